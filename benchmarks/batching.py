"""Gradients of a batch: `jax.vmap` over B states against one batched state (B, d).

Part 1, a neural ODE. An MLP field `f(y) = W2 tanh(W1 y + b1) + b2` (state 32, width
64 or 256, float32) over [0, 1], `num_steps=64` or adaptive (rtol 1e-3, atol 1e-6), a
batch of B = 256 or 512; the loss is `mean(y(1)**2)`, differentiated w.r.t. the field's
weights. Every row is measured twice in one compiled program each:

- `batched`: one state of shape (B, 32), the field applied row-wise;
- `vmap`: `jax.vmap` of a solve of one (32,) state (each element its own adaptive steps).

and reports XLA's temporary memory of the jitted gradient
(`compiled.memory_analysis().temp_size_in_bytes`), the median gradient time (interleaved
rounds after a warm-up), and `vmap / batched` ratios, the issue's targets being ≤ 1.5
(memory) and ≤ 1.25 (time). Diffrax rows (RecursiveCheckpointAdjoint and
BacksolveAdjoint with Tsit5) are measured the same way for comparison. On fixed grids
the two gradients must agree to float32 rounding (`rel. diff`).

Part 2, the Lorenz ensemble. 256 and 1024 trajectories, each with its own ρ, Tsit5,
rtol 1e-6, atol 1e-9, float64, to t = 1; the gradient of Σ y(1)² w.r.t. the ρs, by
`vmap` of `odeint` with ACA, and of `diffeqsolve` with RecursiveCheckpointAdjoint, at
`max_steps` 4096 (both libraries' default) and 64 (the steps taken are 48-55).

Part 3, a CNF: the memory of the mean `log_prob`'s gradient against the batch
(`log_prob` vmaps itself over the examples), per extra example.

    python benchmarks/batching.py           # all three parts (~30 min on 2 cores)
    python benchmarks/batching.py --quick   # B = 64, width 64, 3 rounds
"""

import argparse
import datetime
import pathlib
import platform
import statistics
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)  # part 2 is float64; part 1 asks for float32

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402

import malijax as mj  # noqa: E402

try:
    import diffrax
except ImportError:  # pragma: no cover - the `bench` extra is optional
    diffrax = None

DIM = 32
RESULTS = pathlib.Path(__file__).with_name("results")


def _mib(compiled):
    return compiled.memory_analysis().temp_size_in_bytes / 2**20


def _time(fns, args, rounds):
    """Median seconds per call of each compiled function, in interleaved rounds."""
    for f in fns.values():
        jax.block_until_ready(f(*args[id(f)]))
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args[id(f)]))
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _rel(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    num = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(la, lb))
    return num / max(float(jnp.max(jnp.abs(y))) for y in lb)


# ------------------------------------------------------------------ part 1: neural ODE

MJ_ROWS = {  # strategy: (solver on the fixed grid, solver when adaptive)
    "MALI": (mj.Reversible(mj.Tsit5()), mj.Reversible(mj.Tsit5())),
    "ACA": (mj.Tsit5(), mj.Tsit5()),
    "SymplecticAdjoint": (mj.Tsit5(), mj.Tsit5()),
    "ANODE": (mj.RK4(), mj.Tsit5()),
    "Adjoint": (mj.Tsit5(), mj.Tsit5()),
}


def _mj_losses(strategy, grid, static, y0s):
    fixed, adaptive = MJ_ROWS[strategy]
    solver = fixed if grid == "N=64" else adaptive
    kw = dict(num_steps=64) if grid == "N=64" else dict(rtol=1e-3, atol=1e-6, max_steps=256)
    kw.update(solver=solver, gradient=getattr(mj, strategy)())
    ts = jnp.array([0.0, 1.0], jnp.float32)

    def batched(p):
        m = eqx.combine(p, static)
        return jnp.mean(mj.odeint(lambda t, y, a: jax.vmap(m)(y), y0s, ts, **kw)[-1] ** 2)

    def vmapped(p):
        m = eqx.combine(p, static)
        one = lambda y: mj.odeint(lambda t, y, a: m(y), y, ts, **kw)[-1]  # noqa: E731
        return jnp.mean(jax.vmap(one)(y0s) ** 2)

    return batched, vmapped, f"{type(solver).__name__}" + (
        f"({type(solver.solver).__name__})" if isinstance(solver, mj.Reversible) else "")


def _dfx_losses(adjoint, grid, static, y0s):
    kw = dict(dt0=1 / 64, stepsize_controller=diffrax.ConstantStepSize()) if grid == "N=64" else \
        dict(dt0=None, stepsize_controller=diffrax.PIDController(rtol=1e-3, atol=1e-6), max_steps=256)

    def solve(m, y, field):  # the model goes in as args: BacksolveAdjoint needs that
        return diffrax.diffeqsolve(diffrax.ODETerm(field), diffrax.Tsit5(), 0.0, 1.0, y0=y,
                                   args=m, adjoint=adjoint(), **kw).ys[-1]

    def batched(p):
        m = eqx.combine(p, static)
        return jnp.mean(solve(m, y0s, lambda t, y, m: jax.vmap(m)(y)) ** 2)

    def vmapped(p):
        m = eqx.combine(p, static)
        return jnp.mean(jax.vmap(lambda y: solve(m, y, lambda t, y, m: m(y)))(y0s) ** 2)

    return batched, vmapped, "Tsit5"


