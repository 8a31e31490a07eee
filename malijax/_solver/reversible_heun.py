"""Reversible Heun (Kidger, Foster, Li & Lyons 2021), ALGORITHMS.md §7."""

from typing import ClassVar

import jax.tree_util as jtu

from .base import AbstractReversibleSolver


class ReversibleHeun(AbstractReversibleSolver):
    r"""Algebraically reversible Heun method, order 2, one evaluation of `f` per step.

    The state is `(y, ŷ, f̂)` with `ŷ0 = y0`, `f̂ = f(t, ŷ)`. A step:

        ŷ' = 2y - ŷ + h f̂,   f̂' = f(t + h, ŷ'),   y' = y + (h/2)(f̂ + f̂'),

    with error estimate `(h/2)(f̂' - f̂)`. The inverse is `ŷ = 2y' - ŷ' - h f̂'`,
    `f̂ = f(t, ŷ)`, `y = y' - (h/2)(f̂ + f̂')`.

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

    def init(self, func, t0, y0, args):
        return (y0, y0, func(t0, y0, args))

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

    def y(self, state):
        return state[0]
