"""Model arithmetic from a ``GPTConfig`` alone: parameters, FLOPs per token, compute-optimal data.

    >>> from llm.model import get_preset
    >>> count_parameters(get_preset("gpt2"))
    124439808

Parameters are counted exactly, tensor by tensor, the way ``GPT`` builds them,
so ``count_parameters(config) == GPT(config).num_parameters()`` (a test checks
it on small configs; nothing here builds a model).

FLOPs per token (``flops_per_token``) follow the estimate of the PaLM paper's
appendix B, which nanoGPT's ``estimate_mfu`` uses::

    6 * N  +  12 * n_layer * n_embd * T

- ``6 N``: a weight used in a matrix product costs 2 FLOPs (multiply, add) per
  token in the forward pass and 4 in the backward pass (the gradients of the
  input and of the weight), so 6 per weight per token. ``N`` counts the
  weights that take part in matrix products (``matmul_parameters``): all of
  them except the embedding tables that are only looked up (``wpe`` always,
  ``wte`` when the head is untied; a tied ``wte`` *is* the head's matrix).
  Norm gains and biases are included: they are a rounding error.
- ``12 n_layer n_embd T``: attention's two products with the sequence, Q K^T and
  P V, cost ``2 * T * n_embd`` FLOPs each per token and layer in the forward pass
  (over all heads; grouped-query heads do not reduce them), 3x that with the
  backward pass: ``3 * 2 * 2 * T * n_embd``. The causal mask would let half of it
  be skipped; like PaLM and nanoGPT we count all of it.

Compute-optimal training (Hoffmann et al. 2022, "Chinchilla"): about 20
tokens per parameter, ``D = 20 N``, so the training compute is
``flops_per_token * 20 N``.

``python -m llm size --preset gpt2`` prints these numbers as a table.
"""

from __future__ import annotations

import argparse
import sys

from .model import PRESETS, GPTConfig, get_preset

#: Chinchilla's compute-optimal ratio of training tokens to parameters
CHINCHILLA_TOKENS_PER_PARAMETER = 20


def parameter_breakdown(config: GPTConfig) -> dict[str, int]:
    """Parameter counts by part: ``wte``, ``wpe``, ``attn``, ``mlp``, ``norms``, ``lm_head`` (all layers summed)."""
    c = config
    C, V, L = c.n_embd, c.vocab_size, c.n_layer
    hd, hkv = c.head_dim, c.kv_heads
    bias = 1 if c.bias else 0
    qkv_out = (c.n_head + 2 * hkv) * hd
    attn = C * qkv_out + bias * qkv_out + C * C + bias * C  # c_attn, c_proj
    H = c.hidden_dim
    if c.mlp == "gelu":
        mlp = C * H + bias * H + H * C + bias * C  # c_fc, c_proj
    else:
        mlp = 3 * C * H + bias * (2 * H + C)  # w1, w3 (C -> H), w2 (H -> C)
    norm = norm_parameters(c)
    n_norms = {"pre": 2 * L + 1, "post": 2 * L, "none": 0}[c.norm_placement]  # ln_1, ln_2 per layer (+ ln_f)
    return {
        "wte": V * C,
        "wpe": c.block_size * C if c.pos == "learned" else 0,
        "attn": L * attn,
        "mlp": L * mlp,
        "norms": n_norms * norm,
        "lm_head": 0 if c.tie_embeddings else C * V,
    }


def norm_parameters(config: GPTConfig) -> int:
    """Parameters of one norm layer: the gain (and LayerNorm's bias when ``bias``); 0 with norm_placement "none"."""
    if config.norm_placement == "none":
        return 0
    return config.n_embd * (2 if (config.norm == "layernorm" and config.bias) else 1)


def count_parameters(config: GPTConfig) -> int:
    """The exact number of parameters of ``GPT(config)`` (a tied head counted once)."""
    return sum(parameter_breakdown(config).values())


def non_embedding_parameters(config: GPTConfig) -> int:
    """Parameters without the embedding tables ``wte`` and ``wpe`` (Kaplan et al.'s N)."""
    b = parameter_breakdown(config)
    return count_parameters(config) - b["wte"] - b["wpe"]


def matmul_parameters(config: GPTConfig) -> int:
    """The N of ``6N``: every parameter except tables that are only looked up (wpe; wte when untied)."""
    b = parameter_breakdown(config)
    lookups = b["wpe"] + (0 if config.tie_embeddings else b["wte"])
    return count_parameters(config) - lookups


def flops_per_token(config: GPTConfig, seq_len: int | None = None) -> int:
    """Training FLOPs (forward + backward) per token at sequence length ``seq_len`` (default block_size).

    ``6 * matmul_parameters + 12 * n_layer * n_embd * seq_len`` (PaLM, appendix B;
    see the module docstring). Multiply by tokens per second and divide by the
    hardware's peak FLOP/s for the model FLOPs utilisation (MFU).
    """
    T = config.block_size if seq_len is None else int(seq_len)
    if T < 1:
        raise ValueError(f"flops_per_token: seq_len must be positive, got {seq_len}")
    return 6 * matmul_parameters(config) + 12 * config.n_layer * config.n_embd * T


def forward_flops_per_token(config: GPTConfig, seq_len: int | None = None) -> int:
    """Forward-pass FLOPs per token (one third of ``flops_per_token``): inference cost with a full context."""
    return flops_per_token(config, seq_len) // 3


