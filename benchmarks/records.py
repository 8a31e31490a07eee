"""Records: the issue's four targets for ACA and the Adjoint, measured as ratios in one run.

1. **Lorenz ensemble** (float64). B ∈ {256, 1024} trajectories (quick: {64, 256}), each
   with its own ρ = 28 + linspace(0, 1, B), σ = 10, β = 8/3, y0 = (1, 1, 1), Tsit5,
   rtol 1e-6, atol 1e-9, ts = [0, 1]; loss Σ y(1)², differentiated w.r.t. the ρs. The
   field written two ways: `indexed` (y[0], y[1], y[2], `jnp.stack`) and `stacked`
   (`L(ρ) @ y + x · (P @ y)`, matrix products on the whole vector, x = e₀ · y). malijax:
   `jax.vmap` of `odeint(..., solver=Tsit5(), gradient=ACA(), max_steps=M)`; Diffrax:
   `jax.vmap` of `diffeqsolve(ODETerm, Tsit5(), 0, 1, None, y0, args=ρ,
   PIDController(1e-6, 1e-9), max_steps=M, adjoint=RecursiveCheckpointAdjoint())`;
   M ∈ {4096, 16384}. Per row: forward and gradient times, the gradient's XLA temporary
   memory, malijax / Diffrax ratios. Targets: gradient ≤ 0.7× Diffrax's time and
   ≤ 1.0× its memory; forward faster than Diffrax's. Then, for B = 256, where the
   memory goes: the gradient's (and forward's) temporary memory over
   M ∈ {64, 256, 1024, 4096, 16384} for both libraries, bytes per step and trajectory,
   and the slots of XLA's buffer assignment of the malijax gradient at M = 4096
   (compiled in a subprocess that dumps it).
2. **ACA on a 20,000-float state** (float32): y' = -a ⊙ tanh(y) + c ⊙ cos(10πt),
   a ~ U(0.5, 10) and c ~ N(0, 1) parameter vectors, y0 ~ N(0, 4), Tsit5 adaptive
   (rtol 1e-5, atol 1e-8; 40 steps), ts = [0, 1], loss Σ y(1)², gradient w.r.t. (a, c);
   ACA's memory and time at max_steps 1024 against 16384. Targets: memory(16384) ≤ 1.1×
   memory(1024); time ≤ 1.3×. Diffrax RecursiveCheckpointAdjoint at the same two
   bounds, for reference.
3. **MLP field on a fixed grid** (float32): f(y) = W2 tanh(W1 y + b1) + b2, 32 → 256 →
   32, a batch of 256 as one (256, 32) state, N = 256 steps over [0, 1] (quick: 64);
   gradient of mean(y(1)²) w.r.t. (W1, b1, W2, b2). malijax Tsit5 + ACA `num_steps=N`
   against Diffrax Tsit5 + RecursiveCheckpointAdjoint, `ConstantStepSize`, dt0 = 1/N,
   max_steps = N. Target: malijax ≤ 0.6× Diffrax's time.
4. **The continuous Adjoint under vmap** (float32): `mj.Adjoint()` gradient of mean(y(1)²)
   w.r.t. the weights of an MLP field 32 → 64 → 32, B = 256 (quick: 64), Tsit5, rtol
   1e-3, atol 1e-6, ts = [0, 1]: `jax.vmap` of a solve of one (32,) state against one
   (B, 32) state, at max_steps 256 and 4096. Target: memory vmap / batched ≤ 1.5×.

Times are medians over interleaved rounds after a warm-up (each sample the mean of
enough back-to-back calls to last ~20 ms, the order reversed every other round); a ratio
is the median over rounds of the per-round ratio. Memory is
`jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes`. Each part runs
in its own process, part 1 with `jax_enable_x64`, the float32 parts without it (with it,
Diffrax's times from Python floats would be float64).

    python benchmarks/records.py                 # all four parts (~4-5 min on 2 busy cores)
    python benchmarks/records.py --quick         # smaller batches, 3 rounds (~3 min)
    python benchmarks/records.py --parts 1,2 --out benchmarks/results/x.md

To measure another malijax (e.g. a worktree of a commit), put it first on the path:
`PYTHONPATH=/tmp/wt python benchmarks/records.py`; the report names the commit imported.
"""

import argparse
import datetime
import os
import pathlib
import platform
import re
import statistics
import subprocess
import sys
import time

import _child  # benchmarks/_child.py: the parts' processes

import jax

