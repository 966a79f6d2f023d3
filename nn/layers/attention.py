"""Causal self-attention (GPT-2 names, optional grouped-query heads and RoPE) and its KV cache.

``CausalSelfAttention`` projects x to q, k, v with one fused ``c_attn``
(output width ``(n_head + 2 * n_kv_head) * head_dim``, laid out as
``[q | k | v]``, which is GPT-2's ``c_attn`` when ``n_kv_head == n_head``),
runs the fused attention op of ``nn.functional.attention`` and projects back
with ``c_proj``, a residual projection initialised N(0, 0.02 / sqrt(2 n_layer)).

``KVCache`` keeps the keys and values of positions already processed, so that
generation feeds one new token per step instead of the whole prefix, and gives
the same outputs as recomputing the whole sequence.
"""

from __future__ import annotations

import numbers

import numpy as np

from autograd import backend
from autograd.backend import get_array_module
from autograd.engine import Function, is_grad_enabled
from autograd.ops.shape import concatenate
from autograd.tensor import Tensor

from .. import init
from ..functional.attention import scaled_dot_product_attention
from ..functional.rope import apply_rotary, rope_tables
from ..module import Module
from .basic import Dropout, Linear


class KVCache:
    """The keys and values one attention layer has seen, for incremental (token-by-token) decoding.

    Holds two arrays of shape ``(B, n_kv_head, capacity, head_dim)``, allocated
    at the first ``update`` in the dtype and on the device of the keys, and
    ``offset``, the number of positions cached so far (the absolute position of
    the next token, which RoPE uses). With ``max_len`` the arrays are allocated
    once at that length and going past it is an error; without it they grow by
    doubling. Keep one cache per layer: ``[KVCache(block_size) for _ in range(n_layer)]``.

    The cache stores plain arrays (it is for inference): cached positions get no
    gradient, while the keys and values of the current call still do.
    """

    def __init__(self, max_len: int | None = None):
        if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, numbers.Integral)
                                    or max_len < 1):
            raise ValueError(f"KVCache: max_len must be a positive integer or None (grow as needed), got {max_len!r}")
        self.max_len = None if max_len is None else int(max_len)
        self.k = self.v = None  # (B, Hkv, capacity, D) arrays
        self.offset = 0

    def reset(self):
        """Forget every cached position (the arrays are kept and reused)."""
        self.offset = 0

    def __len__(self):
        return self.offset

    def _ensure(self, k, needed):
        """Allocate or grow the arrays so that ``needed`` positions fit."""
        B, Hkv, _, D = k.shape
        if self.k is not None:
            have = (self.k.shape[0], self.k.shape[1], self.k.shape[3])
            if have != (B, Hkv, D) or self.k.dtype != k.dtype or backend.device_of(self.k) != k.device:
                if self.offset:
                    raise ValueError(f"KVCache holds keys of batch {have[0]}, {have[1]} kv heads, head_dim {have[2]} "
                                     f"({self.k.dtype}, {backend.device_of(self.k)}), but got {tuple(k.shape)} "
                                     f"({k.dtype}, {k.device}); call reset() or use a new cache for a new batch")
                self.k = self.v = None  # empty cache: reallocate for the new shape
        if self.max_len is not None and needed > self.max_len:
            raise ValueError(f"KVCache is full: {self.offset} cached + {needed - self.offset} new positions exceed "
                             f"max_len={self.max_len}; make the cache longer or crop the context")
        capacity = 0 if self.k is None else self.k.shape[2]
        if needed <= capacity:
            return
        new_cap = self.max_len if self.max_len is not None else max(needed, 2 * capacity)
        xp = get_array_module(k.data)
        new_k = xp.zeros((B, Hkv, new_cap, D), dtype=k.dtype)  # (B, Hkv, capacity, D)
        new_v = xp.zeros((B, Hkv, new_cap, D), dtype=k.dtype)
        if self.offset:
            new_k[:, :, :self.offset] = self.k[:, :, :self.offset]
            new_v[:, :, :self.offset] = self.v[:, :, :self.offset]
        self.k, self.v = new_k, new_v

    def update(self, k: Tensor, v: Tensor):
        """Append ``k``, ``v`` of shape ``(B, Hkv, T, D)``; return all keys and values ``(B, Hkv, offset + T, D)``.

        ``offset`` advances by T. Under ``no_grad`` (generation) the result is a
        view of the cache, no copy; when the new keys need a gradient, the
        cached part is a constant concatenated in front of them.
        """
        if k.shape != v.shape or k.ndim != 4:
            raise ValueError(f"KVCache.update needs k and v of one shape (B, Hkv, T, D), got {k.shape} and {v.shape}")
        start = self.offset
        end = start + k.shape[2]
        self._ensure(k, end)
        self.k[:, :, start:end] = k.data
        self.v[:, :, start:end] = v.data
        self.offset = end
        if is_grad_enabled() and (k.requires_grad or v.requires_grad):
            if start == 0:
                return k, v
            past_k = Tensor(self.k[:, :, :start].copy())  # (B, Hkv, start, D): constants
            past_v = Tensor(self.v[:, :, :start].copy())
            return concatenate([past_k, k], axis=2), concatenate([past_v, v], axis=2)
        return Tensor(self.k[:, :, :end]), Tensor(self.v[:, :, :end])  # (B, Hkv, end, D) views


