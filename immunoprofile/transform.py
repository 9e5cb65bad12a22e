"""Compensation and scale transforms (Gating-ML 2.0 / FlowKit semantics), fast and exact.

Gates are defined in transformed coordinates, as in Gating-ML 2.0 and FlowKit: a
channel is compensated (``events[:, columns] @ inv(spillover)``, Gating-ML 2.0
spectrumMatrix / FlowKit ``Matrix.apply``), then each dimension goes through one of
the Gating-ML 2.0 transforms: ``flin`` (:class:`Linear`), ``flog``
(:class:`Log`), ``fasinh`` (:class:`Asinh`) and ``logicle`` (:class:`Logicle`),
or none (:class:`Identity`, our default for scatter and Time).

The logicle has no closed form. :meth:`Logicle.apply` evaluates it from a table
of exact values and derivatives at nodes spaced 1/128 of an octave apart in
``|x| + sigma`` (cubic Hermite pieces indexed straight from the IEEE-754 bits,
so no search), which agrees with the Moore & Parks root finder of
``flowutils``/FlowKit to about 1e-11 and is 15-20 times faster;
:meth:`Logicle.apply_exact` is a vectorised Halley root finder (Moore & Parks
2012) accurate to a few ulp, used to build the table and for values beyond it.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import inspect
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from .errors import CompensationError, InputFileError, TemplateError

__all__ = [
    "Transform",
    "Identity",
    "Linear",
    "Logicle",
    "Asinh",
    "Log",
    "TRANSFORM_TYPES",
    "transform_from_spec",
    "compensate",
    "compensation_matrix_from_csv",
]

log = logging.getLogger(__name__)

_LN10 = math.log(10.0)
_EPS = float(np.finfo(np.float64).eps)


# ---------------------------------------------------------------------------
# Protocol and the closed-form transforms
# ---------------------------------------------------------------------------


@runtime_checkable
class Transform(Protocol):
    """What every transform offers (implemented by frozen dataclasses).

    ``apply`` and ``inverse`` take any real array (float32 included) and return a
    new float64 array of the same shape; they never modify their input.
    """

    kind: str

    def apply(self, x: np.ndarray) -> np.ndarray: ...

    def inverse(self, y: np.ndarray) -> np.ndarray: ...

    def params(self) -> dict[str, float]: ...

    def to_flowkit(self, transform_id: str) -> Any: ...

    def to_spec(self) -> dict: ...


def _as_real(x: Any) -> np.ndarray:
    """``x`` as an array of a real dtype (no copy when it already is one)."""
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiub":
        raise TypeError(f"expected a real numeric array, got dtype {arr.dtype}")
    return arr


def _float64_copy(x: Any) -> np.ndarray:
    return np.array(_as_real(x), dtype=np.float64, copy=True)


def _flowkit_transform(name: str, transform_id: str, **params: float) -> Any:
    """Build ``flowkit.transforms.<name>`` (older FlowKit releases also took the id)."""
    if not isinstance(transform_id, str) or not transform_id:
        raise ValueError("transform_id must be a non-empty string")
    from flowkit import transforms as fk_transforms  # lazy: FlowKit is slow to import

    cls = getattr(fk_transforms, name)
    if "transform_id" in inspect.signature(cls).parameters:
        params = {"transform_id": transform_id, **params}
    return cls(**params)


def _fail(kind: str, message: str) -> TemplateError:
    return TemplateError(
        f"{kind} transform: {message}",
        hint="see the Gating-ML 2.0 transforms for the allowed parameter values",
    )


def _float_field(obj: Any, name: str) -> float:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise _fail(obj.kind, f"{name.upper()}={value!r} is not a number")
    value = float(value)
    if not math.isfinite(value):
        raise _fail(obj.kind, f"{name.upper()}={value!r} is not a finite number")
    object.__setattr__(obj, name, value)
    return value


@dataclass(frozen=True)
class Identity:
    """Raw values, untransformed (our default for scatter and Time)."""

    kind: ClassVar[str] = "identity"

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Return ``x`` as a new float64 array."""
        return _float64_copy(x)

    def inverse(self, y: np.ndarray) -> np.ndarray:
        """Return ``y`` as a new float64 array."""
        return _float64_copy(y)

    def params(self) -> dict[str, float]:
        """No parameters."""
        return {}

    def to_flowkit(self, transform_id: str) -> Any:
        """``LinearTransform(T=1, A=0)``: ``(x + 0) / (1 + 0)`` is exactly ``x``.

        FlowKit also accepts a dimension with no transform reference; this object
        lets callers treat every dimension alike.
        """
        return _flowkit_transform("LinearTransform", transform_id, param_t=1.0, param_a=0.0)

    def to_spec(self) -> dict:
        """``{'type': 'identity'}``."""
        return {"type": self.kind}


