"""Fused neural-net ops with hand-derived backward passes: normalisation, rotary embeddings, attention.

Each op is one ``autograd.Function`` over raw arrays whose docstring carries the
derivation of its backward; each is tested against gradcheck and against the
same computation composed from primitive autograd ops.
"""

from .attention import ScaledDotProductAttention, causal_mask_bias, scaled_dot_product_attention
from .norm import LayerNormFunction, RMSNormFunction, layer_norm, rms_norm
from .rope import Rotary, apply_rotary, rope_tables

__all__ = [
    "layer_norm", "rms_norm", "LayerNormFunction", "RMSNormFunction",
    "rope_tables", "apply_rotary", "Rotary",
    "scaled_dot_product_attention", "ScaledDotProductAttention", "causal_mask_bias",
]