class SplitHeads(Function):
    """q, k, v of shapes (B, H, T, hd), (B, Hkv, T, hd), (B, Hkv, T, hd): views of the fused projection.

    ``qkv`` is (B, T, (H + 2 Hkv) hd), laid out ``[q | k | v]`` along its last
    axis, each part ``heads x hd``. Forward only reshapes and transposes (no
    copy). Backward puts each gradient back where its part came from:
    ``dqkv = [dq | dk | dv]`` with every (B, heads, T, hd) gradient transposed
    back to (B, T, heads, hd), written into one fresh array. (The same as
    ``split`` followed by three ``reshape`` and three ``transpose`` nodes, in one
    node instead of seven: a generation step runs it once per layer.)
    """

    def __init__(self, n_head: int, n_kv_head: int, head_dim: int):
        self.H, self.Hkv, self.hd = n_head, n_kv_head, head_dim

    def forward(self, qkv):
        B, T, W = qkv.shape
        H, Hkv, hd = self.H, self.Hkv, self.hd
        if W != (H + 2 * Hkv) * hd:
            raise ValueError(f"split_heads: the last axis of qkv is {W}, not (n_head + 2 n_kv_head) head_dim = "
                             f"({H} + 2 * {Hkv}) * {hd}")
        heads = qkv.reshape(B, T, H + 2 * Hkv, hd)  # (B, T, H + 2 Hkv, hd)
        return (heads[:, :, :H].transpose(0, 2, 1, 3),  # (B, H, T, hd)
                heads[:, :, H:H + Hkv].transpose(0, 2, 1, 3),  # (B, Hkv, T, hd)
                heads[:, :, H + Hkv:].transpose(0, 2, 1, 3))  # (B, Hkv, T, hd)

    def backward(self, gq, gk, gv):
        xp = get_array_module(gq)
        B, H, T, hd = gq.shape
        Hkv = self.Hkv
        g = xp.empty((B, T, H + 2 * Hkv, hd), dtype=np.result_type(gq, gk, gv))  # (B, T, H + 2 Hkv, hd)
        g[:, :, :H] = gq.transpose(0, 2, 1, 3)  # (B, T, H, hd)
        g[:, :, H:H + Hkv] = gk.transpose(0, 2, 1, 3)  # (B, T, Hkv, hd)
        g[:, :, H + Hkv:] = gv.transpose(0, 2, 1, 3)
        return g.reshape(B, T, (H + 2 * Hkv) * hd)  # (B, T, (H + 2 Hkv) hd)


