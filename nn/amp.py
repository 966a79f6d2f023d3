"""Mixed precision: a precision policy, a dynamic loss scaler, and float32 master weights.

The scheme is Megatron's / apex's "O2" (Micikevicius et al. 2018, *Mixed Precision
Training*): the model's parameters are stored and used in the compute dtype
(float16), so every matrix product runs in float16 (tensor cores on the GPU); an
exact float32 copy of each trainable parameter, the *master* weight, is what the
optimizer updates. One training step:

    loss = model(mp.cast_input(x), ...)      # float16 activations; the loss op returns float32
    mp.backward(loss)                        # = scaler.scale(loss).backward(): float16 grads, scaled
    found_inf = mp.unscale_grads_to_master() # master.grad = float32(grad) / scale, + one finiteness check
    mp.scaler.update(found_inf)              # halve the scale on overflow, double it after clean windows
    if not found_inf:
        nn.optim.clip_grad_norm_(mp.master_named_parameters(), max_norm)
        opt.step()                           # AdamW over the float32 master weights
        mp.copy_master_to_model()            # round the masters into the float16 parameters, in place
    mp.zero_grad()

``mp.step(opt, max_norm=...)`` does the last six lines (and refuses a non-finite
gradient norm where no scaler catches it) and returns whether the update was
applied; the trainer's one step (``llm.trainer.layout.Layout.step``) calls it
for every layout. With ``Precision("float32")`` the same loop is plain float32
training: the master parameters *are* the model's parameters (no copies), the
scaler is disabled (scale 1, never skips), and the results are bitwise those of
a loop without this object. The master weights live in one class,
``MasterWeights``; ZeRO-1 (``parallel.zero.ShardedMasters``) keeps the same
interface over one rank's shard of them.

Why each part:

- float16 has 10 mantissa bits, so an update ``lr * m / sqrt(v)`` smaller than
  2**-11 of a weight is lost when added to a float16 weight; the float32 master
  keeps it (the rounding happens only on the way back to the model).
- float16's smallest normal number is 6.1e-5 (subnormals reach 6e-8): small
  gradients underflow to 0. Multiplying the loss by a large scale (2**16 at
  first) shifts all gradients up into range; they are divided by it again in
  float32. Too large a scale overflows to inf: the step is skipped and the scale
  halved; after ``growth_interval`` clean steps it is doubled again, so it hovers
  just under the overflow limit.
- Reductions (softmax, log-softmax, cross-entropy, LayerNorm, RMSNorm,
  attention's softmax, RoPE) already compute float16 inputs in float32 inside
  their ops and return float16; cross-entropy returns a float32 loss.

bfloat16 (8 exponent bits, no loss scaling needed) is accepted where the array
library has the dtype: NumPy only after ``import ml_dtypes``, CuPy not at all;
elsewhere a clear error says to use float16.

On NumPy, float16 matrix products have no BLAS kernel and are many times slower
than float32 ones: the policy is correct on the CPU (the tests run there), fast
on CuPy. Building a float16 ``MixedPrecision`` over NumPy arrays warns once per
process (``SlowPrecisionWarning``) with the factor ``benchmarks/half_precision_cpu.py``
measures.
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from autograd import backend
from autograd.backend import get_array_module

from .optim.clip import clip_grad_norm_
from .optim.clip import grad_norm as _global_norm


class NonFiniteError(ArithmeticError):
    """The loss, the gradient norm or the weights stopped being finite numbers."""


def _grad_norm(named_params, max_norm):
    """The global L2 norm of the gradients, clipping them to ``max_norm`` when it is set (``MixedPrecision.step``)."""
    return clip_grad_norm_(named_params, max_norm) if max_norm else _global_norm(named_params)
from autograd.ops.conversion import astype
from autograd.tensor import Tensor

from .module import Module, Parameter

# ---------------------------------------------------------------------------
# the precision policy
# ---------------------------------------------------------------------------

_ALIASES = {
    "fp32": "float32", "float32": "float32", "f32": "float32", "32": "float32", "single": "float32",
    "fp16": "float16", "float16": "float16", "f16": "float16", "16": "float16", "half": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp64": "float64", "float64": "float64", "f64": "float64", "64": "float64", "double": "float64",
}
_SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}


def _canonical(name, what: str) -> str:
    """``"fp16"`` -> ``"float16"`` etc.; a clear error for anything else."""
    if isinstance(name, (np.dtype, type)):
        try:
            name = np.dtype(name).name
        except TypeError:
            pass
    key = str(name).strip().lower()
    if key not in _ALIASES:
        raise ValueError(f"unknown {what} {name!r}: use one of 'fp32' / 'float32', 'fp16' / 'float16' "
                         f"(float16 compute, float32 master weights), 'bf16' / 'bfloat16' or 'fp64' / 'float64' "
                         f"(double precision everywhere: gradient studies and exact comparisons)")
    return _ALIASES[key]


def bfloat16_dtype(xp=np) -> np.dtype:
    """The bfloat16 dtype of array library ``xp``, or a ValueError saying it has none and to use float16.

    NumPy has no native bfloat16: ``np.dtype("bfloat16")`` works only once the
    ``ml_dtypes`` package has been imported (it registers the type). CuPy cannot
    hold bfloat16 arrays at all.
    """
    try:
        dt = np.dtype("bfloat16")
    except TypeError:
        raise ValueError(
            "bfloat16 is not supported by this array library: NumPy has no native bfloat16 (it exists only after "
            "`import ml_dtypes`, on the CPU) and CuPy has none. Use float16 instead: --precision fp16 "
            "(MixedPrecision(model, 'fp16') in Python), which trains with float32 master weights and dynamic loss "
            "scaling"
        ) from None
    if xp is not np:
        try:
            xp.zeros(1, dtype=dt)
        except Exception:
            raise ValueError(
                f"bfloat16 is not supported by this array library ({xp.__name__} cannot hold bfloat16 arrays). "
                "Use float16 instead: --precision fp16 (MixedPrecision(model, 'fp16') in Python), which trains with "
                "float32 master weights and dynamic loss scaling") from None
    return dt


class SlowPrecisionWarning(UserWarning):
    """float16 compute on NumPy arrays: correct, but many times slower than float32 (NumPy has no float16 BLAS).

    Silence it with ``warnings.filterwarnings("ignore", category=nn.amp.SlowPrecisionWarning)``.
    """


#: how many times longer a float16 training step takes than a float32 one on NumPy: the tiny preset's default
#: step on a 2-core CPU, 119-139x in three runs (benchmarks/half_precision_cpu.py; benchmarks/README.md)
FP16_ON_NUMPY_SLOWDOWN = 130

_warned_slow_precision = False


def warn_if_slow_precision(precision, xp=np) -> bool:
    """Warn once per process (``SlowPrecisionWarning``) if ``precision`` computes in float16 on array library
    ``xp`` when that is NumPy; returns whether it warned. ``MixedPrecision`` calls it when it is built."""
    global _warned_slow_precision
    if _warned_slow_precision or xp is not np or Precision.from_name(precision).compute_dtype != "float16":
        return False
    _warned_slow_precision = True
    warnings.warn(f"float16 compute on the CPU (NumPy) is about {FP16_ON_NUMPY_SLOWDOWN}x slower than float32: NumPy "
                  "has no fast float16 matrix product. On the CPU train with --precision fp32 (the default); fp16 "
                  "pays off on a GPU (--device cuda).", SlowPrecisionWarning, stacklevel=3)
    return True


@dataclass(frozen=True)
class Precision:
    """Which dtype the model computes in and which dtype the optimizer's master weights are kept in.

    ``compute_dtype``: "float32" (plain training), "float16" (mixed precision with
    float32 master weights and dynamic loss scaling), "bfloat16" (float32
    master weights, no loss scaling; needs an array library with bfloat16) or
    "float64" (double precision throughout, for gradient studies and exact
    comparisons). ``master_dtype`` is "float32" ("float64" with float64
    compute). Short names ("fp16") are normalised.
    """

    compute_dtype: str = "float32"
    master_dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "compute_dtype", _canonical(self.compute_dtype, "compute dtype"))
        master = _canonical(self.master_dtype, "master dtype")
        if self.compute_dtype == "float64":
            master = "float64"  # nothing narrower may hold the weights of a float64 model
        elif master != "float32":
            raise ValueError(f"master_dtype must be float32 (the optimizer's copy of the weights), got "
                             f"{self.master_dtype!r}")
        object.__setattr__(self, "master_dtype", master)

    @classmethod
    def from_name(cls, name) -> "Precision":
        """``"fp32"``/``"float32"``, ``"fp16"``/``"float16"``/``"half"``, ``"bf16"``/``"bfloat16"``, ``"fp64"`` (or a
        Precision)."""
        if isinstance(name, Precision):
            return name
        return cls(compute_dtype=_canonical(name, "precision"))

    @property
    def name(self) -> str:
        """The short name: "fp32", "fp16", "bf16" or "fp64"."""
        return _SHORT[self.compute_dtype]

    @property
    def is_mixed(self) -> bool:
        """True when the model computes in a narrower dtype than the master weights (copies are kept)."""
        return self.compute_dtype != self.master_dtype

    @property
    def needs_loss_scaling(self) -> bool:
        """True for float16, whose 5 exponent bits make small gradients underflow; bfloat16 has float32's range."""
        return self.compute_dtype == "float16"

    def compute_numpy_dtype(self, xp=np) -> np.dtype:
        """The compute dtype as a dtype object of array library ``xp`` (bfloat16: ValueError where it has none)."""
        if self.compute_dtype == "bfloat16":
            return bfloat16_dtype(xp)
        return np.dtype(self.compute_dtype)

    def master_numpy_dtype(self) -> np.dtype:
        """The master dtype (float32; float64 with float64 compute) as a NumPy dtype."""
        return np.dtype(self.master_dtype)


