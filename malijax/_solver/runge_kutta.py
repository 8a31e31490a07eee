"""Explicit Runge--Kutta methods: one generic step driven by a Butcher tableau.

Convention (ALGORITHMS.md §8): `X_i = y + h Σ_j a_ij k_j`, `k_i = f(t + c_i h, X_i)`,
`y1 = y + h Σ_i b_i k_i`, error estimate `h Σ_i (b_i - b̂_i) k_i`.

Dense output (continuous extension) over a step: `y(t + θh) = y + h Σ_i b_i(θ) k_i`,
`θ ∈ [0, 1]`, with polynomial weights `b_i(θ)`, `b_i(0) = 0`, `b_i(1) = b_i`, so the
interpolant needs no evaluation beyond the step's stages. Dopri5 and Tsit5 use their
own 4th-order weights; RK4 its classical 3rd-order ones (Hairer, Nørsett & Wanner I,
II.6); FSAL tableaux without their own (Bosh3) cubic Hermite on `(y0, k_1, y1, k_s)`,
`k_s = f(t + h, y1)`; the others quadratic Hermite on `(y0, k_1, y1)` (no extra
evaluation). `dense_order` is the interpolant's order: its local error is
`O(h^(dense_order + 1))`, measured in `tests/test_dense.py`.
"""

import dataclasses
from fractions import Fraction
from typing import ClassVar

import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from .._misc import tree_lincomb
from .base import AbstractSolver


@dataclasses.dataclass(frozen=True)
class ButcherTableau:
    """An explicit Runge--Kutta tableau, validated on construction.

    `a[i]` holds the `i` coefficients `a_{i+1, 1..i}` of stage `i + 1` (stage 1 has
    none), `b_error = b - b̂` (or `None` for a method without an embedded estimate).
    Not a pytree: the coefficients are compile-time constants.
    """

    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    b_error: tuple[float, ...] | None = None
    # Dense-output weights: `b_dense[i][p - 1]` is the coefficient of θ^p in b_i(θ)
    # (None: Hermite, derived from b by `dense_weights`).
    b_dense: tuple[tuple[float, ...], ...] | None = None

    def __post_init__(self):
        s = len(self.c)
        if len(self.b) != s or len(self.a) != s - 1:
            raise ValueError("Butcher tableau: c, a and b disagree on the stage count.")
        if self.c[0] != 0:
            raise ValueError("Butcher tableau: an explicit method needs c_1 = 0.")
        for i, row in enumerate(self.a, start=1):
            if len(row) != i:
                raise ValueError(f"Butcher tableau: row {i + 1} of a needs {i} entries.")
            if not np.isclose(sum(row), self.c[i], rtol=0, atol=1e-13):
                raise ValueError(f"Butcher tableau: row {i + 1} of a does not sum to c.")
        if not np.isclose(sum(self.b), 1.0, rtol=0, atol=1e-13):
            raise ValueError("Butcher tableau: b does not sum to 1.")
        if self.b_error is not None:
            if len(self.b_error) != s:
                raise ValueError("Butcher tableau: b_error needs one entry per stage.")
            if not np.isclose(sum(self.b_error), 0.0, rtol=0, atol=1e-13):
                raise ValueError("Butcher tableau: b_error does not sum to 0.")

        if self.b_dense is not None:
            if len(self.b_dense) != s:
                raise ValueError("Butcher tableau: b_dense needs one row per stage.")
            at_one = [sum(row) for row in self.b_dense]
            if not np.allclose(at_one, self.b, rtol=0, atol=1e-12):
                raise ValueError("Butcher tableau: b_dense(θ = 1) must equal b.")

    @property
    def num_stages(self):
        return len(self.c)

    def dense_weights(self):
        """`W` (stages × degree): `b_i(θ) = Σ_p W[i, p-1] θ^p`, the dense-output weights
        (see the module docstring)."""
        if self.b_dense is not None:
            return np.array(self.b_dense, dtype=np.float64)
        s, b = self.num_stages, np.array(self.b, dtype=np.float64)
        first = np.zeros(s)
        first[0] = 1.0
        if self.fsal:  # cubic Hermite: h01 = 3θ² - 2θ³, h10 = θ - 2θ² + θ³, h11 = θ³ - θ²
            last = np.zeros(s)
            last[-1] = 1.0
            return np.stack(
                [first, 3 * b - 2 * first - last, -2 * b + first + last], axis=1
            )
        # quadratic Hermite on (y0, k_1, y1): θ k_1 h + θ² (y1 - y0 - h k_1); for
        # Euler the θ² column vanishes (linear interpolation)
        weights = np.stack([first, b - first], axis=1)
        return weights[:, :1] if not np.any(weights[:, 1]) else weights

    @property
    def fsal(self):
        """First same as last: the last stage is evaluated at `(t + h, y1)`, so its
        value is the next step's first stage."""
        return self.c[-1] == 1 and len(self.a) > 0 and tuple(self.a[-1]) == tuple(self.b[:-1])


