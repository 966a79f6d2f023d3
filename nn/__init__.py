"""nn: modules, layers, initialisation and optimizers, built only on ``autograd``.

    >>> import numpy as np, nn
    >>> layer = nn.Linear(4, 3, generator=np.random.default_rng(0))
    >>> [name for name, _ in layer.named_parameters()]
    ['weight', 'bias']
"""

from . import amp, functional, init, optim
from .layers import (MLP, GELU, NORM_PLACEMENTS, Block, CausalSelfAttention, Dropout, Embedding, Identity, KVCache, LayerNorm, Linear,
                     LoRALinear, RMSNorm, SiLU, SwiGLU, apply_lora, check_heads, linear, llama_hidden_dim, lora_disabled,
                     lora_layers, lora_state_dict, merged_state_dict)
from .module import IncompatibleKeys, Module, ModuleDict, ModuleList, Parameter, Sequential, functional_call
from .recompute import recompute

__all__ = [
    "Module", "Parameter", "ModuleList", "ModuleDict", "Sequential", "IncompatibleKeys", "functional_call",
    "Linear", "linear", "Embedding", "Dropout", "GELU", "SiLU", "Identity", "MLP", "SwiGLU", "llama_hidden_dim",
    "LayerNorm", "RMSNorm", "CausalSelfAttention", "KVCache", "check_heads", "Block",
    "LoRALinear", "apply_lora", "lora_layers", "lora_state_dict", "merged_state_dict", "lora_disabled",
    "NORM_PLACEMENTS",
    "recompute", "init", "optim", "functional", "amp",
]
