"""Dense output: steps and gradient time against the number of outputs, and training loops.

Adaptive solves now choose their steps by the tolerance alone and interpolate at the
output times (`land_on_outputs=False`, the default); `land_on_outputs=True` is the old
behaviour, a step landing on every output time. This script measures what that buys.

1. **Steps and gradient time against the number of outputs K** (float64). A 16-state
   tanh field `f(t, y) = tanh(W y + b)` (W ~ N(0, 1/16), b ~ N(0, 1/4), fixed), a batch
   of 32 trajectories carried as one (32, 16) state (`y @ W.T + b`), rtol 1e-6,
   atol 1e-9, over [0, 10] with `ts = linspace(0, 10, K)`, K in {2, 20, 200, 1000}.
   Loss: the sum of squares of every output; gradient w.r.t. (W, b), passed as `args`.
   Rows: malijax defaults (`Reversible(Tsit5())` + `MALI()`), `Tsit5` with `ACA`,
   `Direct`, `SymplecticAdjoint`, `ANODE`, `Adjoint`; the first two also with
   `land_on_outputs=True`; Diffrax `Tsit5` + `RecursiveCheckpointAdjoint` (its
   defaults, `PIDController`, `SaveAt(ts=ts)`, `dt0=None`, `max_steps=4096`) and
   `jax.experimental.ode.odeint`. Per row: accepted (rejected) steps, NFE, compile time
   of the jitted gradient, its median time over interleaved rounds (one call of every
   row per round), the median over rounds of the per-round ratio to Diffrax's time,
   the gradient's max relative difference to `Direct` through the same solver and
   `land_on_outputs` setting, and the outputs' error against Diffrax `Dopri8` at
   rtol = atol = 1e-12 (max abs, and max in units of `atol + rtol |y_ref|`).
2. **Training loops** (float32, optax Adam lr 1e-2, one init shared by all rows, the
   rows stepped in lock-step so load drift hits them alike; time per Adam step is the
   median over all steps after the compile; final loss evaluated after the last step
   by the row's own solve, and by a tight Diffrax Tsit5 solve (rtol 1e-6, atol 1e-8)
   so that rows are comparable):
   a. README-style: 64 spirals `y' = A y`, A = [[-0.1, 2], [-2, -0.1]], from random
      initial points, as one (64, 2) state; 20 output times over [0, 4]; MLP field
      2 -> 64 -> 64 -> 2 (tanh); default tolerances; 200 steps (quick: 30).
   b. Latent-ODE-style: 32 trajectories of the same ODE, each with its own 100 sorted
      observation times (0 then 99 uniform in [0, 5]), of which a random 60-100 are
      valid and the rest padded by repeating the last valid time; solved by `jax.vmap`
      over trajectories (per-example `ts`); loss: masked MSE.
   Rows: "malijax defaults" (no `solver` / `gradient` passed: whatever the library's
   defaults resolve to at run time for this state; the report names them),
   `Reversible(Tsit5())` + `MALI()` explicitly, the same with `land_on_outputs=True`
   ("before dense output"), `Tsit5()` + `ACA()` explicitly, and Diffrax's defaults
   (`Tsit5` + `RecursiveCheckpointAdjoint`, `PIDController(1e-3, 1e-6)`). `--rows`
   picks a subset by label (the Diffrax row, the ratios' reference, always runs).

Each section runs in its own subprocess (float64 for 1, float32 for 2), which prints
its rows as JSON; the parent writes `results/dense_output.md` (and `.csv` for part 1).

    python benchmarks/dense_output.py            # full run, ~8 min on 2 busy CPU cores
    python benchmarks/dense_output.py --quick    # ~4 min: K in {2, 200}, 7 rounds, 30 Adam steps
    python benchmarks/dense_output.py --only spirals --rows "malijax defaults,ACA"
    python benchmarks/dense_output.py --section spirals --train-steps 200 --rounds 1 --ks 2
                                   # one section in this process: prints `RESULT {json}`
                                   # (benchmarks/defaults.py --train runs it so)
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import statistics
import subprocess
import sys
import time

import _child  # benchmarks/_child.py: the parts' processes
import traceback
import warnings

HERE = pathlib.Path(__file__).resolve()
ROOT = HERE.parents[1]
RESULTS = HERE.with_name("results")

RTOL1, ATOL1 = 1e-6, 1e-9
T1 = 10.0
BATCH1, DIM1 = 32, 16


def _err_text(e):
    msg = f"{type(e).__name__}: {e}".replace("\n", " ").replace("|", "/")
    return msg[:400]


# ============================================================== section 1 (float64)


def section_steps(opts):
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import jax.random as jr
    import numpy as np
    from jax.experimental.ode import odeint as jax_odeint

    import malijax as mj

    try:
        import diffrax
    except ImportError:  # pragma: no cover
        diffrax = None

    k1, k2, k3 = jr.split(jr.PRNGKey(0), 3)
    W = jr.normal(k1, (DIM1, DIM1), jnp.float64) / DIM1**0.5
    b = 0.5 * jr.normal(k2, (DIM1,), jnp.float64)
    y0 = jr.normal(k3, (BATCH1, DIM1), jnp.float64)
    params = (W, b)

    def field(t, y, p):
        w, bb = p
        return jnp.tanh(y @ w.T + bb)

    def mj_case(solver, gradient, land):
        kw = dict(solver=solver, gradient=gradient, rtol=RTOL1, atol=ATOL1, max_steps=4096,
                  land_on_outputs=land)

        def make(ts):
            def loss(p):
                return jnp.sum(mj.odeint(field, y0, ts, p, **kw) ** 2)

            def fwd(p):
                sol = mj.solve(field, y0, ts, p, **kw)
                return sol.ys, sol.stats["num_steps"], sol.stats["num_rejected"], sol.stats["num_fevals"]

            return loss, fwd

        return make

    def dfx_make(ts):
        def solve(p):
            return diffrax.diffeqsolve(
                diffrax.ODETerm(field), diffrax.Tsit5(), ts[0], ts[-1], None, y0, args=p,
                saveat=diffrax.SaveAt(ts=ts),
                stepsize_controller=diffrax.PIDController(rtol=RTOL1, atol=ATOL1),
                max_steps=4096)

        def loss(p):
            return jnp.sum(solve(p).ys ** 2)

        def fwd(p):
            sol = solve(p)
            return sol.ys, sol.stats["num_accepted_steps"], sol.stats["num_rejected_steps"], None

        return loss, fwd

    def jode_make(ts):
        def f(y, t, w, bb):
            return jnp.tanh(y @ w.T + bb)

        def loss(p):
            return jnp.sum(jax_odeint(f, y0, ts, *p, rtol=RTOL1, atol=ATOL1) ** 2)

        def fwd(p):
            return jax_odeint(f, y0, ts, *p, rtol=RTOL1, atol=ATOL1), None, None, None

        return loss, fwd

    default = mj.Reversible(mj.Tsit5())
    rows_spec = [  # label, lib, make, reference key (solver, land) or None
        ("malijax default: Reversible(Tsit5) + MALI", "malijax", mj_case(default, mj.MALI(), False), ("rev", False)),
        ("malijax default, land_on_outputs=True", "malijax", mj_case(default, mj.MALI(), True), ("rev", True)),
        ("Tsit5 + ACA", "malijax", mj_case(mj.Tsit5(), mj.ACA(), False), ("tsit5", False)),
        ("Tsit5 + ACA, land_on_outputs=True", "malijax", mj_case(mj.Tsit5(), mj.ACA(), True), ("tsit5", True)),
        ("Tsit5 + Direct", "malijax", mj_case(mj.Tsit5(), mj.Direct(), False), ("tsit5", False)),
        ("Tsit5 + SymplecticAdjoint", "malijax", mj_case(mj.Tsit5(), mj.SymplecticAdjoint(), False), ("tsit5", False)),
        ("Tsit5 + ANODE", "malijax", mj_case(mj.Tsit5(), mj.ANODE(), False), ("tsit5", False)),
        ("Tsit5 + Adjoint", "malijax", mj_case(mj.Tsit5(), mj.Adjoint(), False), ("tsit5", False)),
    ]
    if diffrax is not None:
        rows_spec.append(("Diffrax Tsit5 + RecursiveCheckpointAdjoint", "diffrax", dfx_make, None))
    rows_spec.append(("jax.experimental.ode.odeint", "jax", jode_make, None))
    # untimed references: Direct through the same solver and land_on_outputs setting
    ref_spec = {
        ("rev", False): mj_case(default, mj.Direct(), False),
        ("rev", True): mj_case(default, mj.Direct(), True),
        ("tsit5", False): mj_case(mj.Tsit5(), mj.Direct(), False),
        ("tsit5", True): mj_case(mj.Tsit5(), mj.Direct(), True),
    }

    def rel(a, b):
        la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
        num = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(la, lb))
        return num / max(float(jnp.max(jnp.abs(y))) for y in lb)

    out = []
    for K in opts.ks:
        ts = jnp.linspace(0.0, T1, K, dtype=jnp.float64)
        # tight reference for the outputs
        y_ref = None
        if diffrax is not None:
            y_ref = jax.jit(lambda p: diffrax.diffeqsolve(
                diffrax.ODETerm(field), diffrax.Dopri8(), ts[0], ts[-1], None, y0, args=p,
                saveat=diffrax.SaveAt(ts=ts),
                stepsize_controller=diffrax.PIDController(rtol=1e-12, atol=1e-12),
                max_steps=100_000).ys)(params)
            y_ref = np.asarray(y_ref)
        ref_grads = {}
        for key, make in ref_spec.items():
            try:
                ref_grads[key] = jax.jit(jax.grad(make(ts)[0]))(params)
            except Exception as e:  # noqa: BLE001
                ref_grads[key] = _err_text(e)
                print(f"  K={K} reference Direct {key} failed: {ref_grads[key]}", flush=True)
        rows, fns = [], {}
        for label, lib, make, refkey in rows_spec:
            row = dict(K=K, label=label, lib=lib)
            rows.append(row)
            try:
                loss, fwd = make(ts)
                ys, steps, rej, nfe = jax.jit(fwd)(params)
                row["steps"] = None if steps is None else int(steps)
                row["rejected"] = None if rej is None else int(rej)
                row["nfe"] = None if nfe is None else int(nfe)
                if y_ref is not None:
                    d = np.abs(np.asarray(ys) - y_ref)
                    row["err_abs"] = float(d.max())
                    row["err_tol"] = float((d / (ATOL1 + RTOL1 * np.abs(y_ref))).max())
                    row["err_end"] = float(d[-1].max())
                t0 = time.perf_counter()
                compiled = jax.jit(jax.grad(loss)).lower(params).compile()
                row["compile_s"] = time.perf_counter() - t0
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", mj.ReconstructionWarning)
                    g = jax.block_until_ready(compiled(params))  # warm-up
                recon = [str(w.message) for w in caught if issubclass(w.category, mj.ReconstructionWarning)]
                if recon:
                    row["warning"] = recon[0][:200]
                fns[label] = compiled
                r = ref_grads.get(refkey if refkey is not None else ("tsit5", False))
                if isinstance(r, str):
                    row["rel"] = None
                    row["rel_note"] = "ref failed"
                elif r is not None:
                    row["rel"] = rel(g, r)
                    row["rel_note"] = "same steps" if refkey is not None else "vs Tsit5+Direct (own steps)"
            except Exception as e:  # noqa: BLE001
                row["error"] = _err_text(e)
                print(f"  K={K} {label} FAILED: {row['error']}", flush=True)
                traceback.print_exc(file=sys.stderr)
            print(f"  K={K} {label}: prepared {json.dumps({k: v for k, v in row.items() if k not in ('K', 'label', 'lib')})}",
                  flush=True)
        # interleaved rounds; a sample is the mean of `inner` back-to-back calls, enough for
        # about 20 ms, so that sub-millisecond scheduling noise does not dominate short calls
        inner = {}
        for k, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(params))
            inner[k] = max(1, min(20, round(0.02 / (time.perf_counter() - t0))))
        times = {k: [] for k in fns}
        for rnd in range(opts.rounds):
            order = list(fns) if rnd % 2 == 0 else list(reversed(fns))
            for k in order:
                t0 = time.perf_counter()
                for _ in range(inner[k]):
                    out_ = fns[k](params)
                jax.block_until_ready(out_)
                times[k].append((time.perf_counter() - t0) / inner[k])
        dname = "Diffrax Tsit5 + RecursiveCheckpointAdjoint"
        for row in rows:
            ts_ = times.get(row["label"])
            if not ts_:
                continue
            row["grad_ms"] = 1e3 * statistics.median(ts_)
            row["inner"] = inner[row["label"]]
            row["spread"] = (max(ts_) - min(ts_)) / statistics.median(ts_)
            if dname in times:
                row["ratio"] = statistics.median(a / d for a, d in zip(ts_, times[dname]))
            print(f"  K={K} {row['label']}: {row['grad_ms']:.2f} ms, ratio {row.get('ratio', float('nan')):.2f}",
                  flush=True)
        out.extend(rows)
    return dict(rows=out, rounds=opts.rounds)


# ============================================================= section 2 (float32)

A_SPIRAL = [[-0.1, 2.0], [-2.0, -0.1]]

# the training rows' labels (benchmarks/defaults.py matches them to its candidates)
DEFAULTS_ROW = "malijax defaults"
REV_ROW = "Reversible(Tsit5()) + MALI()"
REV_LAND_ROW = "Reversible(Tsit5()) + MALI(), land_on_outputs=True (before dense output)"
ACA_ROW = "Tsit5() + ACA()"
BOSH3_ROW = "Bosh3() + ACA()"
DIFFRAX_ROW = "Diffrax Tsit5 + RecursiveCheckpointAdjoint"
TRAIN_ROWS = (DEFAULTS_ROW, REV_ROW, REV_LAND_ROW, ACA_ROW, BOSH3_ROW, DIFFRAX_ROW)


def select_rows(labels, spec):
    """The labels chosen by `spec`, comma-separated items (None or "": all). An item
    equal to a label picks that label alone, otherwise every label containing it
    (case-insensitive). The Diffrax row is always kept: the ratios are to it."""
    if not spec:
        return list(labels)
    chosen = set()
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        hits = [lab for lab in labels if lab == item] or [
            lab for lab in labels if item.lower() in lab.lower()]
        if not hits:
            raise SystemExit(f"--rows: {item!r} matches none of {list(labels)}")
        chosen.update(hits)
    return [lab for lab in labels if lab in chosen or lab == DIFFRAX_ROW]


def _resolved_defaults(rtol=1e-3):
    """What `odeint` without `solver`/`gradient` resolves to at this `rtol` (text)."""
    try:
        from malijax import _odeint

        solver = _odeint.default_solver(rtol)
        gradient = _odeint._default_gradient(solver)
        return f"{solver!r} + {gradient!r}".replace("solver=", "")
    except Exception as e:  # noqa: BLE001 - private names moved: say so, do not fail
        return f"unknown ({_err_text(e)})"


def section_train(opts, kind):
    import jax

    jax.config.update("jax_enable_x64", False)
    import equinox as eqx
    import jax.numpy as jnp
    import jax.random as jr
    import optax

    import malijax as mj

    try:
        import diffrax
    except ImportError:  # pragma: no cover
        diffrax = None

    A = jnp.array(A_SPIRAL, jnp.float32)

    def exact(y0s, ts):  # y(t) = expm(A t) y0;  ts (T,), y0s (B, 2) -> (T, B, 2)
        Ms = jax.vmap(jax.scipy.linalg.expm)(A[None] * ts[:, None, None])
        return jnp.einsum("tij,bj->tbi", Ms, y0s)

    key = jr.PRNGKey(42)
    kd, km, kt, kn = jr.split(key, 4)
    mlp = eqx.nn.MLP(2, 2, 64, 2, activation=jnp.tanh, key=km)
    params0, static = eqx.partition(mlp, eqx.is_array)

    if kind == "spirals":
        B, T, NT = 64, 4.0, 20
        y0s = jr.uniform(kd, (B, 2), jnp.float32, -2.0, 2.0)
        ts = jnp.linspace(0.0, T, NT, dtype=jnp.float32)
        data = exact(y0s, ts)  # (NT, B, 2)
        mask = jnp.ones(data.shape[:2] + (1,), jnp.float32)

        def field(t, y, p):
            return jax.vmap(eqx.combine(p, static))(y)

        def mj_pred(p, **kw):
            return mj.odeint(field, y0s, ts, p, **kw)

        def mj_steps(p, **kw):
            return mj.solve(field, y0s, ts, p, **kw).stats["num_steps"]

        def dfx_sol(p, rtol=1e-3, atol=1e-6):
            return diffrax.diffeqsolve(
                diffrax.ODETerm(field), diffrax.Tsit5(), ts[0], ts[-1], None, y0s, args=p,
                saveat=diffrax.SaveAt(ts=ts),
                stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol), max_steps=4096)

        def dfx_pred(p, **kw):
            return dfx_sol(p, **kw).ys

        def dfx_steps(p):
            return dfx_sol(p).stats["num_accepted_steps"]

        desc = (f"{B} spirals as one ({B}, 2) state, {NT} outputs over [0, {T:g}], "
                "data y' = A y exact (expm)")
    else:
        B, NT, T = 32, 100, 5.0
        y0s = jr.uniform(kd, (B, 2), jnp.float32, -2.0, 2.0)
        kts, kv = jr.split(kt)
        raw = jnp.sort(jr.uniform(kts, (B, NT - 1), jnp.float32, 0.0, T), axis=1)
        raw = jnp.concatenate([jnp.zeros((B, 1), jnp.float32), raw], axis=1)  # (B, NT)
        nvalid = jr.randint(kv, (B,), 60, NT + 1)
        idx = jnp.arange(NT)
        valid = idx[None, :] < nvalid[:, None]
        last = jnp.take_along_axis(raw, (nvalid - 1)[:, None], axis=1)
        tss = jnp.where(valid, raw, last)  # (B, NT), padded by repeating the last valid time
        data = jax.vmap(lambda y0, t: exact(y0[None], t)[:, 0])(y0s, tss)  # (B, NT, 2)
        mask = valid[..., None].astype(jnp.float32)

        def field1(t, y, p):
            return eqx.combine(p, static)(y)

        def mj_pred(p, **kw):
            return jax.vmap(lambda y0, t: mj.odeint(field1, y0, t, p, **kw))(y0s, tss)

        def mj_steps(p, **kw):
            return jnp.sum(jax.vmap(lambda y0, t: mj.solve(field1, y0, t, p, **kw).stats["num_steps"])(y0s, tss))

        def dfx_sol(p, y0, t, rtol=1e-3, atol=1e-6):
            return diffrax.diffeqsolve(
                diffrax.ODETerm(field1), diffrax.Tsit5(), t[0], t[-1], None, y0, args=p,
                saveat=diffrax.SaveAt(ts=t),
                stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol), max_steps=4096)

        def dfx_pred(p, **kw):
            return jax.vmap(lambda y0, t: dfx_sol(p, y0, t, **kw).ys)(y0s, tss)

        def dfx_steps(p):
            return jnp.sum(jax.vmap(lambda y0, t: dfx_sol(p, y0, t).stats["num_accepted_steps"])(y0s, tss))

        desc = (f"{B} trajectories under jax.vmap, each {NT} sorted times (0, then uniform in "
                f"[0, {T:g}]), valid {int(nvalid.min())}-{int(nvalid.max())} "
                f"(mean {float(nvalid.mean()):.1f}), padded by repeating the last valid time")

    def mse(pred):
        return jnp.sum(mask * (pred - data) ** 2) / (2 * jnp.sum(mask))

    rev = dict(solver=mj.Reversible(mj.Tsit5()), gradient=mj.MALI())
    aca = dict(solver=mj.Tsit5(), gradient=mj.ACA())
    bosh3 = dict(solver=mj.Bosh3(), gradient=mj.ACA())
    rows_spec = [  # "malijax defaults": no solver/gradient, whatever they resolve to now
        (DEFAULTS_ROW, mj_pred, mj_steps),
        (REV_ROW, lambda p: mj_pred(p, **rev), lambda p: mj_steps(p, **rev)),
        (REV_LAND_ROW, lambda p: mj_pred(p, land_on_outputs=True, **rev),
         lambda p: mj_steps(p, land_on_outputs=True, **rev)),
        (ACA_ROW, lambda p: mj_pred(p, **aca), lambda p: mj_steps(p, **aca)),
        (BOSH3_ROW, lambda p: mj_pred(p, **bosh3), lambda p: mj_steps(p, **bosh3)),
    ]
    if diffrax is not None:
        rows_spec.append((DIFFRAX_ROW, dfx_pred, dfx_steps))
        tight = jax.jit(lambda p: mse(dfx_pred(p, rtol=1e-6, atol=1e-8)))
    else:  # pragma: no cover
        tight = None
    rows_spec = [r for r in rows_spec if r[0] in select_rows([r[0] for r in rows_spec], opts.rows)]
    resolved = _resolved_defaults(1e-3)

    opt = optax.adam(1e-2)
    rows, state = [], {}
    for label, pred, steps in rows_spec:
        row = dict(label=label)
        rows.append(row)
        try:
            def loss(p, pred=pred):
                return mse(pred(p))

            def step(p, s, loss=loss):
                val, g = jax.value_and_grad(loss)(p)
                upd, s = opt.update(g, s, p)
                return optax.apply_updates(p, upd), s, val

            s0 = opt.init(params0)
            t0 = time.perf_counter()
            compiled = jax.jit(step).lower(params0, s0).compile()
            row["compile_s"] = time.perf_counter() - t0
            row["steps_fn"] = jax.jit(steps)
            row["loss_fn"] = jax.jit(loss)
            row["init_steps"] = int(row["steps_fn"](params0))
            row["init_loss"] = float(row["loss_fn"](params0))
            jax.block_until_ready(compiled(params0, s0))  # warm-up call, result discarded
            state[label] = [compiled, params0, s0, [], 0, 0.0]
        except Exception as e:  # noqa: BLE001
            row["error"] = _err_text(e)
            print(f"  {kind} {label} FAILED: {row['error']}", flush=True)
            traceback.print_exc(file=sys.stderr)
    for it in range(opts.train_steps):
        order = list(state) if it % 2 == 0 else list(reversed(state))
        for label in order:
            st = state[label]
            if st is None:
                continue
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", mj.ReconstructionWarning)
                    t0 = time.perf_counter()
                    p, s, val = st[0](st[1], st[2])
                    jax.block_until_ready(p)
                    st[3].append(time.perf_counter() - t0)
                errs = [float(m.group(1)) for w in caught
                        if issubclass(w.category, mj.ReconstructionWarning)
                        and (m := re.search(r"relative error of ([0-9.e+-]+)", str(w.message)))]
                if errs:
                    st[4] += 1
                    st[5] = max(st[5], max(errs))
                st[1], st[2] = p, s
            except Exception as e:  # noqa: BLE001
                row = next(r for r in rows if r["label"] == label)
                row["error"] = f"at Adam step {it}: " + _err_text(e)
                print(f"  {kind} {label} FAILED: {row['error']}", flush=True)
                state[label] = None
        if (it + 1) % 10 == 0:
            print(f"  {kind}: {it + 1}/{opts.train_steps} Adam steps", flush=True)
    for row in rows:
        st = state.get(row["label"])
        fns = (row.pop("steps_fn", None), row.pop("loss_fn", None))
        if st is None:
            continue
        p = st[1]
        row["step_ms"] = 1e3 * statistics.median(st[3])
        row["recon_warned"], row["recon_max"] = st[4], st[5]
        row["spread"] = (max(st[3]) - min(st[3])) / statistics.median(st[3])
        try:
            row["final_steps"] = int(fns[0](p))
            row["final_loss"] = float(fns[1](p))
            if tight is not None:
                row["final_loss_tight"] = float(tight(p))
        except Exception as e:  # noqa: BLE001
            row["error"] = "final evaluation: " + _err_text(e)
        print(f"  {kind} {row['label']}: {json.dumps(row)}", flush=True)
    ref = next((r for r in rows if r["label"].startswith("Diffrax") and "step_ms" in r), None)
    if ref is not None:  # per-step ratio to Diffrax, median over the interleaved steps
        for row in rows:
            st = state.get(row["label"])
            if st is not None and "step_ms" in row:
                row["ratio"] = statistics.median(a / d for a, d in zip(st[3], state[ref["label"]][3]))
    return dict(rows=rows, desc=desc, train_steps=opts.train_steps, defaults=resolved)


# ==================================================================== the parent


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def _steps_cell(r):
    if r.get("steps") is None:
        return "-"
    return f"{r['steps']} ({r['rejected']})" if r.get("rejected") is not None else str(r["steps"])


def report_steps(res, lines, csv_rows):
    rows = res["rows"]
    ks = sorted({r["K"] for r in rows})
    lines += [
        "## 1. Steps and gradient time against the number of outputs (float64)",
        "",
        f"f(t, y) = tanh(W y + b), 16 states, a batch of {BATCH1} trajectories as one "
        f"({BATCH1}, {DIM1}) state, rtol {RTOL1:g}, atol {ATOL1:g}, over [0, {T1:g}], "
        "`ts = linspace(0, 10, K)`; loss Σ ys²; gradient w.r.t. (W, b). `steps (rej.)`: accepted "
        "(rejected) steps (malijax `solve(...).stats`, Diffrax `num_accepted_steps` / "
        "`num_rejected_steps`; a `Reversible` step is one step of the coupled pair); `NFE`: "
        "malijax's forward evaluations of f; `grad ms`: median of "
        f"{res['rounds']} interleaved rounds after a warm-up, one sample per row per round, "
        "each the mean of as many back-to-back calls (1-20) as fill about 20 ms "
        "(`spread` = (max − min) / median of the samples); "
        "`× Diffrax`: median over rounds of the per-round ratio to Diffrax's gradient at the "
        "same K; `rel. diff`: max |g − g_ref| / max |g_ref| against `Direct` through the same "
        "solver and `land_on_outputs` setting (for Diffrax and jax.experimental.ode: against "
        "Tsit5 + Direct, whose steps differ, so it shows truncation error, not a bug); "
        "`err abs`: the outputs' max |y − y_ref| over all outputs against Diffrax Dopri8 at "
        "rtol = atol = 1e-12; `at t=10`: the same at the last output only (a step boundary in "
        "every mode, so the difference between the two is interpolation error); `err/tol`: max "
        "|y − y_ref| / (atol + rtol |y_ref|) over all outputs (large where a component of y_ref "
        "crosses zero).",
        "",
    ]
    warned = []
    for K in ks:
        lines += [
            f"### K = {K}",
            "",
            "| row | steps (rej.) | NFE | compile s | grad ms | spread | × Diffrax | rel. diff | "
            "err abs | err abs at t=10 | err/tol |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            if r["K"] != K:
                continue
            csv_rows.append(r)
            if "error" in r:
                lines.append(f"| {r['label']} | **failed**: {r['error']} |  |  |  |  |  |  |  |  |  |")
                continue
            if "warning" in r:
                warned.append(f"- K={K}, {r['label']}: {r['warning']}")
            reldiff = _fmt(r.get("rel"), ".1e")
            if r.get("rel_note", "").startswith("vs"):
                reldiff += " (own steps)"
            lines.append(
                f"| {r['label']} | {_steps_cell(r)} | {_fmt(r.get('nfe'), 'd')} | "
                f"{_fmt(r.get('compile_s'), '.2f')} | {_fmt(r.get('grad_ms'), '.2f')} | "
                f"{_fmt(100 * r['spread'] if 'spread' in r else None, '.0f')}% | "
                f"{_fmt(r.get('ratio'), '.2f')} | {reldiff} | {_fmt(r.get('err_abs'), '.1e')} | "
                f"{_fmt(r.get('err_end'), '.1e')} | {_fmt(r.get('err_tol'), '.3g')} |")
        lines.append("")
    lines += ["ReconstructionWarnings at the gradients' warm-up calls: "
              + ("none." if not warned else ""), ""] + warned + ([""] if warned else [])
    # steps over K, one line per row
    labels = list(dict.fromkeys(r["label"] for r in rows))
    lines += [
        "### Accepted steps against K",
        "",
        "| row | " + " | ".join(f"K={K}" for K in ks) + " |",
        "|---|" + "---|" * len(ks),
    ]
    for lab in labels:
        cells = []
        for K in ks:
            r = next((x for x in rows if x["label"] == lab and x["K"] == K), None)
            cells.append("failed" if r is None or "error" in r else _steps_cell(r))
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    lines += ["", "### Gradient ms against K (× Diffrax)", "",
              "| row | " + " | ".join(f"K={K}" for K in ks) + " |", "|---|" + "---|" * len(ks)]
    for lab in labels:
        cells = []
        for K in ks:
            r = next((x for x in rows if x["label"] == lab and x["K"] == K), None)
            if r is None or "error" in r or "grad_ms" not in r:
                cells.append("failed")
            else:
                cells.append(f"{r['grad_ms']:.2f} ({_fmt(r.get('ratio'), '.2f')}×)")
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    lines.append("")


def targets_steps(res):
    """[(target, value text, PASS/MISS/n.a.)] from part 1 at K=200 (or the largest K ≤ 200)."""
    rows = res["rows"]
    ks = sorted({r["K"] for r in rows})
    out = []
    if 200 not in ks or 2 not in ks:
        return [("(targets need K = 2 and K = 200 in the run)", "", "n.a.")]

    def get(label, K):
        r = next((x for x in rows if x["label"] == label and x["K"] == K), None)
        return None if r is None or "error" in r else r

    checks = [("malijax default: Reversible(Tsit5) + MALI", "default"), ("Tsit5 + ACA", "Tsit5 + ACA")]
    for lab, short in checks:
        a, b = get(lab, 200), get(lab, 2)
        if a is None or b is None or a.get("steps") is None:
            out.append((f"Steps, K=200 ≤ 1.2× K=2 ({short})", "row failed", "MISS"))
            continue
        q = a["steps"] / b["steps"]
        out.append((f"Steps, K=200 ≤ 1.2× K=2 ({short})", f"{a['steps']} / {b['steps']} = {q:.2f}×",
                    "PASS" if q <= 1.2 else "MISS"))
    dfx = get("Diffrax Tsit5 + RecursiveCheckpointAdjoint", 200)
    a = get("malijax default: Reversible(Tsit5) + MALI", 200)
    if dfx is None or a is None:
        out.append(("Steps, default at K=200 ≤ 1.5× Diffrax Tsit5", "row missing", "MISS"))
    else:
        q = a["steps"] / dfx["steps"]
        out.append(("Steps, default at K=200 ≤ 1.5× Diffrax Tsit5",
                    f"{a['steps']} / {dfx['steps']} = {q:.2f}×", "PASS" if q <= 1.5 else "MISS"))
    for lab, bound in (("Tsit5 + ACA", 0.8), ("malijax default: Reversible(Tsit5) + MALI", 1.0)):
        r = get(lab, 200)
        name = f"Gradient time, K=200: {lab} ≤ {bound}× Diffrax default"
        if r is None or r.get("ratio") is None:
            out.append((name, "row failed or no Diffrax", "MISS"))
        else:
            out.append((name, f"{r['grad_ms']:.2f} ms / {dfx['grad_ms']:.2f} ms → {r['ratio']:.2f}× "
                              "(median per-round ratio)", "PASS" if r["ratio"] <= bound else "MISS"))
    return out


def _recon_cell(r, n):
    if not r.get("recon_warned"):
        return "none"
    return f"{r['recon_warned']} of {n} steps (worst rel. error {r['recon_max']:.1e})"


def report_train(res, title, lines):
    lines += [
        f"## {title}",
        "",
        f"{res['desc']}. MLP field 2 → 64 → 64 → 2 (tanh), float32, rtol 1e-3, atol 1e-6, "
        f"optax Adam lr 1e-2, {res['train_steps']} steps from the same init, the rows stepped in "
        "lock-step. `ms / step`: median Adam step (forward + gradient + update) after the "
        "compile; `× Diffrax`: median over steps of the per-step ratio; `steps`: the solver's "
        "accepted steps (summed over trajectories under vmap) at the initial / final parameters; "
        "`final loss`: by the row's own solve; `tight`: the final parameters evaluated by "
        "Diffrax Tsit5 at rtol 1e-6, atol 1e-8; `ReconstructionWarning`: Adam steps whose "
        "gradient raised MALI's warning (inexact reconstruction), and the worst relative error "
        "it reported."
        + (f" `{DEFAULTS_ROW}`: no `solver`/`gradient` passed; here they resolved to "
           f"`{res['defaults']}`." if res.get("defaults") else ""),
        "",
        "| row | compile s | ms / step | spread | × Diffrax | steps init → final | initial loss | "
        "final loss | final loss (tight) | ReconstructionWarning |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        if "error" in r and "step_ms" not in r:
            lines.append(f"| {r['label']} | **failed**: {r['error']} |  |  |  |  |  |  |  |  |")
            continue
        lines.append(
            f"| {r['label']} | {_fmt(r.get('compile_s'), '.2f')} | {_fmt(r.get('step_ms'), '.2f')} | "
            f"{_fmt(100 * r['spread'] if 'spread' in r else None, '.0f')}% | {_fmt(r.get('ratio'), '.2f')} | "
            f"{r.get('init_steps', '-')} → {r.get('final_steps', '-')} | {_fmt(r.get('init_loss'), '.3e')} | "
            f"{_fmt(r.get('final_loss'), '.3e')} | {_fmt(r.get('final_loss_tight'), '.3e')} | "
            f"{_recon_cell(r, res['train_steps'])} |"
            + (f" error: {r['error']}" if "error" in r else ""))
    lines.append("")


def _git_rev():
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "malijax"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return rev + (" + uncommitted changes under malijax/" if dirty else "")
    except Exception:  # noqa: BLE001
        return "unknown"


def run_section(name, opts):
    cmd = [sys.executable, str(HERE), "--section", name, "--rounds", str(opts.rounds),
           "--train-steps", str(opts.train_steps), "--ks", ",".join(map(str, opts.ks))]
    if opts.rows:
        cmd += ["--rows", opts.rows]
    print(f"== section {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    result, code = _child.run(cmd, cwd=ROOT)
    dt = time.perf_counter() - t0
    if result is None:
        return dict(error=f"section subprocess exited with {code} and no result"), dt
    return result, dt


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="K in {2, 200}, 7 rounds, 30 Adam steps")
    parser.add_argument("--section", choices=["steps", "spirals", "latent"], help=argparse.SUPPRESS)
    parser.add_argument("--only", default="steps,spirals,latent",
                        help="comma-separated sections to run (default: all three)")
    parser.add_argument("--ks", default=None, help="comma-separated numbers of outputs K")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (part 1)")
    parser.add_argument("--train-steps", type=int, default=None, help="Adam steps (part 2)")
    parser.add_argument("--rows", default=None,
                        help="training rows (part 2) to run, comma-separated: an exact label or "
                             "substrings of labels, case-insensitive (default: all; the Diffrax "
                             "row always runs). Labels: " + "; ".join(TRAIN_ROWS))
    parser.add_argument("--out", default=None, help="Markdown output path")
    opts = parser.parse_args()
    opts.ks = [int(k) for k in opts.ks.split(",")] if opts.ks else ([2, 200] if opts.quick else [2, 20, 200, 1000])
    opts.rounds = opts.rounds or (7 if opts.quick else 25)
    opts.train_steps = opts.train_steps or (30 if opts.quick else 200)

    if opts.section is not None:  # a worker
        fn = {"steps": section_steps,
              "spirals": lambda o: section_train(o, "spirals"),
              "latent": lambda o: section_train(o, "latent")}[opts.section]
        _child.report(fn(opts))
        return

    import jax
    import jaxlib

    try:
        import diffrax
        dver = diffrax.__version__
    except ImportError:  # pragma: no cover
        dver = "not installed"
    t_start = time.perf_counter()
    load0 = "{:.2f} / {:.2f} / {:.2f}".format(*os.getloadavg())
    sections = [s for s in ("steps", "spirals", "latent") if s in opts.only.split(",")]
    results = {}
    for s in sections:
        results[s], dt = run_section(s, opts)
        results[s]["seconds"] = dt
    load1 = "{:.2f} / {:.2f} / {:.2f}".format(*os.getloadavg())
    minutes = (time.perf_counter() - t_start) / 60
    command = "python benchmarks/dense_output.py" + ("" if len(sys.argv) == 1 else " " + " ".join(sys.argv[1:]))

    lines = [
        "# Dense output: steps, gradient time and training against the number of outputs",
        "",
        f"Produced by `{command}` on {datetime.datetime.now():%Y-%m-%d %H:%M}, in {minutes:.1f} min.",
        "",
        "## Machine",
        "",
        f"- {os.cpu_count()} CPU cores ({platform.machine()}, {platform.platform()}), no GPU; "
        f"python {platform.python_version()}",
        f"- jax / jaxlib {jax.__version__} / {jaxlib.__version__}, backend {jax.default_backend()}; "
        f"diffrax {dver}",
        f"- malijax git {_git_rev()}",
        f"- load average (1 / 5 / 15 min) at start: {load0}; at end: {load1}",
        "",
    ]
    target_lines = []
    if "steps" in results and "rows" in results["steps"]:
        tg = targets_steps(results["steps"])
        target_lines = ["## Targets", "",
                        "Computed from this run's numbers (part 1, K = 200); nothing was tuned to meet them.", "",
                        "| target | value | verdict |", "|---|---|---|"]
        target_lines += [f"| {a} | {b} | **{c}** |" for a, b, c in tg]
        target_lines.append("")
        print("\nTargets:")
        for a, b, c in tg:
            print(f"  {c}: {a}: {b}")
    lines += target_lines
    csv_rows = []
    for s in sections:
        res = results[s]
        if "rows" not in res:
            lines += [f"## {s}: **failed** — {res.get('error')}", ""]
            continue
        if s == "steps":
            report_steps(res, lines, csv_rows)
        elif s == "spirals":
            report_train(res, "2a. Training: 64 spirals as one batched state (README-style)", lines)
        else:
            report_train(res, "2b. Training: latent-ODE-style, per-trajectory irregular times under vmap",
                         lines)
        lines.append(f"(section `{s}`: {res['seconds'] / 60:.1f} min in its own process)")
        lines.append("")
    out = pathlib.Path(opts.out) if opts.out else RESULTS / ("dense_output_quick.md" if opts.quick else "dense_output.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    if csv_rows:
        import csv

        keys = ["K", "label", "lib", "steps", "rejected", "nfe", "compile_s", "grad_ms", "spread",
                "ratio", "rel", "rel_note", "err_abs", "err_end", "err_tol", "warning", "error"]
        with open(out.with_suffix(".csv"), "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
            w.writeheader()
            w.writerows(csv_rows)
        print(f"wrote {out.with_suffix('.csv')}")


if __name__ == "__main__":
    main()
