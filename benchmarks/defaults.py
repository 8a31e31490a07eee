"""Choosing the default `solver` and `gradient` of `mj.odeint` by measurement.

Seven candidates (solver, gradient):

    A  ALF()                  + MALI()     (the default before this benchmark)
    B  Reversible(Tsit5())    + MALI()     (coupling 0.5, automatic stored states)
    C  Reversible(Dopri5())   + MALI()
    D  Reversible(Bosh3())    + MALI()
    E  ALF(eta=0.9)           + MALI()
    F  Tsit5()                + ACA()
    G  (default)              + (default)  (no `solver` / `gradient` passed: whatever
                                            `mj.odeint` resolves them to at run time,
                                            possibly by the state's size; the report
                                            names what it resolved to per problem)

are run on six problems, all at the library's default tolerances (rtol 1e-3, atol 1e-6,
adaptive steps, max_steps 4096) in float64, with 5 evenly spaced output times over
[0, T]:

    decay1   y' = -k y, k = 1, y0 = 1, T = 20
    decay6   y' = -k y, k = 6, y0 = 1, T = 1
    damped   x'' + 2ζω x' + ω² x = 0, ζ = 0.5, ω = 5, (x, x') = (1, 0), T = 20
    vdp      Van der Pol, μ = 1, (2, 0), T = 10
    tanhnet  y' = -diag(1, 10) y + 0.5 W2 tanh(W1 y + b), 2 -> 16 -> 2, fixed random
             weights (numpy seed 0, scaled 1/sqrt(fan_in)), y0 = (1, 1), T = 2
    cnf      mj.nn.CNF(mj.nn.MLPField(2, 32, key=key(0)), 2) (exact trace, t in [0, 1]):
             log_prob of 8 two-dimensional points, vmapped

The rates / coefficients / weights are passed as `args`, so gradients cover them too.
For each (problem, candidate) it records: the solve's result (`throw=False`), accepted
(rejected) steps and evaluations of f (`mj.solve(...).stats`; for the CNF the maximum
over the 8 points); the max scaled error max |y - y_ref| / (atol + rtol |y_ref|) over the
outputs, against scipy `solve_ivp(method="DOP853", rtol=atol=1e-13)` (for the CNF:
log_prob against the same CNF with `Dopri5()`, `Direct()`, rtol = atol = 1e-10), and
whether it is <= 100; the gradient of `sum(ys[1:]**2)` with respect to `(y0, args)`
(CNF: of `-mean(log_prob)` w.r.t. the points and the field's parameters) against
`gradient=mj.Direct()` with the same solver (for G: the solver the default resolves
to at the default tolerances, `malijax._odeint.default_solver(rtol)`) and tolerances, as the max over gradient leaves of max|g - g_ref| /
max|g_ref| (requirement <= 1e-8), with any `mj.ReconstructionWarning` (caught at the
warm-up call); and the gradient's wall time
(jitted, one warm-up call, median of 5 timed calls, `block_until_ready`).

Memory: for y' = -y + 0.1 sin(y), y0 = ones(20000), T = 1, default tolerances, the
`temp_size_in_bytes` of `jax.jit(jax.grad(loss)).lower(y0).compile().memory_analysis()`
at max_steps = 1024 and 16384 for each candidate (requirement: ratio <= 1.5); and, to
show what a record per possible step costs at a large state, the same at max_steps 4096
for y0 = ones(1_000_000) (8 MB in float64; compiled only, never run).

Training loops (`--train`): benchmarks/dense_output.py's training section, run once per
kind (`--train-kinds spirals,latent`; spirals is the README's loop) in its own process
(`dense_output.py --section KIND --train-steps N --rounds 1 --ks 2`, float32): Adam
steps in lock-step with Diffrax's defaults, time per Adam step (median) and its median
per-step ratio to Diffrax, accepted steps initial -> final, final loss by the row's own
solve and by a tight Diffrax solve. Its rows "malijax defaults", "Reversible(Tsit5()) +
MALI()", "Tsit5() + ACA()" and "Bosh3() + ACA()" are candidates G, B, F and H: the
summary shows their README loop time per step. Recommendation: among the candidates meeting every requirement, the
one with the lowest README-loop time per Adam step (times within 10% are ties, broken by
the smaller worst-case scaled error) when training rows exist; otherwise, among those
whose total NFE is within 1.25x of the fewest, the smallest worst-case scaled error. The
conclusion also says whether it meets <= 1.0x Diffrax per Adam step.

    nice -n 5 .venv/bin/python benchmarks/defaults.py --train     # the full report
    nice -n 5 .venv/bin/python benchmarks/defaults.py             # no training loops
    nice -n 5 .venv/bin/python benchmarks/defaults.py --only B,C  # some candidates only

or split into shorter runs and merge their saved parts into one report:

    .venv/bin/python benchmarks/defaults.py --only A,B,C --save /tmp/abc.json --out /tmp/abc.md
    .venv/bin/python benchmarks/defaults.py --only D,E,F,G --save /tmp/dg.json --out /tmp/dg.md
    .venv/bin/python benchmarks/defaults.py --only B,F,G --problems none --no-memory --train \\
        --save /tmp/train.json --out /tmp/train.md
    .venv/bin/python benchmarks/defaults.py --merge /tmp/abc.json /tmp/dg.json /tmp/train.json

Writes `benchmarks/results/defaults.md` (and prints it). Timings on a shared machine
are only as good as its load: the load average is recorded.
"""

import argparse
import datetime
import math
import os
import pathlib
import platform
import statistics
import sys
import time

import _child  # benchmarks/_child.py: the parts' processes
import warnings

import jax

jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from scipy.integrate import solve_ivp  # noqa: E402

import malijax as mj  # noqa: E402

RTOL, ATOL, MAX_STEPS, NUM_OUT = 1e-3, 1e-6, 4096, 5
ERR_REQ, GRAD_REQ, MEM_REQ = 100.0, 1e-8, 1.5
TIMED_RUNS = 5
MEM_STATE, MEM_STEPS = 20000, (1024, 16384)
OUT = pathlib.Path(__file__).parent / "results" / "defaults.md"