def compute_optimal_tokens(n_params: int) -> int:
    """Chinchilla's compute-optimal number of training tokens for ``n_params`` parameters: ``20 * n_params``."""
    return CHINCHILLA_TOKENS_PER_PARAMETER * int(n_params)


def summary(config: GPTConfig, seq_len: int | None = None) -> dict:
    """All the numbers of the ``size`` command, as a dict."""
    T = config.block_size if seq_len is None else int(seq_len)
    n = count_parameters(config)
    fpt = flops_per_token(config, T)
    tokens = compute_optimal_tokens(n)
    return {
        "parameters": n,
        "breakdown": parameter_breakdown(config),
        "non_embedding_parameters": non_embedding_parameters(config),
        "matmul_parameters": matmul_parameters(config),
        "seq_len": T,
        "flops_per_token": fpt,
        "compute_optimal_tokens": tokens,
        "compute_optimal_flops": fpt * tokens,
        "weights_bytes_fp32": 4 * n,
        "train_state_bytes_fp32": 16 * n,  # weights, gradients, AdamW's two moments
    }


def _human(x: float, unit: str = "") -> str:
    for div, suffix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f} {suffix}{unit}"
    return f"{x:.0f} {unit}".rstrip()


def format_table(config: GPTConfig, seq_len: int | None = None, name: str | None = None) -> str:
    """A small plain-text table of ``summary(config, seq_len)``."""
    s = summary(config, seq_len)
    b = s["breakdown"]
    c = config
    title = f"{name or 'model'}: n_layer={c.n_layer} n_head={c.n_head} n_kv_head={c.kv_heads} n_embd={c.n_embd} " \
            f"vocab_size={c.vocab_size} block_size={c.block_size} mlp={c.mlp} norm={c.norm} pos={c.pos} " \
            f"tied={c.tie_embeddings}"
    rows = [
        ("parameters", f"{s['parameters']:,}", _human(s["parameters"])),
        ("  wte (token embedding)", f"{b['wte']:,}", ""),
        ("  wpe (position embedding)", f"{b['wpe']:,}", ""),
        ("  attention (all layers)", f"{b['attn']:,}", ""),
        ("  mlp (all layers)", f"{b['mlp']:,}", ""),
        ("  norms", f"{b['norms']:,}", ""),
        ("  lm_head (untied)", f"{b['lm_head']:,}", ""),
        ("non-embedding parameters", f"{s['non_embedding_parameters']:,}", _human(s["non_embedding_parameters"])),
        ("N in 6N (matmul weights)", f"{s['matmul_parameters']:,}", _human(s["matmul_parameters"])),
        (f"training FLOPs/token (T={s['seq_len']})", f"{s['flops_per_token']:,}", _human(s["flops_per_token"], "FLOP")),
        ("compute-optimal tokens (20 N)", f"{s['compute_optimal_tokens']:,}", _human(s["compute_optimal_tokens"])),
        ("compute-optimal training FLOPs", f"{s['compute_optimal_flops']:.3e}",
         _human(s["compute_optimal_flops"], "FLOP")),
        ("fp32 weights", f"{s['weights_bytes_fp32']:,} B", _human(s["weights_bytes_fp32"], "B")),
        ("fp32 training state (16 B/param)", f"{s['train_state_bytes_fp32']:,} B",
         _human(s["train_state_bytes_fp32"], "B")),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [title, ""] + [f"{a:<{w0}}  {b_:>{w1}}  {h}".rstrip() for a, b_, h in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    """``python -m llm size``: print the parameter count, FLOPs per token and compute-optimal budget of a preset."""
    parser = argparse.ArgumentParser(
        prog="python -m llm size",
        description="Count a GPT's parameters and training FLOPs per token (6N + 12 n_layer n_embd T, PaLM's "
                    "estimate) and Chinchilla's compute-optimal token budget (20 N), from the config alone.")
    parser.add_argument("--preset", default="gpt2", choices=list(PRESETS),
                        help="model preset to size (default: gpt2)")
    parser.add_argument("--vocab-size", type=int, default=None, help="override the vocabulary size")
    parser.add_argument("--block-size", type=int, default=None, help="override the context length")
    parser.add_argument("--n-layer", type=int, default=None, help="override the number of Transformer blocks")
    parser.add_argument("--n-head", type=int, default=None, help="override the number of attention heads")
    parser.add_argument("--n-kv-head", type=int, default=None,
                        help="override the number of key/value heads (grouped-query attention)")
    parser.add_argument("--n-embd", type=int, default=None, help="override the embedding width")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="sequence length for the attention FLOPs (default: the block size)")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in dict(vocab_size=args.vocab_size, block_size=args.block_size,
                                       n_layer=args.n_layer, n_head=args.n_head, n_kv_head=args.n_kv_head,
                                       n_embd=args.n_embd).items() if v is not None}
    try:
        config = get_preset(args.preset, **overrides)
        table = format_table(config, args.seq_len, name=args.preset)
    except ValueError as e:
        print(f"python -m llm size: error: {e}", file=sys.stderr)
        return 2
    print(table)
    return 0


__all__ = ["parameter_breakdown", "norm_parameters", "count_parameters", "non_embedding_parameters",
           "matmul_parameters", "flops_per_token", "forward_flops_per_token", "compute_optimal_tokens", "summary", "format_table",
           "main", "CHINCHILLA_TOKENS_PER_PARAMETER"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
