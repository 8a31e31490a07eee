"""Gradient strategies side by side: time, compile time, memory and NFE of a neural ODE.

For a neural ODE with an MLP vector field (state 32, hidden 256, a batch of 256
trajectories, float32), solved over [0, 1] with `num_steps=N` fixed steps for
N in {16, 64, 256, 1024} and once adaptively (rtol=1e-3, atol=1e-6), this measures for
every (library, gradient strategy, solver) row:

- `grad ms`: median wall time of a jitted `jax.grad` of `mean(y(1)**2)` w.r.t. the
  vector field's parameters (after one warm-up call; `block_until_ready`);
- `fwd ms`: median wall time of the jitted solve alone (the strategy's forward);
- `compile s`: lower + compile time of the jitted gradient;
- `temp MiB`: `compiled.memory_analysis().temp_size_in_bytes` of the jitted gradient
  (and of the forward);
- steps and forward NFE (malijax: `solve(...).stats`; Diffrax: counted from its step
  statistics), and the backward's evaluations derived analytically;
- `rel. diff`: max |g - g_ref| / max |g_ref| against the reference row named in the
  table (Direct through the same steps), a sanity check that rows compute the same thing.

Rows: malijax Direct/MALI/ACA with ALF, ACA/Direct with Tsit5; MALI (automatic stored
states), MALI(checkpoints=8) and ACA with Reversible(Tsit5), MALI(checkpoints=8) and ACA
with ALF(eta=0.9) (and ANODE, SymplecticAdjoint, Adjoint with Tsit5 when this malijax has
them); Diffrax (when
importable) RecursiveCheckpointAdjoint with ReversibleHeun and Tsit5, DirectAdjoint and
BacksolveAdjoint with Tsit5; and hand-written baselines: a plain `lax.scan` over the same
ALF / Tsit5 steps differentiated by `jax.grad`, to measure malijax's own overhead.

A last section solves the field made dissipative (f - 2y) adaptively with
Reversible(Tsit5) + MALI, Tsit5 + ACA and Diffrax Tsit5 + RecursiveCheckpointAdjoint, at
tolerances chosen so that the achieved error of y(1) against a float64 reference is about
equal, and reports error, steps, time and memory per row.

The Markdown report starts with the project's targets, each ratio computed in this run.

    python benchmarks/gradients.py            # full run (~20 min on 2 CPU cores)
    python benchmarks/gradients.py --quick    # smoke run: N in {16, 64}, batch 32, 3 repeats
"""

import argparse
import csv
import dataclasses
import datetime
import math
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import re
import shlex
import time
import traceback
import warnings
from collections.abc import Callable

import jax

jax.config.update("jax_enable_x64", False)  # float32 throughout, explicitly

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import numpy as np  # noqa: E402

import malijax as mj  # noqa: E402

try:
    import diffrax
except ImportError:  # pragma: no cover - the `bench` extra is optional
    diffrax = None

DIM, HIDDEN = 32, 256
RTOL, ATOL, ADAPTIVE_MAX_STEPS = 1e-3, 1e-6, 128


# --------------------------------------------------------------------------- problem


class Field(eqx.Module):
    """f(t, y) = W2 tanh(W1 y + b1) + b2, applied row-wise to a (batch, 32) state."""

    w1: jax.Array
    b1: jax.Array
    w2: jax.Array
    b2: jax.Array

    def __init__(self, dim, hidden, key):
        k1, k2, k3, k4 = jr.split(key, 4)
        self.w1 = jr.normal(k1, (hidden, dim)) / math.sqrt(dim)
        self.b1 = 0.1 * jr.normal(k2, (hidden,))
        self.w2 = jr.normal(k3, (dim, hidden)) / math.sqrt(hidden)
        self.b2 = 0.1 * jr.normal(k4, (dim,))

    def __call__(self, t, y, args):
        del t, args
        return jnp.tanh(y @ self.w1.T + self.b1) @ self.w2.T + self.b2


TS = (0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str  # "N=64" or "adaptive"
    n: int | None  # fixed steps over [0, 1], or None for adaptive


def loss_of(y_final):
    return jnp.mean(y_final**2)


# ----------------------------------------------------------------------------- rows


@dataclasses.dataclass
class Case:
    library: str
    strategy: str
    solver: str
    # build(setting) -> (forward(params, y0) -> (y_final, stats dict), loss(params, y0))
    build: Callable
    # counts(stats, setting) -> (accepted steps, rejected steps, forward NFE)
    counts: Callable
    # backward(steps, nfe) -> str: the backward's evaluations, derived analytically
    backward: Callable
    fixed_only: bool = False
    ref_fixed: tuple | None = None  # key of the reference row on fixed grids
    ref_adaptive: tuple | None = None
    # Cost model per step, a*F + b*V with F one evaluation of f and V one evaluation plus
    # its VJP (see `per_step_profile`); None where not derived.
    model: tuple | None = None

    @property
    def key(self):
        return (self.library, self.strategy, self.solver)

    @property
    def label(self):
        return f"{self.library} {self.strategy} + {self.solver}"


def _mj_case(strategy_name, make_strategy, solver_name, make_solver, backward, ref,
             model=None, rtol=RTOL, field=None):
    """`field` (optional) maps the parameters to the vector field actually solved (the
    dissipative section's `Damped`); `rtol` is the adaptive relative tolerance."""
    field = field or (lambda p: p)

    def build(setting):
        solver, strategy = make_solver(), make_strategy()
        ts = jnp.array(TS, jnp.float32)
        if setting.n is None:
            kw = dict(rtol=rtol, atol=ATOL, max_steps=ADAPTIVE_MAX_STEPS)
        else:
            kw = dict(num_steps=setting.n)

        def forward(params, y0):
            sol = mj.solve(field(params), y0, ts, solver=solver, gradient=strategy, **kw)
            return sol.ys[-1], sol.stats

        def loss(params, y0):
            ys = mj.odeint(field(params), y0, ts, solver=solver, gradient=strategy, **kw)
            return loss_of(ys[-1])

        return forward, loss

    def counts(stats, setting):
        del setting
        return int(stats["num_steps"]), int(stats["num_rejected"]), int(stats["num_fevals"])

    return Case("malijax", strategy_name, solver_name, build, counts, backward,
                ref_fixed=ref, ref_adaptive=ref, model=model)


# Diffrax: forward NFE per step (FSAL Tsit5: 6; ReversibleHeun: 1), plus one evaluation
# in the solver's init, plus two for the initial step-size selection when adaptive.
_DFX_FEVALS_PER_STEP = {"Tsit5": 6, "ReversibleHeun": 1}


def _dfx_case(adjoint_name, make_adjoint, solver_name, backward, ref_fixed, ref_adaptive,
              model=None, rtol=RTOL, field=None):
    field = field or (lambda p: p)

    def build(setting):
        solver = getattr(diffrax, solver_name)()
        adjoint = make_adjoint()
        if setting.n is None:
            controller = diffrax.PIDController(rtol=rtol, atol=ATOL)
            dt0, max_steps = None, ADAPTIVE_MAX_STEPS
        else:
            controller = diffrax.ConstantStepSize()
            dt0, max_steps = 1.0 / setting.n, setting.n

        def forward(params, y0):
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(field(params)), solver, TS[0], TS[1], dt0, y0,
                saveat=diffrax.SaveAt(t1=True), stepsize_controller=controller,
                adjoint=adjoint, max_steps=max_steps,
            )
            stats = {k: v for k, v in sol.stats.items() if k != "max_steps"}
            return sol.ys[-1], stats

        def loss(params, y0):
            return loss_of(forward(params, y0)[0])

        return forward, loss

    def counts(stats, setting):
        accepted = int(stats["num_accepted_steps"])
        rejected = int(stats["num_rejected_steps"])
        attempted = int(stats["num_steps"])
        nfe = 1 + _DFX_FEVALS_PER_STEP[solver_name] * attempted
        if setting.n is None:
            nfe += 2
        return accepted, rejected, nfe

    return Case("diffrax", adjoint_name, solver_name, build, counts, backward,
                ref_fixed=ref_fixed, ref_adaptive=ref_adaptive, model=model)