CANDIDATES = {
    "A": ("ALF()", "MALI()", lambda: (mj.ALF(), mj.MALI())),
    "B": ("Reversible(Tsit5())", "MALI()", lambda: (mj.Reversible(mj.Tsit5()), mj.MALI())),
    "C": ("Reversible(Dopri5())", "MALI()", lambda: (mj.Reversible(mj.Dopri5()), mj.MALI())),
    "D": ("Reversible(Bosh3())", "MALI()", lambda: (mj.Reversible(mj.Bosh3()), mj.MALI())),
    "E": ("ALF(eta=0.9)", "MALI()", lambda: (mj.ALF(eta=0.9), mj.MALI())),
    "F": ("Tsit5()", "ACA()", lambda: (mj.Tsit5(), mj.ACA())),
    "H": ("Bosh3()", "ACA()", lambda: (mj.Bosh3(), mj.ACA())),
    # no `solver`/`gradient` passed: what `mj.odeint` does by default at run time
    "G": ("(default)", "(default)", lambda: (None, None)),
}
# the candidates timed by benchmarks/dense_output.py's training loops, by its row labels
TRAIN_ROW_OF = {"G": "malijax defaults", "B": "Reversible(Tsit5()) + MALI()",
                "F": "Tsit5() + ACA()", "H": "Bosh3() + ACA()"}
TRAIN_KINDS = ("spirals", "latent")
BIG_STATE, BIG_STEPS, BIG_KEY = 1_000_000, 4096, "big"  # the large-state memory column


# --------------------------------------------------------------------------- problems
# Each vector field is written once for a numpy-like module `xp` (jnp for malijax, np
# for scipy's reference). States are 1-D arrays; args are tuples of arrays.


def _decay(t, y, args, xp):
    (k,) = args
    return -k * y


def _damped(t, y, args, xp):
    zeta, omega = args
    x, v = y[0], y[1]
    return xp.stack([v, -2 * zeta * omega * v - omega**2 * x])


def _vdp(t, y, args, xp):
    (mu,) = args
    x, v = y[0], y[1]
    return xp.stack([v, mu * (1 - x**2) * v - x])


def _tanhnet(t, y, args, xp):
    d, w1, b, w2 = args
    return -d * y + 0.5 * (w2 @ xp.tanh(w1 @ y + b))


def _tanhnet_args():
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 2)) / math.sqrt(2)
    b = rng.standard_normal(16) / math.sqrt(2)
    w2 = rng.standard_normal((2, 16)) / math.sqrt(16)
    return (np.array([1.0, 10.0]), w1, b, w2)


PROBLEMS = {
    # name: (description, field, y0, args, T)
    "decay1": ("y' = -k y, k = 1, y0 = 1, T = 20", _decay, [1.0], (np.array(1.0),), 20.0),
    "decay6": ("y' = -k y, k = 6, y0 = 1, T = 1", _decay, [1.0], (np.array(6.0),), 1.0),
    "damped": ("x'' + 2ζωx' + ω²x = 0, ζ = 0.5, ω = 5, (1, 0), T = 20", _damped, [1.0, 0.0],
               (np.array(0.5), np.array(5.0)), 20.0),
    "vdp": ("Van der Pol, μ = 1, (2, 0), T = 10", _vdp, [2.0, 0.0], (np.array(1.0),), 10.0),
    "tanhnet": ("y' = -diag(1, 10) y + 0.5 W2 tanh(W1 y + b), 2→16→2, y0 = (1, 1), T = 2",
                _tanhnet, [1.0, 1.0], _tanhnet_args(), 2.0),
}


def _resolved_solver(solver, y0):
    """`solver`, or when None the solver `mj.odeint` resolves the default to at the
    default tolerances, so that the `Direct()` reference of candidate G runs the same
    solver."""
    del y0
    if solver is not None:
        return solver
    from malijax._odeint import default_solver

    return default_solver(RTOL)


def _resolved_text(y0):
    """What candidate G (no solver, no gradient) resolves to for `y0`, as text."""
    try:
        from malijax._odeint import _default_gradient

        solver = _resolved_solver(None, y0)
        return f"{solver!r} + {_default_gradient(solver)!r}".replace("solver=", "")
    except Exception as e:  # noqa: BLE001 - private names moved: say so, do not fail
        return "unknown (" + _describe_exc(e)[:60] + ")"


def _jnp_field(field):
    return lambda t, y, args: field(t, y, args, jnp)


def _reference(field, y0, args, ts):
    sol = solve_ivp(lambda t, y: field(t, y, args, np), (ts[0], ts[-1]), np.asarray(y0, float),
                    method="DOP853", rtol=1e-13, atol=1e-13, t_eval=ts)
    assert sol.success, sol.message
    return sol.y.T  # (NUM_OUT, dim)


def _scaled_error(y, y_ref):
    y, y_ref = np.asarray(y), np.asarray(y_ref)
    if not np.all(np.isfinite(y)):
        return math.inf
    return float(np.max(np.abs(y - y_ref) / (ATOL + RTOL * np.abs(y_ref))))


def _rel_diff(g, g_ref):
    """max over leaves of max|g - g_ref| / max|g_ref| (inf if anything is non-finite)."""
    worst = 0.0
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
        a, b = np.asarray(a), np.asarray(b)
        if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
            return math.inf
        scale = np.max(np.abs(b))
        d = np.max(np.abs(a - b))
        worst = max(worst, float(d / scale) if scale > 0 else float(d))
    return worst


def _block(x):
    return jax.tree_util.tree_map(lambda a: a.block_until_ready(), x)


