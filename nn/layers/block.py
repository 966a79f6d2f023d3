"""The Transformer block: residual attention and feed-forward, GPT-2 names, three places for the norms.

    "pre"  (GPT-2, Llama)                  "post" (the original Transformer)      "none"
    x = x + attn(ln_1(x))                  x = ln_1(x + attn(x))                  x = x + attn(x)
    x = x + mlp(ln_2(x))                   x = ln_2(x + mlp(x))                   x = x + mlp(x)

Pre-norm leaves the residual stream itself unnormalised: every block adds to
it, and the gradient reaches block 0 through the identity path of each
residual add. Post-norm normalises the stream after every add, so the
gradient passes through 2 x n_layer norm Jacobians on its way down (Xiong et
al. 2020, *On Layer Normalization in the Transformer Architecture*). "none"
has no norm at all, for contrast.

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
#: where a block normalises: at each sub-layer's input, after each residual add, or nowhere
NORM_PLACEMENTS = ("pre", "post", "none")


class Block(Module):
    """One Transformer block: ``ln_1``, ``attn``, ``ln_2``, ``mlp`` (no ``ln_1``/``ln_2`` with placement "none").

    ``norm`` is "layernorm" (eps 1e-5, with bias when ``bias``) or "rmsnorm"
    (eps 1e-6); ``norm_eps`` overrides the eps. ``mlp`` is "gelu" (GPT-2's
    ``MLP``, hidden ``4 * n_embd``) or "swiglu" (Llama's, hidden
    ``llama_hidden_dim(n_embd, multiple_of)``); ``mlp_hidden_dim`` overrides the
    hidden size. The other arguments go to ``CausalSelfAttention``; ``n_layer``
    scales both residual projections' init, ``generator`` draws every weight.
    ``norm_placement`` is "pre" (default), "post" or "none" (see the module docstring).

    ``forward(x, kv_cache=None, offset=None, position_ids=None, mask=None)``: see ``CausalSelfAttention``.
    """

    def __init__(self, n_embd: int, n_head: int, n_kv_head: int | None = None, mlp: str = "gelu",
                 norm: str = "layernorm", rope: bool = False, bias: bool = True, dropout: float = 0.0,
                 n_layer: int | None = None, block_size: int = 1024, rope_base: float = 10000.0,
                 norm_eps: float | None = None, mlp_hidden_dim: int | None = None, multiple_of: int = 256,
                 norm_placement: str = "pre", generator: np.random.Generator | None = None, dtype=np.float32):
        super().__init__()
        if norm not in _NORMS:
            raise ValueError(f"Block: norm must be one of {_NORMS}, got {norm!r}")
        if mlp not in _MLPS:
            raise ValueError(f"Block: mlp must be one of {_MLPS}, got {mlp!r}")
        if norm_placement not in NORM_PLACEMENTS:
            raise ValueError(f"Block: norm_placement must be one of {NORM_PLACEMENTS}, got {norm_placement!r}")
        self.norm_placement = norm_placement
        normed = norm_placement != "none"
        self.ln_1 = self._norm(norm, n_embd, norm_eps, bias, dtype) if normed else None
        self.attn = CausalSelfAttention(n_embd, n_head, n_kv_head, bias=bias, dropout=dropout, rope=rope,
                                        rope_base=rope_base, block_size=block_size, n_layer=n_layer,
                                        generator=generator, dtype=dtype)
        self.ln_2 = self._norm(norm, n_embd, norm_eps, bias, dtype) if normed else None
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
        kw = dict(kv_cache=kv_cache, offset=offset, position_ids=position_ids, mask=mask)
        if self.norm_placement == "pre":
            x = x + self.attn(self.ln_1(x), **kw)
            return x + self.mlp(self.ln_2(x))
        if self.norm_placement == "post":
            x = self.ln_1(x + self.attn(x, **kw))
            return self.ln_2(x + self.mlp(x))
        x = x + self.attn(x, **kw)
        return x + self.mlp(x)

    def extra_repr(self):
        return f"norm_placement={self.norm_placement!r}" if self.norm_placement != "pre" else ""


__all__ = ["Block", "NORM_PLACEMENTS"]