def neural_ode(batches, widths, grids, rounds, out, only=None):
    rows = []
    for width in widths:
        mlp = eqx.nn.MLP(DIM, DIM, width, 1, activation=jnp.tanh, key=jr.key(0), dtype=jnp.float32)
        params, static = eqx.partition(mlp, eqx.is_array)
        for batch in batches:
            y0s = jr.normal(jr.key(1), (batch, DIM), jnp.float32)
            for grid in grids:
                cases = [("malijax", s, _mj_losses(s, grid, static, y0s)) for s in MJ_ROWS
                         if only is None or s in only]
                if diffrax is not None and only is None:
                    cases += [("diffrax", name, _dfx_losses(adj, grid, static, y0s)) for name, adj in
                              [("RecursiveCheckpoint", diffrax.RecursiveCheckpointAdjoint),
                               ("Backsolve", diffrax.BacksolveAdjoint)]]
                fns, mem, grads, args = {}, {}, {}, {}
                for lib, strategy, (batched, vmapped, solver) in cases:
                    for mode, loss in (("batched", batched), ("vmap", vmapped)):
                        key = (lib, strategy, solver, mode)
                        compiled = jax.jit(jax.grad(loss)).lower(params).compile()
                        fns[key], mem[key] = compiled, _mib(compiled)
                        args[id(compiled)] = (params,)
                        grads[key] = compiled(params)
                    print(f"  compiled {lib} {strategy} {grid} B={batch} w={width}", flush=True)
                times = _time(fns, args, rounds)
                for lib, strategy, (_, _, solver) in cases:
                    b, v = (lib, strategy, solver, "batched"), (lib, strategy, solver, "vmap")
                    row = dict(width=width, batch=batch, grid=grid, library=lib, strategy=strategy,
                               solver=solver, mem_b=mem[b], mem_v=mem[v], ms_b=1e3 * times[b],
                               ms_v=1e3 * times[v],
                               rel=_rel(grads[v], grads[b]) if grid == "N=64" else None)
                    rows.append(row)
                    print("  " + _row_md(row), flush=True)
    lines = [
        "| width | B | grid | library | strategy + solver | temp MiB batched | vmap | ratio "
        "| grad ms batched | vmap | ratio | rel. diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ] + [_row_md(r) for r in rows]
    out.extend(lines)
    return rows


def _row_md(r):
    rel = "—" if r["rel"] is None else f"{r['rel']:.1e}"
    return (f"| {r['width']} | {r['batch']} | {r['grid']} | {r['library']} | {r['strategy']} + "
            f"{r['solver']} | {r['mem_b']:.2f} | {r['mem_v']:.2f} | {r['mem_v'] / r['mem_b']:.2f} | "
            f"{r['ms_b']:.1f} | {r['ms_v']:.1f} | {r['ms_v'] / r['ms_b']:.2f} | {rel} |")


# --------------------------------------------------------------- part 2: Lorenz ensemble


def lorenz(t, y, rho):
    del t
    x, yy, z = y[0], y[1], y[2]
    return jnp.stack([10.0 * (yy - x), x * (rho - z) - yy, x * yy - (8.0 / 3.0) * z])


def lorenz_ensemble(sizes, rounds, out):
    y0 = jnp.array([1.0, 1.0, 1.0], jnp.float64)
    rows = []
    for n in sizes:
        rhos = jnp.linspace(20.0, 30.0, n, dtype=jnp.float64)
        for max_steps in (4096, 64):
            cases = {}

            def mj_solve(rho, max_steps=max_steps):
                return mj.odeint(lorenz, y0, jnp.array([0.0, 1.0]), rho, solver=mj.Tsit5(),
                                 gradient=mj.ACA(), rtol=1e-6, atol=1e-9, max_steps=max_steps)[-1]

            cases["malijax ACA"] = mj_solve
            if diffrax is not None:
                def dfx_solve(rho, max_steps=max_steps):
                    return diffrax.diffeqsolve(
                        diffrax.ODETerm(lorenz), diffrax.Tsit5(), 0.0, 1.0, None, y0, args=rho,
                        stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-9),
                        adjoint=diffrax.RecursiveCheckpointAdjoint(), max_steps=max_steps).ys[-1]

                cases["Diffrax RecursiveCheckpoint"] = dfx_solve
            fns, args, mem, grads = {}, {}, {}, {}
            for name, solve in cases.items():
                fwd = jax.jit(jax.vmap(solve)).lower(rhos).compile()
                grad = jax.jit(jax.grad(lambda r: jnp.sum(jax.vmap(solve)(r) ** 2))).lower(rhos).compile()
                fns[name, "fwd"], fns[name, "grad"] = fwd, grad
                args[id(fwd)] = args[id(grad)] = (rhos,)
                mem[name] = _mib(grad)
                grads[name] = grad(rhos)
            times = _time(fns, args, rounds)
            ref = grads.get("Diffrax RecursiveCheckpoint")
            for name in cases:
                row = dict(n=n, max_steps=max_steps, name=name, fwd=1e3 * times[name, "fwd"],
                           grad=1e3 * times[name, "grad"], mem=mem[name],
                           rel=None if ref is None else _rel(grads[name], ref))
                rows.append(row)
                print("  " + _lorenz_md(row), flush=True)
    out.extend([
        "| trajectories | max_steps | gradient | forward ms | gradient ms | gradient temp MiB "
        "| rel. diff vs Diffrax |",
        "|---|---|---|---|---|---|---|",
    ] + [_lorenz_md(r) for r in rows])
    return rows