def _run_caught(fn, *xs):
    """Call `fn(*xs)` (the warm-up), catching ReconstructionWarnings raised at run time."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _block(fn(*xs))
        jax.effects_barrier()
    msgs = [str(w.message) for w in caught if issubclass(w.category, mj.ReconstructionWarning)]
    return out, msgs


def _time(fn, *xs):
    times = []
    for _ in range(TIMED_RUNS):
        t0 = time.perf_counter()
        _block(fn(*xs))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _short_warning(msgs):
    if not msgs:
        return ""
    m = msgs[0]
    # "... rebuilt the state at t=X with a relative error of Y (tolerance Z) ..."
    try:
        t = m.split("state at t=")[1].split(" ")[0]
        e = m.split("relative error of ")[1].split(" ")[0]
        return f"W: {e} at t={t}"
    except IndexError:  # pragma: no cover - message format changed
        return "W: " + m[:60]


def _result_name(result):
    for name in ("successful", "max_steps_reached", "nonfinite_state", "step_size_underflow",
                 "ts_not_monotone"):
        if bool(result == getattr(mj.RESULTS, name)):
            return "ok" if name == "successful" else name
    return str(result)


def _describe_exc(e):
    s = f"{type(e).__name__}: {e}".replace("\n", " ").replace("|", "/")
    return s[:160]


def run_ode_problem(name, keys):
    desc, field, y0, args, T = PROBLEMS[name]
    ts_np = np.linspace(0.0, T, NUM_OUT)
    ys_ref = _reference(field, y0, args, ts_np)
    y0 = jnp.asarray(y0, jnp.float64)
    args = tuple(jnp.asarray(a, jnp.float64) for a in args)
    ts = jnp.asarray(ts_np)
    f = _jnp_field(field)
    rows = {}
    for key in keys:
        _, _, make = CANDIDATES[key]
        solver, gradient = make()
        row = {}
        t_start = time.perf_counter()
        try:
            sol = jax.jit(lambda y0, args: mj.solve(
                f, y0, ts, args, solver=solver, gradient=gradient, rtol=RTOL, atol=ATOL,
                max_steps=MAX_STEPS, throw=False))(y0, args)
            row["result"] = _result_name(sol.result)
            row["steps"] = int(sol.stats["num_steps"])
            row["rejected"] = int(sol.stats["num_rejected"])
            row["fevals"] = int(sol.stats["num_fevals"])
            row["err"] = _scaled_error(sol.ys, ys_ref)
        except Exception as e:  # noqa: BLE001 - recorded, then continue
            row["result"] = "EXC " + _describe_exc(e)
            rows[key] = row
            continue

        def loss(y0, args, solver, gradient):
            ys = mj.odeint(f, y0, ts, args, solver=solver, gradient=gradient, rtol=RTOL,
                           atol=ATOL, max_steps=MAX_STEPS, throw=False)
            return jnp.sum(ys[1:] ** 2)

        if solver is None:
            row["resolved"] = _resolved_text(y0)
        try:
            ref_solver = _resolved_solver(solver, y0)  # Direct() through the same solver
            grad = jax.jit(jax.grad(lambda y0, a: loss(y0, a, solver, gradient),
                                    argnums=(0, 1)))
            g, msgs = _run_caught(grad, y0, args)
            g_ref = jax.jit(jax.grad(lambda y0, a: loss(y0, a, ref_solver, mj.Direct()),
                                     argnums=(0, 1)))(y0, args)
            row["grad_rel"] = _rel_diff(g, g_ref)
            row["warn"] = _short_warning(msgs)
            row["grad_ms"] = 1e3 * _time(grad, y0, args)
        except Exception as e:  # noqa: BLE001
            row["grad_exc"] = _describe_exc(e)
        row["wall_s"] = time.perf_counter() - t_start
        rows[key] = row
        print(f"  {name} {key}: {_fmt_row(row)}", flush=True)
    return rows


# ------------------------------------------------------------------------------- CNF
CNF_POINTS = 8


def _cnf_dynamics(vf):
    """The CNF's augmented dynamics (the same class `CNF.log_prob` solves), for stats."""
    from malijax.nn._cnf import _Augmented  # private: only to read the step statistics

    return _Augmented(vf, "exact")


def run_cnf(keys):
    vf = mj.nn.MLPField(2, 32, key=jax.random.key(0))
    xs = jax.random.normal(jax.random.key(1), (CNF_POINTS, 2), jnp.float64)
    vf = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, vf)
    ref = mj.nn.CNF(vf, 2, solver=mj.Dopri5(), gradient=mj.Direct(), rtol=1e-10, atol=1e-10,
                    max_steps=16384)
    log_prob = eqx.filter_jit(lambda model, xs: model.log_prob(xs))
    lp_ref = np.asarray(log_prob(ref, xs))
    rows = {}
    func = _cnf_dynamics(vf)
    ts = jnp.array([0.0, 1.0])
    for key in keys:
        _, _, make = CANDIDATES[key]
        solver, gradient = make()
        row = {}
        t_start = time.perf_counter()
        try:
            cnf = mj.nn.CNF(vf, 2, solver=solver, gradient=gradient, rtol=RTOL, atol=ATOL,
                            max_steps=MAX_STEPS, throw=False)
            lp = log_prob(cnf, xs)
            sols = jax.jit(jax.vmap(lambda x: mj.solve(
                func, (x, jnp.zeros((), x.dtype)), ts, (None, None), solver=solver,
                gradient=gradient, rtol=RTOL, atol=ATOL, max_steps=MAX_STEPS, throw=False)))(xs)
            ok = np.asarray(sols.result == mj.RESULTS.successful)
            row["result"] = "ok" if ok.all() else f"{int((~ok).sum())}/{CNF_POINTS} failed"
            row["steps"] = int(np.max(sols.stats["num_steps"]))
            row["rejected"] = int(np.max(sols.stats["num_rejected"]))
            row["fevals"] = int(np.max(sols.stats["num_fevals"]))
            row["err"] = _scaled_error(lp, lp_ref)
        except Exception as e:  # noqa: BLE001
            row["result"] = "EXC " + _describe_exc(e)
            rows[key] = row
            continue

        def loss(vf, xs, solver, gradient):
            model = mj.nn.CNF(vf, 2, solver=solver, gradient=gradient, rtol=RTOL, atol=ATOL,
                              max_steps=MAX_STEPS, throw=False)
            return -jnp.mean(model.log_prob(xs))

        state0 = (xs[0], jnp.zeros((), xs.dtype))  # one point's augmented state (vmapped)
        if solver is None:
            row["resolved"] = _resolved_text(state0)
        try:
            ref_solver = _resolved_solver(solver, state0)  # Direct() through the same solver
            grad = eqx.filter_jit(eqx.filter_grad(lambda p: loss(p[0], p[1], solver, gradient)))
            g, msgs = _run_caught(grad, (vf, xs))
            g_ref = eqx.filter_jit(eqx.filter_grad(
                lambda p: loss(p[0], p[1], ref_solver, mj.Direct())))((vf, xs))
            row["grad_rel"] = _rel_diff(g, g_ref)
            row["warn"] = _short_warning(msgs)
            row["grad_ms"] = 1e3 * _time(grad, (vf, xs))
        except Exception as e:  # noqa: BLE001
            row["grad_exc"] = _describe_exc(e)
        row["wall_s"] = time.perf_counter() - t_start
        rows[key] = row
        print(f"  cnf {key}: {_fmt_row(row)}", flush=True)
    return rows