def _scan_alf(params, y0, n):
    """ALF(eta=1) by hand, as malijax computes it: x_m = z + h/2 v, u = f(t + h/2, x_m),
    v' = v + 2 (u - v), z' = x_m + h/2 v'; v0 = f(0, z0)."""
    h = jnp.float32(1.0 / n)
    half = 0.5 * h

    def step(carry, _):
        z, v, k = carry
        t = k.astype(jnp.float32) * h
        x_m = z + half * v
        u = params(t + half, x_m, None)
        v1 = v + 2 * (u - v)
        return (x_m + half * v1, v1, k + 1), None

    (z, _, _), _ = jax.lax.scan(
        step, (y0, params(0.0, y0, None), jnp.zeros((), jnp.int32)), None, length=n
    )
    return z


def _scan_tsit5(params, y0, n):
    """Tsit5 by hand (FSAL: the last stage's value starts the next step)."""
    tab = mj.Tsit5.tableau
    h = jnp.float32(1.0 / n)

    def step(carry, _):
        y, k1, k = carry
        t = k.astype(jnp.float32) * h
        ks = [k1]
        x = y
        for i in range(1, tab.num_stages):
            x = y + h * sum(a * kj for a, kj in zip(tab.a[i - 1], ks) if a != 0)
            ks.append(params(t + tab.c[i] * h, x, None))
        return (x, ks[-1], k + 1), None

    (y, _, _), _ = jax.lax.scan(
        step, (y0, params(0.0, y0, None), jnp.zeros((), jnp.int32)), None, length=n
    )
    return y


def _scan_case(solver_name, scan_fn, fevals_per_step, ref, model):
    def build(setting):
        n = setting.n

        def forward(params, y0):
            return scan_fn(params, y0, n), {}

        def loss(params, y0):
            return loss_of(scan_fn(params, y0, n))

        return forward, loss

    def counts(stats, setting):
        del stats
        return setting.n, 0, 1 + fevals_per_step * setting.n

    return Case("lax.scan", "jax.grad", solver_name, build, counts,
                lambda s, nfe: f"{nfe} VJP", fixed_only=True, ref_fixed=ref, model=model)


MJ_DIRECT_ALF = ("malijax", "Direct", "ALF")
MJ_DIRECT_TSIT5 = ("malijax", "Direct", "Tsit5")
DFX_RC_RH = ("diffrax", "RecursiveCheckpoint", "ReversibleHeun")
DFX_RC_TSIT5 = ("diffrax", "RecursiveCheckpoint", "Tsit5")
DFX_DIRECT_TSIT5 = ("diffrax", "DirectAdjoint", "Tsit5")
SCAN_ALF = ("lax.scan", "jax.grad", "ALF")
SCAN_TSIT5 = ("lax.scan", "jax.grad", "Tsit5")
MJ_ACA_TSIT5 = ("malijax", "ACA", "Tsit5")
# Algebraically reversible Tsit5 (McCallum & Foster 2024, coupling 0.5) and damped ALF,
# with MALI's stored states (`checkpoints`): automatic, or K = 8.
REV, ALF09 = "Reversible(Tsit5)", "ALF(eta=0.9)"
MJ_MALI_REV = ("malijax", "MALI", REV)
MJ_MALI8_REV = ("malijax", "MALI(checkpoints=8)", REV)
MJ_ACA_REV = ("malijax", "ACA", REV)
MJ_MALI8_ALF09 = ("malijax", "MALI(checkpoints=8)", ALF09)
MJ_ACA_ALF09 = ("malijax", "ACA", ALF09)


