import jax.numpy as jnp

import malijax as mj


def test_exponential_decay_dopri5():
    ys = mj.odeint(lambda t, y, a: -y, jnp.array(1.0), jnp.array([0.0, 1.0]),
                   solver=mj.Dopri5(), rtol=1e-10, atol=1e-12)
    assert abs(float(ys[-1]) - float(jnp.exp(-1.0))) < 1e-9