# ---------------------------------------------------------------------------- memory
def run_memory(keys, sizes=(MEM_STATE, BIG_STATE)):
    """Per candidate: gradient temp bytes for the MEM_STATE-float state at each of
    MEM_STEPS (and its forward's steps), and for the BIG_STATE-float state at max_steps
    BIG_STEPS (row[BIG_KEY]; compiled only, never run). `sizes` picks which."""
    y0 = jnp.ones(MEM_STATE, jnp.float64)
    ts = jnp.linspace(0.0, 1.0, NUM_OUT)

    def f(t, y, args):
        return -y + 0.1 * jnp.sin(y)

    def temp_bytes(y0, solver, gradient, m):
        def loss(y0):
            ys = mj.odeint(f, y0, ts, solver=solver, gradient=gradient, rtol=RTOL,
                           atol=ATOL, max_steps=m, throw=False)
            return jnp.sum(ys[1:] ** 2)

        try:
            compiled = jax.jit(jax.grad(loss)).lower(y0).compile()
            return compiled.memory_analysis().temp_size_in_bytes
        except Exception as e:  # noqa: BLE001
            return "EXC " + _describe_exc(e)

    rows = {}
    for key in keys:
        _, _, make = CANDIDATES[key]
        solver, gradient = make()
        row = {}
        if BIG_STATE in sizes:
            big = jnp.ones(BIG_STATE, jnp.float64)
            row[BIG_KEY] = temp_bytes(big, solver, gradient, BIG_STEPS)
            if solver is None:
                row["resolved_big"] = _resolved_text(big)
            del big
        if MEM_STATE not in sizes:
            rows[key] = row
            print(f"  memory {key}: {row}", flush=True)
            continue
        if solver is None:
            row["resolved"] = _resolved_text(y0)
        for m in MEM_STEPS:
            row[m] = temp_bytes(y0, solver, gradient, m)
        try:
            sol = jax.jit(lambda y0: mj.solve(f, y0, ts, solver=solver, gradient=gradient,
                                              rtol=RTOL, atol=ATOL, max_steps=MEM_STEPS[0],
                                              throw=False))(y0)
            row["steps"] = int(sol.stats["num_steps"])
            row["result"] = _result_name(sol.result)
        except Exception as e:  # noqa: BLE001
            row["result"] = "EXC " + _describe_exc(e)
        rows[key] = row
        print(f"  memory {key}: {row}", flush=True)
    return rows


# -------------------------------------------------------------------------- training
DENSE = pathlib.Path(__file__).resolve().with_name("dense_output.py")