class MergeHeads(Function):
    """y (B, H, T, hd) -> (B, T, H hd): the heads side by side again; backward is the inverse view.

    Free when y's memory is laid out (B, T, H, hd), as the attention op's output is.
    """

    def forward(self, y):
        B, H, T, hd = self.shape = y.shape
        return y.transpose(0, 2, 1, 3).reshape(B, T, H * hd)  # (B, T, H, hd) -> (B, T, H hd)

    def backward(self, gy):
        B, H, T, hd = self.shape
        return gy.reshape(B, T, H, hd).transpose(0, 2, 1, 3)  # (B, T, H, hd) -> (B, H, T, hd)


def check_heads(n_embd: int, n_head: int, n_kv_head: int | None):
    """Validate the head counts; return ``(head_dim, n_kv_head)`` or raise a ValueError naming the numbers."""
    for name, val in (("n_embd", n_embd), ("n_head", n_head)):
        if isinstance(val, bool) or not isinstance(val, numbers.Integral) or val < 1:
            raise ValueError(f"attention: {name} must be a positive integer, got {val!r}")
    if n_kv_head is None:
        n_kv_head = n_head
    if isinstance(n_kv_head, bool) or not isinstance(n_kv_head, numbers.Integral) or n_kv_head < 1:
        raise ValueError(f"attention: n_kv_head must be a positive integer (or None for n_head), got {n_kv_head!r}")
    if n_embd % n_head:
        raise ValueError(f"n_embd={n_embd} is not divisible by n_head={n_head}; each head gets n_embd / n_head "
                         f"channels, so pick n_head (--n-head) among the divisors of {n_embd}")
    if n_head % n_kv_head:
        raise ValueError(f"n_head={n_head} is not divisible by n_kv_head={n_kv_head}; each kv head must serve the "
                         f"same number of query heads: set n_kv_head (--n-kv-head) to a divisor of {n_head} "
                         "(n_head for multi-head attention, 1 for multi-query)")
    return n_embd // n_head, int(n_kv_head)


