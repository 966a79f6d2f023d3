"""The GPT: GPT-2's architecture (and a Llama-style variant) on top of ``nn``.

    >>> import numpy as np
    >>> from llm.model import GPT, get_preset
    >>> config = get_preset("tiny", vocab_size=256)
    >>> model = GPT(config, generator=np.random.default_rng(0))
    >>> ids = np.zeros((2, 8), dtype=np.int64)
    >>> logits, loss = model(ids, targets=ids)
    >>> logits.shape
    (2, 8, 256)

The computation, for token ids of shape (B, T) (Radford et al. 2019, nanoGPT)::

    x = wte[ids] + wpe[offset : offset + T]      # (B, T, C); no wpe with RoPE
    x = dropout(x)
    for block in h:                              # pre-norm residual blocks (norm_placement "pre")
        x = x + attn(ln_1(x))
        x = x + mlp(ln_2(x))
    logits = ln_f(x) @ wte.T                     # tied head (B, T, V); untied: lm_head(ln_f(x))

``norm_placement="post"`` is the original Transformer's (and GPT-1's, BERT's)
post-norm: ``x = ln_1(x + attn(x)); x = ln_2(x + mlp(x))``, and no ``ln_f``
(the last block's output is already normalised). ``"none"`` has no norm at all,
in the blocks or before the head: a contrast for gradient studies.

Parameter names are GPT-2's (Hugging Face's without the ``transformer.``
prefix): ``wte.weight``, ``wpe.weight``, ``h.0.ln_1.weight``,
``h.0.attn.c_attn.weight`` (stored ``(in, out)``), ..., ``ln_f.weight``, and
``lm_head.weight`` ``(n_embd, vocab_size)`` only when the head is untied.

Presets are data (``PRESETS``): "gpt2" is exactly GPT-2 small (124,439,808
parameters), "llama" and "llama-tiny" switch on RMSNorm, RoPE, grouped-query
attention, SwiGLU, no biases and an untied head.
"""

from __future__ import annotations

import copy
import dataclasses
import numbers
from dataclasses import dataclass

import numpy as np

import autograd
import nn
from autograd import backend, kernels
from autograd.engine import Function
from autograd.tensor import Tensor

_MLPS = ("gelu", "swiglu")
_NORMS = ("layernorm", "rmsnorm")
_POS = ("learned", "rope")
_PLACEMENTS = nn.NORM_PLACEMENTS  # "pre", "post", "none"

#: SwiGLU hidden sizes are rounded up to a multiple of this (Llama's ``multiple_of``)
SWIGLU_MULTIPLE_OF = 256


# ---------------------------------------------------------------------------
# config and presets
# ---------------------------------------------------------------------------


