"""Issue 12's performance figures: first-order gradients unchanged, forward mode cheaper.

1. **First-order gradient time, before and after.** Reverse-over-reverse needs bounded
   loops, but only when the call sees two reverse-mode levels (`malijax/_transforms.py`),
   so a first-order gradient should compile to the same program as before. Measured:
   this checkout against a baseline commit (`--baseline`, checked out with
   `git worktree`), each in its own subprocess, alternated `--rounds` times in one run;
   each process times the jitted gradients of four problems (median of `--repeats`
   calls after a warm-up), and the report gives median(after) / median(before) over all
   rounds.
2. **`ForwardMode()` against `Direct()` for `jax.jacfwd`** (32 tangents), in one process,
   interleaved, with `jacrev` through `ACA()` for scale.
3. **What reverse over reverse costs**: `grad(grad)` against `grad`, ACA, adaptive.

Problems (float32): an MLP vector field (state 32, hidden 64) on a batch of 64 states
over [0, 1]: adaptive `Reversible(Tsit5())` + `MALI()` (the defaults), adaptive
`Tsit5()` + `ACA()`, `Dopri5()` + `ACA()` on `num_steps=32`, adaptive `Tsit5()` +
`SymplecticAdjoint()`.

    python benchmarks/higher_order.py --baseline 438815c    # ~10 min on 2 CPU cores
    python benchmarks/higher_order.py --baseline 438815c --quick
"""

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "higher_order.md"

# Run by each worker process, against whichever malijax is first on its path.
WORKER = r"""
import json, statistics, sys, time
import jax, jax.numpy as jnp, jax.random as jr
import malijax as mj
repeats = int(sys.argv[1])
key = jr.PRNGKey(0)
k1, k2, k3 = jr.split(key, 3)
W1 = jr.normal(k1, (64, 32)) / 32**0.5
W2 = jr.normal(k2, (32, 64)) / 64**0.5
y0 = jr.normal(k3, (64, 32))
ts = jnp.array([0.0, 1.0])

def f(t, y, p):
    w1, w2 = p
    return jnp.tanh(y @ w1.T) @ w2.T

cases = {
    "MALI + Reversible(Tsit5), adaptive": dict(solver=mj.Reversible(mj.Tsit5()), gradient=mj.MALI()),
    "ACA + Tsit5, adaptive": dict(solver=mj.Tsit5(), gradient=mj.ACA()),
    "ACA + Dopri5, num_steps=32": dict(solver=mj.Dopri5(), gradient=mj.ACA(), num_steps=32),
    "SymplecticAdjoint + Tsit5, adaptive": dict(solver=mj.Tsit5(), gradient=mj.SymplecticAdjoint()),
}
out = {}
for name, kw in cases.items():
    grad = jax.jit(jax.grad(lambda p: jnp.mean(mj.odeint(f, y0, ts, p, **kw)[-1] ** 2)))
    p = (W1, W2)
    jax.block_until_ready(grad(p))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(grad(p))
        times.append(time.perf_counter() - t0)
    out[name] = statistics.median(times)
print("RESULT " + json.dumps(out))
"""


def run_worker(tree, repeats):
    env = dict(os.environ, PYTHONPATH=str(tree), JAX_ENABLE_X64="0")
    proc = subprocess.run([sys.executable, "-c", WORKER, str(repeats)], env=env,
                          capture_output=True, text=True, check=True)
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def part1(baseline, rounds, repeats):
    with tempfile.TemporaryDirectory() as tmp:
        old = pathlib.Path(tmp) / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), baseline],
                       check=True, capture_output=True)
        try:
            samples = {"before": [], "after": []}
            for r in range(rounds):
                order = [("before", old), ("after", ROOT)] if r % 2 == 0 else [("after", ROOT), ("before", old)]
                for label, tree in order:
                    samples[label].append(run_worker(tree, repeats))
                    print(f"round {r + 1}/{rounds} {label}: {samples[label][-1]}", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)],
                           check=False, capture_output=True)
    rows = []
    for name in samples["after"][0]:
        before = statistics.median(s[name] for s in samples["before"])
        after = statistics.median(s[name] for s in samples["after"])
        rows.append((name, 1e3 * before, 1e3 * after, after / before))
    return rows


