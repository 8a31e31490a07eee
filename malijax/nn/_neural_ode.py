"""`NeuralODE`: an Equinox layer `y(t0) ↦ y(t1)` defined by a learned vector field."""

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu

from .._odeint import odeint


class NeuralODE(eqx.Module):
    r"""A neural ODE layer (Chen et al., NeurIPS 2018): `y(t1)` where `dy/dt = f_θ(t, y, args)`.

    `vector_field` is any callable `vf(t, y, args) -> dy/dt`, usually an `eqx.Module`
    whose array leaves are the parameters θ. The layer is itself an `eqx.Module`, so
    `eqx.filter_grad` / `eqx.filter_value_and_grad` differentiate θ through whichever
    `gradient` strategy is chosen, and `jax.vmap(model)` runs a batch (each example
    then takes its own adaptive steps; on a `num_steps` grid they share the grid).
    Differentiated outside the `vmap` (`grad(lambda m: loss(jax.vmap(m)(ys)))`), the
    batch's gradient costs what one batched state costs: the parameter cotangent is
    contracted over the batch inside each step (`benchmarks/batching.py`).

    **Arguments:** `vector_field`; `t0`, `t1` the integration interval; and the
    solver keywords of [`malijax.odeint`][] (`solver`, `gradient`, `rtol`, `atol`,
    `step_size`, `num_steps`, `max_steps`, `throw`) with the same meaning and defaults.

    **Example:**

    ```python
    model = mj.nn.NeuralODE(mj.nn.MLPField(2, 64, key=key), solver=mj.ALF(), num_steps=20)
    y1 = model(y0)                      # state at t1
    ys = model(y0, ts=jnp.linspace(0, 1, 5))   # states at ts (ys[0] == y0)
    ```
    """

    vector_field: object
    t0: float = 0.0
    t1: float = 1.0
    solver: object = None
    gradient: object = None
    rtol: float = eqx.field(default=1e-3, static=True)
    atol: float = eqx.field(default=1e-6, static=True)
    step_size: float | None = eqx.field(default=None, static=True)
    num_steps: int | None = eqx.field(default=None, static=True)
    max_steps: int = eqx.field(default=4096, static=True)
    throw: bool = eqx.field(default=True, static=True)

    def __call__(self, y0, ts=None, args=None):
        """Returns `y(t1)`, or `y` at every time of `ts` (leading axis `len(ts)`) if given."""
        times = _span(self.t0, self.t1, y0) if ts is None else ts
        ys = odeint(
            self.vector_field,
            y0,
            times,
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
        return jtu.tree_map(lambda y: y[-1], ys) if ts is None else ys


def _span(t0, t1, y0):
    """`[t0, t1]` as an array; Python-float endpoints take the state's dtype, so a
    float32 model integrates in float32 even with x64 enabled."""
    ends = [t for t in (t0, t1) if hasattr(t, "dtype")] or jtu.tree_leaves(y0)
    dtype = jnp.result_type(*ends)
    return jnp.stack([jnp.asarray(t0, dtype), jnp.asarray(t1, dtype)])
