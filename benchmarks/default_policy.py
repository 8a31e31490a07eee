"""Which default solver at which tolerance: Tsit5 against Bosh3 across rtol.

benchmarks/defaults.py chooses the default at the default tolerances (rtol 1e-3,
atol 1e-6). There `Tsit5()` is the fastest candidate but misses the accuracy rule (within
100 tolerances of DOP853 at every output) on Van der Pol, and `Bosh3()` meets it. A
third-order method is the textbook choice at crude tolerances and a poor one at tight
tolerances, where its steps grow as tol^(-1/3) against Tsit5's tol^(-1/5). This script
measures where the two cross, to set the default solver's rule by rtol.

Problems: the five ODE rows of benchmarks/defaults.py (and tests/test_defaults.py) plus
Van der Pol over a family (μ in 0.5, 1, 2; T in 10, 20; 5 or 11 outputs), twelve in all;
for each rtol in `RTOLS` (atol = rtol / 1000, as the defaults), each solver's evaluations of
f (accepted + rejected steps, `mj.solve(...).stats`) and max scaled error
max|y - y_ref| / (atol + rtol |y_ref|) over the outputs against scipy's DOP853 at
rtol = atol = 1e-13. Float64; counts of f are load-independent, so there are no timings.

    .venv/bin/python benchmarks/default_policy.py   # 4 min; writes results/default_policy.md
"""

import datetime
import pathlib
import sys

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import defaults  # noqa: E402  (its problem table and scipy reference)

import malijax as mj  # noqa: E402

RTOLS = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 1e-6, 1e-8)
SOLVERS = {"Tsit5": mj.Tsit5(), "Bosh3": mj.Bosh3()}
OUT = pathlib.Path(__file__).parent / "results" / "default_policy.md"


def problems():
    for name, (_, field, y0, args, T) in defaults.PROBLEMS.items():
        yield name, field, y0, args, T, 5
    for mu in (0.5, 1.0, 2.0):
        for T in (10.0, 20.0):
            for n in (5, 11):
                if (mu, T, n) != (1.0, 10.0, 5):  # that one is the row above
                    name = f"vdp μ={mu:g} T={T:g} n={n}"
                    yield name, defaults._vdp, [2.0, 0.0], (np.array(mu),), T, n


def main():
    rows = []
    for name, field, y0, args, T, n in problems():
        ts = np.linspace(0.0, T, n)
        ref = defaults._reference(field, y0, args, ts)
        f = defaults._jnp_field(field)
        for rtol in RTOLS:
            for sname, solver in SOLVERS.items():
                sol = mj.solve(f, jnp.asarray(y0, float), jnp.asarray(ts),
                               jax.tree.map(jnp.asarray, args), solver=solver,
                               gradient=mj.Direct(), rtol=rtol, atol=rtol * 1e-3,
                               max_steps=100_000, throw=False)
                ok = sol.result == mj.RESULTS.successful
                scale = rtol * 1e-3 + rtol * np.abs(ref)
                err = np.max(np.abs(np.asarray(sol.ys) - ref) / scale) if ok else np.inf
                nfe = int(sol.stats["num_fevals"])
                rows.append(dict(problem=name, rtol=rtol, solver=sname, err=float(err), nfe=nfe,
                                 rejected=int(sol.stats["num_rejected"])))
        print(f"  {name}", flush=True)

    lines = ["# Default solver by tolerance: Tsit5 against Bosh3", "",
             "Produced by `.venv/bin/python benchmarks/default_policy.py` on "
             f"{datetime.date.today()}, jax {jax.__version__}, float64. Problems: the five ODE "
             "rows of benchmarks/defaults.py and eleven more Van der Pol cases (μ 0.5/1/2, "
             "T 10/20, 5 or 11 outputs); atol = rtol / 1000; error: max over outputs of "
             "|y − y_ref| / (atol + rtol|y_ref|) against DOP853 at 1e-13; NFE: evaluations of f "
             "in the forward solve.", "",
             "| rtol | solver | total NFE | NFE ratio to Tsit5 | geo-mean error | worst error "
             "| problems over 100 |",
             "|---|---|---|---|---|---|---|"]
    for rtol in RTOLS:
        nfe_t = sum(r["nfe"] for r in rows if r["rtol"] == rtol and r["solver"] == "Tsit5")
        for sname in SOLVERS:
            sel = [r for r in rows if r["rtol"] == rtol and r["solver"] == sname]
            errs = np.array([r["err"] for r in sel])
            over = [r["problem"] for r in sel if r["err"] > 100]
            nfe = sum(r["nfe"] for r in sel)
            geo = float(np.exp(np.mean(np.log(np.maximum(errs, 1e-300)))))
            listed = ": " + ", ".join(over) if over else ""
            lines.append(f"| {rtol:g} | {sname} | {nfe} | {nfe / nfe_t:.2f} | {geo:.3g} | "
                         f"{errs.max():.3g} | {len(over)}/{len(sel)}{listed} |")
    text = "\n".join(lines) + "\n"
    OUT.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