# ---------------------------------------------------------------------------
# the dynamic loss scaler
# ---------------------------------------------------------------------------


class DynamicLossScaler:
    """Multiplies the loss by a scale that halves on overflow and doubles after clean windows.

    ``scale(loss)`` gives ``loss * S`` (backward then yields S times the true
    gradients); after unscaling, ``update(found_inf)`` adapts S:

    - found_inf: S <- max(S * backoff_factor, min_scale), the step is skipped
      (``update`` returns False) and the clean-step counter restarts;
    - otherwise the counter grows; when it reaches ``growth_interval``,
      S <- S * growth_factor (capped at ``max_scale`` if given) and it restarts.

    Defaults: S starts at 2**16, halves on overflow, doubles after 2000
    consecutive clean steps, never drops below 1. ``enabled=False`` makes it the
    identity (scale 1, ``update`` always returns True): the float32 path.
    The scale is a Python float; ``state_dict()`` holds plain numbers only.
    """

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000, min_scale: float = 1.0, max_scale: float | None = None,
                 enabled: bool = True):
        if not (isinstance(init_scale, (int, float)) and math.isfinite(init_scale) and init_scale > 0):
            raise ValueError(f"init_scale must be a finite number > 0, got {init_scale!r}")
        if not growth_factor > 1.0:
            raise ValueError(f"growth_factor must be > 1 (the scale grows after clean windows), got {growth_factor!r}")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"backoff_factor must be in (0, 1) (the scale shrinks on overflow), got {backoff_factor!r}")
        if isinstance(growth_interval, bool) or not isinstance(growth_interval, (int, np.integer)) or growth_interval < 1:
            raise ValueError(f"growth_interval must be an integer >= 1 (clean steps before the scale grows), "
                             f"got {growth_interval!r}")
        if not (math.isfinite(min_scale) and min_scale > 0):
            raise ValueError(f"min_scale must be a finite number > 0, got {min_scale!r}")
        if min_scale > init_scale:
            raise ValueError(f"min_scale ({min_scale}) is larger than init_scale ({init_scale}): lower min_scale")
        if max_scale is not None and not (math.isfinite(max_scale) and max_scale >= init_scale):
            raise ValueError(f"max_scale must be a finite number >= init_scale ({init_scale}) or None, got {max_scale!r}")
        self.init_scale = float(init_scale)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.min_scale = float(min_scale)
        self.max_scale = None if max_scale is None else float(max_scale)
        self.enabled = bool(enabled)
        self.loss_scale = self.init_scale if self.enabled else 1.0
        self.growth_tracker = 0  # consecutive clean steps since the last change of the scale
        self.skipped_steps = 0  # total number of updates that found an overflow

    @classmethod
    def disabled(cls) -> "DynamicLossScaler":
        """A scaler that does nothing (scale 1, never skips): what float32 and bfloat16 training use."""
        return cls(init_scale=1.0, enabled=False)

    def get_scale(self) -> float:
        """The current loss scale (1.0 when disabled)."""
        return self.loss_scale

    def scale(self, loss: Tensor) -> Tensor:
        """``loss * scale`` as a Tensor to call ``backward()`` on (``loss`` itself when disabled).

        A float16 loss is cast to float32 first, so the scaled value cannot
        overflow in the forward pass (the model's loss ops already return float32).
        """
        if not isinstance(loss, Tensor):
            raise TypeError(f"scale() takes the loss Tensor, got {type(loss).__name__}")
        if not self.enabled:
            return loss
        if loss.dtype.kind == "f" and loss.dtype.itemsize < 4:
            loss = astype(loss, np.float32)
        return loss * self.loss_scale  # a Python float: keeps the loss's dtype

    def update(self, found_inf) -> bool:
        """Adapt the scale after one step's gradients were checked; returns True when the step should be applied.

        ``found_inf``: whether any unscaled gradient was inf or NaN. Disabled: always True.
        """
        if not self.enabled:
            return True
        if bool(found_inf):
            self.loss_scale = max(self.loss_scale * self.backoff_factor, self.min_scale)
            self.growth_tracker = 0
            self.skipped_steps += 1
            return False
        self.growth_tracker += 1
        if self.growth_tracker >= self.growth_interval:
            grown = self.loss_scale * self.growth_factor
            if self.max_scale is not None:
                grown = min(grown, self.max_scale)
            self.loss_scale = grown
            self.growth_tracker = 0
        return True

    # -- checkpoints -----------------------------------------------------------
    _STATE_KEYS = ("scale", "growth_tracker", "skipped_steps", "enabled")

    def state_dict(self) -> dict:
        """The dynamic state and the configuration, as plain Python numbers (no arrays)."""
        return {"scale": float(self.loss_scale), "growth_tracker": int(self.growth_tracker),
                "skipped_steps": int(self.skipped_steps), "enabled": bool(self.enabled),
                "init_scale": self.init_scale, "growth_factor": self.growth_factor,
                "backoff_factor": self.backoff_factor, "growth_interval": self.growth_interval,
                "min_scale": self.min_scale, "max_scale": self.max_scale}

    def load_state_dict(self, state: dict):
        """Restore the scale, the clean-step counter and the skip count saved by ``state_dict()``.

        The configuration (factors, interval, floor) stays the one this scaler
        was built with, so a resumed run may change it. Raises a ValueError (and
        changes nothing) on missing keys, a bad scale, or an enabled/disabled mismatch.
        """
        if not hasattr(state, "keys"):
            raise TypeError(f"DynamicLossScaler.load_state_dict needs the dict from state_dict(), "
                            f"got {type(state).__name__}")
        missing = [k for k in self._STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"loss scaler state is missing {missing}; expected a dict from DynamicLossScaler.state_dict()")
        scale, tracker = state["scale"], state["growth_tracker"]
        if not (isinstance(scale, (int, float, np.floating)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"loss scaler state has scale {scale!r}; it must be a finite number > 0")
        if isinstance(tracker, bool) or not isinstance(tracker, (int, np.integer)) or tracker < 0:
            raise ValueError(f"loss scaler state has growth_tracker {tracker!r}; it must be an integer >= 0")
        if bool(state["enabled"]) != self.enabled:
            have, got = ("enabled", "disabled") if self.enabled else ("disabled", "enabled")
            raise ValueError(f"this loss scaler is {have} but the checkpoint's was {got}: the checkpoint was saved "
                             f"with a different precision (float16 uses loss scaling, float32/bfloat16 do not)")
        self.loss_scale = float(scale)
        self.growth_tracker = int(tracker)
        self.skipped_steps = int(state["skipped_steps"])

    def __repr__(self):
        if not self.enabled:
            return "DynamicLossScaler(enabled=False)"
        return (f"DynamicLossScaler(scale={self.loss_scale:g}, growth_tracker={self.growth_tracker}, "
                f"growth_factor={self.growth_factor:g}, backoff_factor={self.backoff_factor:g}, "
                f"growth_interval={self.growth_interval}, min_scale={self.min_scale:g})")


# ---------------------------------------------------------------------------
# master weights
# ---------------------------------------------------------------------------


def _quiet(xp):
    """Silence NumPy's inf/NaN warnings for a block (an overflow is expected and handled here)."""
    return xp.errstate(over="ignore", invalid="ignore") if hasattr(xp, "errstate") else contextlib.nullcontext()


class MasterWeights:
    """The weights an optimizer updates: float32 copies of a model's trainable parameters, or those parameters.

    The one implementation of master weights. ``MixedPrecision`` keeps one
    over the whole model; ZeRO (``parallel.zero.ShardedMasters``) keeps the same
    interface over its shard of them. With ``copies=True`` each trainable
    floating parameter gets a float32 ``Parameter`` of the same name and
    ``no_decay`` flag (made from the parameter's current values: build it
    before the model is cast down); with ``copies=False`` the masters are the
    parameters themselves and every method is free.

    ``grads_from_model(inv_scale)``: each master's ``.grad`` from its model
    parameter's (times ``inv_scale``), and whether any value is inf or NaN;
    ``copy_to_model()``: round the masters back into the model.
    """

    def __init__(self, named_params, copies: bool, master_dtype=np.float32):
        self.copies = bool(copies)
        self.master_dtype = np.dtype(master_dtype)
        # (name, model parameter, master parameter) for every trainable floating parameter, in order
        self.pairs = []
        for name, p in named_params:
            if not p.requires_grad or p.dtype.kind != "f":
                continue
            master = Parameter(p.data.astype(self.master_dtype), no_decay=getattr(p, "no_decay", False),
                               name=name) if self.copies else p
            self.pairs.append((name, p, master))
        self._master_of = {id(p): m for _, p, m in self.pairs}
        self._grad_buffers = {}  # name -> float32 array reused for the master gradient

    def named_parameters(self) -> list:
        """``[(name, master Parameter)]``, in the model's order: what the optimizer updates."""
        return [(name, m) for name, _, m in self.pairs]

    def master_of(self, p):
        """The master of model parameter ``p`` (None: frozen, or not held here)."""
        return self._master_of.get(id(p))

    def grads_from_model(self, inv_scale: float = 1.0) -> bool:
        """Set each master's ``.grad`` to float32(model grad) * ``inv_scale``; True if any value is inf or NaN.

        One pass per gradient writes the float32 master gradient (``multiply``
        with a float32 output; multiplying by the inverse of a power of two is
        exact), one sum per gradient feeds the check (inf or NaN anywhere makes
        the sum inf or NaN; a sum of finite values cannot overflow float32
        here, each being at most 65504 / scale), and one device
        synchronisation reads the verdict for all of them. A master whose
        parameter has no gradient gets ``.grad = None``. Without copies the
        gradients are scaled in place (nothing at all when ``inv_scale`` is 1:
        returns False).
        """
        if not self.copies and inv_scale == 1.0:
            return False
        partial = []
        xp = np
        for name, p, m in self.pairs:
            g = p.grad
            if g is None:
                m.grad = None
                continue
            if g.shape != p.shape:
                raise ValueError(f"gradient of {name!r} has shape {g.shape}, but the parameter has shape {p.shape}")
            xp = get_array_module(g)
            with _quiet(xp):
                if self.copies:
                    buf = self._grad_buffers.get(name)
                    if buf is None or backend.device_of(buf) != backend.device_of(g):
                        buf = self._grad_buffers[name] = xp.empty(p.shape, dtype=self.master_dtype)
                    xp.multiply(g, self.master_dtype.type(inv_scale), out=buf, dtype=self.master_dtype)
                    m.grad = buf
                else:
                    g *= inv_scale  # a Python float keeps the gradient's dtype; the engine's grads own their memory
                partial.append(m.grad.sum(dtype=np.promote_types(m.grad.dtype, np.float32)))
        if not partial:
            return False
        with _quiet(xp):
            total = xp.stack(partial).sum()
            return not bool(xp.isfinite(total))  # the one synchronisation

    def copy_to_model(self):
        """Round each master into its model parameter's array, in place (the same objects); free without copies."""
        if not self.copies:
            return
        for _, p, m in self.pairs:
            p.data[...] = m.data  # cast on assignment (round to nearest even), into the existing array

    def zero_grad(self):
        """Drop the masters' gradients (``.grad = None``)."""
        for _, _, m in self.pairs:
            m.grad = None

    def state_dict(self) -> OrderedDict:
        """``{name: master array}`` (the live arrays) when copies are kept, else empty (the model holds them)."""
        return OrderedDict((name, m.data) for name, _, m in self.pairs) if self.copies else OrderedDict()

    def load_state_dict(self, master: dict):
        """Set the masters from ``{name: array}`` and round them into the model; ValueError (nothing changed) on
        missing, unexpected or wrongly shaped entries."""
        problems = []
        names = [name for name, _, _ in self.pairs] if self.copies else []
        missing = [n for n in names if n not in master]
        unexpected = [n for n in master if n not in set(names)]
        if missing:
            problems.append(f"master weights missing from the checkpoint ({len(missing)}): " + ", ".join(missing))
        if unexpected:
            problems.append(f"unexpected master weights ({len(unexpected)}): " + ", ".join(unexpected))
        for name, _, m in (self.pairs if self.copies else []):
            if name in master:
                shape = tuple(np.shape(_data(master[name])))
                if shape != tuple(m.shape):
                    problems.append(f"master {name}: checkpoint shape {shape} vs parameter shape {tuple(m.shape)}")
        if problems:
            raise ValueError("master weights do not fit:\n  " + "\n  ".join(problems))
        for name, _, m in (self.pairs if self.copies else []):
            value = _data(master[name])
            value = backend.to_device(value if backend.is_array(value) else np.asarray(value), m.device)
            m.data[...] = value.astype(self.master_dtype, copy=False)
        self.copy_to_model()

    def __len__(self):
        return len(self.pairs)


def _data(value):
    return value.data if isinstance(value, Tensor) else value


class MixedPrecision:
    """The precision policy, the loss scaler and the master weights of ``model``; see the module docstring.

    ``MixedPrecision(model, "fp16")`` copies each trainable parameter into a
    float32 master (``MasterWeights``), then casts every floating parameter
    of the model to float16 in place (the Parameter objects stay the same;
    their ``.data`` is replaced). Build the optimizer over
    ``master_named_parameters()`` (or ``param_groups_for_gpt(...)``), so its state
    is keyed by the model's parameter names. Buffers are left as they are.

    ``scaler``: a ``DynamicLossScaler``; default: one with the standard settings
    for float16, a disabled one for float32 and bfloat16. ``masters``: a
    ``MasterWeights``-like object to use instead of the default one (ZeRO's
    ``parallel.zero.ShardedMasters`` over this rank's shard); it must be made
    from the float32 model, as the default is.

    With ``Precision("float32")``: the model is cast to float32 if it is not
    already (a no-op for a float32 model), the master parameters are the model's
    own, and every method is free (no copies, no checks): the loop is plain training.

    Build it once per model, from float32 weights: a second MixedPrecision on an
    already float16 model would take its rounded weights as masters.
    """

    def __init__(self, model: Module, precision="fp32", scaler: DynamicLossScaler | None = None, masters=None):
        if not isinstance(model, Module):
            raise TypeError(f"MixedPrecision needs an nn.Module, got {type(model).__name__}")
        self.model = model
        self.precision = Precision.from_name(precision)
        params = list(model.named_parameters())
        xp = get_array_module(*(p.data for _, p in params)) if params else np
        self.compute_dtype = self.precision.compute_numpy_dtype(xp)  # bfloat16 unsupported: clear error here
        warn_if_slow_precision(self.precision, xp)
        self.master_dtype = self.precision.master_numpy_dtype()
        if scaler is None:
            scaler = DynamicLossScaler() if self.precision.needs_loss_scaling else DynamicLossScaler.disabled()
        elif not isinstance(scaler, DynamicLossScaler):
            raise TypeError(f"scaler must be a DynamicLossScaler or None, got {type(scaler).__name__}")
        self.scaler = scaler
        self.masters = MasterWeights(params, self.precision.is_mixed, self.master_dtype) if masters is None \
            else masters
        self.copies = self.masters.copies
        self.last_grad_norm = None  # the global gradient norm measured by the last step(max_norm=...)
        self._checked_optimizers = weakref.WeakSet()
        for _, p in params:  # now cast the model (trainable or frozen) to the compute dtype, in place
            if p.dtype.kind == "f" and p.dtype != self.compute_dtype:
                p.data = p.data.astype(self.compute_dtype)
                if p.grad is not None:
                    p.grad = p.grad.astype(self.compute_dtype)

    # -- parameters ----------------------------------------------------------
    def master_named_parameters(self) -> list:
        """``[(name, master Parameter)]`` for every trainable parameter, in ``model.named_parameters()`` order.

        Hand these to the optimizer (``nn.optim.AdamW(mp.master_named_parameters())``).
        They are float32 copies in mixed precision, the model's own parameters in float32.
        """
        return self.masters.named_parameters()

    def master_params_for(self, groups) -> list:
        """Map parameter groups over the model's parameters to the same groups over the master parameters.

        ``groups``: a list of dicts ``{"params": [(name, model_param), ...], ...}``
        (e.g. from ``nn.optim.param_groups_for_gpt(model, ...)``) or a plain list of
        ``(name, model_param)`` pairs. Names and every other key are kept. (With
        sharded masters, parameters with no part on this rank drop out.)
        """
        sharded = getattr(self.masters, "sharded", False)

        def convert(pairs):
            out = []
            for name, p in pairs:
                m = self.masters.master_of(p)
                if m is None:
                    if sharded and p.requires_grad:
                        continue
                    raise ValueError(f"parameter {name!r} has no master copy: it is frozen (requires_grad=False) or "
                                     "not a parameter of the model this MixedPrecision was built for")
                out.append((name, m))
            return out

        groups = list(groups)
        if groups and all(isinstance(g, dict) for g in groups):
            return [{**g, "params": convert(g["params"])} for g in groups]
        return convert(groups)

    def param_groups_for_gpt(self, weight_decay: float, decay_embeddings: bool = False) -> list:
        """``nn.optim.param_groups_for_gpt(model, ...)`` over the master parameters (same names, same no_decay split)."""
        from .optim.optimizer import param_groups_for_gpt

        return self.master_params_for(param_groups_for_gpt(self.model, weight_decay, decay_embeddings))

    def cast_input(self, x):
        """Cast a floating input (Tensor or array) to the compute dtype; integer ids pass unchanged.

        A float32 input to a float16 model would promote every product to
        float32; cast it once here, at the model's input. (A model that starts
        with an ``Embedding`` already produces compute-dtype activations.) For a
        Tensor the cast is differentiable: its gradient comes back in its dtype.
        """
        if isinstance(x, Tensor):
            return astype(x, self.compute_dtype) if x.dtype.kind == "f" else x
        if backend.is_array(x):
            return x.astype(self.compute_dtype, copy=False) if x.dtype.kind == "f" else x
        raise TypeError(f"cast_input takes a Tensor or an array, got {type(x).__name__}")

    # -- the step, in pieces ---------------------------------------------------
    def backward(self, loss: Tensor):
        """``scaler.scale(loss).backward()``: the gradients of the model's parameters, times the loss scale."""
        self.scaler.scale(loss).backward()

    def unscale_grads_to_master(self, scaler: DynamicLossScaler | None = None) -> bool:
        """Set each master's ``.grad`` to float32(model grad) / scale; return True if any value is inf or NaN.

        ``MasterWeights.grads_from_model`` with the scaler's inverse scale.
        Float32 without loss scaling: nothing to do, returns False (never
        skips). The model's gradients are not changed (float32 with an enabled
        scaler: divided in place). ``scaler`` defaults to this object's.
        """
        scaler = self.scaler if scaler is None else scaler
        return self.masters.grads_from_model(1.0 / scaler.get_scale() if scaler.enabled else 1.0)

    def copy_master_to_model(self):
        """Round each float32 master weight into its model parameter's compute-dtype array, in place.

        The Parameter objects and their ``.data`` arrays stay the same objects.
        A no-op in float32 (the masters are the parameters).
        """
        self.masters.copy_to_model()

    def zero_grad(self):
        """Drop the gradients of the model's parameters and of the masters (``.grad = None``)."""
        for p in self.model.parameters():
            p.grad = None
        self.masters.zero_grad()

    def _check_optimizer(self, optimizer):
        """The optimizer must hold master parameters (checked once per optimizer)."""
        if optimizer in self._checked_optimizers:
            return
        if not hasattr(optimizer, "named_parameters") or not hasattr(optimizer, "step"):
            raise TypeError(f"step() needs an nn.optim optimizer, got {type(optimizer).__name__}")
        masters = {id(m) for _, m in self.masters.named_parameters()}
        model_ids = {id(p) for p in self.model.parameters()}
        for name, p in optimizer.named_parameters():
            if id(p) not in masters:
                where = "the model's own (compute-dtype) parameter" if id(p) in model_ids else "not a master parameter"
                raise ValueError(f"the optimizer holds {name!r}, which is {where}: build the optimizer over "
                                 "mp.master_named_parameters() (or mp.param_groups_for_gpt(...)), so it updates the "
                                 "float32 master weights")
        self._checked_optimizers.add(optimizer)

    def step(self, optimizer, max_norm: float | None = None, *, agree_found_inf=None, grad_norm=None) -> bool:
        """After ``backward(loss)``: unscale, update the scaler, and unless a gradient overflowed, measure, clip, step.

        The global L2 norm of the master gradients is measured and kept in
        ``last_grad_norm``; with ``max_norm`` (None or 0: no clipping) the
        gradients are clipped to it (``nn.optim.clip_grad_norm_``). Then the
        optimizer steps, the masters are copied into the model, and all
        gradients are dropped. Returns True when the update was applied, False
        when a float16 overflow skipped it (parameters, optimizer state and step
        count untouched; the scale was lowered).

        Without a loss scaler (float32, bfloat16) nothing catches a NaN or inf
        gradient, so a non-finite norm raises ``NonFiniteError`` before
        anything is updated (the gradients are dropped).

        Distributed training passes the two collective parts:
        ``agree_found_inf(found_inf) -> bool``, every rank's decision on an
        overflow, and ``grad_norm(named_masters, max_norm) -> float``, the norm
        over every rank's share (clipping when ``max_norm`` is set).
        """
        self._check_optimizer(optimizer)
        try:
            found_inf = self.unscale_grads_to_master()
            if agree_found_inf is not None:
                found_inf = agree_found_inf(found_inf)
            stepped = self.scaler.update(found_inf)
            self.last_grad_norm = None
            if stepped:
                self.last_grad_norm = norm = (grad_norm or _grad_norm)(self.master_named_parameters(), max_norm)
                if not math.isfinite(norm):  # float16 overflows were caught above: this is float32 or bfloat16
                    raise NonFiniteError(f"the gradient norm is {norm}")
                optimizer.step()
                self.copy_master_to_model()
        finally:
            self.zero_grad()
        return stepped

    # -- checkpoints -----------------------------------------------------------
    def state_dict(self) -> dict:
        """``{"precision": {...}, "master": {name: float32 array}, "scaler": {plain numbers}}``.

        The master arrays are the live ones, not copies (copy them for a
        snapshot). In float32 "master" is empty: the model's own state_dict holds
        the weights. Save it next to the model's and the optimizer's state.
        """
        return {"precision": {"compute_dtype": self.precision.compute_dtype,
                              "master_dtype": self.precision.master_dtype},
                "master": self.masters.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict):
        """Restore the master weights and the scaler from ``state_dict()``, then copy the masters into the model.

        Raises one ValueError listing every problem (a different precision,
        missing, unexpected or wrongly shaped master weights, a bad scaler
        state); nothing changes when it raises.
        """
        if not hasattr(state, "keys"):
            raise TypeError(f"MixedPrecision.load_state_dict needs the dict from state_dict(), got {type(state).__name__}")
        missing_top = [k for k in ("precision", "master", "scaler") if k not in state]
        if missing_top:
            raise ValueError(f"mixed-precision state is missing {missing_top}; expected a dict from "
                             "MixedPrecision.state_dict()")
        saved = state["precision"]
        ours = {"compute_dtype": self.precision.compute_dtype, "master_dtype": self.precision.master_dtype}
        if dict(saved) != ours:
            raise ValueError(f"the checkpoint was saved with precision {dict(saved)}, but this run uses {ours}: "
                             "resume with the same precision (to change it, load only the model and optimizer state "
                             "and build a fresh MixedPrecision)")
        self._check_scaler_state(state["scaler"])
        try:
            self.masters.load_state_dict(state["master"])
        except ValueError as e:
            raise ValueError(f"MixedPrecision.load_state_dict failed: {e}") from None
        self.scaler.load_state_dict(state["scaler"])

    def _check_scaler_state(self, state):
        """Validate a scaler state without changing the scaler (so a failed load changes nothing)."""
        probe = DynamicLossScaler(init_scale=max(self.scaler.init_scale, self.scaler.min_scale),
                                  min_scale=self.scaler.min_scale, enabled=self.scaler.enabled)
        probe.load_state_dict(state)

    def __repr__(self):
        return (f"MixedPrecision(precision={self.precision.name}, compute_dtype={self.compute_dtype}, "
                f"{len(self.masters)} master parameters{' (shared with the model)' if not self.copies else ''}, "
                f"scaler={self.scaler!r})")


__all__ = ["Precision", "DynamicLossScaler", "MasterWeights", "MixedPrecision", "NonFiniteError", "bfloat16_dtype"]
