"""Step-size control: a PI controller for adaptive steps, and constant steps.

Both are consumed by the one while loop in `_loop.py`. Step sizes here are magnitudes
(the loop applies the direction of integration) and are `stop_gradient`ed: gradient
strategies differentiate the accepted discretisation (ALGORITHMS.md §3.2).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from ._batching import max_over_batch, min_over_batch
from ._misc import magnitude, rms_norm, stop_gradient_tree


def _error_scale(atol, rtol, y0, y1):
    return jtu.tree_map(
        lambda a, b: atol + rtol * jnp.maximum(jnp.abs(a), jnp.abs(b)), y0, y1
    )


class PIController(eqx.Module):
    r"""Adaptive step-size control with a PI controller.

    The error ratio is the RMS norm over every element of the state,
    `r = ‖e / (atol + rtol·max(|y0|, |y1|))‖_rms`; a step is accepted when `r ≤ 1` and the
    candidate is finite. The next step is `h·factor` with

        factor = safety · r_n^(-(P+I)/q) · r_{n-1}^(P/q),   clipped to [factor_min, factor_max],

    (`r_{n-1}` the previous accepted ratio), and capped at 1 right after a rejection.
    A rejection shrinks with `clip(safety·r^(-1/q), factor_min, safety)`; a non-finite
    candidate with `factor_min`. The defaults `P = 0, I = 1` are the classic
    I controller of scipy's `RK45` (Hairer, Nørsett & Wanner, Vol. I, II.4).

    `shared=True`: under `vmap`, one step sequence for the whole batch: the largest of
    the elements' ratios decides, and the first step is the smallest of theirs, so
    every element meets its own tolerance (the continuous adjoint's backward solve,
    whose parameter quadrature is then one array for the batch). Outside `vmap` it
    changes nothing.
    """

    rtol: float
    atol: float
    # Optional: which part of the state the error norm sees (e.g. the continuous
    # adjoint's seminorm drops the parameter quadratures). Applied to y and the error.
    select: object = eqx.field(default=None, static=True)
    pcoeff: float = 0.0
    icoeff: float = 1.0
    safety: float = 0.9
    factor_min: float = 0.2
    factor_max: float = 10.0
    # The largest step magnitude allowed (`hmax` of jax.experimental.ode.odeint).
    max_step: float = float("inf")
    shared: bool = eqx.field(default=False, static=True)

    def initial_step(self, func, solver, t0, y0, args, direction, dtype):
        """Hairer's starting step size (ALGORITHMS.md §9.3); costs 2 evaluations."""
        t0, y0, args = stop_gradient_tree((t0, y0, args))
        q = solver.error_order
        part = self.select or (lambda tree: tree)
        scale = jtu.tree_map(lambda y: self.atol + self.rtol * jnp.abs(y), part(y0))

        def ratio(tree):
            return rms_norm(jtu.tree_map(lambda x, s: magnitude(x) / s, part(tree), scale), dtype)

        f0 = func(t0, y0, args)
        d0, d1 = ratio(y0), ratio(f0)
        h0 = jnp.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / d1).astype(dtype)
        y1 = jtu.tree_map(lambda y, f: y + (direction * h0).astype(y.dtype) * f, y0, f0)
        f1 = func(t0 + direction * h0, y1, args)
        d2 = ratio(jtu.tree_map(lambda a, b: a - b, f1, f0)) / h0
        dmax = jnp.maximum(d1, d2)
        h1 = jnp.where(
            dmax <= 1e-15,
            jnp.maximum(1e-6, h0 * 1e-3),
            (0.01 / jnp.maximum(dmax, 1e-15)) ** (1.0 / q),
        )
        h = jnp.minimum(jnp.minimum(100 * h0, h1), self.max_step)
        if self.shared:
            h = min_over_batch(h)
        return jax.lax.stop_gradient(h.astype(dtype))

    def adapt(self, y0, y1, error, h, prev_ratio, rejected_before, finite, q, dtype):
        """Returns `(accept, h_next, ratio_to_carry)`; `h` is the magnitude just tried."""
        y0, y1, error = stop_gradient_tree((y0, y1, error))
        if self.select is not None:
            y0, y1, error = self.select(y0), self.select(y1), self.select(error)
        scale = _error_scale(self.atol, self.rtol, y0, y1)
        r = rms_norm(jtu.tree_map(lambda e, s: magnitude(e) / s, error, scale), dtype)
        r = jnp.where(finite & jnp.isfinite(r), r, jnp.inf)
        if self.shared:
            r = max_over_batch(r)
        accept = r <= 1
        safe_r = jnp.maximum(r, 1e-10)
        grow = (
            self.safety
            * safe_r ** (-(self.pcoeff + self.icoeff) / q)
            * prev_ratio ** (self.pcoeff / q)
        )
        grow = jnp.where(r == 0, self.factor_max, grow)
        grow = jnp.clip(grow, self.factor_min, self.factor_max)
        grow = jnp.where(rejected_before, jnp.minimum(grow, 1.0), grow)
        shrink = jnp.clip(self.safety * safe_r ** (-1.0 / q), self.factor_min, self.safety)
        shrink = jnp.where(jnp.isfinite(r), shrink, self.factor_min)
        factor = jnp.where(accept, grow, shrink)
        new_prev = jnp.where(accept, safe_r, prev_ratio)
        h_next = jnp.minimum(h * factor, self.max_step)
        return accept, jax.lax.stop_gradient(h_next), new_prev


class ConstantStepSize(eqx.Module):
    """Fixed steps of magnitude `step_size`; the last step is clipped onto `ts[-1]` (onto
    every output time with `land_on_outputs=True`)."""

    step_size: float | jax.Array