def run_training(kinds, steps, rows=None):
    """Run benchmarks/dense_output.py's training section for each kind in its own
    process (float32; it sets that itself) and return {kind: its RESULT json}."""

    out = {}
    for kind in kinds:
        cmd = [sys.executable, str(DENSE), "--section", kind, "--train-steps", str(steps),
               "--rounds", "1", "--ks", "2"] + (["--rows", rows] if rows else [])
        print(f"  training {kind}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        result, code = _child.run(cmd, cwd=DENSE.parents[1], indent="    ")
        if result is None:
            result = dict(error=f"dense_output.py --section {kind} exited with "
                                f"{code} and no RESULT line")
        result["seconds"] = time.perf_counter() - t0
        out[kind] = result
    return out


def _train_row(train, kind, key):
    """The training row of candidate `key` in section `kind`, if it ran and was timed."""
    label = TRAIN_ROW_OF.get(key)
    rows = train.get(kind, {}).get("rows", [])
    r = next((r for r in rows if r.get("label") == label), None)
    return r if r is not None and r.get("step_ms") is not None else None


def _train_cell(train, key):
    r = _train_row(train, "spirals", key)
    if r is None:
        return "-"
    ratio = r.get("ratio")
    return f"{r['step_ms']:.2f}" + (f" ({ratio:.2f}×)" if ratio is not None else "")


def _report_training(train, w):
    w("## Training loops (time per Adam step at equal loss)")
    w("")
    w("From `benchmarks/dense_output.py --section KIND` (each kind in its own process, "
      "float32, optax Adam lr 1e-2, MLP field 2 → 64 → 64 → 2 (tanh), rtol 1e-3, atol 1e-6, "
      "one init shared by all rows, the rows stepped in lock-step). `ms / step`: median Adam "
      "step (forward + gradient + update) after the compile; `× Diffrax`: median over steps of "
      "the per-step ratio to Diffrax's defaults (`Tsit5` + `RecursiveCheckpointAdjoint`); "
      "`steps`: the solver's accepted steps (summed over trajectories under vmap) at the "
      "initial → final parameters; `final loss`: by the row's own solve; `tight`: the final "
      "parameters evaluated by Diffrax Tsit5 at rtol 1e-6, atol 1e-8 (equal loss: the rows "
      "trained as well). Candidates: G = `malijax defaults`, B = `Reversible(Tsit5()) + "
      "MALI()`, F = `Tsit5() + ACA()`, H = `Bosh3() + ACA()`.")
    titles = {"spirals": "README loop: 64 spirals as one (64, 2) state",
              "latent": "latent-ODE-style: per-trajectory irregular times under jax.vmap"}
    for kind in sorted(train, key=lambda k: TRAIN_KINDS.index(k) if k in TRAIN_KINDS else 99):
        res = train[kind]
        w("")
        w(f"### {kind}: {titles.get(kind, kind)}")
        w("")
        if "rows" not in res:
            w(f"**failed**: {res.get('error', 'no result')}")
            continue
        w(f"{res.get('desc', '')}; {res.get('train_steps')} Adam steps; "
          f"{res.get('seconds', 0) / 60:.1f} min in its own process."
          + (f" `malijax defaults` resolved to `{res['defaults']}`." if res.get("defaults")
             else ""))
        w("")
        w("| row | ms / step | × Diffrax | steps init → final | final loss | final loss "
          "(tight) | errors |")
        w("|---|---|---|---|---|---|---|")
        for r in res["rows"]:
            cand = next((k for k, lab in TRAIN_ROW_OF.items() if lab == r.get("label")), None)
            label = r.get("label", "?") + (f" ({cand})" if cand else "")
            err = r.get("error", "").replace("|", "/")
            if r.get("recon_warned"):
                err = (err + "; " if err else "") + (
                    f"ReconstructionWarning at {r['recon_warned']} steps "
                    f"(worst {r['recon_max']:.1e})")
            w(f"| {label} | {_g(r.get('step_ms'))} | {_g(r.get('ratio'))} | "
              f"{r.get('init_steps', '-')} → {r.get('final_steps', '-')} | "
              f"{_g(r.get('final_loss'), 3)} | {_g(r.get('final_loss_tight'), 3)} | "
              f"{err or 'none'} |")
    w("")


# ---------------------------------------------------------------------------- report
def _g(x, digits=2):
    if x is None:
        return "—"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:.{digits}e}" if (x != 0 and (abs(x) >= 1e4 or abs(x) < 1e-2)) else f"{x:.{digits + 1}g}"


def _fmt_row(row):
    return ", ".join(f"{k}={_g(v) if isinstance(v, float) else v}" for k, v in row.items())


def _passes(row):
    """(accurate, gradient ok) for one (problem, candidate) row."""
    acc = row.get("result") == "ok" and row.get("err", math.inf) <= ERR_REQ
    grad = row.get("grad_rel", math.inf) <= GRAD_REQ
    return acc, grad


def _mem_ratio(row):
    a, b = row.get(MEM_STEPS[0]), row.get(MEM_STEPS[1])
    if isinstance(a, int) and isinstance(b, int):
        return b / a if a > 0 else (1.0 if b == 0 else math.inf)
    return math.inf


def _mib(b):
    return f"{b / 2**20:.2f}" if isinstance(b, int) else str(b)


