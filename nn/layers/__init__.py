"""Layers: each is a ``Module`` with its parameters registered in a fixed order."""

from .basic import GELU, Dropout, Embedding, Identity, Linear, LinearFunction, SiLU, linear
from .attention import CausalSelfAttention, KVCache, check_heads
from .block import NORM_PLACEMENTS, Block
from .lora import LoRALinear, apply_lora, lora_disabled, lora_layers, lora_state_dict, merged_state_dict
from .mlp import MLP, SwiGLU, llama_hidden_dim
from .norm import LayerNorm, RMSNorm

__all__ = ["Linear", "LinearFunction", "linear", "Embedding", "Dropout", "GELU", "SiLU", "Identity",
           "MLP", "SwiGLU", "llama_hidden_dim",
           "LayerNorm", "RMSNorm", "CausalSelfAttention", "KVCache", "check_heads", "Block",
           "LoRALinear", "apply_lora", "lora_layers", "lora_state_dict", "merged_state_dict", "lora_disabled",
           "NORM_PLACEMENTS"]
