"""Any explicit Runge--Kutta method made algebraically reversible (McCallum & Foster
2024), ALGORITHMS.md §15."""

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu

from .._batching import value_and_vjp
from .._misc import tree_add
from .base import AbstractReversibleSolver
from .runge_kutta import AbstractRungeKutta

# Chosen by measurement (benchmarks/results/coupling.md): the parasitic eigenvalue is
# ≈ λ e^{-hμ}, so a dissipative mode is stable while |h Re μ| < log(1/λ) (0.69 at
# λ = 0.5). With the error estimate seeing the growth of y - z, adaptive steps respect
# that bound; λ = 0.5 and 0.3 then both solve six test problems at rtol 1e-3 and 1e-6
# within 15 tolerances (λ = 1 stalls or is wrong on every dissipative one), 0.3 in
# fewer steps on decayed tails (y' = -y: 24 against 37; plain Tsit5 16), 0.5 with
# MALI segments twice as long (a stored state every 13 steps in float64, 5 in float32;
# 0.3: 7 and 3).
DEFAULT_COUPLING = 0.5


class Reversible(AbstractReversibleSolver):
    r"""An explicit Runge--Kutta `solver` made algebraically reversible by coupling two
    copies of the state (McCallum & Foster 2024).

    With `Ψ_h(t, u) = Φ_h(t, u) - u` the base method's increment and coupling
    `λ ∈ (0, 1]`, the state `(y, z)` starts at `(y0, y0)` and one step is

        y₁ = λ y₀ + (1 - λ) z₀ + Ψ_h(t₀, z₀),    z₁ = z₀ - Ψ_{-h}(t₁, y₁),

    with the exact inverse `z₀ = z₁ + Ψ_{-h}(t₁, y₁)`,
    `y₀ = (y₁ - (1 - λ) z₀ - Ψ_h(t₀, z₀)) / λ`. The output is `y`. It keeps the base
    method's order for every λ; on `y' = μy` its step matrix has determinant λ, one
    eigenvalue following `e^{hμ}` and a parasitic one ≈ `λ e^{-hμ}`. So λ = 1 is as
    weakly unstable as `ALF()` on dissipative problems, while λ < `e^{-|hμ|}` is stable
    there, at the price of an inverse that amplifies rounding by `1/λ` per step, which
    `MALI(checkpoints=None)` offsets by storing a few states.

    Cost: two base steps per step (`2s - 1` evaluations for FSAL tableaux, whose last,
    zero-weight stage is only evaluated for the error estimate; nothing is cached
    across steps, since neither base step starts where the other ended). MALI's fused
    backward takes two base-step VJPs per step and no other evaluation.

    Error estimate (adaptive stepping): `|e| + |(y₁ - z₁) - λ (y₀ - z₀)|`, with `e` the
    base method's embedded estimate of the forward base step `Ψ_h(t₀, z₀)` (the local
    error of `y` while `y = z`) and the second term the growth of the parasitic
    component `y - z` in this step beyond its decay `λ` at `h -> 0` (from `y₀ = z₀` it
    is the round-trip defect of `Φ_{-h} ∘ Φ_h`, a local error of the base's order + 1).
    It keeps `y - z` below `tol / (1 - λ)`, so the steps stay where the parasitic mode
    is stable. The base's estimate alone never sees that mode: steps sized for accuracy
    on a decayed solution reach `|h Re μ| ≈ 1-3`, beyond the stable `log(1/λ)`, and the
    solve came back silently wrong (y' = -y to T = 20 at rtol 1e-3, λ = 0.5: 1.6e3 times
    the tolerance; with this estimate 7.7 times, plain Tsit5 2.3). It measures the
    growth, not `y - z` itself, because with `λ = 1` `y - z` accumulates every step's
    round-trip defect and never decays: an estimate of `|y - z|` stalled `y' = cos t`
    at rtol 1e-6. The error order is the base's. Bases without an embedded pair
    (`Euler`, `RK4`) take fixed steps.

    Dense output: the base method's interpolant of its forward increment from `z₀`,
    `I(θ)` (`I(0) = 0`, `I(1) = Ψ_h(t₀, z₀)`), plus the coupling term carried linearly:

        y(θ) = y₀ + θ (1 - λ)(z₀ - y₀) + I(θ),

    which is `y₀` at θ = 0 and `λ y₀ + (1 - λ) z₀ + Ψ_h(t₀, z₀) = y₁` at θ = 1. Since
    `y₀ - z₀` is of the order of a local error, it keeps the base interpolant's order
    (`dense_order`, measured in `tests/test_dense.py`), and costs no evaluation: the
    forward base step's stages are the interpolant's.

    **Arguments:**

    - `solver`: an explicit Runge--Kutta solver (`Euler()` … `Tsit5()`).
    - `coupling`: λ ∈ (0, 1], default 0.5 (chosen by measurement, see
      `benchmarks/README.md`).

    ??? cite "Reference"
        McCallum & Foster, "Efficient, accurate and stable gradients for neural ODEs",
        arXiv:2410.11648, 2024.
    """

    solver: AbstractRungeKutta
    coupling: float = eqx.field(default=DEFAULT_COUPLING, static=True)

    def __check_init__(self):
        if not isinstance(self.solver, AbstractRungeKutta):
            raise TypeError(
                "Reversible(solver) needs an explicit Runge--Kutta solver (Euler, Midpoint, "
                f"Heun, RK4, Bosh3, Dopri5, Tsit5), got {type(self.solver).__name__}."
            )
        if not (0 < self.coupling <= 1):
            raise ValueError(f"Reversible needs 0 < coupling <= 1, got {self.coupling!r}.")

    # Properties, not class constants: they are the base method's.
    @property
    def order(self):
        return self.solver.order

    @property
    def error_order(self):
        return self.solver.error_order

    @property
    def fevals_init(self):
        return 0

    @property
    def fevals_step(self):
        tab = self.solver.tableau
        backward = tab.num_stages - (1 if tab.b[-1] == 0 else 0)
        return tab.num_stages + backward

    @property
    def inverse_amplification(self):
        return 1 / self.coupling

    @property
    def dense_order(self):
        return self.solver.dense_order

    @property
    def dense_degree(self):
        return self.solver.dense_degree

    def _dense(self, y, z, base_coeffs):
        """The coefficients of `y(θ)` (stacked) from the base increment's."""
        lam = self.coupling

        def leaf(c, a, b):
            c = c.at[0].set(a)
            return c if lam == 1 else c.at[1].add((1 - lam) * (b - a))

        return jtu.tree_map(leaf, base_coeffs, y, z)

    def step_dense(self, func, t, h, state, args):
        state1, error, base = self._coupled(func, t, h, state, args, dense=True)
        return state1, self._estimate(state, state1, error), self._dense(*state, base)

    def _increment(self, func, t, h, u, args, error=False):
        """`Ψ_h(t, u)` (and the embedded error estimate) by the generic RK step."""
        inc, _, err = self.solver.stages(func, t, h, u, args, error=error, increment=True)
        return inc, err

    def _couple(self, y, z, q):
        """`λ y + (1 - λ) z + q`."""
        lam = self.coupling
        if lam == 1:
            return tree_add(y, q)
        return jtu.tree_map(lambda a, b, c: lam * a + (1 - lam) * b + c, y, z, q)

    def _uncouple(self, y1, z, q):
        """`(y1 - (1 - λ) z - q) / λ`, the inverse of `_couple` in `y`."""
        lam = self.coupling
        if lam == 1:
            return jtu.tree_map(lambda a, c: a - c, y1, q)
        return jtu.tree_map(lambda a, b, c: (a - (1 - lam) * b - c) / lam, y1, z, q)

    def init(self, func, t0, y0, args):
        del func, t0, args
        return (y0, y0)

    def coupled_step(self, func, t, h, state, args):
        """The step `(y1, z1)` and the base's embedded estimate `e` of its forward base
        step (`None` without an embedded pair)."""
        state1, error, _ = self._coupled(func, t, h, state, args)
        return state1, error

    def _coupled(self, func, t, h, state, args, dense=False):
        """`coupled_step`, plus (with `dense`) the forward base step's interpolant
        coefficients, from the same stages."""
        y, z = state
        q, _, error, *base = self.solver.stages(func, t, h, z, args, error=True,
                                                 increment=True, dense=dense)
        y1 = self._couple(y, z, q)
        p, _ = self._increment(func, t + h, -h, y1, args)
        z1 = jtu.tree_map(lambda a, b: a - b, z, p)
        return (y1, z1), error, (base[0] if dense else None)

    def _estimate(self, state, state1, error):
        """See the class docstring: the estimate must see the growth of y - z."""
        if error is None:
            return None
        (y, z), (y1, z1), lam = state, state1, self.coupling
        return jtu.tree_map(
            lambda e, a1, b1, a0, b0: jnp.abs(e) + jnp.abs((a1 - b1) - lam * (a0 - b0)),
            error, y1, z1, y, z,
        )

    def step(self, func, t, h, state, args):
        state1, error = self.coupled_step(func, t, h, state, args)
        return state1, self._estimate(state, state1, error)

    def inverse(self, func, t, h, state1, args):
        y1, z1 = state1
        p, _ = self._increment(func, t + h, -h, y1, args)
        z = tree_add(z1, p)
        q, _ = self._increment(func, t, h, z, args)
        return (self._uncouple(y1, z, q), z)

    def inverse_vjp(self, func, t, h, state1, ct_state1, args, *, h_prev, ct_y0, ct_dense=None,
                    ct_dense_prev=None):
        """Fused inverse and VJP: two base-step VJPs, whose forwards are the inverse's
        two base steps.

        With cotangents `(a_y1, a_z1)` on `(y₁, z₁)`, `P = Ψ_{-h}(t₁, y₁)` and
        `Q = Ψ_h(t₀, z₀)`: `z₀ = z₁ + P`, then `ā_y1 = a_y1 - (∂P/∂y₁)ᵀ a_z1`,
        `y₀ = (y₁ - (1 - λ) z₀ - Q) / λ`, `a_y0 = λ ā_y1`,
        `a_z0 = a_z1 + (1 - λ) ā_y1 + (∂Q/∂z₀)ᵀ ā_y1`; `func`, `args`, `t₀` and `h`
        collect both VJPs' contributions (`t₁ = t₀ + h` formed as in `step`). The dense
        coefficients' cotangent `(c_0, ..., c_P)` joins the second VJP (the base
        increment's coefficients are its stages'), with `c_0 - (1 - λ) c_1` on `y₀` and
        `(1 - λ) c_1` on `z₀`.
        """
        del h_prev, ct_dense_prev
        y1, z1 = state1
        a_y1, a_z1 = ct_state1
        lam = self.coupling

        def backward(params, t, h, u):
            return self._increment(params[0], t + h, -h, u, params[1])[0]

        def forward(params, t, h, u):
            if ct_dense is None:
                return self._increment(params[0], t, h, u, params[1])[0]
            inc, _, _, base = self.solver.stages(params[0], t, h, u, params[1], error=False,
                                                 increment=True, dense=True)
            return inc, jtu.tree_map(lambda c: c[1:], base)

        p, (gf_p, ga_p), (gt_p, gh_p, jp) = value_and_vjp(
            backward, (func, args), (t, h, y1), jtu.tree_map(jnp.negative, a_z1)
        )
        z0 = tree_add(z1, p)
        a_y1 = tree_add(a_y1, jp)
        ct_q = a_y1 if ct_dense is None else (a_y1, jtu.tree_map(lambda c: c[1:], ct_dense))
        q, (gf_q, ga_q), (gt_q, gh_q, jq) = value_and_vjp(forward, (func, args), (t, h, z0), ct_q)
        if ct_dense is not None:
            q = q[0]
            c0, c1 = (jtu.tree_map(lambda c: c[p], ct_dense) for p in range(2))
            ct_y0 = jtu.tree_map(lambda a, b, c: a + b - (1 - lam) * c, ct_y0, c0, c1)
            jq = jtu.tree_map(lambda a, c: a + (1 - lam) * c, jq, c1)
        y0 = self._uncouple(y1, z0, q)
        a_y0 = jtu.tree_map(lambda a, c: lam * a + c, a_y1, ct_y0)
        a_z0 = jtu.tree_map(lambda a, b, c: a + (1 - lam) * b + c, a_z1, a_y1, jq)
        return (
            (y0, z0),
            (a_y0, a_z0),
            tree_add(gf_p, gf_q),
            tree_add(ga_p, ga_q),
            tree_add(gt_p, gt_q),
            tree_add(gh_p, gh_q),
        )

    def parasitic(self, state, error):
        """`y - z`: the coupled copies drift apart in the parasitic mode (eigenvalue
        ≈ λ e^{-hμ}); it stays of the order of a local error while that is below 1."""
        del error
        return jtu.tree_map(lambda a, b: a - b, state[0], state[1])

    def y(self, state):
        return state[0]
