"""`MLPField`: the usual neural vector field, an MLP of the state (and time)."""

import equinox as eqx
import jax.numpy as jnp


class MLPField(eqx.Module):
    """`f(t, y) = MLP([y, t])` (or `MLP(y)` with `time_dependent=False`) for a state
    `y` of shape `(dim,)`: an `eqx.nn.MLP` with `depth` hidden layers of `width` units.

    ```python
    field = mj.nn.MLPField(2, width=64, depth=2, key=jax.random.key(0))
    field(0.0, jnp.ones(2), None)   # -> shape (2,)
    ```
    """

    mlp: eqx.nn.MLP
    time_dependent: bool = eqx.field(static=True)

    def __init__(self, dim, width=64, depth=2, *, key, activation=jnp.tanh,
                 time_dependent=True, dtype=None):
        self.time_dependent = time_dependent
        self.mlp = eqx.nn.MLP(
            dim + int(time_dependent), dim, width, depth, activation=activation, key=key, dtype=dtype
        )

    def __call__(self, t, y, args):
        del args
        if self.time_dependent:
            y = jnp.concatenate([y, jnp.reshape(t, (1,)).astype(y.dtype)])
        return self.mlp(y)
