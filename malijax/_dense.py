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


def evaluate(coeffs, theta):
    """`Σ_p θ^p C_p` (Horner's rule), `θ` cast to each leaf's dtype."""
    def leaf(*cs):
        th = jnp.asarray(theta).astype(cs[0].dtype)
        acc = cs[-1]
        for c in reversed(cs[:-1]):
            acc = c + th * acc
        return acc

    return jtu.tree_map(leaf, *coeffs)


def derivative(coeffs, theta, h):
    """`dy/dt = Σ_p p θ^(p-1) C_p / h`."""
    def leaf(*cs):
        th = jnp.asarray(theta).astype(cs[0].dtype)
        acc = (len(cs) - 1) * cs[-1]
        for p in range(len(cs) - 2, 0, -1):
            acc = p * cs[p] + th * acc
        return acc / jnp.asarray(h).astype(cs[0].dtype)

    return jtu.tree_map(leaf, *coeffs)


def powers(theta, degree):
    """`(1, θ, ..., θ^degree)`: an output's weights on the coefficients."""
    out = [jnp.ones_like(theta)]
    for _ in range(degree):
        out.append(out[-1] * theta)
    return tuple(out)


def scaled(ct, weights):
    """`(w_0 ct, ..., w_P ct)`: the coefficients' cotangent from one output's `ct`."""
    return tuple(jtu.tree_map(lambda c: jnp.asarray(w).astype(c.dtype) * c, ct) for w in weights)


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
