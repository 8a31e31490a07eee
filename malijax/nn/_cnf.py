"""`CNF`: a continuous normalising flow (FFJORD) with exact or Hutchinson traces."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu

from .._odeint import odeint
from ._neural_ode import _span


class _Augmented(eqx.Module):
    """`d/dt (z, ℓ) = (f(t, z), tr ∂f/∂z)`: the flow and its log-determinant together.

    With `trace="exact"` the trace is that of the full Jacobian (`dim` JVPs); with
    `"hutchinson"` it is the unbiased estimate `εᵀ (∂f/∂z) ε` (one VJP), where the probe
    `ε` (with `E[εεᵀ] = I`) arrives in `args` and is held fixed over the solve.
    """

    vector_field: object
    trace: str = eqx.field(static=True)

    def __call__(self, t, state, args):
        z, _ = state
        eps, user_args = args

        def f(z):
            return self.vector_field(t, z, user_args)

        if self.trace == "exact":
            dz, f_jvp = jax.linearize(f, z)
            eye = jnp.eye(z.size, dtype=z.dtype).reshape((z.size, *z.shape))
            columns = jax.vmap(f_jvp)(eye).reshape(z.size, z.size)
            trace = jnp.trace(columns)
        else:
            dz, f_vjp = jax.vjp(f, z)
            (eps_jac,) = f_vjp(eps)
            trace = jnp.sum(eps_jac * eps)
        return dz, trace.astype(z.dtype)


class CNF(eqx.Module):
    r"""A continuous normalising flow (Chen et al. 2018; FFJORD, Grathwohl et al., ICLR 2019).

    Data `x ∈ ℝ^dim` is carried by `dz/dt = f_θ(t, z, args)` from `z(t0) = x` to
    `z(t1)`, whose density is the standard normal. The log-determinant is solved
    together with the state, `dℓ/dt = tr ∂f/∂z`, `ℓ(t0) = 0`, and

        log p(x) = log 𝒩(z(t1); 0, I) + ℓ(t1).

    The pair `(z, ℓ)` is one pytree state, so every gradient strategy serves it; MALI's
    algebraic inverse reconstructs `ℓ` together with `z`.

    **Arguments:**

    - `vector_field`: `vf(t, z, args) -> dz/dt` on one example `z` of shape `(dim,)`.
    - `dim`: the data dimension (static; `sample` needs it).
    - `t0`, `t1`: the flow's time interval.
    - `trace`: `"exact"` (the full Jacobian's trace, `dim` JVPs per evaluation: for
      small `dim`) or `"hutchinson"` (the estimate `εᵀ (∂f/∂z) ε`, one VJP; `log_prob`
      then needs a `key`; Grathwohl et al. 2019, §3.1).
    - `noise`: the Hutchinson probe, `"gaussian"` or `"rademacher"` (lower variance).
    - the solver keywords of [`malijax.odeint`][] (`solver`, `gradient`, `rtol`,
      `atol`, `step_size`, `num_steps`, `max_steps`, `throw`).
    """

    vector_field: object
    dim: int = eqx.field(static=True)
    t0: float = 0.0
    t1: float = 1.0
    trace: str = eqx.field(default="exact", static=True)
    noise: str = eqx.field(default="gaussian", static=True)
    solver: object = None
    gradient: object = None
    rtol: float = eqx.field(default=1e-3, static=True)
    atol: float = eqx.field(default=1e-6, static=True)
    step_size: float | None = eqx.field(default=None, static=True)
    num_steps: int | None = eqx.field(default=None, static=True)
    max_steps: int = eqx.field(default=4096, static=True)
    throw: bool = eqx.field(default=True, static=True)

    def __check_init__(self):
        if self.trace not in ("exact", "hutchinson"):
            raise ValueError(f"`trace` must be 'exact' or 'hutchinson', got {self.trace!r}.")
        if self.noise not in ("gaussian", "rademacher"):
            raise ValueError(f"`noise` must be 'gaussian' or 'rademacher', got {self.noise!r}.")

    def _odeint(self, func, y0, ts, args):
        return odeint(
            func,
            y0,
            ts,
            args,
            solver=self.solver,
            gradient=self.gradient,
            rtol=self.rtol,
            atol=self.atol,
            step_size=self.step_size,
            num_steps=self.num_steps,
            max_steps=self.max_steps,
            throw=self.throw,
        )

    def log_prob(self, x, args=None, *, key=None):
        """`log p(x)` for one example `x` of shape `(dim,)` or a batch `(n, dim)`.

        With `trace="hutchinson"` pass a `key`: each example draws its own probe, so
        the result is an unbiased estimate of the exact `log p(x)` of the same solve.
        """
        x = jnp.asarray(x)
        if x.shape[-1:] != (self.dim,) or x.ndim not in (1, 2):
            raise ValueError(f"`x` must have shape (dim,) or (n, dim) with dim={self.dim}, got {x.shape}.")
        if self.trace == "hutchinson" and key is None:
            raise ValueError("`trace='hutchinson'` draws a random probe: pass `key=`.")
        if x.ndim == 2:
            keys = None if key is None else jr.split(key, x.shape[0])
            return jax.vmap(lambda xi, ki: self.log_prob(xi, args, key=ki))(x, keys)
        if self.trace == "hutchinson":
            if self.noise == "gaussian":
                eps = jr.normal(key, x.shape, x.dtype)
            else:
                eps = jr.rademacher(key, x.shape, x.dtype)
        else:
            eps = None
        state0 = (x, jnp.zeros((), x.dtype))
        func = _Augmented(self.vector_field, self.trace)
        zs, logdets = self._odeint(
            func, state0, _span(self.t0, self.t1, x), (jax.lax.stop_gradient(eps), args)
        )
        z1, logdet = zs[-1], logdets[-1]
        log_base = -0.5 * jnp.sum(z1**2) - 0.5 * self.dim * jnp.log(2 * jnp.pi).astype(x.dtype)
        return log_base + logdet

    def sample(self, key, n, args=None, *, dtype=None):
        """`n` samples, shape `(n, dim)`: standard-normal draws carried from `t1` back to `t0`."""
        if dtype is None:
            leaves = [x for x in jtu.tree_leaves(eqx.filter(self.vector_field, eqx.is_inexact_array))]
            dtype = jnp.result_type(*leaves) if leaves else jnp.result_type(float)
        z1 = jr.normal(key, (n, self.dim), dtype)
        ts = _span(self.t1, self.t0, z1)

        def one(z):
            return self._odeint(self.vector_field, z, ts, args)[-1]

        return jax.vmap(one)(z1)
