"""`python -m malijax`: differentiate a small neural ODE with every gradient strategy.

For each (strategy, solver) pair it prints the steps and function evaluations of the
forward solve, the gradient's error against `Direct` through the *same* steps (the
strategies that are exact for the discretisation agree to rounding), its error against
the true gradient of the ODE (a tight Dopri5 reference: the discretisation error), the
compiled temporary memory of the jitted gradient, and its run time.
"""

import time

import jax

jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402

import malijax as mj  # noqa: E402


class Field(eqx.Module):
    w1: jax.Array
    b1: jax.Array
    w2: jax.Array

    def __init__(self, dim, hidden, key):
        k1, k2, k3 = jr.split(key, 3)
        self.w1 = jr.normal(k1, (hidden, dim)) / jnp.sqrt(dim)
        self.b1 = 0.5 * jr.normal(k2, (hidden,))
        self.w2 = jr.normal(k3, (dim, hidden)) / jnp.sqrt(hidden)

    def __call__(self, t, y, args):
        return self.w2 @ jnp.tanh(self.w1 @ y + self.b1) - 0.1 * y


def _cases():
    """(strategy, solver, grid name, grid keywords) rows of the table."""
    fixed = ("64 per interval", dict(num_steps=64))
    adaptive = ("adaptive 1e-4", dict(rtol=1e-4, atol=1e-7, max_steps=1024))
    return [
        ("Direct", mj.ALF(), *fixed),
        ("MALI", mj.ALF(), *fixed),
        ("ACA", mj.ALF(), *fixed),
        ("Direct", mj.Dopri5(), *fixed),
        ("ACA", mj.Dopri5(), *fixed),
        ("MALI", mj.ALF(), *adaptive),
        ("ACA", mj.Dopri5(), *adaptive),
        ("Direct", mj.Dopri5(), *adaptive),
    ]


def main():
    field = Field(dim=8, hidden=64, key=jr.PRNGKey(0))
    y0 = jr.normal(jr.PRNGKey(1), (8,))
    ts = jnp.array([0.0, 0.5, 1.0])

    def loss(params, solver, gradient, kw):
        ys = mj.odeint(params, y0, ts, solver=solver, gradient=gradient, **kw)
        return jnp.sum(ys[1:] ** 2)

    exact = jax.grad(loss)(field, mj.Dopri5(), mj.Direct(), dict(rtol=1e-12, atol=1e-12, max_steps=2048))

    def flat(g):
        return jnp.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(g)])

    print(__doc__.split("\n\n")[0].replace("`", ""))
    print("Neural vector field: 8 states, 64 hidden units, outputs at t = 0.5 and 1, float64.\n")
    header = (f"{'strategy':<18}{'solver':<9}{'grid':<15}{'steps':>6}{'NFE':>6}"
              f"{'vs Direct':>11}{'vs exact':>10}{'memory':>10}{'time':>10}")
    print(header)
    print("-" * len(header))
    for strategy, solver, grid_name, kw in _cases():
        gradient = getattr(mj, strategy)()
        sol = mj.solve(field, y0, ts, solver=solver, gradient=gradient, **kw)
        grad_fn = eqx.filter_jit(jax.grad(lambda p: loss(p, solver, gradient, kw)))
        g = grad_fn(field)
        jax.block_until_ready(g)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            jax.block_until_ready(grad_fn(field))
            times.append(time.perf_counter() - start)
        ref = g if strategy == "Direct" else jax.grad(loss)(field, solver, mj.Direct(), kw)
        vs_direct = float(jnp.max(jnp.abs(flat(g) - flat(ref))) / jnp.max(jnp.abs(flat(ref))))
        vs_exact = float(jnp.max(jnp.abs(flat(g) - flat(exact))) / jnp.max(jnp.abs(flat(exact))))
        memory = _temp_bytes(lambda p: loss(p, solver, gradient, kw), field)
        print(f"{strategy:<18}{type(solver).__name__:<9}{grid_name:<15}"
              f"{int(sol.stats['num_steps']):>6}{int(sol.stats['num_fevals']):>6}"
              f"{vs_direct:>11.1e}{vs_exact:>10.1e}{memory / 1024:>8.0f}KiB"
              f"{1e3 * sorted(times)[2]:>8.1f}ms")
    print("\n'vs Direct': gradient error against backprop through the same steps (exact "
          "strategies: rounding).\n'vs exact': against the ODE's true gradient (the "
          "discretisation's error). memory: XLA temp bytes of the jitted gradient;\n"
          "adaptive solves size their buffers by max_steps (shapes are static in JAX), "
          "and Direct's backward stores every stage of all max_steps iterations.")


def _temp_bytes(f, params):
    grad = jax.grad(f)
    dynamic, static = eqx.partition(params, eqx.is_array)
    lowered = jax.jit(lambda d: grad(eqx.combine(d, static))).lower(dynamic)
    return lowered.compile().memory_analysis().temp_size_in_bytes


if __name__ == "__main__":
    main()