def cases():
    """Every row, in display order: malijax's strategies present in this version, Diffrax
    (when importable), then the hand-written baselines."""
    alf, tsit5 = mj.ALF, mj.Tsit5

    def vjps(nfe_of):
        return lambda s, nfe: f"{nfe_of(s, nfe)} VJP"

    out = [
        # Direct: one VJP (with stored residuals) per forward evaluation.
        _mj_case("Direct", mj.Direct, "ALF", alf, vjps(lambda s, nfe: nfe), MJ_DIRECT_ALF,
                 model=(0, 1)),
        # MALI: the inverse's evaluation is the VJP's forward; one more for v0 = f(t0, z0).
        _mj_case("MALI", mj.MALI, "ALF", alf, vjps(lambda s, nfe: s + 1), MJ_DIRECT_ALF,
                 model=(1, 1)),
        # ACA: each step recomputed from its checkpoint under the VJP (+ v0).
        _mj_case("ACA", mj.ACA, "ALF", alf, vjps(lambda s, nfe: s + 1), MJ_DIRECT_ALF,
                 model=(1, 1)),
        # ACA + Tsit5: restoring a checkpoint recomputes k1 = f(t_k, y_k): 7 per step.
        _mj_case("ACA", mj.ACA, "Tsit5", tsit5, vjps(lambda s, nfe: 7 * s + 1),
                 MJ_DIRECT_TSIT5, model=(6, 7)),
        _mj_case("Direct", mj.Direct, "Tsit5", tsit5, vjps(lambda s, nfe: nfe),
                 MJ_DIRECT_TSIT5, model=(0, 6)),
    ]
    if hasattr(mj, "Reversible"):
        def rev():
            return mj.Reversible(mj.Tsit5())

        def alf09():
            return mj.ALF(eta=0.9)

        def mali8():
            return mj.MALI(checkpoints=8)

        # Reversible(Tsit5): two Tsit5 base steps per step. Forward: `stats` count 13
        # evaluations per step (7 + 6), but on a num_steps grid the first base step's
        # seventh stage only feeds the discarded error estimate and XLA drops it, so 12
        # are computed. MALI's fused backward: two base-step VJPs per step, 6 VJPs of f
        # each (the zero-weight FSAL stage is skipped). ACA: each step recomputed from
        # its stored (y, z) under the VJP, the same 12 VJPs (error stage dead too).
        out += [
            _mj_case("MALI", mj.MALI, REV, rev, vjps(lambda s, nfe: 12 * s), MJ_ACA_REV,
                     model=(12, 12)),
            _mj_case("MALI(checkpoints=8)", mali8, REV, rev, vjps(lambda s, nfe: 12 * s),
                     MJ_ACA_REV, model=(12, 12)),
            _mj_case("ACA", mj.ACA, REV, rev, vjps(lambda s, nfe: 12 * s), None,
                     model=(12, 12)),
            # ALF(eta=0.9): as ALF (one VJP per step, + v0), stored states aside.
            _mj_case("MALI(checkpoints=8)", mali8, ALF09, alf09,
                     vjps(lambda s, nfe: s + 1), MJ_ACA_ALF09, model=(1, 1)),
            _mj_case("ACA", mj.ACA, ALF09, alf09, vjps(lambda s, nfe: s + 1), None,
                     model=(1, 1)),
        ]
    # Strategies that newer malijax versions have: used when present.
    if hasattr(mj, "ANODE"):
        # A checkpoint of the loop state (k1 included) per step; each step recomputed once
        # with its residuals, then one VJP per stage.
        out.append(_mj_case("ANODE", mj.ANODE, "Tsit5", tsit5,
                            lambda s, nfe: f"{6 * s + 1} VJP", MJ_DIRECT_TSIT5,
                            model=(6, 6)))
    if hasattr(mj, "SymplecticAdjoint"):
        # Stages recomputed from the checkpoint (k1 included), then one VJP per stage.
        out.append(_mj_case("SymplecticAdjoint", mj.SymplecticAdjoint, "Tsit5", tsit5,
                            lambda s, nfe: f"{6 * s} F + {6 * s + 1} VJP", MJ_DIRECT_TSIT5,
                            model=(12, 6)))
    if hasattr(mj, "Adjoint"):
        # The augmented system on the same grid: each stage is one evaluation + VJP.
        out.append(_mj_case("Adjoint", mj.Adjoint, "Tsit5", tsit5,
                            lambda s, nfe: "adjoint ODE, ~6 VJP/step", MJ_DIRECT_TSIT5,
                            model=(6, 6)))
    if diffrax is not None:
        rc_bwd = "recomputed fwd + NFE VJP"
        out += [
            # Binomial checkpointing: assume one recomputed forward sweep.
            _dfx_case("RecursiveCheckpoint", diffrax.RecursiveCheckpointAdjoint,
                      "ReversibleHeun", lambda s, nfe: rc_bwd, None, None, model=(2, 1)),
            _dfx_case("RecursiveCheckpoint", diffrax.RecursiveCheckpointAdjoint, "Tsit5",
                      lambda s, nfe: rc_bwd, MJ_DIRECT_TSIT5, DFX_DIRECT_TSIT5,
                      model=(12, 6)),
            _dfx_case("DirectAdjoint", diffrax.DirectAdjoint, "Tsit5",
                      lambda s, nfe: f"{nfe} VJP", MJ_DIRECT_TSIT5, DFX_DIRECT_TSIT5,
                      model=(0, 6)),
            _dfx_case("Backsolve", diffrax.BacksolveAdjoint, "Tsit5",
                      lambda s, nfe: "adjoint ODE, ~6 VJP/step", MJ_DIRECT_TSIT5,
                      DFX_DIRECT_TSIT5, model=(6, 6)),
        ]
    out += [
        _scan_case("ALF", _scan_alf, 1, MJ_DIRECT_ALF, model=(0, 1)),
        _scan_case("Tsit5", _scan_tsit5, 6, MJ_DIRECT_TSIT5, model=(0, 6)),
    ]
    return out


# Rows that a timing target compares have their gradients timed *interleaved*: one call of
# each member per round, so a change in the machine's load hits all of them alike, and a
# target's ratio is the median over rounds of the per-round ratio.
GROUPS = [
    [MJ_DIRECT_ALF, SCAN_ALF, ("malijax", "MALI", "ALF"), DFX_RC_RH],
    [MJ_ACA_TSIT5, DFX_RC_TSIT5, MJ_MALI_REV, MJ_MALI8_REV, MJ_ACA_REV],
    [MJ_DIRECT_TSIT5, SCAN_TSIT5],
    [MJ_MALI8_ALF09, MJ_ACA_ALF09],
]


def measure_groups(cases_):
    """The cases of one setting as groups to time together: GROUPS first, then the rest
    one by one."""
    by_key = {c.key: c for c in cases_}
    grouped = [[by_key[k] for k in g if k in by_key] for g in GROUPS]
    grouped = [g for g in grouped if g]
    seen = {c.key for g in grouped for c in g}
    return grouped + [[c] for c in cases_ if c.key not in seen]


# ------------------------------------------------------------------------ measuring


def _compile(fn, *args):
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - start


def _temp_bytes(compiled):
    analysis = compiled.memory_analysis()
    return None if analysis is None else int(analysis.temp_size_in_bytes)


FAST_S = 0.25  # calls faster than this are timed 2 * repeats - 1 times: cheap, steadier


def _num_runs(warm_s, args):
    if warm_s > args.slow_s:
        return args.slow_repeats
    return 2 * args.repeats - 1 if warm_s < FAST_S else args.repeats


def _time(compiled, fn_args, args):
    """Median of the timed calls after one warm-up call (how many: `_num_runs`).
    Returns (median s, times, warm-up output)."""
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(*fn_args))
    runs = _num_runs(time.perf_counter() - start, args)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*fn_args))
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, out


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree_util.tree_leaves(tree)])


def _error_row(case, setting, e):
    msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    traceback.print_exc(limit=3)
    return dict(library=case.library, strategy=case.strategy, solver=case.solver,
                setting=setting.name, n=setting.n or "", error=msg[:200])


def _warning_notes(caught):
    """malijax's ReconstructionWarning (MALI rebuilt a state inexactly), shortened for
    the report; other warnings by class name."""
    notes = []
    for w in caught:
        text = str(w.message)
        m = re.search(r"state at t=(\S+) with a relative error of (\S+)", text)
        if m:
            notes.append(f"ReconstructionWarning: rebuilt state off by {m.group(2)} "
                         f"(relative) at t={m.group(1)}")
        else:
            notes.append(f"{w.category.__name__}: {text.splitlines()[0][:80]}")
    return list(dict.fromkeys(notes))


