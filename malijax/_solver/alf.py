"""The asynchronous leapfrog (ALF) integrator of MALI (ALGORITHMS.md §1)."""

import math
from typing import ClassVar

import jax.numpy as jnp
import jax.tree_util as jtu

from .._batching import call_field as _call, value_and_vjp
from .._misc import tree_dot
from .base import AbstractReversibleSolver


class ALF(AbstractReversibleSolver):
    r"""Asynchronous leapfrog with damping `eta` (Zhuang et al., ICLR 2021).

    The state is `(z, v)`, where `v ≈ dz/dt` starts at `v0 = f(t0, z0)`. One step from
    `t` with step `h` costs one evaluation of `f`:

        x_m = z + (h/2) v,   u = f(t + h/2, x_m),
        v'  = v + 2η (u - v),   z' = x_m + (h/2) v'.

    Its exact inverse is `x_m = z' - (h/2) v'`, `u = f(t + h/2, x_m)`,
    `v = (v' - 2η u) / (1 - 2η)`, `z = x_m - (h/2) v`. The error estimate (z-part only)
    is `h (u - v)`, of first order, so the controller uses `q = 2`. The method is
    second order at `eta = 1` only: with `eta != 1` the `v`-update relaxes `v` towards
    `u` instead of reflecting it, and the global error falls like `h` (measured orders
    on a damped oscillator: 2.00 at η = 1; 1.04, 1.02 and 1.02 at η = 0.9, 0.8 and 0.6;
    `tests/test_solvers.py::test_damped_alf_is_first_order`). At tight tolerances a
    damped ALF takes far more steps: 5944 (η = 0.9) and 6304 (η = 0.8) at rtol 1e-6 on
    `z' = [[-0.5, 0.3], [-0.3, -5]] z`, `z0 = (1, 1)`, T = 4, against 37 for the default
    solver and 46 for `Reversible(Tsit5())`. `order` states the undamped order.

    Dense output: cubic Hermite on `(z, v)` at both ends, `v` standing for `dz/dt`:
    `z(θ) = h00 z + h10 h v + h01 z' + h11 h v'` (`h00 = 1 - 3θ² + 2θ³`,
    `h10 = θ - 2θ² + θ³`, `h01 = 3θ² - 2θ³`, `h11 = θ³ - θ²`), order 2 (`v` is a
    second-order approximation of `dz/dt`; measured in `tests/test_dense.py`).

    !!! warning
        With `eta = 1` (the default, and the only value the reference code uses) ALF
        is time-reversible and its inverse is as accurate as its step, but, like
        leapfrog, it is only weakly stable: on a dissipative problem `z' = λ z`,
        `λ < 0`, its parasitic mode grows like `exp(|λ| T)`. Damping `eta < 1` makes
        the forward stable but first order (above), and the inverse amplifies
        rounding by `1/|1 - 2η|` per step (η = 0.9 loses every float64 digit after
        about 165 steps; `MALI()`'s automatic checkpoints keep its gradients exact).
        For a stable reversible solver of higher order take `Reversible(Tsit5())`.
        `eta = 0.5` has no inverse. Under adaptive stepping the error estimate sees the
        growing parasitic mode, and shrinking the step does not slow it: on long,
        dissipative horizons the solve can stall (e.g. Van der Pol, T = 10, rtol 1e-6
        runs out of 300k steps at t ≈ 8), so prefer short horizons or `num_steps`.

    ??? cite "Reference"
        Zhuang, Dvornek, Tatikonda & Duncan, "MALI: A memory efficient and reverse
        accurate integrator for Neural ODEs", ICLR 2021.
    """

    eta: float = 1.0

    order: ClassVar[int] = 2
    error_order: ClassVar[int] = 2
    fevals_init: ClassVar[int] = 1
    fevals_step: ClassVar[int] = 1
    dense_order: ClassVar[int] = 2
    dense_degree: ClassVar[int] = 3

    def __check_init__(self):
        if not (0 < self.eta <= 1):
            raise ValueError(f"ALF needs 0 < eta <= 1, got eta={self.eta}.")

    @property
    def inverse_amplification(self):
        return math.inf if self.eta == 0.5 else 1 / abs(1 - 2 * self.eta)

    def init(self, func, t0, y0, args):
        return (y0, func(t0, y0, args))

    def _midpoint(self, t, h):
        # Formed the same way in step and inverse, so both see the same time.
        return t + 0.5 * h

    def step(self, func, t, h, state, args):
        z, v = state
        eta = self.eta

        def drift(a, b):
            return a + (0.5 * h).astype(a.dtype) * b

        x_m = jtu.tree_map(drift, z, v)
        u = func(self._midpoint(t, h), x_m, args)
        v1 = jtu.tree_map(lambda vi, ui: vi + 2 * eta * (ui - vi), v, u)
        z1 = jtu.tree_map(drift, x_m, v1)
        error = jtu.tree_map(lambda vi, ui: h.astype(vi.dtype) * (ui - vi), v, u)
        return (z1, v1), error

    def inverse(self, func, t, h, state1, args):
        z1, v1 = state1
        eta = self.eta
        if eta == 0.5:
            raise ValueError("ALF(eta=0.5) forgets v and has no inverse.")
        x_m = jtu.tree_map(lambda a, b: a - (0.5 * h).astype(a.dtype) * b, z1, v1)
        u = func(self._midpoint(t, h), x_m, args)
        v = jtu.tree_map(lambda vi, ui: (vi - 2 * eta * ui) / (1 - 2 * eta), v1, u)
        z = jtu.tree_map(lambda a, b: a - (0.5 * h).astype(a.dtype) * b, x_m, v)
        return (z, v)

    def dense_from_states(self, h, state0, state1):
        (z0, v0), (z1, v1) = state0, state1

        def coeffs(a0, b0, a1, b1):
            hb0, hb1 = h.astype(a0.dtype) * b0, h.astype(a0.dtype) * b1
            return jnp.stack([a0, hb0, 3 * (a1 - a0) - 2 * hb0 - hb1, 2 * (a0 - a1) + hb0 + hb1])

        return jtu.tree_map(coeffs, z0, v0, z1, v1)

    def inverse_vjp(self, func, t, h, state1, ct_state1, args, *, h_prev, ct_y0, ct_dense=None,
                    ct_dense_prev=None):
        """Fused inverse and VJP (`_fused_inverse_vjp`), with the dense-output
        coefficients' cotangent (a function of the two end states) added on either side."""
        del h_prev, ct_dense_prev
        if ct_dense is None:
            return self._fused_inverse_vjp(func, t, h, state1, ct_state1, args, ct_y0=ct_y0)
        _, ct_s1, _ = self.dense_from_states_vjp(h, state1, state1, ct_dense)
        ct_state1 = jtu.tree_map(lambda a, b: a + b, ct_state1, ct_s1)
        state0, ct_state0, g_func, g_args, g_t, g_h = self._fused_inverse_vjp(
            func, t, h, state1, ct_state1, args, ct_y0=ct_y0
        )
        ct_s0, _, ct_h = self.dense_from_states_vjp(h, state0, state1, ct_dense)
        ct_state0 = jtu.tree_map(lambda a, b: a + b, ct_state0, ct_s0)
        return state0, ct_state0, g_func, g_args, g_t, g_h + ct_h

    def _fused_inverse_vjp(self, func, t, h, state1, ct_state1, args, *, ct_y0):
        """Fused inverse and VJP: one VJP of `func` per step (ALGORITHMS.md §2.2).

        With cotangents `(a_z, a_v)` on `(z', v')` and `u, J = f, ∂f/∂x` at the
        midpoint `(t + h/2, x_m)`, `x_m = z' - (h/2) v'`:

            g = a_v + (h/2) a_z,   w = 2η g,   ā_xm = a_z + Jᵀw,
            ā_z = ā_xm,   ā_v = (1 - 2η) g + (h/2) ā_xm,
            ā_t = f_tᵀw,   ā_h = <a_z, v'>/2 + <ā_xm, v>/2 + f_tᵀw/2.
        """
        z1, v1 = state1
        a_z, a_v = ct_state1
        eta = self.eta
        half = 0.5 * h
        x_m = jtu.tree_map(lambda a, b: a - half.astype(a.dtype) * b, z1, v1)
        t_m = self._midpoint(t, h)
        g = jtu.tree_map(lambda av, az: av + half.astype(az.dtype) * az, a_v, a_z)
        w = jtu.tree_map(lambda gi: 2 * eta * gi, g)
        u, (g_func, g_args), (g_tm, jtw) = value_and_vjp(_call, (func, args), (t_m, x_m), w)
        v0 = jtu.tree_map(lambda vi, ui: (vi - 2 * eta * ui) / (1 - 2 * eta), v1, u)
        z0 = jtu.tree_map(lambda a, b: a - half.astype(a.dtype) * b, x_m, v0)
        a_xm = jtu.tree_map(lambda a, b: a + b, a_z, jtw)
        a_v0 = jtu.tree_map(
            lambda gi, ax: (1 - 2 * eta) * gi + half.astype(ax.dtype) * ax, g, a_xm
        )
        g_tm = jnp.zeros_like(t) if g_tm is None else g_tm
        g_h = 0.5 * (tree_dot(a_z, v1, h.dtype) + tree_dot(a_xm, v0, h.dtype) + g_tm)
        a_z0 = jtu.tree_map(lambda a, b: a + b, a_xm, ct_y0)  # y = z
        return (z0, v0), (a_z0, a_v0), g_func, g_args, g_tm, g_h

    def parasitic(self, state, error):
        """`h (v' - u) = (2η - 1) h (u - v)`: the velocity's deviation from the field at
        the midpoint, in units of `z` (of order `h²` on a smooth solution, of the order
        of the parasitic mode's velocity once it has grown)."""
        del state
        return jtu.tree_map(lambda e: (2 * self.eta - 1) * e, error)

    def y(self, state):
        return state[0]

