"""Checkpointed MALI: exactness against the number of stored states, and memory.

1. Exactness. On `z' = (diag(-0.5, -5) + 0.3 J) z`, `ts = (0, 2, 4)`, `num_steps=200` per
   interval (400 steps, h = 0.01), for each reversible solver and `MALI(checkpoints=K)`:
   the gradient of `sum(z(2)² + z(4)²)` w.r.t. `(z0, A)` against `Direct` through the
   same steps (max relative difference), in float64 and float32, and whether the
   reconstruction check warned. Also one adaptive row (ALF(0.8), rtol 1e-5).
2. Memory. `jax.jit(grad).lower(...).compile().memory_analysis().temp_size_in_bytes`
   of the gradient of a 64-state tanh field, float64, `num_steps=N` for N in
   {256, 1024, 4096}, for MALI with K in {0, 8, 32, None} and for ACA and Direct.

    python benchmarks/checkpoints.py      # ~3 min on 2 CPU cores; writes results/checkpoints.md
"""

import datetime
import pathlib
import warnings

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402

import malijax as mj  # noqa: E402

OUT = pathlib.Path(__file__).parent / "results" / "checkpoints.md"
SOLVERS = {
    "ALF(eta=0.8)": mj.ALF(eta=0.8),
    "ALF()": mj.ALF(),
    "ReversibleHeun()": mj.ReversibleHeun(),
    "Reversible(Tsit5(), 0.5)": mj.Reversible(mj.Tsit5(), coupling=0.5),
    "Reversible(Tsit5(), 0.9)": mj.Reversible(mj.Tsit5(), coupling=0.9),
}
KS = (0, 4, 8, 16, 32, None)


def _loss(y0, a, solver, gradient, kw):
    ts = jnp.array([0.0, 2.0, 4.0], y0.dtype)
    # throw=False: undamped ALF / ReversibleHeun are weakly unstable on this problem (the
    # forward reports it); the table compares gradients of the same computed steps.
    ys = mj.odeint(lambda t, y, a: a @ y, y0, ts, a, solver=solver, gradient=gradient,
                   throw=False, **dict(kw))
    return jnp.sum(ys[1:] ** 2)


_grad = jax.jit(jax.grad(_loss, argnums=(0, 1)), static_argnums=(2, 3, 4))


def _rel(got, want):
    """max |got - want| / max |want| over the leaves; NaN counts as inf (Python's `max`
    would skip a NaN that is not first)."""
    errors = [float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in zip(got, want)]
    return max(e if e == e else float("inf") for e in errors)


def exactness(dtype, kw, solvers=SOLVERS):
    a = (jnp.diag(jnp.array([-0.5, -5.0])) + 0.3 * jnp.array([[0.0, 1.0], [-1.0, 0.0]])).astype(dtype)
    y0 = jnp.array([1.0, -0.7], dtype)
    rows = []
    for label, solver in solvers.items():
        want = _grad(y0, a, solver, mj.Direct(), kw)
        cells = []
        for k in KS:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", mj.ReconstructionWarning)
                got = jax.block_until_ready(_grad(y0, a, solver, mj.MALI(checkpoints=k), kw))
            warned = any(issubclass(w.category, mj.ReconstructionWarning) for w in caught)
            cells.append(f"{_rel(got, want):.1e}{' (w)' if warned else ''}")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return rows


def _temp_mib(solver, gradient, n, dim=64):
    a = jnp.eye(dim) * -0.1

    def loss(y0, a):
        ys = mj.odeint(lambda t, y, a: jnp.tanh(a @ y), y0, jnp.array([0.0, 1.0]), a,
                       solver=solver, gradient=gradient, num_steps=n)
        return jnp.sum(ys[-1] ** 2)

    compiled = jax.jit(jax.grad(loss, argnums=1)).lower(jnp.ones(dim), a).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**20


def memory():
    ns = (256, 1024, 4096)
    rows = []
    for label, solver in (("ALF(eta=0.8)", mj.ALF(eta=0.8)),
                          ("Reversible(Tsit5(), 0.5)", mj.Reversible(mj.Tsit5()))):
        for glabel, gradient in [(f"MALI(checkpoints={k})", mj.MALI(checkpoints=k)) for k in (0, 8, 32, None)] + [
            ("ACA()", mj.ACA()), ("Direct()", mj.Direct())
        ]:
            cells = [f"{_temp_mib(solver, gradient, n):.3f}" for n in ns]
            rows.append(f"| {label} | {glabel} | " + " | ".join(cells) + " |")
    return ns, rows


def main():
    head = "| solver | " + " | ".join(f"K={k}" for k in KS) + " |"
    sep = "|---" * (len(KS) + 1) + "|"
    grid = (("num_steps", 200),)
    lines = [
        "# Checkpointed MALI: exactness and memory",
        "",
        f"`python benchmarks/checkpoints.py`, {datetime.date.today()}, jax {jax.__version__}, "
        f"{jax.default_backend()}.",
        "",
        "## Exactness: max relative gradient difference against Direct (same steps)",
        "",
        "`z' = (diag(-0.5, -5) + 0.3 J) z`, 400 steps (h = 0.01), outputs at t = 2, 4. "
        "`(w)`: MALI's reconstruction check warned. `K=None` is the automatic choice (none "
        "for undamped solvers; a stored state every `floor(log(ε^(-1/4)) / log(1/|det|))` "
        "steps otherwise).",
        "",
        "### float64",
        "",
        head, sep, *exactness(jnp.float64, grid),
        "",
        "### float32",
        "",
        head, sep, *exactness(jnp.float32, grid),
        "",
        "### float64, adaptive (rtol 1e-5, atol 1e-8, max_steps 2048)",
        "",
        head, sep, *exactness(jnp.float64, (("rtol", 1e-5), ("atol", 1e-8), ("max_steps", 2048)),
                              {"ALF(eta=0.8)": mj.ALF(eta=0.8)}),
        "",
    ]
    ns, rows = memory()
    lines += [
        "## Memory: temp MiB of the jitted gradient (64-state tanh field, float64, num_steps=N)",
        "",
        "| solver | gradient | " + " | ".join(f"N={n}" for n in ns) + " |",
        "|---|---|" + "---|" * len(ns),
        *rows,
        "",
    ]
    OUT.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