def measure_group(group, setting, params, y0, args, grads):
    """Rows for the cases of `group`: compile each gradient (compile time, memory), warm
    each up, time their gradients interleaved (round r calls every member once), then
    compile and time each forward solve on its own."""
    dynamic, static = eqx.partition(params, eqx.is_array)
    fn_args = (dynamic, y0)
    rows, live = {}, []
    for case in group:
        row = dict(library=case.library, strategy=case.strategy, solver=case.solver,
                   setting=setting.name, n=setting.n or "")
        try:
            forward, loss = case.build(setting)

            def grad_fn(d, y, loss=loss):
                return jax.grad(lambda dd: loss(eqx.combine(dd, static), y))(d)

            compiled, row["compile_s"] = _compile(grad_fn, *fn_args)
            row["grad_temp_bytes"] = _temp_bytes(compiled)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                start = time.perf_counter()
                g = jax.block_until_ready(compiled(*fn_args))
                warm = time.perf_counter() - start
            grads[(case.key, setting.name)] = _flat(g)
            notes = _warning_notes(caught)
            if not np.all(np.isfinite(_flat(g))):
                notes.append("non-finite gradient")
            if notes:
                row["note"] = "; ".join(notes)
            live.append((case, compiled, forward, warm))
        except Exception as e:  # noqa: BLE001 - a failing row is reported, not fatal
            row = _error_row(case, setting, e)
        rows[case.key] = row

    times = {case.key: [] for case, *_ in live}
    if live:
        runs = _num_runs(max(warm for *_, warm in live), args)
        for _ in range(runs):
            for case, compiled, _, _ in live:
                start = time.perf_counter()
                jax.block_until_ready(compiled(*fn_args))
                times[case.key].append(time.perf_counter() - start)

    for case, _, forward, _ in live:
        row, t = rows[case.key], times[case.key]
        grad_s = statistics.median(t)
        row.update(grad_ms=1e3 * grad_s, grad_runs=len(t),
                   grad_spread=(max(t) - min(t)) / grad_s, grad_times=t,
                   group=[c.key for c, *_ in live])
        try:
            def fwd_fn(d, y, forward=forward):
                return forward(eqx.combine(d, static), y)

            compiled_fwd, _ = _compile(fwd_fn, *fn_args)
            row["fwd_temp_bytes"] = _temp_bytes(compiled_fwd)
            fwd_s, t_fwd, (y_final, stats) = _time(compiled_fwd, fn_args, args)
            del compiled_fwd
        except Exception as e:  # noqa: BLE001
            rows[case.key] = _error_row(case, setting, e)
            continue
        row["fwd_ms"], row["fwd_runs"] = 1e3 * fwd_s, len(t_fwd)
        steps, rejected, nfe = case.counts(stats, setting)
        row.update(steps=steps, rejected=rejected, nfe=nfe, bwd=case.backward(steps, nfe))
        row["grad_over_fwd"] = grad_s / fwd_s
        if not np.all(np.isfinite(np.asarray(y_final))):
            row["note"] = "; ".join(filter(None, [row.get("note"), "non-finite result"]))
    live.clear()
    return [rows[case.key] for case in group]


def per_step_profile(params, y0, n, repeats):
    """The cost model's units, measured: F, one evaluation of f, and V, one evaluation
    plus its VJP (w.r.t. the state and the parameters), each per step of an n-step
    `lax.scan` (median of `repeats`), in seconds. V - F is the VJP alone."""
    dynamic, static = eqx.partition(params, eqx.is_array)

    def evals(d, y):
        p = eqx.combine(d, static)
        return jax.lax.scan(lambda y, _: (y + 1e-3 * p(0.0, y, None), None), y, None,
                            length=n)[0]

    def vjps(d, y):
        def body(carry, _):
            y, g = carry
            _, pull = jax.vjp(lambda d, y: eqx.combine(d, static)(0.0, y, None), d, y)
            g_d, g_y = pull(y)
            return (y + 1e-3 * g_y, jax.tree_util.tree_map(jnp.add, g, g_d)), None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, d)
        return jax.lax.scan(body, (y, zeros), None, length=n)[0]

    out = []
    for fn in (evals, vjps):
        compiled, _ = _compile(fn, dynamic, y0)
        median, _, _ = _time(compiled, (dynamic, y0), argparse.Namespace(
            repeats=repeats, slow_s=math.inf, slow_repeats=repeats))
        out.append(median / n)
    return tuple(out)


def warm_up_tracing(all_cases):
    """Compile every row once on a tiny problem, so that one-time costs of a process
    (imports, JAX's and Equinox's internal caches) do not land on the first row's
    compile time."""
    tiny = Field(2, 4, jr.PRNGKey(0))
    dynamic, static = eqx.partition(tiny, eqx.is_array)
    y0 = jnp.ones((1, 2), jnp.float32)
    for case in all_cases:
        _, loss = case.build(Setting("N=2", 2))
        try:
            _compile(lambda d, y, loss=loss: jax.grad(
                lambda dd: loss(eqx.combine(dd, static), y))(d), dynamic, y0)
        except Exception:  # noqa: BLE001 - the real measurement reports failures
            pass


def add_rel_diffs(rows, cases_by_key, grads):
    for row in rows:
        if "error" in row:
            continue
        key = (row["library"], row["strategy"], row["solver"])
        case = cases_by_key[key]
        ref = case.ref_adaptive if row["setting"] == "adaptive" else case.ref_fixed
        g = grads.get((key, row["setting"]))
        g_ref = grads.get((ref, row["setting"])) if ref is not None else None
        if ref is None or ref == key or g is None or g_ref is None:
            row["rel_diff"], row["ref"] = None, ""
            continue
        row["rel_diff"] = float(np.max(np.abs(g - g_ref)) / np.max(np.abs(g_ref)))
        row["ref"] = f"{ref[0]} {ref[1]}"


# ------------------------------------------------- adaptive, dissipative, equal error

# The MLP field made dissipative, f(t, y) - DAMPING * y, solved adaptively by a few rows
# at tolerances that give about the same error of y(1): ACA + Tsit5 at the anchor rtol
# sets the target error; every other row takes, from a quarter-decade grid of rtol
# (loosest first, stopping at the first whose error is at most the target), whichever
# of the last two tried has the error nearest the target (in log).
DAMPING = 2.0
DISS_ANCHOR = (MJ_ACA_TSIT5, 1e-3)
DISS_RTOLS = tuple(10.0 ** (-2 - k / 4) for k in range(13))  # 1e-2 ... 1e-5
DISS_REF_STEPS = 256  # float64 Tsit5 reference: 256 fixed steps


class Damped(eqx.Module):
    """f(t, y) - damping * y: the vector field made dissipative (contracting)."""

    field: eqx.Module
    damping: float = eqx.field(static=True)

    def __call__(self, t, y, args):
        return self.field(t, y, args) - self.damping * y


def damped(params):
    return Damped(params, DAMPING)


def dissipative_keys():
    return [MJ_ACA_TSIT5, MJ_MALI_REV] + ([DFX_RC_TSIT5] if diffrax is not None else [])


def dissipative_case(key, rtol):
    if key == MJ_ACA_TSIT5:
        return _mj_case("ACA", mj.ACA, "Tsit5", mj.Tsit5,
                        lambda s, nfe: f"{7 * s + 1} VJP", None, rtol=rtol, field=damped)
    if key == MJ_MALI_REV:
        return _mj_case("MALI", mj.MALI, REV, lambda: mj.Reversible(mj.Tsit5()),
                        lambda s, nfe: f"{12 * s} VJP", None, rtol=rtol, field=damped)
    if key == DFX_RC_TSIT5:
        return _dfx_case("RecursiveCheckpoint", diffrax.RecursiveCheckpointAdjoint, "Tsit5",
                         lambda s, nfe: "recomputed fwd + NFE VJP", None, None, rtol=rtol,
                         field=damped)
    raise ValueError(key)


DISSIPATIVE = Setting("dissipative", None)


def dissipative_reference(params, y0):
    """y(1) and the gradient of the loss, in float64: Tsit5 with DISS_REF_STEPS fixed
    steps (ACA: the exact gradient of that discretisation)."""
    with jax.enable_x64(True):
        p64 = jax.tree_util.tree_map(
            lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x, params)
        dyn, static = eqx.partition(p64, eqx.is_array)
        y64 = jnp.asarray(y0, jnp.float64)
        ts = jnp.array(TS, jnp.float64)

        def y1(d):
            return mj.odeint(damped(eqx.combine(d, static)), y64, ts, solver=mj.Tsit5(),
                             gradient=mj.ACA(), num_steps=DISS_REF_STEPS)[-1]

        y_ref = np.asarray(jax.jit(y1)(dyn))
        g_ref = _flat(jax.jit(jax.grad(lambda d: loss_of(y1(d))))(dyn))
    return y_ref, g_ref