def _median_time(fn, *args, repeats):
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def part2_and_3(repeats):
    import jax
    import jax.numpy as jnp
    import jax.random as jr

    import malijax as mj

    k1, k2, k3 = jr.split(jr.PRNGKey(0), 3)
    w1, w2 = jr.normal(k1, (64, 32)) / 32**0.5, jr.normal(k2, (32, 64)) / 64**0.5
    y0 = jr.normal(k3, (32,))
    ts = jnp.array([0.0, 1.0])

    def f(t, y, p):
        return p[1] @ jnp.tanh(p[0] @ y)

    def sol(y0, gradient, kw):
        return mj.odeint(f, y0, ts, (w1, w2), solver=mj.Tsit5(), gradient=gradient, **kw)[-1]

    rows2 = []
    for label, kw in [("adaptive", {}), ("num_steps=32", {"num_steps": 32})]:
        fns = {
            "jacfwd, ForwardMode()": jax.jit(jax.jacfwd(lambda y: sol(y, mj.ForwardMode(), kw))),
            "jacfwd, Direct()": jax.jit(jax.jacfwd(lambda y: sol(y, mj.Direct(), kw))),
            "jacrev, ACA()": jax.jit(jax.jacrev(lambda y: sol(y, mj.ACA(), kw))),
        }
        ref = fns["jacrev, ACA()"](y0)
        times = {name: [] for name in fns}
        for _ in range(3):  # interleaved
            for name, fn in fns.items():
                times[name].append(_median_time(fn, y0, repeats=repeats))
        for name, fn in fns.items():
            err = float(jnp.max(jnp.abs(fn(y0) - ref)) / jnp.max(jnp.abs(ref)))
            rows2.append((label, name, 1e3 * statistics.median(times[name]), err))

    def loss(s):
        return jnp.sum(mj.odeint(f, y0, ts, (s * w1, w2), solver=mj.Tsit5(), gradient=mj.ACA(),
                                 max_steps=256) ** 2)

    first = jax.jit(jax.grad(loss))
    second = jax.jit(jax.grad(jax.grad(loss)))
    t1 = statistics.median(_median_time(first, 1.0, repeats=repeats) for _ in range(3))
    t2 = statistics.median(_median_time(second, 1.0, repeats=repeats) for _ in range(3))
    return rows2, (1e3 * t1, 1e3 * t2)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="the commit to compare against")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rounds, repeats = (2, 5) if args.quick else (6, 15)
    rows1 = part1(args.baseline, rounds, repeats)
    rows2, (t1, t2) = part2_and_3(repeats)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    cmd = f"python benchmarks/higher_order.py --baseline {args.baseline}" + (" --quick" if args.quick else "")
    lines = [
        "# Higher-order and forward-mode differentiation (issue 12)",
        "",
        f"`{cmd}` at {head} (plus uncommitted changes, if any), {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, float32, {time.strftime('%Y-%m-%d')}.",
        "",
        f"## 1. First-order gradient time: this checkout against {args.baseline}",
        "",
        f"Jitted `grad` of `mean(y(1)²)` w.r.t. the MLP's weights (state 32, hidden 64, a batch of "
        f"64 states). Median over {rounds} alternating processes of each one's median of {repeats} calls. "
        "Target: unchanged (ratio ≈ 1; this machine's run-to-run noise is several percent).",
        "",
        "| problem | before ms | after ms | after / before |",
        "|---|---|---|---|",
        *[f"| {n} | {b:.2f} | {a:.2f} | {r:.3f} |" for n, b, a, r in rows1],
        "",
        "## 2. `jax.jacfwd` (32 tangents): `ForwardMode()` against `Direct()`",
        "",
        "State 32, hidden 64, Tsit5, the Jacobian of y(1) w.r.t. y0; median of three interleaved "
        f"medians of {repeats} calls; `rel. diff` against `jacrev` through `ACA()`.",
        "",
        "| grid | transformation, strategy | ms | rel. diff |",
        "|---|---|---|---|",
        *[f"| {g} | {n} | {ms:.2f} | {e:.1e} |" for g, n, ms, e in rows2],
        "",
        "## 3. Reverse over reverse",
        "",
        f"ACA + Tsit5, adaptive, `max_steps=256`: `grad` {t1:.2f} ms, `grad(grad)` {t2:.2f} ms "
        f"({t2 / t1:.1f}×; the second runs the forward and the sweep in bounded loops).",
        "",
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