@dataclass
class GPTConfig:
    """Every number and switch that defines a GPT; ``asdict(config)`` is what checkpoints store.

    ``n_kv_head``: None means ``n_head`` (multi-head attention), 1 is multi-query,
    anything between that divides ``n_head`` is grouped-query attention.
    ``mlp``: "gelu" (GPT-2's 4x MLP with tanh-GELU) or "swiglu" (Llama's).
    ``norm``: "layernorm" (GPT-2) or "rmsnorm" (Llama), with epsilon ``norm_eps``.
    ``norm_placement``: "pre" (GPT-2, Llama: each sub-layer's input, plus ``ln_f``
    before the head), "post" (the original Transformer: after each residual
    add, no ``ln_f``) or "none" (no norm anywhere). Checkpoints from before the
    field existed load as "pre".
    ``pos``: "learned" absolute position embeddings ``wpe`` (GPT-2) or "rope".
    ``tie_embeddings``: the output head reuses ``wte`` (logits = x @ wte.T).
    ``mlp_hidden_dim``: None means ``4 * n_embd`` for "gelu" and Llama's rule
    (2/3 of 4 * n_embd rounded up to a multiple of 256) for "swiglu".
    """

    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None
    n_embd: int = 768
    mlp: str = "gelu"
    norm: str = "layernorm"
    pos: str = "learned"
    tie_embeddings: bool = True
    dropout: float = 0.0
    bias: bool = True
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    mlp_hidden_dim: int | None = None
    norm_placement: str = "pre"

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            _check_positive_int(name, getattr(self, name))
        if self.n_kv_head is not None:
            _check_positive_int("n_kv_head", self.n_kv_head)
        if self.mlp_hidden_dim is not None:
            _check_positive_int("mlp_hidden_dim", self.mlp_hidden_dim)
        for name, choices in (("mlp", _MLPS), ("norm", _NORMS), ("pos", _POS), ("norm_placement", _PLACEMENTS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"GPTConfig.{name} must be one of {choices}, got {getattr(self, name)!r}")
        try:
            nn.check_heads(self.n_embd, self.n_head, self.n_kv_head)  # the one check of the head counts
        except ValueError as e:
            raise ValueError(f"GPTConfig: {e}") from None
        if self.pos == "rope" and self.head_dim % 2:
            raise ValueError(f"GPTConfig: RoPE needs an even head_dim, but n_embd / n_head = {self.head_dim}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
        if not float(self.norm_eps) > 0.0:
            raise ValueError(f"GPTConfig.norm_eps must be positive, got {self.norm_eps}")

    @property
    def head_dim(self) -> int:
        """Channels per attention head: ``n_embd // n_head``."""
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """The number of key/value heads (``n_kv_head``, or ``n_head`` when it is None)."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def hidden_dim(self) -> int:
        """The MLP's hidden width as built: ``mlp_hidden_dim`` or the rule of ``mlp``."""
        if self.mlp_hidden_dim is not None:
            return self.mlp_hidden_dim
        if self.mlp == "gelu":
            return 4 * self.n_embd
        return nn.llama_hidden_dim(self.n_embd, SWIGLU_MULTIPLE_OF)


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")


_LLAMA = dict(mlp="swiglu", norm="rmsnorm", pos="rope", bias=False, tie_embeddings=False)

#: Named configurations. "llama" is the Llama architecture at GPT-2 small's size (and vocabulary);
#: "tiny" and "small" are for CPU experiments (set ``vocab_size`` to the tokenizer's ``n_vocab``).
PRESETS: dict[str, GPTConfig] = {
    "gpt2": GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPTConfig(vocab_size=50257, block_size=1024, n_layer=24, n_head=16, n_embd=1024),
    "llama": GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_kv_head=4, n_embd=768, **_LLAMA),
    "tiny": GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64),
    "small": GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256),
    "llama-tiny": GPTConfig(n_layer=4, n_head=4, n_kv_head=2, n_embd=128, block_size=64, **_LLAMA),
}