def _rel_error(a, ref):
    a = np.asarray(a, np.float64)
    if not np.all(np.isfinite(a)):
        return math.inf
    return float(np.max(np.abs(a - ref)) / np.max(np.abs(ref)))


def _y_error(case, params, y0, y_ref):
    """The achieved error of y(1) of `case`'s forward solve, or inf where it fails."""
    forward, _ = case.build(DISSIPATIVE)
    dyn, static = eqx.partition(params, eqx.is_array)
    try:
        y1, _ = jax.jit(lambda d, y: forward(eqx.combine(d, static), y))(dyn, y0)
        return _rel_error(jax.block_until_ready(y1), y_ref)
    except Exception:  # noqa: BLE001 - e.g. max_steps reached: too tight for this row
        return math.inf


def choose_tolerances(params, y0, y_ref):
    """{key: (rtol, achieved error)} at about equal achieved error, the target error,
    and each row's sweep [(rtol, error), ...]."""
    anchor, anchor_rtol = DISS_ANCHOR
    target = _y_error(dissipative_case(anchor, anchor_rtol), params, y0, y_ref)
    print(f"dissipative: target error {target:.2e} ({' '.join(anchor)} at rtol "
          f"{anchor_rtol:g})", flush=True)
    chosen, sweeps = {anchor: (anchor_rtol, target)}, {}
    for key in dissipative_keys():
        if key == anchor:
            continue
        tried = []
        for rtol in DISS_RTOLS:
            err = _y_error(dissipative_case(key, rtol), params, y0, y_ref)
            tried.append((rtol, err))
            if err <= target:
                break
        def distance(pair):
            err = pair[1]
            return abs(math.log(max(err, 1e-30) / target)) if math.isfinite(err) else math.inf

        chosen[key] = min(tried[-2:], key=distance)
        sweeps[key] = tried
        print(f"dissipative: {' '.join(key)}: " + ", ".join(
            f"{r:.2g}: {e:.2e}" for r, e in tried) + f" -> rtol {chosen[key][0]:.2g}",
            flush=True)
    return target, chosen, sweeps


def run_dissipative(params, y0, args):
    """The dissipative section's rows (timed interleaved, as one group), each with its
    rtol, the achieved error of y(1) and the gradient's error against float64."""
    y_ref, g_ref = dissipative_reference(params, y0)
    target, chosen, sweeps = choose_tolerances(params, y0, y_ref)
    cases_ = [dissipative_case(k, chosen[k][0]) for k in dissipative_keys()]
    grads = {}
    rows = measure_group(cases_, DISSIPATIVE, params, y0, args, grads)
    for case, row in zip(cases_, rows):
        row["rtol"], row["y_error"] = chosen[case.key]
        g = grads.get((case.key, DISSIPATIVE.name))
        if g is not None:
            row["grad_error"] = _rel_error(g, g_ref)
        if "error" not in row:
            print(f"{'dissip.':>9} {case.label:<50} rtol {row['rtol']:.2g}  y err "
                  f"{row['y_error']:.2e}  grad {row['grad_ms']:8.1f} ms  temp "
                  f"{_mib(row['grad_temp_bytes']):>6} MiB  steps {row['steps']}", flush=True)
    return dict(rows=rows, target=target, sweeps=sweeps)