# Each part runs in its own process: part 1 with float64 enabled, parts 2-4 without it, so
# that Python floats (Diffrax's t0, t1, dt0) stay float32 there as a float32 user's would
# (with x64 on, Diffrax's Tsit5 ran the float32 MLP of part 3 2.2x slower, in float64 time).
jax.config.update("jax_enable_x64", "--x64" in sys.argv)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import numpy as np  # noqa: E402

import malijax as mj  # noqa: E402

try:
    import diffrax
except ImportError:  # pragma: no cover - the `bench` extra is optional
    diffrax = None

HERE = pathlib.Path(__file__).resolve()
RESULTS = HERE.with_name("results")
MIB = 2**20


# ------------------------------------------------------------------------ helpers


def _compile(f, *args):
    t0 = time.perf_counter()
    c = jax.jit(f).lower(*args).compile()
    return c, time.perf_counter() - t0


def _mib(compiled):
    return compiled.memory_analysis().temp_size_in_bytes / MIB


def _measure(fns, rounds):
    """fns: key -> zero-argument callable. Returns key -> list of seconds per call, one
    sample per round, rounds interleaved (order reversed every other round)."""
    inner = {}
    for k, f in fns.items():
        jax.block_until_ready(f())  # warm-up
        t0 = time.perf_counter()
        jax.block_until_ready(f())
        inner[k] = max(1, min(20, round(0.02 / max(time.perf_counter() - t0, 1e-6))))
    times = {k: [] for k in fns}
    keys = list(fns)
    for r in range(rounds):
        for k in (keys if r % 2 == 0 else keys[::-1]):
            f = fns[k]
            t0 = time.perf_counter()
            for _ in range(inner[k]):
                out = f()
            jax.block_until_ready(out)
            times[k].append((time.perf_counter() - t0) / inner[k])
    return times


def _med(xs):
    return statistics.median(xs)


def _ratio(a, b):
    """Median over rounds of the per-round ratio a / b."""
    return statistics.median(x / y for x, y in zip(a, b))


def _rel(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    num = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(la, lb))
    return num / max(float(jnp.max(jnp.abs(y))) for y in lb)


def _verdict(ok):
    return "met" if ok else "not met"


def _git_rev():
    """The commit of the malijax actually imported (and whether its sources differ)."""
    pkg = pathlib.Path(mj.__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "-C", str(pkg), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(pkg), "status", "--porcelain", "--", "."],
                               capture_output=True, text=True, check=True).stdout.strip()
        return rev + (" + uncommitted changes under malijax/" if dirty else ""), str(pkg)
    except Exception:  # noqa: BLE001
        return "unknown", str(pkg)


# ---------------------------------------------------------- part 1: Lorenz ensemble

SIGMA, BETA = 10.0, 8.0 / 3.0
LORENZ_RTOL, LORENZ_ATOL = 1e-6, 1e-9


def lorenz_indexed(t, y, rho):
    del t
    x, yy, z = y[0], y[1], y[2]
    return jnp.stack([SIGMA * (yy - x), x * (rho - z) - yy, x * yy - BETA * z])


_L0 = np.array([[-SIGMA, SIGMA, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, -BETA]])
_E10 = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # ρ's place in L(ρ)
_P = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])  # x·(P y) = (0, -xz, xy)
_E0 = np.array([1.0, 0.0, 0.0])


def lorenz_stacked(t, y, rho):
    del t
    L = jnp.asarray(_L0, y.dtype) + rho * jnp.asarray(_E10, y.dtype)
    x = jnp.dot(jnp.asarray(_E0, y.dtype), y)
    return L @ y + x * (jnp.asarray(_P, y.dtype) @ y)


LORENZ_FIELDS = {"indexed": lorenz_indexed, "stacked": lorenz_stacked}
LORENZ_Y0 = (1.0, 1.0, 1.0)


def _lorenz_solvers(field, max_steps):
    y0 = jnp.array(LORENZ_Y0, jnp.float64)
    ts = jnp.array([0.0, 1.0], jnp.float64)

    def mj_one(rho):
        return mj.odeint(field, y0, ts, rho, solver=mj.Tsit5(), gradient=mj.ACA(),
                         rtol=LORENZ_RTOL, atol=LORENZ_ATOL, max_steps=max_steps)[-1]

    def mj_steps(rho):
        return mj.solve(field, y0, ts, rho, solver=mj.Tsit5(), gradient=mj.ACA(),
                        rtol=LORENZ_RTOL, atol=LORENZ_ATOL, max_steps=max_steps).stats["num_steps"]

    def dfx_sol(rho):
        return diffrax.diffeqsolve(
            diffrax.ODETerm(field), diffrax.Tsit5(), 0.0, 1.0, None, y0, args=rho,
            stepsize_controller=diffrax.PIDController(rtol=LORENZ_RTOL, atol=LORENZ_ATOL),
            max_steps=max_steps, adjoint=diffrax.RecursiveCheckpointAdjoint())

    def dfx_one(rho):
        return dfx_sol(rho).ys[-1]

    def dfx_steps(rho):
        return dfx_sol(rho).stats["num_accepted_steps"]

    return dict(malijax=(mj_one, mj_steps), diffrax=(dfx_one, dfx_steps))