def _lorenz_md(r):
    rel = "—" if r["rel"] is None else f"{r['rel']:.1e}"
    return (f"| {r['n']} | {r['max_steps']} | {r['name']} | {r['fwd']:.2f} | {r['grad']:.2f} | "
            f"{r['mem']:.2f} | {rel} |")


# ------------------------------------------------------------ part 3: CNF log-likelihood


def cnf_memory(batches, out):
    """`mj.nn.CNF(MLPField(2, 64), 2)` with the defaults (Reversible(Tsit5) + MALI,
    adaptive) and exact traces, float32: the gradient of the mean `log_prob` over a batch
    (vmapped per example inside `log_prob`), its temporary memory against the batch."""
    cnf = mj.nn.CNF(mj.nn.MLPField(2, 64, key=jr.key(0), dtype=jnp.float32), 2)
    params, static = eqx.partition(cnf, eqx.is_array)
    rows = []
    for batch in batches:
        x = jr.normal(jr.key(1), (batch, 2), jnp.float32)

        def loss(p, x=x):
            return -jnp.mean(eqx.combine(p, static).log_prob(x))

        compiled = jax.jit(jax.grad(loss)).lower(params).compile()
        t = _time({"g": compiled}, {id(compiled): (params,)}, 3)["g"]
        rows.append((batch, _mib(compiled), 1e3 * t))
        print(f"  CNF B={batch}: {rows[-1][1]:.2f} MiB, {rows[-1][2]:.1f} ms", flush=True)
    (b0, m0, _), (b1, m1, _) = rows[0], rows[-1]
    out.extend([
        "| batch | gradient temp MiB | gradient ms |",
        "|---|---|---|",
    ] + [f"| {b} | {m:.2f} | {t:.1f} |" for b, m, t in rows] + [
        "",
        f"Memory per extra example: {(m1 - m0) * 2**10 / (b1 - b0):.2f} KiB "
        f"(from B = {b0} to {b1}).",
    ])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--part", choices=["1", "2", "3", "all"], default="all")
    parser.add_argument("--only", nargs="+", choices=list(MJ_ROWS),
                        help="part 1: only these malijax strategies (and no Diffrax rows)")
    opts = parser.parse_args()
    rounds = 3 if opts.quick else 5
    out = [
        f"# `vmap` over a batch against one batched state ({datetime.date.today()})",
        "",
        f"`python benchmarks/batching.py{' --quick' if opts.quick else ''}` on "
        f"{platform.machine()}, {jax.devices()[0].platform}, jax {jax.__version__}, "
        f"diffrax {getattr(diffrax, '__version__', 'not installed')}; "
        f"{' '.join(sys.argv[1:]) or 'full run'}. Times are medians of {rounds} interleaved "
        "rounds; memory is XLA's temporary memory of the jitted gradient.",
        "",
    ]
    if opts.part in ("1", "all"):
        out += ["## Neural ODE (float32)", ""]
        if opts.quick:
            neural_ode([64], [64], ["N=64", "adaptive"], rounds, out, opts.only)
        else:
            neural_ode([256, 512], [64, 256], ["N=64", "adaptive"], rounds, out, opts.only)
        out.append("")
    if opts.part in ("2", "all"):
        out += ["## Lorenz ensemble (float64)", ""]
        lorenz_ensemble([64] if opts.quick else [256, 1024], rounds, out)
        out.append("")
    if opts.part in ("3", "all"):
        out += ["## CNF log-likelihood (float32, defaults, exact trace)", ""]
        cnf_memory([16, 64] if opts.quick else [64, 512], out)
        out.append("")
    name = "batching_quick.md" if opts.quick else "batching.md"
    if opts.part != "all" or opts.only:
        name = name.replace(".md", f"_part{opts.part}{'_' + '_'.join(opts.only) if opts.only else ''}.md")
    (RESULTS / name).write_text("\n".join(out) + "\n")
    print(f"wrote {RESULTS / name}")


if __name__ == "__main__":
    main()