def _dissipative_section(diss):
    rows = diss["rows"]
    anchor, anchor_rtol = DISS_ANCHOR
    lines = ["## Adaptive, dissipative field, at equal achieved error", ""]
    lines.append(
        f"The same MLP made dissipative, f(t, y) − {DAMPING:g}·y, solved adaptively "
        f"(atol {ATOL:g}, max_steps {ADAPTIVE_MAX_STEPS}). `{' '.join(anchor)}` at rtol "
        f"{anchor_rtol:g} sets the target error of y(1), {diss['target']:.2e}; each other "
        "row's rtol is taken from the quarter-decade grid 1e-2 … 1e-5 (loosest first, up "
        "to the first whose error is at most the target) as the one of the last two tried "
        "whose error is nearest the target. `y(1) error` and `grad error`: "
        "max |x − x_ref| / max |x_ref| against float64 Tsit5 with "
        f"{DISS_REF_STEPS} fixed steps. The rows are timed interleaved."
    )
    lines.append("")
    lines.append("| row | rtol | y(1) error | steps (rej.) | NFE | backward | grad ms | "
                 "runs | fwd ms | grad MiB | grad error | note |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        label = f"{row['library']} {row['strategy']} + {row['solver']}"
        if "error" in row:
            lines.append(f"| {label} | failed: {row['error']} |" + " |" * 10)
            continue
        ge = row.get("grad_error")
        lines.append(
            f"| {label} | {row['rtol']:.2g} | {row['y_error']:.2e} | {row['steps']} "
            f"({row['rejected']}) | {row['nfe']} | {row['bwd']} | {row['grad_ms']:.1f} | "
            f"{row['grad_runs']} | {row['fwd_ms']:.1f} | {_mib(row['grad_temp_bytes'])} | "
            f"{'' if ge is None else f'{ge:.1e}'} | {row.get('note', '')} |")
    lines.append("")
    ratios = []
    for den in (DFX_RC_TSIT5, MJ_ACA_TSIT5):
        r = _ratio(rows, MJ_MALI_REV, den, DISSIPATIVE.name, "grad_ms")
        m = _ratio(rows, MJ_MALI_REV, den, DISSIPATIVE.name, "grad_temp_bytes")
        if r is not None:
            ratios.append(f"{_fmt_ratio(r)} the time and {_fmt_ratio(m)} the memory of "
                          f"{den[0]} {den[1]} + {den[2]}")
    if ratios:
        lines.append("Reversible(Tsit5) + MALI at equal error: " + "; ".join(ratios) + ".")
        lines.append("")
    for key, tried in diss["sweeps"].items():
        lines.append(f"- rtol sweep, {' '.join(key)}: " + ", ".join(
            f"{r:.2g} → {e:.1e}" for r, e in tried))
    lines.append("")
    return lines


# ------------------------------------------------------------------------ reporting


def _find(rows, key, setting):
    for row in rows:
        if (row["library"], row["strategy"], row["solver"]) == key and row["setting"] == setting:
            return None if "error" in row else row
    return None


def _ratio(rows, num, den, setting, metric):
    """a / b; for gradient times of rows timed interleaved, the median over rounds of
    the per-round ratio."""
    a, b = _find(rows, num, setting), _find(rows, den, setting)
    if a is None or b is None or not b.get(metric):
        return None
    if metric == "grad_ms" and den in a.get("group", []):
        return statistics.median(x / y for x, y in zip(a["grad_times"], b["grad_times"]))
    return a[metric] / b[metric]


def _fmt_ratio(r):
    return "n/a" if r is None else f"{r:.2f}×"


def targets(rows, settings):
    """Each target as (description, threshold, {setting: ratio}, informational settings);
    threshold None marks a line given for information (no verdict)."""
    fixed = [s.name for s in settings if s.n is not None]
    adaptive = [s.name for s in settings if s.n is None]
    out = []

    def ratio_target(text, num, den, metric, threshold, with_adaptive):
        by = {s: _ratio(rows, num, den, s, metric) for s in fixed}
        extra = {s: _ratio(rows, num, den, s, metric) for s in adaptive} if with_adaptive else {}
        out.append((text, threshold, by, extra))

    ratio_target("MALI gradient ≤ 1.3× Direct, same ALF grid (time)",
                 ("malijax", "MALI", "ALF"), MJ_DIRECT_ALF, "grad_ms", 1.3, True)
    ratio_target("MALI+ALF ≤ 0.7× Diffrax RecursiveCheckpoint+ReversibleHeun, equal steps "
                 "(time)",
                 ("malijax", "MALI", "ALF"), DFX_RC_RH, "grad_ms", 0.7, False)
    ratio_target("ACA+Tsit5 ≤ 0.6× Diffrax RecursiveCheckpoint+Tsit5 (time)",
                 ("malijax", "ACA", "Tsit5"), DFX_RC_TSIT5, "grad_ms", 0.6, False)
    ratio_target("Direct+ALF ≤ 1.1× hand-written lax.scan + jax.grad (time)",
                 MJ_DIRECT_ALF, SCAN_ALF, "grad_ms", 1.1, False)
    ratio_target("Direct+Tsit5 ≤ 1.1× hand-written lax.scan + jax.grad (time)",
                 MJ_DIRECT_TSIT5, SCAN_TSIT5, "grad_ms", 1.1, False)
    ratio_target("Compile: MALI+ALF ≤ 0.5× Diffrax RecursiveCheckpoint+ReversibleHeun",
                 ("malijax", "MALI", "ALF"), DFX_RC_RH, "compile_s", 0.5, True)
    ratio_target("Compile: ACA+Tsit5 ≤ 0.5× Diffrax RecursiveCheckpoint+Tsit5",
                 ("malijax", "ACA", "Tsit5"), DFX_RC_TSIT5, "compile_s", 0.5, True)
    ratio_target("Compile: Direct+Tsit5 ≤ 0.5× Diffrax DirectAdjoint+Tsit5",
                 MJ_DIRECT_TSIT5, DFX_DIRECT_TSIT5, "compile_s", 0.5, True)
    # Memory flat in N: temp bytes at each N over those at the smallest N.
    smallest = fixed[0]

    def memory_flat(text, key, threshold=1.05):
        base = _find(rows, key, smallest)
        by = {}
        for s in fixed:
            r = _find(rows, key, s)
            ok = r is not None and base is not None and base["grad_temp_bytes"]
            by[s] = r["grad_temp_bytes"] / base["grad_temp_bytes"] if ok else None
        out.append((text.format(smallest=smallest), threshold, by, {}))

    memory_flat("MALI memory flat in N: temp bytes ÷ those at {smallest} ≤ 1.05",
                ("malijax", "MALI", "ALF"))

    # Reversible(Tsit5) + MALI against Diffrax's checkpointed Tsit5 at equal steps.
    ratio_target("Reversible(Tsit5)+MALI ≤ 1.0× Diffrax RecursiveCheckpointAdjoint+Tsit5 "
                 "in time at equal steps, with memory flat in N (time)",
                 MJ_MALI_REV, DFX_RC_TSIT5, "grad_ms", 1.0, True)
    per_base = {s: None if r is None else r / 2 for s, r in out[-1][2].items()}
    out.append(("— the same per Tsit5 base step (Reversible takes two per step): "
                "ratio ÷ 2", None, per_base, {}))
    memory_flat("— its memory: Reversible(Tsit5)+MALI temp bytes ÷ those at {smallest} "
                "≤ 1.05", MJ_MALI_REV)
    ratio_target("— its memory against Diffrax RecursiveCheckpointAdjoint+Tsit5 "
                 "(temp bytes)", MJ_MALI_REV, DFX_RC_TSIT5, "grad_temp_bytes", None, False)
    ratio_target("Reversible(Tsit5)+MALI(checkpoints=8) ≤ 1.0× Diffrax "
                 "RecursiveCheckpointAdjoint+Tsit5 (time)",
                 MJ_MALI8_REV, DFX_RC_TSIT5, "grad_ms", 1.0, False)
    memory_flat("— its memory: Reversible(Tsit5)+MALI(checkpoints=8) temp bytes ÷ those "
                "at {smallest} ≤ 1.05", MJ_MALI8_REV)
    memory_flat("ALF(eta=0.9)+MALI(checkpoints=8) memory flat in N: temp bytes ÷ those "
                "at {smallest} ≤ 1.05", MJ_MALI8_ALF09)
    return out


def _verdict(values, threshold):
    vals = [v for v in values if v is not None]
    if not vals:
        return "n/a"
    return "**met**" if all(v <= threshold for v in vals) else "**not met**"


def _mib(b):
    return "" if b is None else f"{b / 2**20:.1f}"


# Rows whose gradient memory the report lists over N (those present in the run).
MEMORY_ROWS = [MJ_MALI_REV, MJ_MALI8_REV, MJ_ACA_REV, MJ_MALI8_ALF09, MJ_ACA_ALF09,
               ("malijax", "MALI", "ALF"), MJ_ACA_TSIT5, DFX_RC_TSIT5]


def _memory_table(rows, settings):
    names = [s.name for s in settings]
    body = []
    for key in MEMORY_ROWS:
        cells = [_find(rows, key, n) for n in names]
        if not any(cells):
            continue
        body.append(f"| {' '.join(key)} | " + " | ".join(
            "" if c is None else _mib(c.get("grad_temp_bytes")) for c in cells) + " |")
    if not body:
        return []
    return [
        "Gradient memory over N (`temp MiB` of the jitted gradient; adaptive: sized by "
        "`max_steps`):", "",
        "| row | " + " | ".join(n.removeprefix("N=") for n in names) + " |",
        "|---|" + "---|" * len(names),
        *body, "",
    ]


def _load():
    try:
        return "{:.2f} / {:.2f} / {:.2f}".format(*os.getloadavg())
    except OSError:
        return "unavailable"


def _cpu_model():
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_rev():
    here = pathlib.Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "malijax"], cwd=here,
                               capture_output=True, text=True, check=True).stdout.strip()
        return rev + (" (malijax/ has uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_info():
    import jaxlib

    return {
        "CPU": f"{os.cpu_count()} × {_cpu_model()}",
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "jax / jaxlib": f"{jax.__version__} / {jaxlib.__version__}",
        "backend": f"{jax.default_backend()} ({', '.join(str(d) for d in jax.devices())})",
        "equinox": eqx.__version__,
        "diffrax": getattr(diffrax, "__version__", "not installed"),
        "malijax": f"{mj.__version__}, git {_git_rev()}",
    }


COLUMNS = ["library", "strategy", "solver", "setting", "n", "steps", "rejected", "nfe", "bwd",
           "grad_ms", "grad_runs", "grad_spread", "fwd_ms", "fwd_runs", "grad_over_fwd",
           "compile_s", "grad_temp_bytes", "fwd_temp_bytes", "rel_diff", "ref", "rtol",
           "y_error", "grad_error", "note", "error"]


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k, "")) for k in COLUMNS})