def _fwd_and_grad(one):
    fwd = jax.vmap(one)

    def loss(r):
        return jnp.sum(jax.vmap(one)(r) ** 2)

    return fwd, jax.grad(loss)


def lorenz_part(sizes, max_steps_list, rounds, out, targets, breakdown_batch):
    libs = ["malijax"] + (["diffrax"] if diffrax is not None else [])
    rows = []
    for n in sizes:
        rhos = 28.0 + jnp.linspace(0.0, 1.0, n, dtype=jnp.float64)
        fns, mem, grads, comp, steps = {}, {}, {}, {}, {}
        for fname, field in LORENZ_FIELDS.items():
            for M in max_steps_list:
                solvers = _lorenz_solvers(field, M)
                for lib in libs:
                    one, nsteps = solvers[lib]
                    fwd, grad = _fwd_and_grad(one)
                    cf, _ = _compile(fwd, rhos)
                    cg, tg = _compile(grad, rhos)
                    key = (fname, M, lib)
                    fns[key + ("fwd",)] = lambda c=cf: c(rhos)
                    fns[key + ("grad",)] = lambda c=cg: c(rhos)
                    mem[key], comp[key] = _mib(cg), tg
                    grads[key] = cg(rhos)
                    if (fname, lib) not in steps:
                        s = np.asarray(jax.jit(jax.vmap(nsteps))(rhos))
                        steps[fname, lib] = (int(s.min()), float(s.mean()), int(s.max()))
                    print(f"  compiled B={n} {fname} M={M} {lib}: grad {mem[key]:.2f} MiB, "
                          f"compile {tg:.1f} s", flush=True)
        times = _measure(fns, rounds)
        for fname in LORENZ_FIELDS:
            for M in max_steps_list:
                m, d = (fname, M, "malijax"), (fname, M, "diffrax")
                row = dict(n=n, field=fname, M=M, steps=steps[fname, "malijax"],
                           mj_fwd=_med(times[m + ("fwd",)]), mj_grad=_med(times[m + ("grad",)]),
                           mj_mem=mem[m], mj_comp=comp[m])
                if "diffrax" in libs:
                    row.update(
                        dfx_steps=steps[fname, "diffrax"],
                        dfx_fwd=_med(times[d + ("fwd",)]), dfx_grad=_med(times[d + ("grad",)]),
                        dfx_mem=mem[d], dfx_comp=comp[d],
                        r_fwd=_ratio(times[m + ("fwd",)], times[d + ("fwd",)]),
                        r_grad=_ratio(times[m + ("grad",)], times[d + ("grad",)]),
                        r_mem=mem[m] / mem[d], rel=_rel(grads[m], grads[d]))
                rows.append(row)
                print("  " + _lorenz_md(row), flush=True)
    out += [
        "| B | field | max_steps | steps (min/mean/max) | fwd ms malijax | Diffrax | ratio "
        "| grad ms malijax | Diffrax | ratio | grad MiB malijax | Diffrax | ratio "
        "| compile s malijax / Diffrax | rel. diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ] + [_lorenz_md(r) for r in rows] + [""]
    if rows and "r_grad" in rows[0]:
        worst = lambda k: max(rows, key=lambda r: r[k])  # noqa: E731
        for k, label, bound in [
            ("r_grad", "Lorenz: ACA gradient ≤ 0.7× Diffrax RecursiveCheckpoint (time)", 0.7),
            ("r_mem", "Lorenz: ACA gradient ≤ 1.0× Diffrax RecursiveCheckpoint (memory)", 1.0),
            ("r_fwd", "Lorenz: forward < 1.0× Diffrax (time)", 1.0),
        ]:
            w = worst(k)
            ok = w[k] < bound if k == "r_fwd" else w[k] <= bound
            detail = ", ".join(f"{r['n']}/{r['field'][:3]}/{r['M']}: {r[k]:.2f}×" for r in rows)
            targets.append((label, f"worst {w[k]:.2f}× (B={w['n']}, {w['field']}, M={w['M']}); "
                            f"{detail}", _verdict(ok)))
    if breakdown_batch:
        lorenz_breakdown(breakdown_batch, out)


def _lorenz_md(r):
    s = r["steps"]
    st = f"{s[0]}/{s[1]:.1f}/{s[2]}"
    if "dfx_steps" in r and r["dfx_steps"] != s:
        d = r["dfx_steps"]
        st += f" (Diffrax {d[0]}/{d[1]:.1f}/{d[2]})"
    if "r_grad" not in r:
        return (f"| {r['n']} | {r['field']} | {r['M']} | {st} | {1e3 * r['mj_fwd']:.2f} | — | — | "
                f"{1e3 * r['mj_grad']:.2f} | — | — | {r['mj_mem']:.2f} | — | — | "
                f"{r['mj_comp']:.1f} | — |")
    return (f"| {r['n']} | {r['field']} | {r['M']} | {st} | {1e3 * r['mj_fwd']:.2f} | "
            f"{1e3 * r['dfx_fwd']:.2f} | {r['r_fwd']:.2f} | {1e3 * r['mj_grad']:.2f} | "
            f"{1e3 * r['dfx_grad']:.2f} | {r['r_grad']:.2f} | {r['mj_mem']:.2f} | "
            f"{r['dfx_mem']:.2f} | {r['r_mem']:.2f} | {r['mj_comp']:.1f} / {r['dfx_comp']:.1f} | "
            f"{r['rel']:.1e} |")


def _buffer_slots(n, M):
    """Compile the malijax gradient (B = n, max_steps = M, indexed field) in a subprocess
    that dumps XLA's buffer assignment, and return the temporary allocation's slots of
    at least 256 KiB: [(offset, bytes, shapes, names)], and the allocation's size."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, XLA_FLAGS=f"--xla_dump_to={d} --xla_dump_hlo_as_text "
                   "--xla_dump_hlo_module_re=.*loss.*")
        subprocess.run([sys.executable, str(HERE), "--x64", "--_dump", f"{n},{M}"], env=env,
                       check=True,
                       capture_output=True)
        files = sorted(pathlib.Path(d).glob("*after_optimizations-buffer-assignment.txt"),
                       key=lambda q: q.stat().st_size)
        if not files:
            return [], 0
        text = files[-1].read_text()
    slots, total, inside = {}, 0, False
    for line in text.splitlines():
        m = re.match(r"allocation \d+: size (\d+), preallocated-temp", line)
        if m:
            inside, total = True, int(m.group(1))
            continue
        if line.startswith("allocation"):
            inside = False
        if not inside:
            continue
        m = re.match(r"\s*value: <\d+ (\S+) @\S+> \(size=(\d+),offset=(\d+)\): (\S+)", line)
        if m and int(m.group(2)) >= 256 * 1024:
            name, size, off, shape = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
            slot = slots.setdefault((off, size), [set(), set()])
            slot[0].add(shape.split("{")[0])
            slot[1].add(name)
    return sorted((o, sz, sorted(a), sorted(b)) for (o, sz), (a, b) in slots.items()), total


def _dump_lorenz_grad(spec):
    n, M = (int(x) for x in spec.split(","))
    rhos = 28.0 + jnp.linspace(0.0, 1.0, n, dtype=jnp.float64)
    _, grad = _fwd_and_grad(_lorenz_solvers(lorenz_indexed, M)["malijax"][0])
    jax.jit(grad).lower(rhos).compile()


def lorenz_breakdown(n, out):
    """Temporary memory against max_steps for B = n, indexed field (compile only)."""
    rhos = 28.0 + jnp.linspace(0.0, 1.0, n, dtype=jnp.float64)
    Ms = [64, 256, 1024, 4096, 16384]
    libs = ["malijax"] + (["diffrax"] if diffrax is not None else [])
    tab = {}
    for M in Ms:
        solvers = _lorenz_solvers(lorenz_indexed, M)
        for lib in libs:
            fwd, grad = _fwd_and_grad(solvers[lib][0])
            cf, _ = _compile(fwd, rhos)
            cg, _ = _compile(grad, rhos)
            tab[lib, M] = (_mib(cf), _mib(cg))
        print(f"  breakdown B={n} M={M}: " + ", ".join(
            f"{lib} fwd {tab[lib, M][0]:.2f} / grad {tab[lib, M][1]:.2f} MiB" for lib in libs),
            flush=True)
    out += [
        f"### Where the memory goes (B = {n}, indexed field, compile only)",
        "",
        "| max_steps | malijax fwd MiB | malijax grad MiB | Diffrax fwd MiB | Diffrax grad MiB |",
        "|---|---|---|---|---|",
    ]
    for M in Ms:
        d = tab.get(("diffrax", M), (float("nan"),) * 2)
        out.append(f"| {M} | {tab['malijax', M][0]:.2f} | {tab['malijax', M][1]:.2f} | "
                   f"{d[0]:.2f} | {d[1]:.2f} |")
    out.append("")
    lo, hi = Ms[0], Ms[-1]
    for lib in libs:
        for i, what in ((0, "forward"), (1, "gradient")):
            slope = (tab[lib, hi][i] - tab[lib, lo][i]) * MIB / ((hi - lo) * n)
            base = tab[lib, lo][i] - slope * lo * n / MIB
            out.append(f"- {lib} {what}: {slope:.1f} bytes per (max_steps × trajectory) "
                       f"between M = {lo} and {hi}; {base:.2f} MiB extrapolated to M = 0.")
    try:
        slots, total = _buffer_slots(n, 4096)
    except Exception as e:  # noqa: BLE001
        slots, total = [], 0
        print(f"  buffer dump failed: {e}", flush=True)
    if slots:
        out += ["", f"XLA's buffer assignment of the malijax gradient (B = {n}, M = 4096): its "
                f"temporary allocation is {total / MIB:.2f} MiB; the slots of 256 KiB or more "
                "(values sharing a slot are one buffer over its life):", "",
                "| offset MiB | MiB | shapes | HLO values |", "|---|---|---|---|"]
        out += [f"| {o / MIB:.2f} | {sz / MIB:.2f} | {', '.join(f'`{x}`' for x in sh)} | "
                f"{', '.join(nm[:4])}{' …' if len(nm) > 4 else ''} |" for o, sz, sh, nm in slots]
    out.append("")


# -------------------------------------------------------- part 2: large state, ACA

BIG_DIM = 20_000
BIG_RTOL, BIG_ATOL = 1e-5, 1e-8


def big_field(t, y, p):
    a, c = p
    return -a * jnp.tanh(y) + c * jnp.cos(10 * jnp.pi * t)


def big_part(max_steps_list, rounds, out, targets):
    ka, kc, ky = jr.split(jr.key(2), 3)
    a = jr.uniform(ka, (BIG_DIM,), jnp.float32, 0.5, 10.0)
    c = jr.normal(kc, (BIG_DIM,), jnp.float32)
    y0 = 2.0 * jr.normal(ky, (BIG_DIM,), jnp.float32)
    p = (a, c)
    ts = jnp.array([0.0, 1.0], jnp.float32)
    cases = {}
    for M in max_steps_list:
        def mj_loss(p, M=M):
            return jnp.sum(mj.odeint(big_field, y0, ts, p, solver=mj.Tsit5(), gradient=mj.ACA(),
                                     rtol=BIG_RTOL, atol=BIG_ATOL, max_steps=M)[-1] ** 2)

        cases["malijax ACA", M] = mj_loss
        if diffrax is not None:
            def dfx_loss(p, M=M):
                return jnp.sum(diffrax.diffeqsolve(
                    diffrax.ODETerm(big_field), diffrax.Tsit5(), 0.0, 1.0, None, y0, args=p,
                    stepsize_controller=diffrax.PIDController(rtol=BIG_RTOL, atol=BIG_ATOL),
                    max_steps=M, adjoint=diffrax.RecursiveCheckpointAdjoint()).ys[-1] ** 2)

            cases["Diffrax RecursiveCheckpoint", M] = dfx_loss
    steps = int(jax.jit(lambda p: mj.solve(big_field, y0, ts, p, solver=mj.Tsit5(), rtol=BIG_RTOL,
                                           atol=BIG_ATOL).stats["num_steps"])(p))
    rej = int(jax.jit(lambda p: mj.solve(big_field, y0, ts, p, solver=mj.Tsit5(), rtol=BIG_RTOL,
                                         atol=BIG_ATOL).stats["num_rejected"])(p))
    fns, mem, comp, grads = {}, {}, {}, {}
    for key, loss in cases.items():
        cg, tc = _compile(jax.grad(loss), p)
        fns[key] = lambda c=cg: c(p)
        mem[key], comp[key] = _mib(cg), tc
        grads[key] = cg(p)
        print(f"  compiled {key}: {mem[key]:.2f} MiB, {tc:.1f} s", flush=True)
    times = _measure(fns, rounds)
    lo, hi = max_steps_list[0], max_steps_list[-1]
    out += [
        f"{steps} accepted steps ({rej} rejected) by malijax Tsit5.",
        "",
        "| gradient | max_steps | grad temp MiB | grad ms | compile s | rel. diff vs malijax "
        f"M={lo} |",
        "|---|---|---|---|---|---|",
    ]
    ref = grads["malijax ACA", lo]
    for key in cases:
        out.append(f"| {key[0]} | {key[1]} | {mem[key]:.2f} | {1e3 * _med(times[key]):.2f} | "
                   f"{comp[key]:.1f} | {_rel(grads[key], ref):.1e} |")
    out.append("")
    for name in sorted({k[0] for k in cases}, key=lambda s: not s.startswith("malijax")):
        rm = mem[name, hi] / mem[name, lo]
        rt = _ratio(times[name, hi], times[name, lo])
        out.append(f"- {name}: M={hi} / M={lo}: memory {rm:.2f}×, time {rt:.2f}×.")
        if name == "malijax ACA":
            targets.append((f"20k state: ACA memory(M={hi}) ≤ 1.1× memory(M={lo})",
                            f"{rm:.2f}× ({mem[name, hi]:.1f} / {mem[name, lo]:.1f} MiB)",
                            _verdict(rm <= 1.1)))
            targets.append((f"20k state: ACA time(M={hi}) ≤ 1.3× time(M={lo})",
                            f"{rt:.2f}× ({1e3 * _med(times[name, hi]):.1f} / "
                            f"{1e3 * _med(times[name, lo]):.1f} ms)", _verdict(rt <= 1.3)))
    out.append("")


# ------------------------------------------------------------- part 3 and 4: MLP field


class Field(eqx.Module):
    """f(t, y) = W2 tanh(W1 y + b1) + b2 on the last axis: (32,) or (B, 32) states."""

    w1: jax.Array
    b1: jax.Array
    w2: jax.Array
    b2: jax.Array

    def __init__(self, dim, hidden, key, dtype=jnp.float32):
        k1, k2, k3, k4 = jr.split(key, 4)
        self.w1 = (jr.normal(k1, (hidden, dim)) / np.sqrt(dim)).astype(dtype)
        self.b1 = (0.1 * jr.normal(k2, (hidden,))).astype(dtype)
        self.w2 = (jr.normal(k3, (dim, hidden)) / np.sqrt(hidden)).astype(dtype)
        self.b2 = (0.1 * jr.normal(k4, (dim,))).astype(dtype)


def mlp(t, y, f):
    del t
    return jnp.tanh(y @ f.w1.T + f.b1) @ f.w2.T + f.b2


def mlp_part(batch, n_steps, rounds, out, targets):
    f = Field(32, 256, jr.key(0))
    y0 = jr.normal(jr.key(1), (batch, 32), jnp.float32)
    ts = jnp.array([0.0, 1.0], jnp.float32)

    def mj_solve(f):
        return mj.odeint(mlp, y0, ts, f, solver=mj.Tsit5(), gradient=mj.ACA(),
                         num_steps=n_steps)[-1]

    def dfx_solve(f):
        return diffrax.diffeqsolve(
            diffrax.ODETerm(mlp), diffrax.Tsit5(), 0.0, 1.0, 1.0 / n_steps, y0, args=f,
            stepsize_controller=diffrax.ConstantStepSize(), max_steps=n_steps,
            adjoint=diffrax.RecursiveCheckpointAdjoint()).ys[-1]

    cases = {"malijax Tsit5 + ACA": mj_solve}
    if diffrax is not None:
        cases["Diffrax Tsit5 + RecursiveCheckpoint"] = dfx_solve
    fns, info, grads = {}, {}, {}
    for name, solve in cases.items():
        cf, _ = _compile(solve, f)
        cg, tc = _compile(jax.grad(lambda f, s=solve: jnp.mean(s(f) ** 2)), f)
        fns[name, "fwd"] = lambda c=cf: c(f)
        fns[name, "grad"] = lambda c=cg: c(f)
        info[name] = dict(mem=_mib(cg), fmem=_mib(cf), comp=tc)
        grads[name] = cg(f)
        print(f"  compiled {name}: {info[name]['mem']:.2f} MiB, {tc:.1f} s", flush=True)
    times = _measure(fns, rounds)
    mjn, dn = "malijax Tsit5 + ACA", "Diffrax Tsit5 + RecursiveCheckpoint"
    out += [
        f"B = {batch}, N = {n_steps} steps.",
        "",
        "| gradient | fwd ms | grad ms | grad / Diffrax (time) | grad temp MiB | fwd temp MiB "
        "| compile s | rel. diff vs Diffrax |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in cases:
        r = _ratio(times[name, "grad"], times[dn, "grad"]) if dn in cases else float("nan")
        rel = _rel(grads[name], grads[dn]) if dn in cases else float("nan")
        out.append(f"| {name} | {1e3 * _med(times[name, 'fwd']):.1f} | "
                   f"{1e3 * _med(times[name, 'grad']):.1f} | {r:.2f} | {info[name]['mem']:.2f} | "
                   f"{info[name]['fmem']:.2f} | {info[name]['comp']:.1f} | {rel:.1e} |")
    out.append("")
    if dn in cases:
        r = _ratio(times[mjn, "grad"], times[dn, "grad"])
        targets.append((f"MLP 32→256→32, B={batch}, N={n_steps}: ACA+Tsit5 ≤ 0.6× Diffrax "
                        "RecursiveCheckpoint+Tsit5 (time)", f"{r:.2f}×", _verdict(r <= 0.6)))


def adjoint_part(batch, max_steps_list, rounds, out, targets):
    f = Field(32, 64, jr.key(0))
    y0s = jr.normal(jr.key(1), (batch, 32), jnp.float32)
    ts = jnp.array([0.0, 1.0], jnp.float32)
    kw = dict(solver=mj.Tsit5(), gradient=mj.Adjoint(), rtol=1e-3, atol=1e-6)
    fns, mem, grads = {}, {}, {}
    for M in max_steps_list:
        def batched(f, M=M):
            return jnp.mean(mj.odeint(mlp, y0s, ts, f, max_steps=M, **kw)[-1] ** 2)

        def vmapped(f, M=M):
            one = lambda y: mj.odeint(mlp, y, ts, f, max_steps=M, **kw)[-1]  # noqa: E731
            return jnp.mean(jax.vmap(one)(y0s) ** 2)

        for mode, loss in (("batched", batched), ("vmap", vmapped)):
            cg, _ = _compile(jax.grad(loss), f)
            fns[M, mode] = lambda c=cg: c(f)
            mem[M, mode] = _mib(cg)
            grads[M, mode] = cg(f)
            print(f"  compiled Adjoint {mode} M={M}: {mem[M, mode]:.2f} MiB", flush=True)
    sb = int(jax.jit(lambda f: mj.solve(mlp, y0s, ts, f, **kw).stats["num_steps"])(f))
    sv = np.asarray(jax.jit(jax.vmap(
        lambda y: mj.solve(mlp, y, ts, f, **kw).stats["num_steps"]))(y0s))
    times = _measure(fns, rounds)
    out += [
        f"B = {batch}; forward steps: batched {sb}, vmapped {sv.min()}–{sv.max()} "
        f"(mean {sv.mean():.1f}).",
        "",
        "| max_steps | grad temp MiB batched | vmap | ratio | grad ms batched | vmap | ratio "
        "| rel. diff vmap vs batched |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for M in max_steps_list:
        rm = mem[M, "vmap"] / mem[M, "batched"]
        rt = _ratio(times[M, "vmap"], times[M, "batched"])
        out.append(f"| {M} | {mem[M, 'batched']:.2f} | {mem[M, 'vmap']:.2f} | {rm:.2f} | "
                   f"{1e3 * _med(times[M, 'batched']):.1f} | {1e3 * _med(times[M, 'vmap']):.1f} | "
                   f"{rt:.2f} | {_rel(grads[M, 'vmap'], grads[M, 'batched']):.1e} |")
        targets.append((f"Adjoint under vmap, B={batch}, max_steps={M}: memory ≤ 1.5× one batched "
                        "state", f"{rm:.2f}× ({mem[M, 'vmap']:.2f} / {mem[M, 'batched']:.2f} MiB)",
                        _verdict(rm <= 1.5)))
    out.append("")


# ------------------------------------------------------------------------------ main


PART_TITLES = {
    1: "## 1. Lorenz ensemble (float64, Tsit5, rtol 1e-6, atol 1e-9, ACA vs Diffrax "
       "RecursiveCheckpointAdjoint, both under `jax.vmap`)",
    2: f"## 2. ACA on a {BIG_DIM:,}-float state (float32, Tsit5, rtol {BIG_RTOL:g}, "
       f"atol {BIG_ATOL:g}): memory and time against max_steps",
    3: "## 3. MLP field 32 → 256 → 32 (tanh), one batched state, fixed grid (float32)",
    4: "## 4. `Adjoint()` under `jax.vmap` against one batched state (MLP 32 → 64 → 32, "
       "float32, Tsit5, rtol 1e-3, atol 1e-6)",
}


def run_part(p, quick, rounds):
    """A worker: one part, in this process; its Markdown and targets as JSON on stdout."""
    body, targets = [], []
    if p == 1:
        lorenz_part([64, 256] if quick else [256, 1024], [4096, 16384], rounds, body, targets, 256)
    elif p == 2:
        big_part([1024, 16384], rounds, body, targets)
    elif p == 3:
        mlp_part(256, 64 if quick else 256, rounds, body, targets)
    elif p == 4:
        adjoint_part(64 if quick else 256, [256, 4096], rounds, body, targets)
    _child.report(dict(body=body, targets=targets))


def spawn_part(p, quick, rounds):
    cmd = [sys.executable, str(HERE), "--_part", str(p), "--rounds", str(rounds)]
    cmd += (["--quick"] if quick else []) + (["--x64"] if p == 1 else [])
    result, code = _child.run(cmd)
    if result is None:
        return dict(body=[f"**failed**: the part's process exited with {code} "
                          "and no result (its stderr is in the console log).", ""], targets=[])
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smaller batches (Lorenz B 64/256, MLP N=64, Adjoint B=64), 3 rounds")
    parser.add_argument("--parts", default="1,2,3,4", help="comma-separated parts to run")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds")
    parser.add_argument("--out", default=None, help="Markdown output (default results/records.md)")
    parser.add_argument("--_part", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_dump", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--x64", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    rounds = opts.rounds or (3 if opts.quick else 7)
    if opts._dump:  # a worker of `_buffer_slots`
        _dump_lorenz_grad(opts._dump)
        return
    if opts._part is not None:
        run_part(opts._part, opts.quick, rounds)
        return
    parts = sorted({int(p) for p in opts.parts.split(",")})
    rev, pkg = _git_rev()
    print(f"malijax imported from {pkg} ({rev})", flush=True)
    load0 = "{:.2f} / {:.2f} / {:.2f}".format(*os.getloadavg())
    t_start = time.perf_counter()
    targets, body = [], []
    for p in parts:
        print(f"== part {p}", flush=True)
        t0 = time.perf_counter()
        res = spawn_part(p, opts.quick, rounds)
        body += [PART_TITLES[p], ""] + res["body"]
        body += [f"(part {p}: {(time.perf_counter() - t0) / 60:.1f} min in its own process)", ""]
        targets += [tuple(t) for t in res["targets"]]

    import jaxlib

    load1 = "{:.2f} / {:.2f} / {:.2f}".format(*os.getloadavg())
    minutes = (time.perf_counter() - t_start) / 60
    args = "" if len(sys.argv) == 1 else " " + " ".join(sys.argv[1:])
    command = "python benchmarks/records.py" + args
    if os.environ.get("PYTHONPATH"):
        command = f"PYTHONPATH={os.environ['PYTHONPATH']} " + command
    lines = [
        "# Records: ACA and Adjoint targets as ratios, one interleaved run",
        "",
        f"Produced by `{command}` on {datetime.datetime.now():%Y-%m-%d %H:%M}, in {minutes:.1f} min"
        f"{' (quick)' if opts.quick else ''}.",
        "",
        f"- machine: {os.cpu_count()} CPU cores ({platform.machine()}, {platform.platform()}), "
        f"backend {jax.default_backend()}; python {platform.python_version()}",
        f"- jax / jaxlib {jax.__version__} / {jaxlib.__version__}; equinox {eqx.__version__}; "
        f"diffrax {getattr(diffrax, '__version__', 'not installed')}",
        f"- malijax git {rev}, imported from `{pkg}`",
        f"- load average (1 / 5 / 15 min) at start: {load0}; at end: {load1}",
        f"- times: medians of {rounds} interleaved rounds after a warm-up; ratios are medians "
        "of per-round ratios; memory is XLA's `temp_size_in_bytes` of the jitted function",
        "",
    ]
    if targets:
        lines += ["## Targets", "", "| target | value | verdict |", "|---|---|---|"]
        lines += [f"| {a} | {b} | **{c}** |" for a, b, c in targets] + [""]
    lines += body
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    path = pathlib.Path(opts.out) if opts.out else RESULTS / "records.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
