"""Reversible Heun (Kidger, Foster, Li & Lyons 2021), ALGORITHMS.md §7."""

from typing import ClassVar

import jax.numpy as jnp
import jax.tree_util as jtu

from .._batching import call_field as _call, value_and_vjp
from .._misc import tree_dot

from .base import AbstractReversibleSolver


class ReversibleHeun(AbstractReversibleSolver):
    r"""Algebraically reversible Heun method, order 2, one evaluation of `f` per step.

    The state is `(y, ŷ, f̂)` with `ŷ0 = y0`, `f̂ = f(t, ŷ)`. A step:

        ŷ' = 2y - ŷ + h f̂,   f̂' = f(t + h, ŷ'),   y' = y + (h/2)(f̂ + f̂'),

    with error estimate `(h/2)(f̂' - f̂)`. The inverse is `ŷ = 2y' - ŷ' - h f̂'`,
    `f̂ = f(t, ŷ)`, `y = y' - (h/2)(f̂ + f̂')`.

    Dense output: quadratic Hermite on `(y, f̂, y')`,
    `y(θ) = y + θ h f̂ + θ² (y' - y - h f̂)`, order 2 (measured in `tests/test_dense.py`).
    It uses the step's start `f̂`, so the fused backward pulls its cotangent back with
    the VJP that step already takes.

    !!! warning
        Same linear stability as ALF with η = 1: stable only for `hλ` on the segment
        `i(-1, 1)`; the parasitic mode grows like `exp(|λ| T)` on dissipative problems,
        and adaptive solves over long dissipative horizons can stall (see `ALF`).

    ??? cite "Reference"
        Kidger, Foster, Li & Lyons, "Efficient and accurate gradients for neural SDEs",
        NeurIPS 2021.
    """

    order: ClassVar[int] = 2
    error_order: ClassVar[int] = 2
    fevals_init: ClassVar[int] = 1
    fevals_step: ClassVar[int] = 1
    dense_order: ClassVar[int] = 2
    dense_degree: ClassVar[int] = 2

    def init(self, func, t0, y0, args):
        return (y0, y0, func(t0, y0, args))

    def dense_from_states(self, h, state0, state1):
        (y0, _, f0), y1 = state0, state1[0]

        def coeffs(a, b, f):
            hf = h.astype(f.dtype) * f
            return jnp.stack([a, hf, b - a - hf])

        return jtu.tree_map(coeffs, y0, y1, f0)

    def step(self, func, t, h, state, args):
        y, yhat, fhat = state
        yhat1 = jtu.tree_map(
            lambda a, b, f: 2 * a - b + h.astype(a.dtype) * f, y, yhat, fhat
        )
        fhat1 = func(t + h, yhat1, args)
        y1 = jtu.tree_map(
            lambda a, f0, f1: a + (0.5 * h).astype(a.dtype) * (f0 + f1), y, fhat, fhat1
        )
        error = jtu.tree_map(lambda f0, f1: (0.5 * h).astype(f0.dtype) * (f1 - f0), fhat, fhat1)
        return (y1, yhat1, fhat1), error

    def inverse(self, func, t, h, state1, args):
        y1, yhat1, fhat1 = state1
        yhat = jtu.tree_map(
            lambda a, b, f: 2 * a - b - h.astype(a.dtype) * f, y1, yhat1, fhat1
        )
        fhat = func(t, yhat, args)
        y = jtu.tree_map(
            lambda a, f0, f1: a - (0.5 * h).astype(a.dtype) * (f0 + f1), y1, fhat, fhat1
        )
        return (y, yhat, fhat)

    def inverse_vjp(self, func, t, h, state1, ct_state1, args, *, h_prev, ct_y0, ct_dense=None,
                    ct_dense_prev=None):
        """Fused inverse and VJP: one VJP of `func` per step.

        The step's only evaluation, `f̂1 = f(t + h, ŷ1)`, is linearised one iteration
        earlier (or in `inverse_vjp_prologue`), so the carried cotangent of `ŷ1`
        already includes `J(ŷ1)ᵀ` of the total cotangent of `f̂1`, and that of `f̂1` is
        zero. This iteration's single VJP, at `(t, ŷ0)`, gives `f̂0` for the
        reconstruction and pulls back the total cotangent of `f̂0`: from this step
        (`h a_ŷ1 + (h/2) a_y1`) and from the step before (`(h_prev/2) a_y0`).

        The dense coefficients' cotangent `(c0, c1, c2)` of this step adds `c0 - c2` to
        `y0`'s and `h (c1 - c2)` to `f̂0`'s, before that VJP. Its `c2` on `y1` reached
        `y1`'s cotangent one iteration earlier (`ct_dense_prev` there, or the
        prologue), where `f̂1` was pulled back: so it is not added again here.
        """
        y1, yhat1, fhat1 = state1
        a_y1, a_yhat1, _ = ct_state1
        if ct_dense_prev is not None:  # the step before's c2, on y0 (= its y1)
            ct_y0 = jtu.tree_map(lambda a, c: a + c[2], ct_y0, ct_dense_prev)
        if ct_dense is not None:
            c0, c1, c2 = (jtu.tree_map(lambda c: c[p], ct_dense) for p in range(3))
            ct_y0 = jtu.tree_map(lambda a, b, c: a + b - c, ct_y0, c0, c2)
            c_f = jtu.tree_map(lambda a, b: a - b, c1, c2)
        yhat0 = jtu.tree_map(lambda a, b, f: 2 * a - b - h.astype(a.dtype) * f, y1, yhat1, fhat1)
        # Linear part of the step: ŷ1 = 2y - ŷ + h f̂0, y1 = y + (h/2)(f̂0 + f̂1).
        a_y0 = jtu.tree_map(lambda a, b, c: a + 2 * b + c, a_y1, a_yhat1, ct_y0)
        a_yhat0 = jtu.tree_map(lambda b: -b, a_yhat1)
        a_fhat0 = jtu.tree_map(
            lambda b, a: h.astype(b.dtype) * b + (0.5 * h).astype(a.dtype) * a, a_yhat1, a_y1
        )
        # f̂0 also enters the step before: y0 = y_prev + (h_prev/2)(f̂_prev + f̂0).
        total = jtu.tree_map(lambda c, a: c + (0.5 * h_prev).astype(a.dtype) * a, a_fhat0, a_y0)
        if ct_dense is not None:
            total = jtu.tree_map(lambda a, c: a + h.astype(c.dtype) * c, total, c_f)
        fhat0, (g_func, g_args), (g_t, jtw) = value_and_vjp(_call, (func, args), (t, yhat0), total)
        y0 = jtu.tree_map(lambda a, f0, f1: a - (0.5 * h).astype(a.dtype) * (f0 + f1), y1, fhat0, fhat1)
        g_h = tree_dot(a_yhat1, fhat0, h.dtype) + 0.5 * tree_dot(
            a_y1, jtu.tree_map(lambda a, b: a + b, fhat0, fhat1), h.dtype
        )
        if ct_dense is not None:
            g_h = g_h + tree_dot(c_f, fhat0, h.dtype)
        a_yhat0 = jtu.tree_map(lambda a, b: a + b, a_yhat0, jtw)
        zero = jtu.tree_map(jnp.zeros_like, fhat0)
        # g_t is ∂L/∂t0 through f̂0 = f(t0, ŷ0): the time the step before ended on.
        return (y0, yhat0, fhat0), (a_y0, a_yhat0, zero), g_func, g_args, g_t, g_h

    def inverse_vjp_prologue(self, func, t, h_last, state, ct_state, args, ct_dense=None):
        """Pull the final state's `f̂_N = f(t_N, ŷ_N)` back, as `inverse_vjp` expects
        (with the last step's dense cotangent on `y_N`)."""
        y, yhat, fhat = state
        a_y, a_yhat, a_fhat = ct_state
        if ct_dense is not None:
            a_y = jtu.tree_map(lambda a, c: a + c[2], a_y, ct_dense)
        total = jtu.tree_map(lambda c, a: c + (0.5 * h_last).astype(a.dtype) * a, a_fhat, a_y)
        _, (g_func, g_args), (g_t, jtw) = value_and_vjp(_call, (func, args), (t, yhat), total)
        a_yhat = jtu.tree_map(lambda a, b: a + b, a_yhat, jtw)
        return (a_y, a_yhat, jtu.tree_map(jnp.zeros_like, a_fhat)), g_func, g_args, g_t

    def parasitic(self, state, error):
        """`y - ŷ`: the two copies of the state drift apart in the parasitic mode."""
        del error
        return jtu.tree_map(lambda a, b: a - b, state[0], state[1])

    def y(self, state):
        return state[0]
