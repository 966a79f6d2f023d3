"""Special functions on plain arrays (NumPy or CuPy), written with ``xp`` operations only.

NumPy has no ``erf`` and SciPy is not a dependency, so ``erf`` is built here from
W. J. Cody's rational Chebyshev approximations ("Rational Chebyshev approximations
for the error function", Math. Comp. 23 (1969) 631-637; the coefficient sets of
Netlib SPECFUN ``calerf``), the same ones behind many libm and SciPy versions.
They are accurate to about one unit in the last place of a float64.

These are array functions, not graph ops: the differentiable exact GELU in
``elementwise.py`` calls ``erf`` inside its ``forward``.
"""

from __future__ import annotations

import numpy as np

from ..backend import get_array_module

# 1 / sqrt(pi)
_SQRPI = 5.6418958354775628695e-1

# |x| <= 0.46875:  erf(x) = x * A(x^2) / B(x^2)
_A = (3.16112374387056560e00, 1.13864154151050156e02, 3.77485237685302021e02, 3.20937758913846947e03,
      1.85777706184603153e-1)
_B = (2.36012909523441209e01, 2.44024637934444173e02, 1.28261652607737228e03, 2.84423683343917062e03)

# 0.46875 < |x| <= 4:  erfc(|x|) = exp(-x^2) * C(|x|) / D(|x|)
_C = (5.64188496988670089e-1, 8.88314979438837594e00, 6.61191906371416295e01, 2.98635138197400131e02,
      8.81952221241769090e02, 1.71204761263407058e03, 2.05107837782607147e03, 1.23033935479799725e03,
      2.15311535474403846e-8)
_D = (1.57449261107098347e01, 1.17693950891312499e02, 5.37181101862009858e02, 1.62138957456669019e03,
      3.29079923573345963e03, 4.36261909014324716e03, 3.43936767414372164e03, 1.23033935480374942e03)

# |x| > 4:  erfc(|x|) = exp(-x^2) / |x| * (1/sqrt(pi) - z * P(z) / Q(z)),  z = 1 / x^2
_P = (3.05326634961232344e-1, 3.60344899949804439e-1, 1.25781726111229246e-1, 1.60837851487422766e-2,
      6.58749161529837803e-4, 1.63153871373020978e-2)
_Q = (2.56852019228982242e00, 1.87295284992346047e00, 5.27905102951428412e-1, 6.05183413124413191e-2,
      2.33520497626869185e-3)

_SMALL = 0.46875
_MID = 4.0
_BIG = 27.0  # erfc(27) ~ 1e-319: beyond it erf is exactly 1 in float64


def _ratio(t, num, den):
    """Cody's rational function, evaluated by Horner's rule exactly as ``calerf`` does.

    ``num`` has one coefficient more than ``den``: its last entry is the leading
    coefficient; the denominator is monic.
    """
    xnum = num[-1] * t
    xden = t + 0.0  # a fresh array: the loop below updates it in place
    for a, b in zip(num[:-2], den[:-1]):
        xnum += a
        xnum *= t
        xden += b
        xden *= t
    xnum += num[-2]
    xden += den[-1]
    xnum /= xden
    return xnum


def erf(x):
    """The error function erf(x) = 2/sqrt(pi) * integral_0^x exp(-t^2) dt, element-wise.

    ``x`` is a NumPy or CuPy array (or anything ``numpy.asarray`` takes). The work
    is done in float64, accurate to ~1e-16 relative, and the result has the
    input's floating dtype (float32 in, float32 out); integer and boolean input
    gives float64, as NumPy's ufuncs do. NaN gives NaN, +-inf gives +-1.

    Three ranges of |x|, as in Cody's ``calerf``: a rational function of x^2 for
    erf itself near 0, and rational approximations of erfc(|x|) * exp(x^2) above
    (in |x| up to 4, in 1/x^2 beyond), from which erf = sign(x) * (1 - erfc(|x|)).
    Every range is evaluated on its own clamped copy of |x| and the results are
    chosen with ``where``, so there is no data-dependent indexing (no GPU sync).
    """
    xp = get_array_module(x)
    x = xp.asarray(x)
    if x.dtype.kind == "c":
        raise TypeError(f"erf is defined here for real input only, got dtype {x.dtype}")
    out_dtype = x.dtype if x.dtype.kind == "f" else np.dtype(np.float64)
    x64 = x.astype(np.float64, copy=False)
    y = xp.abs(x64)

    # |x| <= 0.46875: erf directly
    ys = xp.minimum(y, _SMALL)
    small = _ratio(ys * ys, _A, _B)
    small *= ys

    # 0.46875 < |x| <= 4: erfc from a rational function of |x|
    ym = xp.clip(y, _SMALL, _MID)
    mid = _ratio(ym, _C, _D)
    mid *= xp.exp(-(ym * ym))

    # |x| > 4: erfc from a rational function of 1/x^2 (asymptotic form)
    yt = xp.clip(y, _MID, _BIG)
    z = 1.0 / (yt * yt)
    tail = _ratio(z, _P, _Q)
    tail *= z
    tail = _SQRPI - tail
    tail /= yt
    tail *= xp.exp(-(yt * yt))

    erfc = xp.where(y <= _MID, mid, tail)
    result = xp.where(y <= _SMALL, small, 1.0 - erfc)  # NaN fails every test and lands in the tail: NaN
    result = xp.copysign(result, x64)
    # asarray: NumPy turns 0-d results into scalars; give back a 0-d array
    return xp.asarray(result).astype(out_dtype, copy=False)
