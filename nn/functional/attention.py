"""Causal scaled-dot-product attention as one fused op, for multi-head, grouped-query and multi-query heads.

Shapes: q is ``(B, H, T, D)``; k and v are ``(B, Hkv, S, D)`` with ``H`` a
multiple of ``Hkv``. Query head ``h`` reads kv head ``h // G`` with
``G = H // Hkv`` (so heads ``0 .. G-1`` share kv head 0: the order of
Llama's ``repeat_kv``). ``Hkv == H`` is ordinary multi-head attention,
``Hkv == 1`` multi-query attention (MQA), anything between grouped-query
attention (GQA).

The kv heads are never copied G times: q is reshaped to ``(B, Hkv, G*T, D)``,
stacking the G query heads of one kv head along the row axis, so every
product is one batched matmul against the un-repeated k or v, and in backward
the sum over the G heads that share a kv head happens inside the matmul.

Causality with a KV cache: when ``S > T`` the keys hold ``S - T`` cached past
positions followed by the T current ones, so query i sits at absolute
position ``(S - T) + i`` and may attend keys ``j <= i + (S - T)``.

An attention ``mask`` (boolean, broadcastable to ``(B, 1, T, S)``, True = may
attend) is combined with the causal rule: a query attends key j only where
both allow it. Key padding is ``mask[:, None, None, :]`` (left-padded batched
generation with a KV cache); packed sequences use a block-diagonal mask
``seg[:, None, :, None] == seg[:, None, None, :]`` (with ``causal=True``).
A query row that may attend to no key at all gets a zero output and zero
gradients (not the NaN of a softmax over nothing).

Memory: forward saves q, k, v (held by the graph anyway) and the softmax
probabilities P, ``B * H * T * S`` numbers (on the CPU only its causal blocks,
about half of that: see ``ScaledDotProductAttention``), so backward needs no
recomputation of ``Q K^T``. The alternative, FlashAttention's, saves only the
logsumexp per row (``B * H * T`` numbers) and recomputes P in backward: one
more matmul for O(T) instead of O(T * S) memory. At the sizes this CPU/CuPy
stack trains, keeping P is simpler and faster.

Layout: the output (and dQ, dK, dV in backward) are written into memory laid
out as ``(B, T, heads, D)`` and returned as ``(B, heads, T, D)`` views, so the
caller's ``transpose(0, 2, 1, 3).reshape(B, T, C)`` back into the residual
stream is free instead of a copy.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from autograd import backend, kernels
from autograd.backend import accumulation_dtype, get_array_module, sum_rows_of
from autograd.engine import Function
from autograd.tensor import Tensor, as_tensor


_compute_dtype = accumulation_dtype  # half precision: softmax needs float32's range and digits


def causal_mask_bias(xp, T: int, S: int, dtype):
    """The additive causal mask, shape ``(T, S)``: 0 where key j <= i + (S - T), -inf above (a future key)."""
    return xp.triu(xp.full((T, S), -np.inf, dtype=dtype), k=S - T + 1)


#: query rows per block of causal attention on the CPU (see ``ScaledDotProductAttention``)
BLOCK_ROWS = 64


def _row_blocks(xp, T: int, S: int, causal: bool):
    """``(r0, r1, end)`` per block of query rows: rows ``r0:r1`` attend to keys ``0:end``.

    Causal: query i (absolute position ``S - T + i``) sees keys ``j <= S - T + i``, so a block
    of rows ending at r1 needs only the first ``S - T + r1`` keys. On the GPU one block (every
    extra block is more kernel launches: ``kernels.pieces``); not causal: one block with every key.
    """
    rows = kernels.pieces(xp, T, BLOCK_ROWS) if causal else (slice(0, T),)
    return [(r.start, r.stop, S - T + r.stop if causal else S) for r in rows]


#: scores per piece of CPU attention work (B * H * T * S summed over its batch elements): about a core's L2
PIECE_SCORES = 1 << 17


def _head_pieces(xp, B: int, H: int, Hkv: int, T: int, S: int):
    """``(batch slice, kv-head slice)`` per piece of work for the CPU threads (``kernels.grid_pieces``).

    A piece is a run of batch elements with about ``PIECE_SCORES`` scores
    (fewer pieces pay the threads' hand-offs less often), or one (batch
    element, kv head) pair when runs would give too few pieces to share.
    Shape-only; every (batch, head) is computed by the same products in any
    grouping. CuPy: one piece.
    """
    return kernels.grid_pieces(xp, B, Hkv, H * T * S, PIECE_SCORES)


class ScaledDotProductAttention(Function):
    """O = softmax(Q K^T * scale + mask) V per head, with kv heads shared by G = H / Hkv query heads.

    Forward, per head (rows i = queries, columns j = keys):
        S = Q K^T * scale,  S_ij = -inf for masked (future) j,
        P = softmax_j(S),   O = P V.
    Softmax is computed in float32 for float16 inputs; P is saved (see the module doc).

    Backward, with dO = dL/dO:
        dV = P^T dO                                 (O is linear in V)
        dP = dO V^T                                 (O is linear in P)
        dS = P * (dP - rowsum(dP * P))              (the softmax Jacobian, row by row)
        dQ = dS K * scale,  dK = dS^T Q * scale     (S is bilinear in Q and K)
    Masked entries (future keys, or False in ``mask``: S_ij = -inf) have
    P = 0 and so get dS = 0; a row with every entry masked has P = 0 (its
    softmax is defined as zero), so O = 0 there and it passes no gradient.
    A kv head used by G query
    heads receives the sum of their dK, dV; with the G heads stacked along the
    row axis, ``dS^T Q`` and ``P^T dO`` compute that sum in the matmul itself.

    Causal blocks (CPU): the query rows are processed in blocks of
    ``BLOCK_ROWS``, and a block attends only to the keys up to its last row
    (``_row_blocks``): the entries above the diagonal blocks, all masked, are
    never computed. With four blocks that skips 3/8 of the products and of
    the softmax work; each block's P is small enough to stay in the cache
    between the product that makes it and the softmax that normalises it. Row
    blocks are independent in forward (each row's softmax sees its whole row);
    in backward dQ is per block and dK, dV add up the blocks' contributions.

    CPU threads: the work is cut into runs of batch elements (or single
    (batch, kv head) pairs, ``_head_pieces``), each running every block of
    its own heads, so each piece writes only its own part of O, P, dQ, dK, dV.

    With attention dropout (``keep`` a boolean mask, kept entries scaled by
    1/(1-p)), O = (P * M) V with M = keep / (1 - p): dV = (P * M)^T dO, and dP
    is multiplied by M before the softmax step.

    Attention mask: ``bias`` is ``0`` where the mask allows and ``-inf`` where
    it does not, in the mask's own (4-D, broadcastable) shape, added to each
    block's scores; the unmasked path never touches it.
    """

    def __init__(self, scale: float, causal: bool, keep=None, dropout_p: float = 0.0, bias=None):
        self.scale, self.causal, self.keep, self.dropout_p, self.bias = scale, causal, keep, dropout_p, bias

    def _bias_block(self, bs, r0, r1, end):
        """The mask's additive bias for batch slice ``bs``, query rows ``r0:r1`` and keys ``:end``, shaped to
        broadcast against a block's scores ``(b, h, G, n, end)``: ``(b | 1, 1, 1, n | 1, end | 1)``."""
        bias = self.bias
        rows = slice(r0, r1) if bias.shape[2] > 1 else slice(None)
        batch = bs if bias.shape[0] > 1 else slice(None)
        keys = slice(0, end) if bias.shape[3] > 1 else slice(None)
        return bias[batch, :, rows, keys][:, :, None]  # (b | 1, 1, 1, n | 1, end | 1)

    def _dropped(self, p, piece, r0, r1, end):
        """P * M for one block of one piece (fresh): the probabilities after dropout, in p's dtype."""
        bs, hs = piece
        keep = self.keep[bs, hs, :, r0:r1, :end]  # (b, h, G, n, end)
        p = p * keep.reshape(p.shape)  # (b, h, G*n, end)
        p *= p.dtype.type(1.0 / (1.0 - self.dropout_p))
        return p

    def forward(self, q, k, v):
        xp = get_array_module(q)
        B, H, T, D = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        G = H // Hkv
        cd = _compute_dtype(q.dtype)
        if self.keep is not None:
            self.keep = self.keep.reshape(B, Hkv, G, T, S)  # (B, Hkv, G, T, S) from (B, H, T, S)
        q5 = q.reshape(B, Hkv, G, T, D)  # (B, Hkv, G, T, D): the G query heads of each kv head
        # the output lives in (B, T, H, D) memory, returned as a (B, H, T, D) view: the caller's
        # transpose back to (B, T, H * D) is then free, with no copy
        o = xp.empty((B, T, Hkv, G, D), dtype=q.dtype).transpose(0, 2, 3, 1, 4)  # (B, Hkv, G, T, D) view
        self.blocks = _row_blocks(xp, T, S, self.causal)
        self.pieces = _head_pieces(xp, B, H, Hkv, T, S)
        # P of every block, filled piece by piece: (B, Hkv, G*n, end) per block
        self.ps = [xp.empty((B, Hkv, G * (r1 - r0), end), dtype=q.dtype) for r0, r1, end in self.blocks]
        causal = self.causal and T > 1  # one query (a generation step) sees every key: nothing to mask
        masks = {n: causal_mask_bias(xp, n, n, cd) for n in {r1 - r0 for r0, r1, _ in self.blocks}} if causal else {}

        def piece(i):  # a range of batch elements and kv heads, every block of query rows
            bs, hs = self.pieces[i]
            for (r0, r1, end), p_all in zip(self.blocks, self.ps):
                n = r1 - r0
                qb = q5[bs, hs, :, r0:r1]  # (b, h, G, n, D)
                qb = qb.reshape(qb.shape[0], qb.shape[1], G * n, D)  # (b, h, G*n, D): G heads stacked on rows
                p = p_all[bs, hs]  # (b, h, G*n, end)
                kt = xp.swapaxes(k[bs, hs, :end], -1, -2)  # (b, h, D, end)
                # float32 computes straight into P; float16 through a float32 copy (softmax needs its range)
                s = xp.matmul(qb, kt, out=p) if cd == p.dtype else xp.matmul(qb, kt).astype(cd)
                s *= cd.type(self.scale)
                if causal or self.bias is not None:
                    s5 = s.reshape(s.shape[0], s.shape[1], G, n, end)  # (b, h, G, n, end): a view into s
                    if causal:
                        s5[..., end - n:] += masks[n]  # the block's diagonal square
                    if self.bias is not None:
                        s5 += self._bias_block(bs, r0, r1, end)
                if self.bias is None:
                    s -= s.max(axis=-1, keepdims=True)
                    xp.exp(s, out=s)
                    s /= sum_rows_of(s)[..., None]  # (b, h, G*n, 1)
                else:  # a row may have no key left: its max is -inf; give it P = 0 instead of NaN
                    m = s.max(axis=-1, keepdims=True)  # (b, h, G*n, 1)
                    m[m == -np.inf] = 0
                    s -= m
                    xp.exp(s, out=s)
                    z = sum_rows_of(s)[..., None]  # (b, h, G*n, 1)
                    z[z == 0] = 1
                    s /= z
                if s is not p:
                    p[...] = s  # float16 inputs: P is kept in float16
                pv = p if self.keep is None else self._dropped(p, (bs, hs), r0, r1, end)
                ob = xp.matmul(pv, v[bs, hs, :end])  # (b, h, G*n, D)
                o[bs, hs, :, r0:r1] = ob.reshape(ob.shape[0], ob.shape[1], G, n, D)  # (b, h, G, n, D)

        kernels.run(range(len(self.pieces)), piece)
        self.q, self.k, self.v = q, k, v
        return o.reshape(B, H, T, D)  # (B, H, T, D)

    def backward(self, go):
        xp = get_array_module(go)
        q, k, v = self.q, self.k, self.v
        B, H, T, D = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        G = H // Hkv
        cd = _compute_dtype(q.dtype)
        need_q, need_k, need_v = self.needs_input_grad
        q5 = q.reshape(B, Hkv, G, T, D)  # (B, Hkv, G, T, D)
        go5 = go.reshape(B, Hkv, G, T, D)  # (B, Hkv, G, T, D)
        # gradients in (B, T, heads, D) memory, as (B, heads, T, D) views (see forward); dK and dV sum
        # over the blocks, accumulated in cd
        dq = xp.empty((B, T, Hkv, G, D), dtype=q.dtype).transpose(0, 2, 3, 1, 4) if need_q else None
        dk = xp.zeros((B, S, Hkv, D), dtype=cd).transpose(0, 2, 1, 3) if need_k else None  # (B, Hkv, S, D)
        dv = xp.zeros((B, S, Hkv, D), dtype=cd).transpose(0, 2, 1, 3) if need_v else None  # (B, Hkv, S, D)

        def piece(i):  # each piece owns its batch elements and kv heads of dq, dk, dv
            bs, hs = self.pieces[i]
            for (r0, r1, end), p_all in zip(self.blocks, self.ps):
                n = r1 - r0
                p = p_all[bs, hs]  # (b, h, G*n, end)
                b, h = p.shape[:2]
                gob = go5[bs, hs, :, r0:r1].reshape(b, h, G * n, D)  # (b, h, G*n, D)
                if need_v:
                    pv = p if self.keep is None else self._dropped(p, (bs, hs), r0, r1, end)
                    dv[bs, hs, :end] += xp.matmul(xp.swapaxes(pv, -1, -2), gob)  # (b, h, end, D): summed over G
                if need_q or need_k:
                    dp = xp.matmul(gob, xp.swapaxes(v[bs, hs, :end], -1, -2))  # (b, h, G*n, end), fresh
                    dp = dp.astype(cd, copy=False)
                    if self.keep is not None:
                        dp = self._dropped(dp, (bs, hs), r0, r1, end)
                    pc = p.astype(cd, copy=False)
                    dp -= xp.einsum("...j,...j->...", dp, pc)[..., None]  # rowsum(dP * P), no temporary
                    dp *= pc
                    dp *= cd.type(self.scale)  # dS * scale, the common factor of dQ and dK
                    ds = dp.astype(q.dtype, copy=False)
                    if need_q:
                        dq[bs, hs, :, r0:r1] = xp.matmul(ds, k[bs, hs, :end]).reshape(b, h, G, n, D)  # (b, h, G, n, D)
                    if need_k:
                        qb = q5[bs, hs, :, r0:r1].reshape(b, h, G * n, D)  # (b, h, G*n, D)
                        dk[bs, hs, :end] += xp.matmul(xp.swapaxes(ds, -1, -2), qb)  # (b, h, end, D)

        kernels.run(range(len(self.pieces)), piece)
        if need_q:
            dq = dq.reshape(B, H, T, D)  # (B, H, T, D)
        if need_k:
            dk = dk.astype(q.dtype, copy=False)
        if need_v:
            dv = dv.astype(q.dtype, copy=False)
        return dq, dk, dv


def _check(q, k, v, causal):
    """Clear errors for shapes and dtypes the attention op cannot take."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.ndim != 4:
            raise ValueError(f"attention: {name} must have 4 axes (batch, heads, time, head_dim), got shape {t.shape}; "
                             f"reshape (B, T, n_head * head_dim) to (B, T, n_head, head_dim) and swap axes 1 and 2")
        if t.dtype.kind != "f":
            raise TypeError(f"attention: {name} must be floating point, got dtype {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; "
                        "cast them to the same dtype first")
    B, H, T, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"attention: k and v must have the same shape (B, Hkv, S, D), got {k.shape} and {v.shape}")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"attention: q of shape {q.shape} (B, H, T, D) and k of shape {k.shape} (B, Hkv, S, D) must "
                         f"agree on the batch size and head_dim")
    Hkv, S = k.shape[1], k.shape[2]
    if Hkv < 1 or H % Hkv:
        raise ValueError(f"attention: the number of query heads ({H}) must be a multiple of the number of kv heads "
                         f"({Hkv}) for grouped-query attention")
    if causal and S < T:
        raise ValueError(f"attention: causal attention with {T} queries needs at least {T} keys (the queries are the "
                         f"last T positions of the key sequence), got {S}")


def _mask_bias(mask, B: int, T: int, S: int, device: str, dtype):
    """The additive bias (0 allowed, -inf not) of a boolean ``mask`` broadcastable to ``(B, 1, T, S)``, 4-D."""
    if isinstance(mask, Tensor):
        mask = mask.data
    if not backend.is_array(mask):
        mask = np.asarray(mask)
    if mask.dtype != np.bool_:
        raise TypeError(f"attention: mask must be a boolean array (True = may attend), got dtype {mask.dtype}; "
                        "e.g. mask = (padding_ids != pad_id)")
    if mask.ndim > 4 or mask.ndim == 0:
        raise ValueError(f"attention: mask must have 1 to 4 axes, broadcastable to (B, 1, T, S) = {(B, 1, T, S)}, "
                         f"got shape {mask.shape}")
    shape4 = (1,) * (4 - mask.ndim) + tuple(mask.shape)
    if any(m not in (1, want) for m, want in zip(shape4, (B, 1, T, S))):
        raise ValueError(f"attention: a mask of shape {mask.shape} does not broadcast to (B, 1, T, S) = "
                         f"{(B, 1, T, S)}; key padding is mask[:, None, None, :] of shape (B, 1, 1, S)")
    mask = backend.to_device(mask, device).reshape(shape4)  # (B | 1, 1, T | 1, S | 1)
    xp = get_array_module(mask)
    return xp.where(mask, dtype.type(0), dtype.type(-np.inf))


def scaled_dot_product_attention(q, k, v, causal: bool = True, scale: float | None = None, dropout_p: float = 0.0,
                                 training: bool = True, generator=None, mask=None) -> Tensor:
    """softmax(q k^T * scale + causal mask + attention mask) v, as one fused node; returns ``(B, H, T, D)``.

    ``q``: ``(B, H, T, D)``; ``k``, ``v``: ``(B, Hkv, S, D)`` with ``H % Hkv == 0``
    (MHA, GQA, MQA). With ``S > T`` the first ``S - T`` keys are cached past
    positions (see the module doc). ``mask``: None, or a boolean array
    broadcastable to ``(B, 1, T, S)``, True where a query may attend a key,
    combined with the causal rule; a row that may attend nothing gives zeros.
    ``scale`` defaults to ``1 / sqrt(D)``.
    ``dropout_p`` drops attention probabilities in training (mask drawn from
    ``generator`` or ``autograd.random``'s default generator). float16 inputs
    get their softmax in float32 and a float16 output.
    """
    q, k, v = (as_tensor(t) for t in (q, k, v))
    _check(q, k, v, causal)
    D = q.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"attention: scale must be a number, got {scale!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: dropout_p must be a number in [0, 1), got {dropout_p!r}")
    keep = None
    if training and dropout_p > 0.0:
        xp = get_array_module(q.data)
        if generator is None:
            from autograd import random as _random

            generator = _random.default_generator(xp)
        B, H, T, _ = q.shape
        u = generator.random((B, H, T, k.shape[2]), dtype=np.float32)  # (B, H, T, S) uniform [0, 1)
        if get_array_module(u) is not xp:
            u = backend.to_device(u, q.device)
        keep = u >= np.float32(dropout_p)
    bias = None
    if mask is not None:
        B, _, T, _ = q.shape
        bias = _mask_bias(mask, B, T, k.shape[2], q.device, _compute_dtype(q.dtype))
    return ScaledDotProductAttention(float(scale), bool(causal), keep, float(dropout_p), bias)(q, k, v)


__all__ = ["ScaledDotProductAttention", "scaled_dot_product_attention", "causal_mask_bias", "BLOCK_ROWS"]
