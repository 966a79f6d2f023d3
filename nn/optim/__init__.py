"""Optimizers (state keyed by parameter name), gradient clipping and learning-rate schedules."""

from .adamw import AdamW
from .clip import clip_grad_norm_, grad_norm
from .optimizer import Optimizer, param_groups_for_gpt
from .schedule import constant, cosine_with_warmup
from .sgd import SGD

__all__ = ["Optimizer", "SGD", "AdamW", "param_groups_for_gpt", "clip_grad_norm_", "grad_norm",
           "cosine_with_warmup", "constant"]
