"""The Transformer block: pre-norm residual attention and feed-forward, GPT-2 names.

    x = x + attn(ln_1(x))
    x = x + mlp(ln_2(x))

GPT-2 uses LayerNorm and a GELU MLP; Llama uses RMSNorm, SwiGLU, RoPE and
(in later versions) grouped-query heads. ``Block`` builds either from its
arguments; a model's config dataclass passes them through.
"""

from __future__ import annotations

import numpy as np

from ..module import Module
from .attention import CausalSelfAttention, KVCache
from .mlp import MLP, SwiGLU
from .norm import LayerNorm, RMSNorm

_NORMS = ("layernorm", "rmsnorm")
_MLPS = ("gelu", "swiglu")


class Block(Module):
    """One pre-norm Transformer block: ``ln_1``, ``attn``, ``ln_2``, ``mlp``.

    ``norm`` is "layernorm" (eps 1e-5, with bias when ``bias``) or "rmsnorm"
    (eps 1e-6); ``norm_eps`` overrides the eps. ``mlp`` is "gelu" (GPT-2's
    ``MLP``, hidden ``4 * n_embd``) or "swiglu" (Llama's, hidden
    ``llama_hidden_dim(n_embd, multiple_of)``); ``mlp_hidden_dim`` overrides the
    hidden size. The other arguments go to ``CausalSelfAttention``; ``n_layer``
    scales both residual projections' init, ``generator`` draws every weight.

    ``forward(x, kv_cache=None, offset=None, position_ids=None, mask=None)``: see ``CausalSelfAttention``.
    """

    def __init__(self, n_embd: int, n_head: int, n_kv_head: int | None = None, mlp: str = "gelu",
                 norm: str = "layernorm", rope: bool = False, bias: bool = True, dropout: float = 0.0,
                 n_layer: int | None = None, block_size: int = 1024, rope_base: float = 10000.0,
                 norm_eps: float | None = None, mlp_hidden_dim: int | None = None, multiple_of: int = 256,
                 generator: np.random.Generator | None = None, dtype=np.float32):
        super().__init__()
        if norm not in _NORMS:
            raise ValueError(f"Block: norm must be one of {_NORMS}, got {norm!r}")
        if mlp not in _MLPS:
            raise ValueError(f"Block: mlp must be one of {_MLPS}, got {mlp!r}")
        self.ln_1 = self._norm(norm, n_embd, norm_eps, bias, dtype)
        self.attn = CausalSelfAttention(n_embd, n_head, n_kv_head, bias=bias, dropout=dropout, rope=rope,
                                        rope_base=rope_base, block_size=block_size, n_layer=n_layer,
                                        generator=generator, dtype=dtype)
        self.ln_2 = self._norm(norm, n_embd, norm_eps, bias, dtype)
        if mlp == "gelu":
            self.mlp = MLP(n_embd, mlp_hidden_dim, dropout=dropout, bias=bias, n_layer=n_layer, generator=generator,
                           dtype=dtype)
        else:
            self.mlp = SwiGLU(n_embd, mlp_hidden_dim, multiple_of=multiple_of, bias=bias, dropout=dropout,
                              n_layer=n_layer, generator=generator, dtype=dtype)

    @staticmethod
    def _norm(kind, dim, eps, bias, dtype):
        if kind == "layernorm":
            return LayerNorm(dim, eps=1e-5 if eps is None else eps, bias=bias, dtype=dtype)
        return RMSNorm(dim, eps=1e-6 if eps is None else eps, dtype=dtype)

    def forward(self, x, kv_cache: KVCache | None = None, offset: int | None = None, position_ids=None, mask=None):
        x = x + self.attn(self.ln_1(x), kv_cache=kv_cache, offset=offset, position_ids=position_ids, mask=mask)
        return x + self.mlp(self.ln_2(x))


__all__ = ["Block"]
