"""autograd: reverse-mode automatic differentiation over NumPy (CPU) and CuPy (GPU) arrays.

    >>> from autograd import Tensor
    >>> x = Tensor([1.0, 2.0, 3.0], requires_grad=True)
    >>> (x * x).sum().backward()
    >>> x.grad
    array([2., 4., 6.], dtype=float32)
"""

from . import overloads as _overloads  # noqa: F401  (attaches operators and methods to Tensor)
from . import random
from .backend import cupy_available, get_array_module
from .engine import Function, enable_grad, is_grad_enabled, no_grad, set_grad_enabled, sum_to
from .gradcheck import GradcheckError, gradcheck
from .ops.arithmetic import add, div, mul, neg, pow, sub
from .ops.conversion import astype, result_type, to_device
from .ops.elementwise import abs, clip, exp, gelu, log, maximum, minimum, relu, sigmoid, silu, sqrt, tanh, where
from .ops.linalg import matmul
from .ops.nn_ops import cross_entropy, dropout, embedding, log_softmax, softmax
from .ops.reduction import logsumexp, max, mean, min, sum, var
from .ops.shape import (broadcast_to, concatenate, flatten, getitem, pad, permute, reshape, split, squeeze, stack,
                        swapaxes, transpose, tril, triu, unsqueeze)
from .tensor import Tensor, as_tensor
from .threads import num_threads, set_num_threads

__all__ = [
    "Tensor", "as_tensor", "random", "Function", "gradcheck", "GradcheckError",
    "no_grad", "enable_grad", "set_grad_enabled", "is_grad_enabled", "sum_to",
    "get_array_module", "cupy_available", "astype", "to_device", "result_type", "num_threads", "set_num_threads",
    "add", "sub", "mul", "div", "neg", "pow", "matmul",
    "exp", "log", "sqrt", "tanh", "sigmoid", "relu", "gelu", "silu", "abs", "maximum", "minimum", "where", "clip",
    "sum", "mean", "var", "max", "min", "logsumexp",
    "reshape", "transpose", "permute", "swapaxes", "broadcast_to", "squeeze", "unsqueeze", "flatten", "getitem",
    "concatenate", "stack", "split", "pad", "triu", "tril",
    "softmax", "log_softmax", "cross_entropy", "embedding", "dropout",
]