def get_preset(name: str, **overrides) -> GPTConfig:
    """A fresh copy of preset ``name`` with ``overrides`` applied, e.g. ``get_preset("tiny", vocab_size=512)``."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; the presets are: {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown GPTConfig field(s) {unknown}; the fields are: {', '.join(sorted(fields))}")
    return dataclasses.replace(PRESETS[name], **overrides)


# ---------------------------------------------------------------------------
# the tied output head, one fused op
# ---------------------------------------------------------------------------


class TiedHead(Function):
    """logits = x @ W^T for x (..., C) and the embedding table W (V, C), as one node.

    With X = x flattened to (N, C) and G = dL/dlogits flattened to (N, V):

        dL/dX = G @ W          (N, C)
        dL/dW = G^T @ X        (V, C): already the table's layout, so the
                               gradient adds to the embedding's own gradient
                               with no transposed copy.

    (``x @ wte.weight.T`` through ``transpose`` and ``matmul`` computes the
    same, but its weight gradient comes back as a transposed (C, V) view that
    the engine must copy, and a 3-D ``x`` would build one (C, V) product per
    batch element before summing them.)
    """

    def forward(self, x, w):
        if w.ndim != 2 or x.shape[-1] != w.shape[1]:
            raise ValueError(f"tied head: activations of shape {x.shape} do not fit an embedding table of shape "
                             f"{w.shape}; the last axis must be n_embd={w.shape[-1]}")
        self.lead = x.shape[:-1]
        self.x2 = x.reshape(-1, w.shape[1])  # (N, C)
        self.w = w
        return kernels.matmul(self.x2, w.T).reshape(*self.lead, w.shape[0])  # (N, V) -> (..., V)

    def backward(self, gy):
        w = self.w
        g2 = gy.reshape(-1, w.shape[0])  # (N, V)
        gx = gw = None
        if self.needs_input_grad[0]:
            gx = kernels.matmul(g2, w).reshape(*self.lead, w.shape[1])  # (N, C) -> (..., C)
        if self.needs_input_grad[1]:
            gw = kernels.matmul(g2.T, self.x2)  # (V, C)
        return gx, gw


def tied_head(x, weight) -> Tensor:
    """``x @ weight.T`` with ``weight`` an embedding table (V, C): the logits of a tied output head."""
    return TiedHead()(x, weight)


# ---------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------


class GPT(nn.Module):
    """A decoder-only Transformer language model built from ``nn`` layers (see the module docstring).

    ``generator`` (a ``numpy.random.Generator``) draws every initial weight, in
    the order wte, wpe, h.0 .. h.{n_layer-1}, lm_head, with GPT-2's scheme
    (N(0, 0.02), residual projections N(0, 0.02 / sqrt(2 n_layer)), zero
    biases, unit norm gains); two models built from equal generators are
    bitwise identical. ``dtype`` is the parameters' dtype (float32; float64 for
    gradient checks).

    Pipeline parallelism cuts the same model into stages (``pipeline_stage``):
    a stage is a GPT that holds a run of blocks, plus the embeddings on the
    first stage and the final norm and head on the last, and runs this same
    ``forward`` on its part. The whole model is the one-stage case.
    """

    def __init__(self, config: GPTConfig, generator: np.random.Generator | None = None, dtype=np.float32):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"GPT needs a GPTConfig, got {type(config).__name__}; e.g. GPT(get_preset('tiny'))")
        self.config = config
        c = config
        self.stage, self.n_stages, self.blocks = 0, 1, range(c.n_layer)
        self.recompute = False  # keep only each block's input in training; recompute the rest in backward
        self.activation_hook = None  # hook(name, x) on "embed" and each "h.i" output (llm.trainer.grad_stats)
        self.wte = nn.Embedding(c.vocab_size, c.n_embd, generator=generator, dtype=dtype)
        if c.pos == "learned":
            self.wpe = nn.Embedding(c.block_size, c.n_embd, generator=generator, dtype=dtype)
        else:
            self.wpe = None
        self.drop = nn.Dropout(c.dropout)
        self.h = nn.ModuleList([
            nn.Block(c.n_embd, c.n_head, c.n_kv_head, mlp=c.mlp, norm=c.norm, rope=c.pos == "rope", bias=c.bias,
                     dropout=c.dropout, n_layer=c.n_layer, block_size=c.block_size, rope_base=c.rope_base,
                     norm_eps=c.norm_eps, mlp_hidden_dim=c.hidden_dim, multiple_of=SWIGLU_MULTIPLE_OF,
                     norm_placement=c.norm_placement, generator=generator, dtype=dtype)
            for _ in range(c.n_layer)
        ])
        if c.norm_placement != "pre":
            self.ln_f = None  # post-norm: the last block's output is normalised already; "none": no norms at all
        elif c.norm == "layernorm":
            self.ln_f = nn.LayerNorm(c.n_embd, eps=c.norm_eps, bias=c.bias, dtype=dtype)
        else:
            self.ln_f = nn.RMSNorm(c.n_embd, eps=c.norm_eps, dtype=dtype)
        if c.tie_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False, generator=generator, dtype=dtype)

    # -- pipeline stages -----------------------------------------------------
    @property
    def is_first(self) -> bool:
        """Whether this (part of the) model takes token ids: it holds the embeddings."""
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        """Whether this (part of the) model makes the logits: it holds the final norm and the head."""
        return self.stage == self.n_stages - 1

    def pipeline_stage(self, stage: int, layout) -> "GPT":
        """Stage ``stage`` of a pipeline whose stages hold the blocks in ``layout`` (``[range, ...]``).

        The stage shares this model's modules: the embeddings ``wte``, ``wpe``,
        ``drop`` on the first stage, its blocks (``h``, keyed by block index, so
        parameter names stay ``h.3.attn...``), and ``ln_f`` and the head on the
        last. Tied embeddings: the head multiplies by ``wte``, which the first
        stage needs for the lookup and the last for the logits; as in
        Megatron-LM the last stage keeps its own copy of ``wte.weight``, equal
        at the start, whose gradient the pipeline sums with the first stage's
        after each backward (``tied_weight``), so both take the same steps.
        """
        layout = [range(r.start, r.stop) for r in layout]
        if not 0 <= stage < len(layout):
            raise ValueError(f"stage {stage} does not exist in a pipeline of {len(layout)} stages")
        if [i for r in layout for i in r] != list(range(self.config.n_layer)) or any(len(r) == 0 for r in layout):
            raise ValueError(f"the stage layout {layout} must cover blocks 0..{self.config.n_layer - 1} exactly once, "
                             "in order, with at least one block per stage")
        part = GPT.__new__(GPT)
        nn.Module.__init__(part)
        part.config = self.config
        part.stage, part.n_stages, part.blocks = stage, len(layout), layout[stage]
        tied = self.config.tie_embeddings
        part.wte = self.wte if part.is_first else copy.deepcopy(self.wte) if part.is_last and tied else None
        part.wpe = self.wpe if part.is_first else None
        part.drop = self.drop if part.is_first else None
        part.h = nn.ModuleDict({str(i): self.h[i] for i in part.blocks})
        part.ln_f = self.ln_f if part.is_last else None
        part.lm_head = self.lm_head if part.is_last else None
        part.training = self.training
        part.recompute = self.recompute
        part.activation_hook = None
        return part

    @property
    def tied_weight(self):
        """``(name, Parameter)`` of the weight the first and the last stage both hold (tied ``wte``), else None."""
        if not self.config.tie_embeddings or self.n_stages == 1 or not (self.is_first or self.is_last):
            return None
        return "wte.weight", self.wte.weight

    @property
    def holds_tied_copy(self) -> bool:
        """True on the last stage of a multi-stage pipeline with tied embeddings: its ``wte`` is the head's copy."""
        return self.config.tie_embeddings and self.is_last and not self.is_first

    def activation_shape(self, ids_shape) -> tuple:
        """The shape of the activation between stages for token ids of shape ``(B, T)``: ``(B, T, n_embd)``."""
        return (int(ids_shape[0]), int(ids_shape[1]), self.config.n_embd)

    @property
    def activation_dtype(self):
        """The dtype of the activations this stage receives and sends (that of its parameters)."""
        return next(iter(self.parameters())).dtype

    def _blocks(self):
        """This (part of the) model's blocks, in order."""
        return list(self.h) if isinstance(self.h, nn.ModuleList) else list(self.h.values())

    # -- helpers -------------------------------------------------------------
    @property
    def device(self) -> str:
        """"cpu" or "cuda": where the parameters live."""
        return next(iter(self.parameters())).device

    def _as_ids(self, ids, what: str):
        """Integer ids as an array on the parameters' device (from an array, a Tensor or nested lists)."""
        if isinstance(ids, Tensor):
            ids = ids.data
        if not backend.is_array(ids):
            ids = np.asarray(ids)
        if ids.dtype.kind not in "iu":
            raise TypeError(f"GPT: {what} must be integer token ids, got dtype {ids.dtype}; "
                            "e.g. np.asarray(ids, dtype=np.int64)")
        return backend.to_device(ids, self.device)

    def _check_position_ids(self, position_ids, B: int, T: int):
        """``position_ids`` as an integer array (B, T) on the parameters' device, every value in [0, block_size)."""
        position_ids = self._as_ids(position_ids, "position_ids")
        if position_ids.shape != (B, T):
            raise ValueError(f"GPT: position_ids of shape {position_ids.shape} must match ids of shape {(B, T)}")
        lo, hi = int(position_ids.min()), int(position_ids.max())
        if lo < 0 or hi >= self.config.block_size:
            raise ValueError(f"GPT: position_ids must lie in [0, block_size={self.config.block_size}), got "
                             f"{lo} .. {hi}; crop the context to the last {self.config.block_size} tokens")
        return position_ids

    def resize_token_embeddings(self, vocab_size: int) -> "GPT":
        """Grow the vocabulary to ``vocab_size`` tokens (new special tokens); returns self.

        ``wte`` gets new rows and an untied ``lm_head`` new columns, each set to
        the mean of the existing rows (columns): a new token starts as an average
        token, so its logit is moderate instead of random. Every existing weight
        keeps its bits; ``config.vocab_size`` becomes ``vocab_size`` (checkpoints
        record it). Shrinking is refused: it would drop trained tokens. Call it on
        the whole model, before training or cutting it into pipeline stages.
        """
        c = self.config
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral) or vocab_size < c.vocab_size:
            raise ValueError(f"resize_token_embeddings: the new vocabulary size must be an integer >= the current "
                             f"{c.vocab_size}, got {vocab_size!r}")
        if self.n_stages != 1:
            raise ValueError("resize_token_embeddings works on the whole model, not a pipeline stage")
        extra = int(vocab_size) - c.vocab_size
        if extra == 0:
            return self
        xp = backend.get_array_module(self.wte.weight.data)

        def grown(w, axis):
            mean = w.mean(axis=axis, keepdims=True, dtype=np.float64).astype(w.dtype)  # (1, C) or (C, 1)
            reps = (extra, 1) if axis == 0 else (1, extra)
            return xp.concatenate([w, xp.tile(mean, reps)], axis=axis)

        old = self.wte.weight
        self.wte.weight = nn.Parameter(grown(old.data, 0), requires_grad=old.requires_grad,
                                       no_decay=old.no_decay)  # (V', C)
        self.wte.num_embeddings = int(vocab_size)
        if self.lm_head is not None:
            head = self.lm_head.weight
            self.lm_head.weight = nn.Parameter(grown(head.data, 1), requires_grad=head.requires_grad,
                                               no_decay=head.no_decay)  # (C, V')
            self.lm_head.out_features = int(vocab_size)
        self.config = dataclasses.replace(c, vocab_size=int(vocab_size))
        return self

    def new_kv_caches(self, max_len: int | None = None) -> list:
        """One empty ``nn.KVCache`` per layer, each holding up to ``max_len`` positions (default: block_size)."""
        max_len = self.config.block_size if max_len is None else max_len
        return [nn.KVCache(max_len) for _ in range(self.config.n_layer)]

    # -- forward -------------------------------------------------------------
    def forward(self, ids, targets=None, kv_caches=None, last_only: bool = False, position_ids=None,
                attention_mask=None):
        """Logits ``(B, T, V)`` for token ids ``(B, T)``, and the mean cross-entropy against ``targets``.

        ``targets`` (B, T): the next token at each position, ``-100`` where no
        loss is wanted; the loss is None without targets. ``kv_caches`` (from
        ``new_kv_caches``): the new tokens sit at positions
        ``kv_caches[0].offset ..`` and attend to every cached one.
        ``last_only=True`` computes the logits of the last position only
        ``(B, 1, V)``, all that sampling needs (not allowed with targets).

        Rows of different lengths (inference on left-padded batches, packed
        sequences): ``position_ids`` (B, T) gives each token its own position
        (``0 <= p < block_size``; default: the cache offset onwards, the same
        for every row), and ``attention_mask``, boolean of shape
        ``(B | 1, 1, T | 1, S)`` with ``S`` = cached + T keys, says which keys
        each query may attend (True), on top of causality: key padding is
        ``keep[:, None, None, :]``. A query that may attend nothing gets zeros.

        ``activation_hook`` (an attribute, None by default): when set, it is
        called as ``hook(name, x)`` with the embeddings' output (``"embed"``)
        and each block's output (``"h.3"``), the Tensors of the forward;
        ``--grad-stats`` reads their RMS through it.

        A pipeline stage (``pipeline_stage``) runs its part: a stage after the
        first takes the previous stage's activation ``(B, T, C)`` (a Tensor)
        instead of ids (with the same ``position_ids`` and ``attention_mask``),
        and a stage before the last returns its activation.
        """
        c = self.config
        offset = 0
        if kv_caches is not None:
            if len(kv_caches) != c.n_layer or self.n_stages > 1:
                raise ValueError(f"GPT: got {len(kv_caches)} KV caches for {c.n_layer} layers; "
                                 "use model.new_kv_caches() (on the whole model)")
            offset = kv_caches[0].offset
        if last_only and targets is not None:
            raise ValueError("GPT: last_only=True gives no logits for most targets; use it only to sample")
        if attention_mask is not None and getattr(attention_mask, "ndim", None) != 4:
            raise ValueError(f"GPT: attention_mask must be 4-D (B, 1, T, S), got shape "
                             f"{getattr(attention_mask, 'shape', None)}; for key padding pass keep[:, None, None, :]")
        if self.is_first:
            ids = self._as_ids(ids, "ids")
            if ids.ndim != 2:
                raise ValueError(f"GPT: ids must have shape (B, T), got {ids.shape}; for one sequence use ids[None]")
            B, T = ids.shape
            if T == 0:
                raise ValueError("GPT: ids has no positions (T == 0); pass at least one token")
            if offset + T > c.block_size:
                raise ValueError(f"GPT: {offset} cached + {T} new positions = {offset + T} exceed block_size="
                                 f"{c.block_size}; crop the context to the last {c.block_size} tokens")
            if position_ids is not None:
                position_ids = self._check_position_ids(position_ids, B, T)
            x = self.wte(ids)  # (B, T, C)
            if self.wpe is not None:
                if position_ids is None:
                    x = x + self.wpe.weight[offset:offset + T]  # (T, C) broadcast over B: rows offset .. offset+T-1
                else:
                    x = x + self.wpe(position_ids)  # (B, T, C)
            x = self.drop(x)
            if self.activation_hook is not None:
                self.activation_hook("embed", x)
        elif not isinstance(ids, Tensor):
            raise TypeError(f"stage {self.stage} of the pipeline takes the previous stage's activation as a Tensor "
                            f"(B, T, C), got {type(ids).__name__}")
        else:
            x = ids
            if position_ids is not None:
                position_ids = self._check_position_ids(position_ids, x.shape[0], x.shape[1])
        for i, block in zip(self.blocks, self._blocks()):
            if self.recompute and self.training and kv_caches is None:
                # only x is kept: the block runs again in backward
                x = nn.recompute(lambda h, block=block: block(h, position_ids=position_ids, mask=attention_mask), x)
            else:
                x = block(x, kv_cache=None if kv_caches is None else kv_caches[i], position_ids=position_ids,
                          mask=attention_mask)
            if self.activation_hook is not None:
                self.activation_hook(f"h.{i}", x)
        if not self.is_last:
            return x
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        if self.ln_f is not None:
            x = self.ln_f(x)
        logits = tied_head(x, self.wte.weight) if self.lm_head is None else self.lm_head(x)  # (B, T, V)

        loss = None
        if targets is not None:
            B, T, V = logits.shape
            targets = self._as_ids(targets, "targets")
            if targets.shape != (B, T):
                raise ValueError(f"GPT: targets of shape {targets.shape} must match ids of shape {(B, T)}")
            loss = autograd.cross_entropy(logits.reshape(B * T, V),  # (B*T, V)
                                          targets.reshape(B * T),  # (B*T,)
                                          ignore_index=-100)
        return logits, loss

    def extra_repr(self):
        c = self.config
        where = "" if self.n_stages == 1 else f", stage {self.stage} of {self.n_stages} (blocks {self.blocks.start}.." \
                                               f"{self.blocks.stop - 1})"
        return (f"n_layer={c.n_layer}, n_head={c.n_head}, n_embd={c.n_embd}, vocab_size={c.vocab_size}, "
                f"block_size={c.block_size}, tied={c.tie_embeddings}"
                + (f", norm_placement={c.norm_placement!r}" if c.norm_placement != "pre" else "") + where)


__all__ = ["GPTConfig", "PRESETS", "get_preset", "GPT", "TiedHead", "tied_head", "SWIGLU_MULTIPLE_OF"]