def report(results, mem, keys, elapsed, load0, load1, argv, fingerprint=None, train=None):
    names = list(results)
    train = train or {}
    lines = []
    w = lines.append
    w("# Choosing the default solver and gradient of `mj.odeint`")
    w("")
    w(f"Produced by `{argv}` on {datetime.date.today().isoformat()}, jax {jax.__version__}, "
      f"malijax {mj.__version__} ({fingerprint or FINGERPRINT}), backend {jax.default_backend()}, float64, "
      f"Python {platform.python_version()}, {os.cpu_count()} CPUs shared with other work "
      f"(load average {load0:.2f} to {load1:.2f} at the starts and ends of the runs; "
      f"{elapsed:.0f} s of measurement).")
    w("")
    w(f"All solves adaptive at the default tolerances (rtol {RTOL:g}, atol {ATOL:g}), "
      f"max_steps {MAX_STEPS}, {NUM_OUT} evenly spaced output times over [0, T], "
      "`throw=False`. Requirements per (problem, candidate): reported success with scaled "
      f"error max|y − y_ref| / (atol + rtol|y_ref|) ≤ {ERR_REQ:g} against DOP853 at "
      f"rtol = atol = 1e-13 (CNF: log_prob against Dopri5 + Direct at 1e-10); gradient "
      f"relative difference ≤ {GRAD_REQ:g} against `Direct()` with the same solver and "
      f"tolerances (max over gradient leaves of max|g − g_ref| / max|g_ref|); and per "
      f"candidate: gradient memory at max_steps {MEM_STEPS[1]} ≤ {MEM_REQ:g}× that at "
      f"{MEM_STEPS[0]}.")
    w("")
    # ---- summary
    w("## Summary")
    w("")
    w("| | solver | gradient | accurate (of %d) | gradient ≤ 1e-8 (of %d) | reconstruction "
      "warnings | memory ratio | total NFE | total grad ms | geo-mean scaled err | README loop "
      "ms/step (× Diffrax) | meets every requirement |" % (len(names), len(names)))
    w("|---|---|---|---|---|---|---|---|---|---|---|---|")
    summary = {}
    for key in keys:
        sname, gname, _ = CANDIDATES[key]
        acc = [n for n in names if _passes(results[n].get(key, {}))[0]]
        grd = [n for n in names if _passes(results[n].get(key, {}))[1]]
        warns = [n for n in names if results[n].get(key, {}).get("warn")]
        ratio = _mem_ratio(mem.get(key, {}))
        times = [results[n].get(key, {}).get("grad_ms") for n in names]
        total = sum(times) if all(t is not None for t in times) else math.inf
        errs = [results[n].get(key, {}).get("err", math.inf) for n in names]
        geo = (math.exp(statistics.fmean(math.log(max(e, 1e-300)) for e in errs))
               if errs and all(math.isfinite(e) for e in errs) else math.inf)
        nfes = [results[n].get(key, {}).get("fevals") for n in names]
        nfe = sum(nfes) if all(x is not None for x in nfes) else math.inf
        ok = len(acc) == len(names) and len(grd) == len(names) and ratio <= MEM_REQ
        summary[key] = dict(ok=ok, total=total, geo=geo, acc=acc, grd=grd, ratio=ratio, nfe=nfe)
        miss_a = [n for n in names if n not in acc]
        miss_g = [n for n in names if n not in grd]
        w(f"| {key} | `{sname}` | `{gname}` | {len(acc)}"
          + (f" (fails: {', '.join(miss_a)})" if miss_a else "")
          + f" | {len(grd)}" + (f" (fails: {', '.join(miss_g)})" if miss_g else "")
          + f" | {', '.join(warns) if warns else 'none'} | {_g(ratio)} | {nfe} | {_g(total)} | "
          f"{_g(geo)} | {_train_cell(train, key)} | {'**yes**' if ok else 'no'} |")
    w("")
    if "G" in keys:  # what "(default)" meant in this run, per state
        seen = [f"{n}: `{results[n]['G']['resolved']}`" for n in names
                if results[n].get("G", {}).get("resolved")]
        g_mem = mem.get("G", {})
        if g_mem.get("resolved"):
            seen.append(f"memory ({MEM_STATE:,} floats): `{g_mem['resolved']}`")
        if g_mem.get("resolved_big"):
            seen.append(f"memory ({BIG_STATE:,} floats): `{g_mem['resolved_big']}`")
        seen += [f"training {k}: `{v['defaults']}`" for k, v in train.items()
                 if v.get("defaults")]
        if seen:
            w("G (no `solver` / `gradient` passed) resolved to: " + "; ".join(seen) + ".")
            w("")
    # ---- conclusion
    w("## Conclusion")
    w("")
    passing = [k for k in keys if summary[k]["ok"]]
    if passing and names:
        cheapest = min(passing, key=lambda k: summary[k]["total"])
        fewest = min(passing, key=lambda k: summary[k]["nfe"])
        accurate = min(passing, key=lambda k: summary[k]["geo"])
        w(f"Candidates meeting every requirement: {', '.join(passing)}. Among them: fastest "
          f"(total gradient time over the {len(names)} problems) **{cheapest}** "
          f"(`{CANDIDATES[cheapest][0]}` + `{CANDIDATES[cheapest][1]}`, "
          f"{_g(summary[cheapest]['total'])} ms); fewest forward evaluations of f (total NFE, "
          f"load-independent) **{fewest}** ({summary[fewest]['nfe']}); most accurate "
          f"(geometric mean of the scaled errors) **{accurate}** ({_g(summary[accurate]['geo'])}). "
          "Wall times of these millisecond solves on a loaded, shared 2-core machine vary by "
          "2-3x between runs: read time differences below that as ties.")
        worst_err = {k: max(results[n][k]["err"] for n in names) for k in passing}
        trained = {k: _train_row(train, "spirals", k) for k in passing}
        trained = {k: r for k, r in trained.items() if r is not None}
        w("")
        if trained:
            fastest = min(r["step_ms"] for r in trained.values())
            ties = [k for k, r in trained.items() if r["step_ms"] <= 1.1 * fastest]
            rec = min(ties, key=lambda k: worst_err[k])
            untimed = [k for k in passing if k not in trained]
            w(f"**Recommended default: {rec}** (`{CANDIDATES[rec][0]}` + "
              f"`{CANDIDATES[rec][1]}`), by the rule: among the candidates meeting every "
              "requirement, the one with the lowest time per Adam step in the README training "
              "loop (median ms per step, lock-step with the others), times within 10% of the "
              "lowest counted as ties and broken by the smallest worst-case scaled error. "
              "README loop ms/step: "
              + ", ".join(f"{k} {_g(r['step_ms'])}" for k, r in trained.items())
              + f" (ties: {', '.join(ties)}); worst-case scaled error: "
              + ", ".join(f"{k} {_g(worst_err[k])}" for k in trained) + "."
              + (f" Not timed in the training loops, so not considered by this rule: "
                 f"{', '.join(untimed)}." if untimed else ""))
        else:
            min_nfe = min(summary[k]["nfe"] for k in passing)
            affordable = [k for k in passing if summary[k]["nfe"] <= 1.25 * min_nfe]
            rec = min(affordable, key=lambda k: worst_err[k])
            w(f"**Recommended default: {rec}** (`{CANDIDATES[rec][0]}` + "
              f"`{CANDIDATES[rec][1]}`), by the rule (no training-loop rows in this report): "
              "among the candidates meeting every requirement whose total NFE is within 1.25x "
              "of the fewest, the one with the smallest worst-case scaled error (the widest "
              f"margin to the requirement of {ERR_REQ:g}): {_g(worst_err[rec])}, against "
              + (", ".join(f"{k} {_g(worst_err[k])}" for k in passing if k != rec) or "none")
              + ".")
        w("")
        verdicts = []  # (text, met) per training kind with a row for `rec`
        for kind in TRAIN_KINDS:
            r = _train_row(train, kind, rec)
            if r is None:
                continue
            ratio = r.get("ratio")
            if ratio is None:
                verdicts.append((f"{kind}: no Diffrax ratio", False))
            else:
                met = ratio <= 1.0
                verdicts.append((f"{kind} {_g(ratio)}× ({'met' if met else 'missed'})", met))
        if verdicts:
            w(f"Target ≤ 1.0× Diffrax per Adam step, for {rec}: "
              + "; ".join(t for t, _ in verdicts) + ". "
              + ("**Met**" + (" in every training loop measured." if len(verdicts) > 1 else ".")
                 if all(m for _, m in verdicts) else "**Not met**."))
        else:
            w(f"Target ≤ 1.0× Diffrax per Adam step, for {rec}: not measured (no training row "
              "for it; run with `--train`).")
        w("")
        for k in passing:
            worst = max(names, key=lambda n: results[n][k]["err"])
            w(f"- {k} (`{CANDIDATES[k][0]}` + `{CANDIDATES[k][1]}`): total grad "
              f"{_g(summary[k]['total'])} ms, total NFE {summary[k]['nfe']}, geo-mean scaled "
              f"error {_g(summary[k]['geo'])} (worst {_g(results[worst][k]['err'])} on {worst}), "
              f"memory ratio {_g(summary[k]['ratio'])}, README loop ms/step (× Diffrax) "
              f"{_train_cell(train, k)}.")
    elif not names:
        w("No problems in this report: no recommendation.")
    else:
        w("No candidate meets every requirement.")
    for k in keys:
        if not summary[k]["ok"]:
            why = []
            s = summary[k]
            for n in names:
                if n in s["acc"]:
                    continue
                r = results[n].get(k, {})
                if r.get("result") != "ok":
                    why.append(f"{n}: {r.get('result', 'not run')}")
                else:
                    why.append(f"{n}: silently inaccurate (reported success, scaled error "
                               f"{_g(r.get('err'))})")
            if len(s["grd"]) < len(names):
                why.append("gradient off Direct's on " + ", ".join(n for n in names if n not in s["grd"]))
            if s["ratio"] > MEM_REQ:
                why.append(f"memory ratio {_g(s['ratio'])}")
            w(f"- {k} (`{CANDIDATES[k][0]}` + `{CANDIDATES[k][1]}`) fails: {'; '.join(why)}.")
    w("")
    # ---- per problem
    w("## Per problem")
    w("")
    w("Cells: result; accepted steps (rejected); evaluations of f (CNF: max over the 8 "
      "points); scaled error (✓ ≤ 100); gradient relative difference to Direct (✓ ≤ 1e-8); "
      "ReconstructionWarning at the warm-up call (W: its relative error and time); gradient "
      "wall time (median of 5, ms).")
    for n in names:
        desc = PROBLEMS[n][0] if n in PROBLEMS else (
            f"CNF, `mj.nn.CNF(mj.nn.MLPField(2, 32, key=key(0)), 2)`, exact trace, log_prob of "
            f"{CNF_POINTS} points (vmapped); gradient of -mean(log_prob) w.r.t. the field's "
            "parameters and the points")
        w("")
        w(f"### {n}: {desc}")
        w("")
        w("| | solver + gradient | result | steps (rej.) | NFE | scaled err | grad rel. diff | "
          "warning | grad ms |")
        w("|---|---|---|---|---|---|---|---|---|")
        for key in keys:
            r = results[n].get(key, {})
            acc, grd = _passes(r)
            sname, gname, _ = CANDIDATES[key]
            if "steps" not in r:
                w(f"| {key} | `{sname}` + `{gname}` | {r.get('result', '—')} | | | | | | |")
                continue
            gcell = (_g(r["grad_rel"]) + (" ✓" if grd else " ✗")) if "grad_rel" in r else (
                r.get("grad_exc", "—"))
            w(f"| {key} | `{sname}` + `{gname}` | {r['result']} | {r['steps']} ({r['rejected']}) | "
              f"{r['fevals']} | {_g(r['err'])}{' ✓' if acc else ' ✗'} | {gcell} | "
              f"{r.get('warn', '') or ''} | {_g(r.get('grad_ms'))} |")
    w("")
    # ---- training loops
    if train:
        _report_training(train, w)
    # ---- memory
    w("## Memory")
    w("")
    w(f"y' = -y + 0.1 sin(y), y0 = ones({MEM_STATE}) (float64, {MEM_STATE * 8 / 2**20:.2f} MiB "
      f"per state), T = 1, {NUM_OUT} outputs, default tolerances; `temp_size_in_bytes` of the "
      "compiled `jax.grad` of sum(ys[1:]**2), in MiB. Steps: accepted steps of the forward at "
      f"max_steps {MEM_STEPS[0]}. `MiB at 10⁶ floats`: the same field and loss for y0 = "
      f"ones({BIG_STATE:,}) (float64, {BIG_STATE * 8 / 2**20:.2f} MiB per state) at max_steps "
      f"{BIG_STEPS}, compiled only (not run): what a state-sized record per possible step "
      "costs at a large state.")
    w("")
    w(f"| | solver + gradient | steps | MiB at max_steps {MEM_STEPS[0]} | MiB at {MEM_STEPS[1]} | "
      f"ratio (≤ {MEM_REQ:g}) | MiB at 10⁶ floats |")
    w("|---|---|---|---|---|---|---|")
    for key in keys:
        r = mem.get(key, {})
        sname, gname, _ = CANDIDATES[key]
        ratio = _mem_ratio(r)
        w(f"| {key} | `{sname}` + `{gname}` | {r.get('steps', '—')} ({r.get('result', '')}) | "
          f"{_mib(r.get(MEM_STEPS[0]))} | {_mib(r.get(MEM_STEPS[1]))} | {_g(ratio)}"
          f"{' ✓' if ratio <= MEM_REQ else ' ✗'} | {_mib(r.get(BIG_KEY, '—'))} |")
    w("")
    try:  # what the sizes are made of, from the library's own constants
        from malijax._gradient.mali import AUTO_MAX_SLOTS, segment_length

        state = MEM_STATE * 8 / 2**20
        s_rev = segment_length(1 / 0.5, jnp.float64)
        s_alf = segment_length(1 / 0.8, jnp.float64)
        slots = [min(math.ceil(m / s_alf), AUTO_MAX_SLOTS) for m in MEM_STEPS]
        w(f"What the sizes are: `MALI()` on a damped solver keeps, under adaptive stepping, "
          f"min(⌈max_steps / s⌉, {AUTO_MAX_SLOTS}) whole solver states whatever the steps "
          f"taken. `Reversible` (λ = 0.5, s = {s_rev}): {AUTO_MAX_SLOTS} slots at both "
          f"max_steps, each a (y, z) pair, {AUTO_MAX_SLOTS} × 2 × {state:.3f} = "
          f"{AUTO_MAX_SLOTS * 2 * state:.1f} MiB, a fixed ~10x the undamped `ALF()`'s "
          f"footprint even for a 5-step solve. `ALF(eta=0.9)` (s = {s_alf}): {slots[0]} slots "
          f"at {MEM_STEPS[0]}, {slots[1]} at {MEM_STEPS[1]}, hence its ratio. `ACA` keeps its "
          "checkpoints in a fixed number of slots (every step while they last, at least 8 "
          "states within 64 MiB, `malijax/_records.py`), whatever max_steps is.")
        w("")
    except ImportError:  # pragma: no cover - private names moved
        pass
    return "\n".join(lines)