def _cost_model(rows, cases_by_key, profile, headline, n, batch):
    f_s, v_s = profile
    lines = ["## Cost model", ""]
    lines.append(
        f"Per step of an {n}-step `lax.scan` at batch {batch}: "
        f"F = one evaluation of f = {1e6 * f_s:.0f} µs; V = one evaluation plus its VJP "
        f"(state and parameters) = {1e6 * v_s:.0f} µs, so the VJP alone costs "
        f"{(v_s - f_s) / f_s:.1f} F. Each row's model is its count of F and V per step "
        f"(forward and backward, init evaluations ignored) times these; `measured/model` "
        f"is roughly what the row spends beyond that arithmetic (residual stores and loads, loop "
        f"and bookkeeping overhead). Diffrax RecursiveCheckpoint's model assumes one "
        f"recomputed forward sweep. At {headline}:"
    )
    lines.append("")
    lines.append("| row | per step | model ms | grad ms | measured/model |")
    lines.append("|---|---|---|---|---|")
    for row in rows:
        if row["setting"] != headline or "error" in row:
            continue
        case = cases_by_key[(row["library"], row["strategy"], row["solver"])]
        if case.model is None:
            continue
        a, b = case.model
        terms = " + ".join(t for t in (f"{a} F" if a else "", f"{b} V" if b else "") if t)
        model_ms = 1e3 * n * (a * f_s + b * v_s)
        lines.append(f"| {case.label} | {terms} | {model_ms:.0f} | {row['grad_ms']:.0f} | "
                     f"{row['grad_ms'] / model_ms:.2f} |")
    lines.append("")
    return lines


