"""Continuous extensions: a step's interpolant as a polynomial in `θ = (t - t_k) / h_k`.

Every solver writes the interpolant of an accepted step from `t_k` to `t_k + h_k` as

    y(t_k + θ h_k) = Σ_{p=0..P} θ^p C_p,     θ ∈ [0, 1],   C_0 = y(t_k),

with coefficients `C_p` (pytrees like `y`) that are linear in the step's own values
(its stages, or its end states), so evaluating it costs no evaluation of `func`
(`AbstractSolver.step_dense`). Since `y(θ)` is linear in the `C_p`, the cotangent of the
coefficients from outputs `y_j = y(θ_j)` with cotangents `ȳ_j` inside one step is

    C̄_p = Σ_j θ_j^p ȳ_j,

a fixed number of pytrees however many outputs fall in the step: that is what the reverse
sweep pulls back through the step's VJP (`malijax/_gradient/_sweep.py`). An output time
`s_j` also moves `θ_j`: `∂y_j/∂s_j = ẏ_j = Σ_p p θ_j^(p-1) C_p / h_k`, and through
`θ_j = (s_j - t_k) / h_k` the step's start and size receive `-⟨ȳ_j, ẏ_j⟩` and
`-θ_j ⟨ȳ_j, ẏ_j⟩`.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu


# Coefficients are stored stacked: a pytree like `y` whose leaves carry a leading axis
# of `P + 1` (`C_0, ..., C_P`), so evaluating, forming and transposing an interpolant is
# one contraction per leaf rather than `P + 1` separate small operations.


def stack(coeffs):
    """`(C_0, ..., C_P)` (pytrees like `y`) -> one pytree with stacked leaves."""
    return jtu.tree_map(lambda *cs: jnp.stack(cs), *coeffs)


def degree(coeffs):
    return jtu.tree_leaves(coeffs)[0].shape[0] - 1


def _contract(weights, coeffs):
    """`Σ_p w_p C_p` leaf by leaf."""
    return jtu.tree_map(
        lambda c: jnp.tensordot(jnp.asarray(weights).astype(c.dtype), c, axes=1), coeffs
    )


def powers(theta, degree):
    """`(1, θ, ..., θ^degree)`: an output's weights on the coefficients (by products, so
    that gradients are finite at θ = 0)."""
    theta = jnp.asarray(theta)
    out = [jnp.ones_like(theta)]
    for _ in range(degree):
        out.append(out[-1] * theta)
    return jnp.stack(out)


def evaluate(coeffs, theta):
    """`Σ_p θ^p C_p`."""
    return _contract(powers(theta, degree(coeffs)), coeffs)


def derivative(coeffs, theta, h):
    """`dy/dt = Σ_p p θ^(p-1) C_p / h`."""
    theta = jnp.asarray(theta)
    n = degree(coeffs)
    p = jnp.arange(1, n + 1, dtype=theta.dtype)
    weights = jnp.concatenate([jnp.zeros((1,), theta.dtype), p * powers(theta, n - 1)])
    return _contract(weights / jnp.asarray(h).astype(theta.dtype), coeffs)


def transpose(ct, weights):
    """The coefficients' cotangent from one output's cotangent `ct`: `(w_p ct)_p`."""
    return jtu.tree_map(
        lambda c: jnp.asarray(weights).astype(c.dtype).reshape((-1,) + (1,) * c.ndim) * c[None],
        ct,
    )


class DenseInterpolation(eqx.Module):
    """The solution between the accepted steps: step `k` from `ts[k]` with (signed) size
    `hs[k]` is `y(ts[k] + θ hs[k]) = Σ_p θ^p coeffs[p][k]`. Rows past `num_steps` are
    unused (buffers are sized by `max_steps` under adaptive stepping, by the grid's
    steps on a `num_steps` grid)."""

    ts: jax.Array
    hs: jax.Array
    coeffs: tuple
    num_steps: jax.Array

    def _locate(self, t):
        """`(k, θ)`: the step holding `t` (the first or last step outside the range)."""
        t = jnp.asarray(t, self.ts.dtype)
        direction = jnp.sign(self.hs[0])
        rows = jnp.arange(self.ts.shape[0], dtype=jnp.int32)
        starts = jnp.where(rows < self.num_steps, direction * self.ts, jnp.inf)
        k = jnp.searchsorted(starts, direction * t, side="right").astype(jnp.int32) - 1
        k = jnp.clip(k, 0, jnp.maximum(self.num_steps - 1, 0))
        h = self.hs[k]
        return k, (t - self.ts[k]) / jnp.where(h == 0, 1, h)

    def evaluate(self, t):
        k, theta = self._locate(t)
        return evaluate(jtu.tree_map(lambda c: c[k], self.coeffs), theta)

    def derivative(self, t):
        k, theta = self._locate(t)
        h = self.hs[k]
        return derivative(jtu.tree_map(lambda c: c[k], self.coeffs), theta,
                          jnp.where(h == 0, 1, h))