class CausalSelfAttention(Module):
    """Multi-head causal self-attention with grouped-query heads (``n_kv_head``) and optional RoPE.

    ``forward(x, kv_cache=None, offset=None, position_ids=None, mask=None)``
    maps ``(B, T, n_embd)`` to ``(B, T, n_embd)``. With a ``KVCache`` the keys
    of earlier calls are attended too, and the new tokens sit at positions
    ``kv_cache.offset ..``; ``offset`` gives the first position when there is
    no cache (RoPE only). ``position_ids`` ``(B, T)`` gives every row its own
    positions instead (RoPE only; e.g. left-padded rows), and ``mask`` (boolean,
    broadcastable to ``(B, 1, T, S)``, True = may attend) restricts the keys
    further than causality (see ``nn.functional.attention``).
    ``dropout`` applies to the attention probabilities and to the output
    (nanoGPT's attn_dropout and resid_dropout), in training mode only.
    ``block_size`` sizes the precomputed RoPE tables (longer sequences compute
    theirs on the fly). ``n_layer`` sets ``c_proj``'s init std to
    0.02 / sqrt(2 n_layer).
    """

    def __init__(self, n_embd: int, n_head: int, n_kv_head: int | None = None, bias: bool = True,
                 dropout: float = 0.0, rope: bool = False, rope_base: float = 10000.0, block_size: int = 1024,
                 n_layer: int | None = None, generator: np.random.Generator | None = None, dtype=np.float32):
        super().__init__()
        head_dim, n_kv_head = check_heads(n_embd, n_head, n_kv_head)
        if rope and head_dim % 2:
            raise ValueError(f"attention: RoPE rotates pairs of channels, so head_dim = n_embd / n_head = "
                             f"{n_embd} / {n_head} = {head_dim} must be even")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"attention: dropout must be in [0, 1), got {dropout}")
        self.n_embd, self.n_head, self.n_kv_head, self.head_dim = int(n_embd), int(n_head), n_kv_head, head_dim
        self.dropout, self.rope, self.rope_base, self.block_size = float(dropout), bool(rope), float(rope_base), \
            int(block_size)
        proj_std = init.GPT2_STD if n_layer is None else init.residual_std(n_layer)
        self.c_attn = Linear(n_embd, (n_head + 2 * n_kv_head) * head_dim, bias=bias, generator=generator, dtype=dtype)
        self.c_proj = Linear(n_embd, n_embd, bias=bias, generator=generator, init_std=proj_std, dtype=dtype)
        self.resid_dropout = Dropout(dropout)
        self._rope_cache = {}  # (array-library name, dtype) -> (cos, sin) for positions 0 .. block_size-1

    def _rope_tables(self, xp, dtype, start, length):
        """cos, sin of shape (length, head_dim / 2) for positions start .. start + length - 1."""
        dtype = np.dtype(np.float32) if dtype == np.float16 else np.dtype(dtype)
        if start + length > self.block_size:
            return rope_tables(self.head_dim, length, base=self.rope_base, dtype=dtype, offset=start, xp=xp)
        key = (xp.__name__, dtype.str)
        if key not in self._rope_cache:
            self._rope_cache[key] = rope_tables(self.head_dim, self.block_size, base=self.rope_base, dtype=dtype,
                                                xp=xp)
        cos, sin = self._rope_cache[key]
        return cos[start:start + length], sin[start:start + length]

    def _rope_rows(self, xp, dtype, position_ids):
        """cos, sin of shape (B, 1, T, head_dim / 2) for per-row positions ``position_ids`` (B, T)."""
        if int(position_ids.max()) < self.block_size:
            cos, sin = self._rope_tables(xp, dtype, 0, self.block_size)  # (block_size, hd / 2)
            return cos[position_ids][:, None], sin[position_ids][:, None]  # (B, 1, T, hd / 2)
        dtype = np.dtype(np.float32) if dtype == np.float16 else np.dtype(dtype)
        cos, sin = rope_tables(self.head_dim, position_ids.reshape(-1), base=self.rope_base, dtype=dtype, xp=xp)
        B, T = position_ids.shape
        return cos.reshape(B, 1, T, -1), sin.reshape(B, 1, T, -1)  # (B*T, hd / 2) -> (B, 1, T, hd / 2)

    def forward(self, x, kv_cache: KVCache | None = None, offset: int | None = None, position_ids=None, mask=None):
        if x.ndim != 3 or x.shape[-1] != self.n_embd:
            raise ValueError(f"CausalSelfAttention expects x of shape (B, T, n_embd={self.n_embd}), got {x.shape}")
        if kv_cache is not None:
            if offset is not None and offset != kv_cache.offset:
                raise ValueError(f"CausalSelfAttention: offset={offset} disagrees with the cache's offset "
                                 f"{kv_cache.offset}; leave offset=None when passing kv_cache")
            start = kv_cache.offset
        else:
            start = 0 if offset is None else int(offset)
        B, T, C = x.shape
        H, Hkv, hd = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.c_attn(x)  # (B, T, (H + 2 Hkv) * hd)
        q, k, v = SplitHeads(H, Hkv, hd)(qkv)  # (B, H, T, hd), (B, Hkv, T, hd), (B, Hkv, T, hd)
        if self.rope:
            if position_ids is None:
                cos, sin = self._rope_tables(get_array_module(x.data), x.dtype, start, T)  # (T, hd / 2)
            else:
                cos, sin = self._rope_rows(get_array_module(x.data), x.dtype, position_ids)  # (B, 1, T, hd / 2)
            q = apply_rotary(q, cos, sin)
            k = apply_rotary(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)  # (B, Hkv, S, hd), S = cached + T
        y = scaled_dot_product_attention(q, k, v, causal=True, dropout_p=self.dropout, training=self.training,
                                         mask=mask)
        y = MergeHeads()(y)  # (B, H, T, hd) -> (B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def extra_repr(self):
        return (f"n_embd={self.n_embd}, n_head={self.n_head}, n_kv_head={self.n_kv_head}, rope={self.rope}, "
                f"dropout={self.dropout}")


__all__ = ["CausalSelfAttention", "KVCache", "check_heads"]