def write_markdown(path, rows, settings, args, info, loads, wall_s, headline,
                   cases_by_key=None, profile=None, diss=None):
    lines = ["# Gradient strategies: time, compile time, memory, NFE", ""]
    lines.append(
        f"Neural ODE: f(t, y) = W2 tanh(W1 y + b1) + b2 (an `eqx.Module`), state {DIM}, "
        f"hidden {HIDDEN}, batch {args.batch}, float32, over [0, 1] (`ts = [0, 1]`). Loss "
        "`mean(y(1)**2)`, gradient w.r.t. the vector field's parameters. Fixed grids: "
        "`num_steps=N` (Diffrax: `ConstantStepSize`, `dt0=1/N`, `max_steps=N`); adaptive: "
        f"rtol={RTOL}, atol={ATOL}, max_steps={ADAPTIVE_MAX_STEPS} (Diffrax: `PIDController`)."
    )
    lines.append("")
    lines.append(
        f"Produced by `{args.command}` on "
        f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}, in {wall_s / 60:.1f} min."
    )
    lines.append("")
    lines.append("## Machine")
    lines.append("")
    for k, v in info.items():
        lines.append(f"- {k}: {v}")
    lines.append(f"- load average (1 / 5 / 15 min) at start: {loads[0]}; at end: {loads[1]}")
    lines.append(
        f"- timing: median of {args.repeats} calls after a warm-up call; {args.slow_repeats} "
        f"calls where the warm-up took over {args.slow_s:g} s, {2 * args.repeats - 1} where "
        f"it took under {FAST_S:g} s (the `runs` column says which; `spread` is "
        "(max − min) / median of the timed calls)"
    )
    lines.append("")

    lines.append("## Targets")
    lines.append("")
    lines.append(
        f"Ratios of this run's numbers: headline at {headline}, the range over every N, and "
        "a verdict over every N (a target is met only if it holds at every N). Adaptive "
        "ratios are for information (the libraries take different steps there). The rows a "
        "timing target compares are timed interleaved (one call of each per round) and "
        "the ratio is the median over rounds of the per-round ratio, which cancels most of "
        "a shared machine's load drift; compile times are single measurements."
    )
    lines.append("")
    lines.append("| target | at " + headline + " | range over N | per N | adaptive | verdict |")
    lines.append("|---|---|---|---|---|---|")
    skipped = 0
    for text, threshold, by, extra in targets(rows, settings):
        vals = [v for v in by.values() if v is not None]
        if not vals and not any(v is not None for v in extra.values()):
            skipped += 1  # its rows were not run (--only)
            continue
        rng = f"{min(vals):.2f}–{max(vals):.2f}×" if vals else "n/a"
        per = ", ".join(f"{s.removeprefix('N=')}: {_fmt_ratio(v)}" for s, v in by.items())
        adapt = ", ".join(_fmt_ratio(v) for v in extra.values()) or "—"
        head = by.get(headline)
        head_s = _fmt_ratio(head)
        if head is not None and threshold is not None:
            head_s += " (met)" if head <= threshold else " (not met)"
        verdict = "(information)" if threshold is None else _verdict(by.values(), threshold)
        lines.append(f"| {text} | {head_s} | {rng} | {per} | {adapt} | {verdict} |")
    lines.append("")
    if skipped:
        lines.append(f"({skipped} targets left out: their rows were not run.)")
        lines.append("")
    lines += _memory_table(rows, settings)

    if profile is not None:
        lines += _cost_model(rows, cases_by_key, profile, headline,
                             int(headline.removeprefix("N=")), args.batch)
    if diss is not None:
        lines += _dissipative_section(diss)

    lines.append("## Results")
    lines.append("")
    lines.append(
        "`grad ms`/`fwd ms`: median wall time of the jitted gradient / solve (`spread`: "
        "(max − min) / median of the gradient's timed calls); `compile s`: "
        "lower + compile of the jitted gradient; `grad MiB`/`fwd MiB`: XLA "
        "`memory_analysis().temp_size_in_bytes`; `NFE`: forward evaluations of f (malijax: "
        "`solve(...).stats`; Diffrax and lax.scan: counted, 1 + stages × steps, +2 for "
        "Diffrax's initial step selection); `backward`: the backward's evaluations derived "
        "analytically (VJP = one vector-Jacobian product of f, which includes its forward "
        "evaluation); `rel. diff`: max |g − g_ref| / max |g_ref| against `ref` (Direct "
        "through the same steps; float32 rounding is ~1e-6)."
    )
    lines.append("")
    for setting in settings:
        lines.append(f"### {setting.name}" + ("" if setting.n else
                     f" (rtol={RTOL}, atol={ATOL}, max_steps={ADAPTIVE_MAX_STEPS})"))
        lines.append("")
        lines.append("| library | strategy | solver | steps (rej.) | NFE | backward | grad ms | "
                     "runs | spread | fwd ms | grad/fwd | compile s | grad MiB | fwd MiB | "
                     "rel. diff | ref |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for row in rows:
            if row["setting"] != setting.name:
                continue
            if "error" in row:
                lines.append(f"| {row['library']} | {row['strategy']} | {row['solver']} | "
                             f"failed: {row['error']} |" + " |" * 12)
                continue
            rd = "" if row.get("rel_diff") is None else f"{row['rel_diff']:.1e}"
            lines.append(
                f"| {row['library']} | {row['strategy']} | {row['solver']} | "
                f"{row['steps']} ({row['rejected']}) | {row['nfe']} | {row['bwd']} | "
                f"{row['grad_ms']:.1f} | {row['grad_runs']} | {100 * row['grad_spread']:.0f}% | "
                f"{row['fwd_ms']:.1f} | "
                f"{row['grad_over_fwd']:.2f} | {row['compile_s']:.2f} | "
                f"{_mib(row['grad_temp_bytes'])} | {_mib(row['fwd_temp_bytes'])} | {rd} | "
                f"{row.get('ref', '')} |" + (f" {row['note']}" if row.get("note") else "")
            )
        lines.append("")
    lines.append("## Notes")
    lines.append("")
    lines.append(
        "- Adaptive solves size their per-step buffers by `max_steps` (shapes are static in "
        "JAX), so memory there reflects `max_steps`, not the steps taken; malijax `Direct` "
        "runs a bounded while loop whose backward stores all `max_steps` iterations.\n"
        "- Diffrax `RecursiveCheckpointAdjoint()` uses its default checkpoints, "
        "⌊√(2·max_steps)⌋-ish (binomial checkpointing: each step recomputed at most twice); "
        "`max_steps` is N on fixed grids, so its memory grows like √N.\n"
        "- Diffrax `ReversibleHeun` is the nearest Diffrax has to MALI (a reversible solver); "
        "this Diffrax has no reversible adjoint, so it is differentiated by recursive "
        "checkpointing.\n"
        "- The `lax.scan` rows are the same ALF / Tsit5 arithmetic written as a bare "
        "`lax.scan` and differentiated by `jax.grad`: Direct's overhead is the ratio.\n"
        "- `Reversible(Tsit5)` (coupling 0.5) takes two Tsit5 base steps per step: its "
        "NFE (from `stats`) counts 13 per step, but on a `num_steps` grid the first base "
        "step's seventh stage only feeds the unused error estimate and XLA drops it, so 12 "
        "are computed (its cost model counts 12 F + 12 V). `MALI()` stores a whole state "
        "(y, z) every s steps (s = 5 for λ = 0.5 in float32 in this malijax, i.e. "
        "⌈N/5⌉ − 1 states), so "
        "its memory grows with N; `MALI(checkpoints=8)` stores 8, and its reconstruction "
        "segments grow with N (amplifying rounding by 1/|det| per step: 2 for Reversible, "
        "1.25 for ALF(eta=0.9)), which the `rel. diff` column and ReconstructionWarning "
        "notes show.\n"
        "- Other processes on the machine distort timings: see the load average above."
    )
    pathlib.Path(path).write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: N in {16, 64}, batch 32, 3 repeats")
    parser.add_argument("--out", default=None,
                        help="output folder (default benchmarks/results; with --quick "
                             "benchmarks/results/quick)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 256)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per measurement (default 5; 3 with --quick)")
    parser.add_argument("--slow-s", type=float, default=1.5,
                        help="warm-up seconds above which --slow-repeats calls are timed")
    parser.add_argument("--slow-repeats", type=int, default=None,
                        help="timed calls for slow measurements (default 3)")
    parser.add_argument("--only", default=None,
                        help="comma-separated substrings: run only rows whose label has one")
    parser.add_argument("--ns", default=None,
                        help="comma-separated step counts N (default 16,64,256,1024; "
                             "16,64 with --quick)")
    parser.add_argument("--no-adaptive", action="store_true",
                        help="leave out the adaptive setting of the main table")
    parser.add_argument("--no-dissipative", action="store_true",
                        help="leave out the adaptive dissipative section (equal error)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.command = shlex.join(["python", "benchmarks/gradients.py", *argv])
    args.batch = args.batch or (32 if args.quick else 256)
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.slow_repeats = min(args.slow_repeats or 3, args.repeats)
    if args.ns:
        ns = sorted(int(n) for n in args.ns.split(","))
    else:
        ns = [16, 64] if args.quick else [16, 64, 256, 1024]
    settings = [Setting(f"N={n}", n) for n in ns]
    if not args.no_adaptive:
        settings.append(Setting("adaptive", None))
    headline = "N=256" if 256 in ns else f"N={ns[-1]}"
    default_out = pathlib.Path(__file__).resolve().parent / "results"
    out = pathlib.Path(args.out) if args.out else (
        default_out / "quick" if args.quick else default_out)
    out.mkdir(parents=True, exist_ok=True)

    info = machine_info()
    load_start = _load()
    print("\n".join(f"{k}: {v}" for k, v in info.items()))
    print(f"load average at start: {load_start}")
    params = Field(DIM, HIDDEN, jr.PRNGKey(0))
    y0 = jr.normal(jr.PRNGKey(1), (args.batch, DIM), jnp.float32)

    all_cases = cases()
    if args.only:
        wanted = args.only.split(",")
        all_cases = [c for c in all_cases
                     if any(w in c.label for w in wanted)]
    cases_by_key = {c.key: c for c in all_cases}
    rows, grads = [], {}
    start = time.perf_counter()
    warm_up_tracing(all_cases)
    for setting in settings:
        present = [c for c in all_cases if not (c.fixed_only and setting.n is None)]
        for group in measure_groups(present):
            t0 = time.perf_counter()
            group_rows = measure_group(group, setting, params, y0, args, grads)
            for case, row in zip(group, group_rows):
                rows.append(row)
                if "error" in row:
                    print(f"{setting.name:>9} {case.label:<50} FAILED {row['error']}",
                          flush=True)
                else:
                    print(f"{setting.name:>9} {case.label:<50} grad {row['grad_ms']:9.1f} ms  "
                          f"fwd {row['fwd_ms']:8.1f} ms  compile {row['compile_s']:5.2f} s  "
                          f"temp {_mib(row['grad_temp_bytes']):>7} MiB  NFE {row['nfe']:5d}",
                          flush=True)
            print(f"{'':>9} [group of {len(group)}: {time.perf_counter() - t0:5.1f} s]",
                  flush=True)
    diss = None if args.no_dissipative else run_dissipative(params, y0, args)
    headline_n = int(headline.removeprefix("N="))
    profile = per_step_profile(params, y0, headline_n, args.repeats)
    print(f"per step at {headline}: F = {1e6 * profile[0]:.0f} us, "
          f"F + VJP = {1e6 * profile[1]:.0f} us")
    wall_s = time.perf_counter() - start
    # Display order: the order of `cases()` within each setting.
    display = {c.key: i for i, c in enumerate(all_cases)}
    setting_rank = {s.name: i for i, s in enumerate(settings)}
    rows.sort(key=lambda r: (setting_rank[r["setting"]],
                             display[(r["library"], r["strategy"], r["solver"])]))
    add_rel_diffs(rows, cases_by_key, grads)
    loads = (load_start, _load())
    write_csv(out / "gradients.csv", rows + (diss["rows"] if diss else []))
    write_markdown(out / "gradients.md", rows, settings, args, info, loads, wall_s, headline,
                   cases_by_key, profile, diss)
    print(f"\nwrote {out / 'gradients.md'} and {out / 'gradients.csv'} "
          f"({wall_s / 60:.1f} min)")
    print(f"load average at end: {loads[1]}")


if __name__ == "__main__":
    main()