def _fractions(*xs):
    return tuple(float(Fraction(x)) for x in xs)


class AbstractRungeKutta(AbstractSolver):
    """An explicit Runge--Kutta method defined by its class attribute `tableau`.

    The state is `(y, k1)` with `k1 = f(t, y)` for FSAL tableaux (one evaluation
    saved per step), and `(y, None)` otherwise.
    """

    tableau: ClassVar[ButcherTableau]
    dense_order: ClassVar[int]

    @property
    def dense_degree(self):
        return self.tableau.dense_weights().shape[1]

    def init(self, func, t0, y0, args):
        k1 = func(t0, y0, args) if self.tableau.fsal else None
        return (y0, k1)

    def step(self, func, t, h, state, args):
        y, k1 = state
        y1, k_last, error = self.stages(func, t, h, y, args, k1=k1, error=True)
        return (y1, k_last if self.tableau.fsal else None), error

    def step_dense(self, func, t, h, state, args):
        y, k1 = state
        y1, k_last, error, coeffs = self.stages(func, t, h, y, args, k1=k1, error=True,
                                                dense=True)
        return (y1, k_last if self.tableau.fsal else None), error, coeffs

    def dense_coefficients(self, y, h, ks):
        """The coefficients `C_p` of `y(t + θh) = Σ_p θ^p C_p` (stacked, `malijax._dense`)
        from the stages `ks`: `C_0 = y`, `C_p = h Σ_i W[i, p-1] k_i`."""
        weights = self.tableau.dense_weights()  # (stages, P)
        used = [i for i in range(len(ks)) if np.any(weights[i])]

        def leaf(y, *k):
            w = jnp.asarray(weights[used].T, y.dtype)
            c = jnp.tensordot(w, jnp.stack([k[i] for i in used]), axes=1)
            return jnp.concatenate([y[None], jnp.asarray(h).astype(y.dtype) * c])

        return jtu.tree_map(leaf, y, *ks)

    def stages(self, func, t, h, y, args, *, k1=None, error=True, increment=False, dense=False):
        """The one generic explicit RK step: `(y1, k_s, error)`, or with
        `increment=True` `(h Σ b_i k_i, k_s, error)` (the increment `Φ_h(t, y) - y`
        formed directly, without the cancellation of `y1 - y`). With `dense=True` the
        step's dense-output coefficients (`dense_coefficients`) are appended.

        `k1` is the cached first stage (FSAL), else evaluated. With `error=False` (and
        not `dense`) a last stage of weight `b_s = 0` (the FSAL stage of Bosh3, Dopri5,
        Tsit5) is not evaluated unless the increment is not asked for: it then *is*
        `y1`'s input, and `k_s` is returned for the next step; otherwise `k_s` is `None`.
        """
        tab = self.tableau
        ks = [func(t, y, args) if k1 is None else k1]
        x = y
        num = tab.num_stages
        if not (error or dense) and tab.b[-1] == 0 and (increment or not tab.fsal):
            num -= 1  # the last stage only feeds the error estimate (and FSAL reuse)
        for i in range(1, num):
            x = tree_lincomb(y, h, tab.a[i - 1], ks)
            ks.append(func(t + tab.c[i] * h, x, args))
        err = None
        if error and tab.b_error is not None:
            err = tree_lincomb(None, h, tab.b_error, ks)
        if increment:
            out = (tree_lincomb(None, h, tab.b, ks), None, err)
        # With FSAL the last stage's input *is* y1, bit for bit, so the carried k1 of
        # the next step equals f(t + h, y1) exactly and gradients see the same map.
        elif tab.fsal and num == tab.num_stages:
            out = (x, ks[-1], err)
        else:
            out = (tree_lincomb(y, h, tab.b, ks), None, err)
        if dense:
            return out + (self.dense_coefficients(y, h, ks),)
        return out

    def y(self, state):
        return state[0]

    def checkpoint(self, state):
        # k1 is recomputed from y on restore: store one state per step, not two.
        return state[0]

    def restore(self, func, t, checkpoint, args):
        return self.init(func, t, checkpoint, args)

    def checkpoint_y(self, checkpoint):
        return checkpoint