@dataclass(frozen=True)
class Linear:
    """Gating-ML 2.0 ``flin``: ``(x + A) / (T + A)``; maps ``[-A, T]`` to ``[0, 1]``.

    Raises
    ------
    TemplateError
        Unless ``T > 0`` and ``0 <= A <= T`` (Gating-ML 2.0 ``flin``).
    """

    t: float = 262144.0
    a: float = 0.0
    kind: ClassVar[str] = "linear"

    def __post_init__(self) -> None:
        t, a = _float_field(self, "t"), _float_field(self, "a")
        if not t > 0:
            raise _fail(self.kind, f"T={t:g} must be > 0")
        if not 0 <= a <= t:
            raise _fail(self.kind, f"A={a:g} must be between 0 and T={t:g}")

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Transform raw values (float64 result)."""
        out = np.add(_as_real(x), self.a, dtype=np.float64)
        out /= self.t + self.a
        return out

    def inverse(self, y: np.ndarray) -> np.ndarray:
        """Raw values from transformed ones (float64 result)."""
        out = np.multiply(_as_real(y), self.t + self.a, dtype=np.float64)
        out -= self.a
        return out

    def params(self) -> dict[str, float]:
        """``{'T': ..., 'A': ...}``."""
        return {"T": self.t, "A": self.a}

    def to_flowkit(self, transform_id: str) -> Any:
        """The equivalent ``flowkit.transforms.LinearTransform``."""
        return _flowkit_transform("LinearTransform", transform_id, param_t=self.t, param_a=self.a)

    def to_spec(self) -> dict:
        """``{'type': 'linear', 'T': ..., 'A': ...}``."""
        return {"type": self.kind, **self.params()}


@dataclass(frozen=True)
class Log:
    """Gating-ML 2.0 ``flog``: ``log10(x / T) / M + 1``.

    Defined for ``x > 0`` only: like FlowKit, ``0`` maps to ``-inf`` and negative
    values to NaN (no warning), so such events fall outside every gate.

    Raises
    ------
    TemplateError
        Unless ``T > 0`` and ``M > 0`` (Gating-ML 2.0 ``flog``).
    """

    t: float = 262144.0
    m: float = 4.5
    kind: ClassVar[str] = "log"

    def __post_init__(self) -> None:
        t, m = _float_field(self, "t"), _float_field(self, "m")
        if not t > 0:
            raise _fail(self.kind, f"T={t:g} must be > 0")
        if not m > 0:
            raise _fail(self.kind, f"M={m:g} must be > 0")

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Transform raw values (float64 result; ``-inf``/NaN for ``x <= 0``)."""
        out = np.divide(_as_real(x), self.t, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            np.log10(out, out=out)
        out /= self.m
        out += 1.0
        return out

    def inverse(self, y: np.ndarray) -> np.ndarray:
        """Raw values: ``T * 10 ** ((y - 1) * M)``."""
        out = np.subtract(_as_real(y), 1.0, dtype=np.float64)
        out *= self.m
        with np.errstate(over="ignore"):
            np.power(10.0, out, out=out)
        out *= self.t
        return out

    def params(self) -> dict[str, float]:
        """``{'T': ..., 'M': ...}``."""
        return {"T": self.t, "M": self.m}

    def to_flowkit(self, transform_id: str) -> Any:
        """The equivalent ``flowkit.transforms.LogTransform``."""
        return _flowkit_transform("LogTransform", transform_id, param_t=self.t, param_m=self.m)

    def to_spec(self) -> dict:
        """``{'type': 'log', 'T': ..., 'M': ...}``."""
        return {"type": self.kind, **self.params()}


@dataclass(frozen=True)
class Asinh:
    """Gating-ML 2.0 ``fasinh``: ``(asinh(x sinh(M ln10) / T) + A ln10) / ((M + A) ln10)``.

    Equal to ``Logicle(T, W=0, M, A)``. A cytometry "cofactor" ``c`` is
    ``Asinh.from_cofactor(c)``, whose output is exactly ``asinh(x / c)``.

    Raises
    ------
    TemplateError
        Unless ``T > 0``, ``M > 0`` and ``0 <= A <= M`` (Gating-ML 2.0 ``fasinh``).
    """

    t: float = 262144.0
    m: float = 4.5
    a: float = 0.0
    kind: ClassVar[str] = "asinh"

    def __post_init__(self) -> None:
        t, m, a = (_float_field(self, k) for k in ("t", "m", "a"))
        if not t > 0:
            raise _fail(self.kind, f"T={t:g} must be > 0")
        if not m > 0:
            raise _fail(self.kind, f"M={m:g} must be > 0")
        if not 0 <= a <= m:
            raise _fail(self.kind, f"A={a:g} must be between 0 and M={m:g}")
        if not math.isfinite(math.sinh(min(m * _LN10, 710.0))):
            raise _fail(self.kind, f"M={m:g} is too large (sinh(M ln 10) overflows)")

    @classmethod
    def from_cofactor(cls, cofactor: float) -> Asinh:
        """The ``fasinh`` equal to ``asinh(x / cofactor)``: ``T = c sinh(1)``, ``M = 1/ln 10``, ``A = 0``.

        Raises
        ------
        TemplateError
            If ``cofactor`` is not a positive finite number.
        """
        if isinstance(cofactor, bool) or not isinstance(cofactor, (int, float, np.integer, np.floating)):
            raise _fail(cls.kind, f"cofactor={cofactor!r} is not a number")
        if not (math.isfinite(cofactor) and cofactor > 0):
            raise _fail(cls.kind, f"cofactor={cofactor!r} must be a positive number")
        return cls(t=float(cofactor) * math.sinh(1.0), m=1.0 / _LN10, a=0.0)

    @property
    def cofactor(self) -> float:
        """``T / sinh(M ln 10)``: the input is ``asinh(x / cofactor)``, then scaled and shifted."""
        return self.t / math.sinh(self.m * _LN10)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Transform raw values (float64 result)."""
        out = np.multiply(_as_real(x), math.sinh(self.m * _LN10) / self.t, dtype=np.float64)
        np.arcsinh(out, out=out)
        out += self.a * _LN10
        out /= (self.m + self.a) * _LN10
        return out

    def inverse(self, y: np.ndarray) -> np.ndarray:
        """Raw values from transformed ones (float64 result)."""
        out = np.multiply(_as_real(y), (self.m + self.a) * _LN10, dtype=np.float64)
        out -= self.a * _LN10
        with np.errstate(over="ignore"):
            np.sinh(out, out=out)
        out /= math.sinh(self.m * _LN10) / self.t
        return out

    def params(self) -> dict[str, float]:
        """``{'T': ..., 'M': ..., 'A': ...}``."""
        return {"T": self.t, "M": self.m, "A": self.a}

    def to_flowkit(self, transform_id: str) -> Any:
        """The equivalent ``flowkit.transforms.AsinhTransform``."""
        return _flowkit_transform(
            "AsinhTransform", transform_id, param_t=self.t, param_m=self.m, param_a=self.a
        )

    def to_spec(self) -> dict:
        """``{'type': 'asinh', 'T': ..., 'M': ..., 'A': ...}``."""
        return {"type": self.kind, **self.params()}


# ---------------------------------------------------------------------------
# Logicle
# ---------------------------------------------------------------------------

_TAYLOR_TERMS = 16  # as Moore & Parks: enough for full precision near data zero
_OCTAVE_BITS = 7  # table nodes per octave = 2**_OCTAVE_BITS
_OCTAVES_BELOW_T = 52  # table starts at sigma = 2**(floor(log2 T) - 52)
_OCTAVES_ABOVE_T = 46  # ... and ends at 2**(floor(log2 T) + 46); beyond: exact solver
_CHUNK = 16384  # values per pass: the working buffers stay in the L2 cache
_ABS_MASK = np.int64(0x7FFFFFFFFFFFFFFF)
_SIGN_MASK = np.int64(-0x8000000000000000)


def _solve_d(b: float, w: float) -> float:
    """Root ``d`` in ``(0, b]`` of ``2 (ln d - ln b) + w (b + d) = 0`` (Moore & Parks 2012).

    Newton steps kept inside a shrinking bracket; ``w == 0`` gives ``d = b``.
    """
    if w == 0:
        return b
    lo, hi = 0.0, b
    f_b = -2.0 * math.log(b) + w * b
    d = 0.5 * b
    for _ in range(200):
        f = 2.0 * math.log(d) + w * d + f_b
        if f == 0:
            return d
        if f < 0:
            lo = d
        else:
            hi = d
        step = d - f / (2.0 / d + w)
        if not lo < step < hi:
            step = 0.5 * (lo + hi)
        if abs(step - d) <= 2.0 * _EPS * d:
            return step
        d = step
    return d  # pragma: no cover - the bracket halves at least every other step


class _LogicleKernel:
    """Constants of one logicle scale, its exact solver, inverse and lookup table.

    ``B(y) = a e^(b y) - c e^(-d y) - f`` for ``y >= x1`` (data zero is ``x1``),
    ``B(2 x1 - y) = -B(y)`` below; ``logicle(x)`` is the root of ``B(y) = x``.
    Near ``x1`` ``B`` is evaluated by its Taylor series (round-off), as in the
    reference implementation.
    """

    def __init__(self, t: float, w: float, m: float, a: float) -> None:
        self.w = w / (m + a)
        x2 = a / (m + a)
        self.x1 = x2 + self.w
        x0 = x2 + 2.0 * self.w
        self.b = (m + a) * _LN10
        self.d = _solve_d(self.b, self.w)
        c_a = math.exp(x0 * (self.b + self.d))
        mf_a = math.exp(self.b * self.x1) - c_a / math.exp(self.d * self.x1)
        # a, c, f and the series are for T = 1 (B scales with T): no underflow for any T
        self.t = t
        self.a = 1.0 / ((math.exp(self.b) - mf_a) - c_a / math.exp(self.d))
        self.c = c_a * self.a
        self.f = -mf_a * self.a
        self.x_taylor = self.x1 + self.w / 4.0
        pos = self.a * math.exp(self.b * self.x1)
        neg = -self.c / math.exp(self.d * self.x1)
        taylor = []
        for i in range(_TAYLOR_TERMS):
            pos *= self.b / (i + 1)
            neg *= -self.d / (i + 1)
            taylor.append(pos + neg)
        taylor[1] = 0.0  # exactly zero by the logicle condition
        self.taylor = tuple(taylor)
        # above v_big (in units of T), logicle(v) = ln((v + f + c e^(-d y)) / a) / b, no iteration
        self.v_big = max(2.0**40, 1e8 * (abs(self.f) + self.c))
        self._build_table(t)

    # -- closed form B(y) / T and its derivative, for y >= x1 ------------------

    def _series(self, y: np.ndarray) -> np.ndarray:
        z = y - self.x1
        tay = self.taylor
        s = tay[-1] * z
        for coef in tay[-2:1:-1]:
            s += coef
            s *= z
        s *= z
        s += tay[0]
        s *= z
        return s

    def _biexp(self, y: np.ndarray) -> np.ndarray:
        """``B(y) / T`` for ``y >= x1`` (Taylor series just above ``x1``)."""
        with np.errstate(over="ignore"):
            out = (self.a * np.exp(self.b * y) + self.f) - self.c * np.exp(-self.d * y)
        near = y < self.x_taylor
        if near.any():
            out[near] = self._series(y[near])
        return out

    def _slope(self, y: np.ndarray) -> np.ndarray:
        """``T dlogicle/dx = T / B'(y)`` for ``y >= x1``."""
        return 1.0 / (self.a * self.b * np.exp(self.b * y) + self.c * self.d * np.exp(-self.d * y))

    # -- exact solver ----------------------------------------------------------

    def solve(self, v: np.ndarray, guess: np.ndarray | None = None) -> np.ndarray:
        """``logicle(v) - x1`` for ``v >= 0`` (float64), by Halley's method to ~3 ulp.

        ``guess`` (same shape, ``logicle(v) - x1`` approximately) saves iterations.
        NaN gives NaN and ``+inf`` gives ``+inf``.
        """
        v = np.asarray(v, dtype=np.float64) / self.t
        out = np.zeros(v.shape)
        out[np.isnan(v)] = np.nan
        out[np.isposinf(v)] = np.inf
        flat = out.reshape(-1)
        big = np.isfinite(v) & (v > self.v_big)
        if big.any():  # Halley would overflow; c e^(-d y) and f are below 1e-8 of v here
            vb = v[big]
            log_a = math.log(self.a)
            y0 = (np.log(vb) - log_a) / self.b
            out[big] = (np.log(vb + self.f + self.c * np.exp(-self.d * y0)) - log_a) / self.b - self.x1
        todo = np.flatnonzero(np.isfinite(v) & (v > 0) & ~big)
        if todo.size == 0:
            return out
        vv = v.reshape(-1)[todo]
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            if guess is not None:
                y = self.x1 + np.asarray(guess, dtype=np.float64).reshape(-1)[todo]
            else:  # near-linear below f (or within one e-fold of zero), logarithmic above
                linear = self.x1 + vv / self.taylor[0]
                logarithmic = np.log(vv / self.a) / self.b
                y = np.where((vv < self.f) | (linear < self.x1 + 1.0 / self.b), linear, logarithmic)
            for _ in range(60):
                ae = self.a * np.exp(self.b * y)
                ce = self.c * np.exp(-self.d * y)
                r = (ae + self.f) - (ce + vv)
                near = y < self.x_taylor
                if near.any():
                    r[near] = self._series(y[near]) - vv[near]
                dy = self.b * ae + self.d * ce
                ddy = self.b * self.b * ae - self.d * self.d * ce
                delta = r / (dy * (1.0 - r * ddy / (2.0 * dy * dy)))
                y = np.maximum(y - delta, self.x1)
                tol = np.where(y > 1.0, 3.0 * _EPS * y, 3.0 * _EPS)
                done = ~(np.abs(delta) >= tol)  # NaN counts as done: nothing more to gain
                flat[todo[done]] = y[done] - self.x1
                keep = ~done
                if not keep.any():
                    break
                todo, vv, y = todo[keep], vv[keep], y[keep]
            else:  # pragma: no cover - Halley converges cubically from these guesses
                flat[todo] = y - self.x1
        return out

    def apply_exact(self, x: np.ndarray) -> np.ndarray:
        """``logicle(x)`` by :meth:`solve`, seeded from the table."""
        x = np.asarray(x, dtype=np.float64)
        v = np.abs(x)
        with np.errstate(invalid="ignore"):
            guess = self.apply_fast(v) - self.x1
        return self.x1 + np.copysign(self.solve(v, guess), x)

    def inverse(self, y: np.ndarray) -> np.ndarray:
        y = np.asarray(y, dtype=np.float64)
        z = y - self.x1
        out = self._biexp(self.x1 + np.abs(z))
        out *= self.t
        return np.copysign(out, z)

    # -- lookup table ------------------------------------------------------------

    def _build_table(self, t: float) -> None:
        """Cubic Hermite pieces of ``g(u) = logicle(u - sigma) - x1`` on a bit-indexed grid.

        Node ``j`` is ``u_j = 2**e * (1 + k / 128)``: the top 7 mantissa bits and the
        exponent of ``u = |x| + sigma`` are the piece's index and the rest of the
        mantissa is the position inside the piece, exactly.
        """
        e_top = math.floor(math.log2(t))
        e_min = max(e_top - _OCTAVES_BELOW_T, -1000)  # clamped for absurd T only
        e_max = min(e_top + _OCTAVES_ABOVE_T, 1000)
        n_pieces = (e_max - e_min) << _OCTAVE_BITS
        self.sigma = math.ldexp(1.0, e_min)
        self.shift = 52 - _OCTAVE_BITS
        self.key0 = int(np.array(self.sigma).view(np.int64)) >> self.shift
        self.frac_mask = np.int64((1 << self.shift) - 1)
        self.frac_scale = math.ldexp(1.0, -self.shift)
        self.n_pieces = n_pieces
        j = np.arange(n_pieces + 1)
        u = np.ldexp(1.0 + (j & ((1 << _OCTAVE_BITS) - 1)) / (1 << _OCTAVE_BITS), e_min + (j >> _OCTAVE_BITS))
        g = self.solve(u - self.sigma)
        slope = self._slope(g + self.x1) / t
        h = np.diff(u)
        p0, p1 = g[:-1], g[1:]
        m0, m1 = slope[:-1] * h, slope[1:] * h
        self.c0 = np.ascontiguousarray(p0)
        self.c1 = np.ascontiguousarray(m0)
        self.c2 = 3.0 * (p1 - p0) - 2.0 * m0 - m1
        self.c3 = 2.0 * (p0 - p1) + m0 + m1
        for arr in (self.c0, self.c1, self.c2, self.c3):
            arr.flags.writeable = False

    def apply_fast(self, x: np.ndarray) -> np.ndarray:
        """Table evaluation; ``x`` any real array, result float64 of the same shape."""
        arr = _as_real(x)
        out = np.empty(arr.shape, dtype=np.float64)
        n = arr.size
        if n == 0:
            return out
        src = arr.reshape(-1)  # a view unless arr is a non-contiguous N-d array
        dst = out.reshape(-1)
        size = min(n, _CHUNK)
        buf_x = np.empty(size)
        buf_u = np.empty(size)
        buf_i = np.empty(size, dtype=np.int64)
        key = np.empty(size, dtype=np.intp)
        poly = np.empty(size)
        tmp = np.empty(size)
        c0, c1, c2, c3 = self.c0, self.c1, self.c2, self.c3
        for start in range(0, n, _CHUNK):
            stop = min(start + _CHUNK, n)
            m = stop - start
            chunk = src[start:stop]
            if m != size:
                buf_x, buf_u, buf_i, key, poly, tmp = (
                    b[:m] for b in (buf_x, buf_u, buf_i, key, poly, tmp)
                )
            if chunk.dtype == np.float64 and chunk.flags.c_contiguous:
                xs = chunk
            else:
                np.copyto(buf_x, chunk, casting="unsafe")
                xs = buf_x
            xbits = xs.view(np.int64)
            ubits = buf_u.view(np.int64)
            # u = |x| + sigma; piece index from its exponent and top mantissa bits
            np.bitwise_and(xbits, _ABS_MASK, out=buf_i)
            np.add(buf_i.view(np.float64), self.sigma, out=buf_u)
            np.right_shift(ubits, self.shift, out=key)
            np.subtract(key, self.key0, out=key)
            beyond = None
            if key.max() >= self.n_pieces:  # NaN, inf or |x| >= T * 2**46: exact solver
                beyond = np.flatnonzero(key >= self.n_pieces)
                key[beyond] = 0
            # position inside the piece: the remaining mantissa bits, as a float in [0, 1)
            np.bitwise_and(ubits, self.frac_mask, out=buf_i)
            np.multiply(buf_i, self.frac_scale, out=buf_u)
            # cubic Hermite piece, Horner form
            np.take(c3, key, out=poly, mode="wrap")
            poly *= buf_u
            np.take(c2, key, out=tmp, mode="wrap")
            poly += tmp
            poly *= buf_u
            np.take(c1, key, out=tmp, mode="wrap")
            poly += tmp
            poly *= buf_u
            np.take(c0, key, out=tmp, mode="wrap")
            poly += tmp
            # odd symmetry about data zero: y = x1 + sign(x) * g(|x|)
            np.bitwise_and(xbits, _SIGN_MASK, out=buf_i)
            pbits = poly.view(np.int64)
            np.bitwise_or(pbits, buf_i, out=pbits)
            np.add(poly, self.x1, out=dst[start:stop])
            if beyond is not None:
                rare = xs[beyond]
                dst[start + beyond] = self.x1 + np.copysign(self.solve(np.abs(rare)), rare)
        return out


@functools.lru_cache(maxsize=32)
def _logicle_kernel(t: float, w: float, m: float, a: float) -> _LogicleKernel:
    return _LogicleKernel(t, w, m, a)


@dataclass(frozen=True)
class Logicle:
    """Gating-ML 2.0 ``logicle`` (Moore & Parks 2012): the root ``y`` of ``B(y; T, W, M, A) = x``.

    ``T`` maps to 1, data zero to ``(W + A) / (M + A)``; ``M`` decades of log scale,
    ``W`` decades of near-linear region, ``A`` extra decades of negatives.

    Raises
    ------
    TemplateError
        Unless ``T > 0``, ``W >= 0``, ``M > 0``, ``2W <= M`` and ``-W <= A <= M - 2W``
        (Gating-ML 2.0 ``logicle``).
    """

    t: float = 262144.0
    w: float = 0.5
    m: float = 4.5
    a: float = 0.0
    kind: ClassVar[str] = "logicle"

    def __post_init__(self) -> None:
        t, w, m, a = (_float_field(self, k) for k in ("t", "w", "m", "a"))
        if not t > 0:
            raise _fail(self.kind, f"T={t:g} must be > 0")
        if not m > 0:
            raise _fail(self.kind, f"M={m:g} must be > 0")
        if not w >= 0:
            raise _fail(self.kind, f"W={w:g} must be >= 0")
        if not 2 * w <= m:
            raise _fail(self.kind, f"W={w:g} is too large: 2*W must be <= M={m:g}")
        if not -w <= a <= m - 2 * w:
            raise _fail(self.kind, f"A={a:g} must be between -W={-w:g} and M-2W={m - 2 * w:g}")
        if (m + a) * _LN10 > 700:
            raise _fail(self.kind, f"M+A={m + a:g} decades is too large (e^(b) overflows)")

    @property
    def _kernel(self) -> _LogicleKernel:
        return _logicle_kernel(self.t, self.w, self.m, self.a)

    @property
    def zero(self) -> float:
        """Where data zero lands: ``(W + A) / (M + A)``."""
        return self._kernel.x1

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Transform raw values (float64 result, within ~1e-11 of the exact root).

        Accepts any real dtype and layout without copying the whole input; NaN stays
        NaN and +-inf map to +-inf.
        """
        return self._kernel.apply_fast(x)

    def apply_exact(self, x: np.ndarray) -> np.ndarray:
        """Transform by Halley's method to a few ulp (seeded from the table; ~40x slower than :meth:`apply`)."""
        return self._kernel.apply_exact(_as_real(x))

    def inverse(self, y: np.ndarray) -> np.ndarray:
        """Raw values from transformed ones: the closed-form biexponential ``B(y)``."""
        return self._kernel.inverse(_as_real(y))

    def params(self) -> dict[str, float]:
        """``{'T': ..., 'W': ..., 'M': ..., 'A': ...}``."""
        return {"T": self.t, "W": self.w, "M": self.m, "A": self.a}

    def to_flowkit(self, transform_id: str) -> Any:
        """The equivalent ``flowkit.transforms.LogicleTransform``."""
        return _flowkit_transform(
            "LogicleTransform", transform_id, param_t=self.t, param_w=self.w, param_m=self.m, param_a=self.a
        )

    def to_spec(self) -> dict:
        """``{'type': 'logicle', 'T': ..., 'W': ..., 'M': ..., 'A': ...}``."""
        return {"type": self.kind, **self.params()}


# ---------------------------------------------------------------------------
# Specs from templates
# ---------------------------------------------------------------------------

TRANSFORM_TYPES: dict[str, type] = {
    "identity": Identity,
    "linear": Linear,
    "log": Log,
    "asinh": Asinh,
    "logicle": Logicle,
}
# Gating-ML 2.0 names of the same transforms
_TYPE_ALIASES = {"flin": "linear", "flog": "log", "fasinh": "asinh"}
# parameters each type accepts (spec keys lower-cased = dataclass fields)
_SPEC_KEYS: dict[str, tuple[str, ...]] = {
    "identity": (),
    "linear": ("t", "a"),
    "log": ("t", "m"),
    "asinh": ("t", "m", "a"),
    "logicle": ("t", "w", "m", "a"),
}
_TYPE_LIST = "identity, linear (flin), log (flog), asinh (fasinh), logicle"


def _spec_number(value: Any, field: str, where: str) -> float:
    """A spec value as a finite float; YAML 1.1 reads ``2.6e5`` as a string, so numeric strings pass."""
    if isinstance(value, bool) or value is None:
        number = math.nan
    elif isinstance(value, (int, float, np.integer, np.floating)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = math.nan
    else:
        number = math.nan
    if not math.isfinite(number):
        raise TemplateError(f"{where}: {field} is {value!r}; expected a finite number")
    return number


def transform_from_spec(spec: Mapping | str | Transform, *, where: str = "") -> Transform:
    """Build a transform from its template spec.

    Parameters
    ----------
    spec
        A type name (``'logicle'``: default parameters), or a mapping such as
        ``{'type': 'logicle', 'T': 262144, 'W': 0.5, 'M': 4.5, 'A': 0}``. Keys are
        case-insensitive; omitted parameters take the defaults of the dataclass.
        Types: ``identity``, ``linear``/``flin`` (T, A), ``log``/``flog`` (T, M),
        ``asinh``/``fasinh`` (T, M, A, or ``cofactor`` alone, meaning exactly
        ``asinh(x / cofactor)``, see :meth:`Asinh.from_cofactor`), ``logicle``
        (T, W, M, A). A :class:`Transform` instance is returned unchanged.
    where
        Where the spec comes from, for messages
        (e.g. ``"template t_cell_exhaustion.yaml, transforms.PD1"``).

    Returns
    -------
    Transform

    Raises
    ------
    TemplateError
        Unknown type or key, a non-numeric value, or parameters outside the
        Gating-ML 2.0 constraints; the message names ``where`` and the field.
    """
    where = where or "transform spec"
    if isinstance(spec, tuple(TRANSFORM_TYPES.values())):
        return spec  # type: ignore[return-value]
    if isinstance(spec, str):
        kind_raw, values = spec, {}
    elif isinstance(spec, Mapping):
        values = {}
        kind_raw = None
        for key, value in spec.items():
            if not isinstance(key, str):
                raise TemplateError(f"{where}: key {key!r} is not a string")
            lower = key.strip().lower()
            if lower in values or (lower == "type" and kind_raw is not None):
                raise TemplateError(f"{where}: key {key!r} is given twice (keys are case-insensitive)")
            if lower == "type":
                kind_raw = value
            else:
                values[lower] = (key, value)
        if kind_raw is None:
            raise TemplateError(
                f"{where}: no 'type'; expected e.g. {{type: logicle, T: 262144, W: 0.5, M: 4.5, A: 0}}"
            )
    else:
        raise TemplateError(
            f"{where}: expected a transform name ({_TYPE_LIST}) or a mapping with a 'type', "
            f"got {type(spec).__name__} {spec!r}"
        )
    if not isinstance(kind_raw, str):
        raise TemplateError(f"{where}: type {kind_raw!r} is not a name; expected one of: {_TYPE_LIST}")
    kind = kind_raw.strip().lower()
    kind = _TYPE_ALIASES.get(kind, kind)
    if kind not in TRANSFORM_TYPES:
        hint = ""
        if kind in ("biex", "biexponential", "hyperlog"):
            hint = " (FlowJo biex and hyperlog are not supported: use logicle)"
        raise TemplateError(f"{where}: unknown transform type {kind_raw!r}{hint}; expected one of: {_TYPE_LIST}")
    allowed = _SPEC_KEYS[kind]
    if kind == "asinh" and "cofactor" in values:
        others = sorted(original for lower, (original, _) in values.items() if lower != "cofactor")
        if others:
            raise TemplateError(
                f"{where}: asinh takes either 'cofactor' or T/M/A, not both (also got {', '.join(others)})"
            )
        original, value = values["cofactor"]
        cofactor = _spec_number(value, original, where)
        try:
            return Asinh.from_cofactor(cofactor)
        except TemplateError as e:
            raise TemplateError(f"{where}: {e.message}", hint=e.hint) from None
    params: dict[str, float] = {}
    for lower, (original, value) in values.items():
        if lower not in allowed:
            expected = ", ".join(k.upper() for k in allowed) or "no parameters"
            if kind == "asinh":
                expected += " (or cofactor alone)"
            raise TemplateError(f"{where}: unknown key {original!r} for a {kind} transform; expected {expected}")
        params[lower] = _spec_number(value, original, where)
    try:
        return TRANSFORM_TYPES[kind](**params)
    except TemplateError as e:
        raise TemplateError(f"{where}: {e.message}", hint=e.hint) from None


# ---------------------------------------------------------------------------
# Compensation
# ---------------------------------------------------------------------------

_MAX_CONDITION = 1e12  # the inverse would lose ~12 of 16 digits: not a real spillover matrix
_COMP_BLOCK = 16384  # rows per block: the gathered block stays in cache


def compensate(events: np.ndarray, columns: Sequence[int], spillover: np.ndarray) -> np.ndarray:
    """Compensated values of ``columns``: ``events[:, columns] @ inv(spillover)``.

    As Gating-ML 2.0 (``spectrumMatrix``) and FlowKit's ``Matrix.apply``: row ``i`` of
    ``spillover`` is the spill of the dye of ``columns[i]`` into each detector.

    Parameters
    ----------
    events
        Event matrix ``(n_events, n_parameters)``, any real dtype (float32 is read
        block by block, never copied whole).
    columns
        Indices of the detectors, in the order of the matrix rows and columns.
    spillover
        Square ``(len(columns), len(columns))`` spillover matrix.

    Returns
    -------
    numpy.ndarray
        New float64 array ``(n_events, len(columns))`` in column-major (Fortran)
        order, so ``out[:, j]`` is a contiguous vector for the transforms.

    Raises
    ------
    CompensationError
        If the matrix is not square, does not match ``columns``, holds non-finite
        values or is singular (condition number above 1e12); or ``columns`` are out
        of range or repeated.
    """
    arr = np.asarray(events)
    if arr.ndim != 2 or arr.dtype.kind not in "fiub":
        raise CompensationError(f"events must be a 2-d numeric array, got shape {arr.shape} dtype {arr.dtype}")
    cols = [int(c) for c in columns]
    n_par = arr.shape[1]
    bad = [c for c in cols if not -n_par <= c < n_par]
    if bad:
        raise CompensationError(f"column indices {bad} are out of range for {n_par} parameters")
    cols = [c % n_par for c in cols]
    if len(set(cols)) != len(cols):
        raise CompensationError(f"column indices {list(columns)} repeat a parameter")
    matrix = np.asarray(spillover, dtype=np.float64)
    k = len(cols)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise CompensationError(
            f"the spillover matrix must be square, got shape {matrix.shape}",
            hint="check the $SPILLOVER keyword or the matrix file",
        )
    if matrix.shape[0] != k:
        raise CompensationError(
            f"the spillover matrix is {matrix.shape[0]}x{matrix.shape[1]} but {k} channels are to be compensated",
            hint="the matrix must have one row and one column per compensated channel",
        )
    if not np.all(np.isfinite(matrix)):
        raise CompensationError("the spillover matrix holds NaN or infinite values")
    n = arr.shape[0]
    out = np.empty((n, k), dtype=np.float64, order="F")
    if k == 0 or n == 0:
        return out
    try:
        inverse = np.linalg.inv(matrix)
    except np.linalg.LinAlgError:
        inverse = None
    condition = np.linalg.cond(matrix) if inverse is not None else math.inf
    if inverse is None or not condition <= _MAX_CONDITION:
        raise CompensationError(
            f"the spillover matrix is singular (condition number {condition:.3g})",
            hint="two rows are (nearly) proportional; check the single-stain controls or the matrix file",
        )
    left = np.ascontiguousarray(inverse.T)
    out_t = out.T  # (k, n), C-contiguous view of out
    block = np.empty((min(n, _COMP_BLOCK), k))
    with _one_blas_thread():
        for start in range(0, n, _COMP_BLOCK):
            stop = min(start + _COMP_BLOCK, n)
            part = block[: stop - start]
            part[...] = arr[start:stop, cols]
            np.matmul(left, part.T, out=out_t[:, start:stop])
    return out


def _one_blas_thread() -> Any:
    """Single-threaded BLAS for small products: a threaded OpenBLAS on a busy machine (or
    beside other workers of a batch) was measured 10-20x slower for this (k x k) @ (k x n)."""
    try:
        from threadpoolctl import threadpool_limits  # installed with scikit-learn
    except ImportError:  # pragma: no cover - then BLAS keeps its own threading
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def compensation_matrix_from_csv(path: str | os.PathLike) -> tuple[tuple[str, ...], np.ndarray]:
    """Read a FlowJo-style spillover matrix file (CSV or TSV).

    The first non-blank line holds the channel names (a leading ``#`` is ignored);
    each following line one row of the matrix, optionally led by the row's channel
    name (then the header may start with an empty cell). Rows named in another
    order than the header are put in header order.

    Parameters
    ----------
    path
        The matrix file.

    Returns
    -------
    tuple
        ``(channel names, matrix)``, matrix float64 of shape ``(n, n)``.

    Raises
    ------
    InputFileError
        If the file is missing or unreadable.
    TemplateError
        If it is malformed (code ``COMPENSATION_FILE_INVALID``): the message names
        the file, line and column.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as e:
        raise InputFileError(
            f"cannot read the compensation matrix ({e.strerror or e})", path=path,
            hint="check the path in the sample sheet or on the command line",
        ) from e

    def bad(message: str, hint: str | None = None) -> TemplateError:
        return TemplateError(message, path=path, hint=hint, code="COMPENSATION_FILE_INVALID")

    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    lines = [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        raise bad("the file is empty", hint="export the matrix again: a header of channel names, then one row per channel")
    header_number, header_line = lines[0]
    header_line = header_line.lstrip()
    if header_line.startswith("#"):
        header_line = header_line[1:].lstrip()
    delimiter = "\t" if "\t" in header_line else ","
    rows = list(csv.reader([header_line] + [line for _, line in lines[1:]], delimiter=delimiter))
    header, *body = ([cell.strip() for cell in row] for row in rows)
    for row in (header, *body):  # spreadsheets often end lines with a separator
        while row and row[-1] == "":
            row.pop()
    numbers = [number for number, _ in lines]
    if len(header) < 1 or (len(header) == 1 and not header[0]):
        raise bad(f"line {header_number}: no channel names in the header row")
    corner = header[0] == ""
    names = header[1:] if corner else header
    if not corner and body and len(body[0]) == len(names) + 1:
        try:
            float(body[0][0])
        except ValueError:
            corner = True  # rows carry names but the header has no corner cell
    if any(not name for name in names):
        position = names.index("") + 1
        raise bad(f"line {header_number}: channel name number {position} in the header is empty")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise bad(f"line {header_number}: channel names repeat in the header: {', '.join(duplicates)}")
    k = len(names)
    if len(body) != k:
        raise bad(
            f"the header names {k} channels but {len(body)} matrix rows follow",
            hint="a spillover matrix has one row per channel",
        )
    matrix = np.empty((k, k))
    row_names: list[str] = []
    for i, (row, number) in enumerate(zip(body, numbers[1:])):
        cells = row
        if corner:
            if not row:
                raise bad(f"line {number}: the row is empty")
            row_names.append(row[0])
            cells = row[1:]
        if len(cells) != k:
            raise bad(f"line {number}: {len(cells)} values, expected {k} (one per channel in the header)")
        for j, cell in enumerate(cells):
            try:
                value = float(cell)
            except ValueError:
                value = math.nan
            if not math.isfinite(value):
                raise bad(f"line {number}, column {names[j]!r}: {cell!r} is not a finite number")
            matrix[i, j] = value
    if corner:
        if sorted(row_names) != sorted(names):
            missing = sorted(set(names) - set(row_names))
            extra = sorted(set(row_names) - set(names))
            raise bad(
                "the row names do not match the header"
                + (f"; no row for: {', '.join(missing)}" if missing else "")
                + (f"; rows not in the header: {', '.join(extra)}" if extra else "")
            )
        if row_names != names:
            order = [row_names.index(name) for name in names]
            matrix = matrix[order]
            log.info("%s: matrix rows reordered to follow the header", path)
    diagonal = np.diag(matrix)
    if k and np.allclose(diagonal, 100.0):
        raise bad(
            "the diagonal is 100: the matrix is in percent",
            hint="divide every value by 100 (the diagonal of a spillover matrix is 1)",
        )
    if np.any(np.abs(diagonal - 1.0) > 1e-6):
        log.warning("%s: the spillover matrix diagonal is not all 1 (%s)", path, np.array2string(diagonal, precision=4))
    return tuple(names), matrix
