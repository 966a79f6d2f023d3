"""Layers: each is a ``Module`` with its parameters registered in a fixed order."""

from .basic import GELU, Dropout, Embedding, Identity, Linear, LinearFunction, SiLU, linear
from .mlp import MLP, SwiGLU, llama_hidden_dim

__all__ = ["Linear", "LinearFunction", "linear", "Embedding", "Dropout", "GELU", "SiLU", "Identity",
           "MLP", "SwiGLU", "llama_hidden_dim"]
