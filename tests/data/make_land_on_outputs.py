"""Records tests/data/land_on_outputs.npz: values and gradients of solves that land on
every output time, as malijax computed them before dense output (run at commit 0dd34fe,
where landing was the only behaviour): `git worktree add /tmp/old 0dd34fe && cd /tmp/old
&& python /path/to/tests/data/make_land_on_outputs.py /path/to/tests/data/land_on_outputs.npz`.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)
import malijax as mj  # noqa: E402

CASES = {
    "tsit5_aca_adapt": (mj.Tsit5(), mj.ACA(), dict(rtol=1e-6, atol=1e-9)),
    "dopri5_direct_hstep": (mj.Dopri5(), mj.Direct(), dict(step_size=0.07)),
    "rev_mali_adapt": (mj.Reversible(mj.Tsit5()), mj.MALI(), dict(rtol=1e-6, atol=1e-9)),
    "rh_mali_hstep": (mj.ReversibleHeun(), mj.MALI(), dict(step_size=0.07)),
}
TS = jnp.array([0.0, 0.3, 0.3, 1.1, 2.0, 2.0, 3.5])


def field(t, y, a):
    return jnp.stack([y[1], -a[0] * y[0] - 0.1 * y[1] + jnp.sin(t)])


def main(path):
    out = {}
    y0, a = jnp.array([1.0, 0.2]), jnp.array([2.0])
    for case, (solver, gradient, kw) in CASES.items():
        def loss(y0, a, ts):
            return jnp.sum(mj.odeint(field, y0, ts, a, solver=solver, gradient=gradient, **kw)**2)

        out[f"{case}_ys"] = np.asarray(mj.odeint(field, y0, TS, a, solver=solver,
                                                 gradient=gradient, **kw))
        for i, g in enumerate(jax.grad(loss, argnums=(0, 1, 2))(y0, a, TS)):
            out[f"{case}_g{i}"] = np.asarray(g)
    np.savez(path, **out)


if __name__ == "__main__":
    main(sys.argv[1])
