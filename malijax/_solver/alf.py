"""The asynchronous leapfrog (ALF) integrator of MALI (ALGORITHMS.md §1)."""

from typing import ClassVar

import jax.tree_util as jtu

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
    second order.

    !!! warning
        With `eta = 1` (the default, and the only value the reference code uses) ALF
        is time-reversible and its inverse is as accurate as its step, but, like
        leapfrog, it is only weakly stable: on a dissipative problem `z' = λ z`,
        `λ < 0`, its parasitic mode grows like `exp(|λ| T)`. Damping `eta < 1` makes
        the forward stable but the inverse amplifies rounding by `1/|1 - 2η|` per
        step (η = 0.9 loses every float64 digit after about 165 steps), so MALI
        gradients with `eta < 1` are only reverse-accurate over a few steps.
        `eta = 0.5` has no inverse.

    ??? cite "Reference"
        Zhuang, Dvornek, Tatikonda & Duncan, "MALI: A memory efficient and reverse
        accurate integrator for Neural ODEs", ICLR 2021.
    """

    eta: float = 1.0

    order: ClassVar[int] = 2
    error_order: ClassVar[int] = 2
    fevals_init: ClassVar[int] = 1
    fevals_step: ClassVar[int] = 1

    def __check_init__(self):
        if not (0 < self.eta <= 1):
            raise ValueError(f"ALF needs 0 < eta <= 1, got eta={self.eta}.")

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

    def y(self, state):
        return state[0]