def _rk_class(name, tableau, order, error_order, dense_order, doc):
    fsal = tableau.fsal
    cls = type(
        name,
        (AbstractRungeKutta,),
        {
            "__doc__": doc,
            "__module__": __name__,
            "__annotations__": {},
            "tableau": tableau,
            "order": order,
            "error_order": error_order,
            "dense_order": dense_order,
            "fevals_init": 1 if fsal else 0,
            "fevals_step": tableau.num_stages - 1 if fsal else tableau.num_stages,
        },
    )
    return cls


def _dopri5_dense(b, b_mid):
    """Dopri5's quartic through `y0, y1, f0, f1` and `y(1/2) = y0 + h Σ b_mid_i k_i`
    (Shampine 1986; the form Diffrax and torchdiffeq use), as weights `b_i(θ)`:
    `θ δ_i1 + θ² (δ_is - 4δ_i1 - 5b_i + 16m_i) + θ³ (5δ_i1 - 3δ_is + 14b_i - 32m_i)
    + θ⁴ (2δ_is - 2δ_i1 - 8b_i + 16m_i)`."""
    s = len(b)
    first, last = np.eye(s)[0], np.eye(s)[-1]
    b, m = np.array(b), np.array(b_mid)
    cols = [
        first,
        last - 4 * first - 5 * b + 16 * m,
        5 * first - 3 * last + 14 * b - 32 * m,
        2 * last - 2 * first - 8 * b + 16 * m,
    ]
    return tuple(tuple(float(x) for x in row) for row in np.stack(cols, axis=1))


def _tsit5_dense():
    """Tsitouras's 4th-order continuous extension (Tsitouras 2011, Table 2), from the
    factored form Diffrax uses, multiplied out into powers of θ."""
    P = np.polynomial.Polynomial
    t = P([0.0, 1.0])
    polys = [
        -1.0530884977290216 * t * (t - 1.3299890189751412)
        * (t**2 - 1.4364028541716351 * t + 0.7139816917074209),
        0.1017 * t**2 * (t**2 - 2.1966568338249754 * t + 1.2949852507374631),
        2.490627285651252793 * t**2 * (t**2 - 2.38535645472061657 * t + 1.57803468208092486),
        -16.54810288924490272 * (t - 1.21712927295533244) * (t - 0.61620406037800089) * t**2,
        47.37952196281928122 * (t - 1.203071208372362603) * (t - 0.658047292653547382) * t**2,
        -34.87065786149660974 * (t - 1.2) * (t - 0.666666666666666667) * t**2,
        2.5 * (t - 1) * (t - 0.6) * t**2,
    ]
    return tuple(tuple(float(x) for x in np.pad(p.coef, (0, 5))[1:5]) for p in polys)