def _fingerprint():
    """The malijax source measured: git HEAD, plus a hash of its .py files when they differ
    from HEAD (the library may be edited between runs; parts of one report must agree)."""
    import hashlib
    import subprocess

    root = pathlib.Path(mj.__file__).parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    sha = f"malijax source sha256 {h.hexdigest()[:12]}"
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=root, text=True,
                               capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return sha
    return f"{sha}; git {head}" + (" + uncommitted changes" if dirty else "")


FINGERPRINT = _fingerprint()  # taken at import, i.e. of the code this process runs


def _load(paths):
    """Merge the parts saved by `--save` (later files win per (problem, candidate), per
    (candidate, memory entry) and per training kind)."""
    import json

    results, mem, keys, elapsed, loads, argvs, prints = {}, {}, [], 0.0, [], [], set()
    train = {}
    for path in paths:
        part = json.loads(pathlib.Path(path).read_text())
        argvs.append(part.get("argv", "?"))
        prints.add(part.get("fingerprint", "?").split(";")[0])  # the source hash
        fingerprint = part.get("fingerprint", "?")
        for p, rows in part["results"].items():
            results.setdefault(p, {}).update(rows)
        for k, row in part["mem"].items():
            mem.setdefault(k, {}).update(
                {(int(m) if m.isdigit() else m): v for m, v in row.items()})
        train.update(part.get("train", {}))
        keys += [k for k in part["keys"] if k not in keys]
        elapsed += part["elapsed"]
        loads += part["loads"]
    order = [*PROBLEMS, "cnf"]
    results = {p: results[p] for p in sorted(results, key=order.index)}
    if len(prints) > 1:
        raise SystemExit(f"the parts measured different malijax sources: {sorted(prints)}")
    return (results, mem, sorted(keys), elapsed, min(loads), max(loads), argvs, fingerprint,
            train)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(CANDIDATES),
                        help="comma-separated candidate letters (default: all)")
    parser.add_argument("--problems", default=",".join([*PROBLEMS, "cnf"]),
                        help="comma-separated problem names (default: all; 'none': none, e.g. "
                             "for a part with the training loops only)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory section")
    parser.add_argument("--train", action="store_true",
                        help="also time the training loops of benchmarks/dense_output.py "
                             "(time per Adam step against Diffrax), one process per kind")
    parser.add_argument("--train-steps", type=int, default=200, help="Adam steps (default 200)")
    parser.add_argument("--train-kinds", default=",".join(TRAIN_KINDS),
                        help="comma-separated training loops: spirals (the README's), latent")
    parser.add_argument("--train-rows", default=None,
                        help="passed to dense_output.py --rows (default: all its rows)")
    parser.add_argument("--save", help="also save the raw results as JSON here (for --merge)")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="measure nothing: write the report from parts saved with --save "
                             "(to split a run over several invocations)")
    parser.add_argument("--out", default=str(OUT))
    a = parser.parse_args()
    argv = " ".join(["nice -n 5 .venv/bin/python", *(["benchmarks/defaults.py"] + sys.argv[1:])])
    if a.merge:
        results, mem, keys, elapsed, load0, load1, argvs, fingerprint, train = _load(a.merge)
        argv = "` then `".join([*argvs, argv])
        text = report(results, mem, keys, elapsed, load0, load1, argv, fingerprint, train)
        pathlib.Path(a.out).write_text(text + "\n")
        print(text)
        return
    keys = [k.strip() for k in a.only.split(",") if k.strip()]
    probs = [p.strip() for p in a.problems.split(",") if p.strip() not in ("", "none")]
    kinds = [k.strip() for k in a.train_kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in TRAIN_KINDS]
    if bad:
        raise SystemExit(f"--train-kinds: unknown {bad}; known: {', '.join(TRAIN_KINDS)}")
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    results = {}
    for p in probs:
        print(f"[{time.perf_counter() - t0:6.0f} s] {p}", flush=True)
        results[p] = run_cnf(keys) if p == "cnf" else run_ode_problem(p, keys)
    mem = {}
    if not a.no_memory:
        print(f"[{time.perf_counter() - t0:6.0f} s] memory", flush=True)
        mem = run_memory(keys)
    train = {}
    if a.train:
        print(f"[{time.perf_counter() - t0:6.0f} s] training loops", flush=True)
        train = run_training(kinds, a.train_steps, a.train_rows)
    elapsed = time.perf_counter() - t0
    load1 = os.getloadavg()[0]
    if a.save:
        import json

        part = dict(results=results,
                    mem={k: {str(m): v for m, v in r.items()} for k, r in mem.items()},
                    keys=keys, elapsed=elapsed, loads=[load0, load1], argv=argv,
                    fingerprint=FINGERPRINT, train=train)
        pathlib.Path(a.save).write_text(json.dumps(part))
    text = report(results, mem, keys, elapsed, load0, load1, argv, train=train)
    pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(a.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