_euler = ButcherTableau(c=(0.0,), a=(), b=(1.0,))
_midpoint = ButcherTableau(c=(0.0, 0.5), a=((0.5,),), b=(0.0, 1.0), b_error=(-1.0, 1.0))
_heun = ButcherTableau(c=(0.0, 1.0), a=((1.0,),), b=(0.5, 0.5), b_error=(-0.5, 0.5))
_rk4 = ButcherTableau(
    c=(0.0, 0.5, 0.5, 1.0),
    a=((0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
    b=_fractions("1/6", "1/3", "1/3", "1/6"),
    # b_1 = θ - 3θ²/2 + 2θ³/3, b_2 = b_3 = θ² - 2θ³/3, b_4 = -θ²/2 + 2θ³/3 (order 3).
    b_dense=(
        _fractions("1", "-3/2", "2/3"),
        _fractions("0", "1", "-2/3"),
        _fractions("0", "1", "-2/3"),
        _fractions("0", "-1/2", "2/3"),
    ),
)
_bosh3 = ButcherTableau(
    c=_fractions("0", "1/2", "3/4", "1"),
    a=((0.5,), (0.0, 0.75), _fractions("2/9", "1/3", "4/9")),
    b=_fractions("2/9", "1/3", "4/9", "0"),
    b_error=_fractions("-5/72", "1/12", "1/9", "-1/8"),
)
_dopri5_b = ("35/384", "0", "500/1113", "125/192", "-2187/6784", "11/84", "0")
_dopri5_bhat = ("1951/21600", "0", "22642/50085", "451/720", "-12231/42400", "649/6300", "1/60")
_dopri5 = ButcherTableau(
    c=_fractions("0", "1/5", "3/10", "4/5", "8/9", "1", "1"),
    a=(
        _fractions("1/5"),
        _fractions("3/40", "9/40"),
        _fractions("44/45", "-56/15", "32/9"),
        _fractions("19372/6561", "-25360/2187", "64448/6561", "-212/729"),
        _fractions("9017/3168", "-355/33", "46732/5247", "49/176", "-5103/18656"),
        _fractions(*_dopri5_b[:6]),
    ),
    b=_fractions(*_dopri5_b),
    # b - b̂ in exact rational arithmetic, then rounded once.
    b_error=tuple(float(Fraction(p) - Fraction(q)) for p, q in zip(_dopri5_b, _dopri5_bhat)),
    b_dense=_dopri5_dense(
        _fractions(*_dopri5_b),
        [float(Fraction(x)) / 2 for x in (
            "6025192743/30085553152", "0", "51252292925/65400821598",
            "-2691868925/45128329728", "187940372067/1594534317056",
            "-1776094331/19743644256", "11237099/235043384",
        )],
    ),
)
_tsit5_b = (
    0.096460766818065229518,
    0.01,
    0.47988965041449957478,
    1.3790085741037418932,
    -3.2900695154360806799,
    2.3247105240997739824,
)
_tsit5 = ButcherTableau(
    c=(0.0, 0.161, 0.327, 0.9, 0.98002554090450968573, 1.0, 1.0),
    a=(
        (0.161,),
        (-0.0084806554923569885444, 0.33548065549235698854),
        (2.8971530571054934321, -6.3594484899750748431, 4.3622954328695814110),
        (
            5.3258648284392566044,
            -11.748883564062827878,
            7.4955393428898362083,
            -0.092495066361755249257,
        ),
        (
            5.8614554429464200287,
            -12.920969317847109292,
            8.1593678985761586432,
            -0.071584973281400997225,
            -0.028269050394068382909,
        ),
        _tsit5_b,
    ),
    b=_tsit5_b + (0.0,),
    b_error=(
        0.0017800110522257714,
        0.00081643445965674690,
        -0.0078808780102619960,
        0.14471100717326290750,
        -0.58235716545255522500,
        0.45808210592918694660,
        -1 / 66,
    ),
    b_dense=_tsit5_dense(),
)

Euler = _rk_class(
    "Euler", _euler, 1, None, 1,
    "Explicit Euler, order 1; fixed steps only. Dense output: linear (order 1).",
)
Midpoint = _rk_class(
    "Midpoint",
    _midpoint,
    2,
    2,
    2,
    "Explicit midpoint rule, order 2, embedded Euler error estimate (ANODE's 'RK2'). "
    "Dense output: quadratic Hermite on (y0, f0, y1), order 2.",
)
Heun = _rk_class(
    "Heun", _heun, 2, 2, 2,
    "Heun's method (explicit trapezoid), order 2, embedded Euler. Dense output: "
    "quadratic Hermite on (y0, f0, y1), order 2.",
)
RK4 = _rk_class(
    "RK4", _rk4, 4, None, 3,
    "The classic fourth-order Runge--Kutta method. Dense output: its classical "
    "third-order weights.",
)
Bosh3 = _rk_class(
    "Bosh3", _bosh3, 3, 3, 3,
    "Bogacki--Shampine 3(2), FSAL: 3 evaluations per step. Dense output: cubic "
    "Hermite on (y0, f0, y1, f1), order 3.",
)
Dopri5 = _rk_class(
    "Dopri5",
    _dopri5,
    5,
    5,
    4,
    "Dormand--Prince 5(4) with Shampine's embedded weights (as torchdiffeq and diffrax; "
    "scipy's RK45 and TorchDiffEqPack use the 1980 pair), FSAL: 6 evaluations per step. "
    "Dense output: Shampine's quartic through the midpoint, order 4.",
)
Tsit5 = _rk_class(
    "Tsit5", _tsit5, 5, 5, 4,
    "Tsitouras 5(4), FSAL: 6 evaluations per step. Dense output: Tsitouras's own "
    "quartic, order 4.",
)
