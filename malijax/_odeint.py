"""`odeint` and `solve`: validate at trace time, then run a gradient strategy."""

import numbers

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from ._batching import innermost_is_vmap
from ._controller import ConstantStepSize, PIController
from ._errors import Report, call_site, error_if_failed, solve_errors_raised_plainly, stall_hint
from ._gradient import ACA, MALI, AbstractGradient
from ._loop import Config, Problem
from ._misc import time_dtype
from ._solution import Solution
from ._transforms import forward_mode_innermost, reverse_levels
from ._solver import AbstractReversibleSolver, AbstractSolver, Bosh3, Tsit5


# At and above this rtol the default solver is Bosh3, below it Tsit5
# (benchmarks/results/default_policy.md).
CRUDE_RTOL = 1e-4


def default_solver(rtol=None, adaptive=True):
    """The solver `odeint` uses when none is given, with `ACA()` (memory set by its slots,
    not by `max_steps`). Chosen by measurement:

    - adaptive steps at `rtol >= 1e-4` (the default 1e-3 included): `Bosh3()`. Of the
      candidates in benchmarks/results/defaults.md it is the fastest per Adam step in
      the training loops that also solves every problem there within 100 tolerances;
      `Tsit5()` is faster but is 173 tolerances off on Van der Pol, and on 4 to 9 of
      16 problems at rtol 1e-4 to 1e-2 (benchmarks/results/default_policy.md), where
      Bosh3 costs 0.7 to 1.7x Tsit5's evaluations;
    - tighter `rtol`, fixed steps (`step_size`, `num_steps`), or an `rtol` given as a
      JAX array (its value may be unknown when tracing; deciding on Python and NumPy
      numbers only keeps `jit` and eager calls alike): `Tsit5()`, whose fifth order
      costs 2 to 6.6x fewer evaluations than Bosh3 at tight tolerances.
    """
    static = isinstance(rtol, (numbers.Real, np.number)) or (
        isinstance(rtol, np.ndarray) and rtol.ndim == 0)
    if adaptive and static and float(rtol) >= CRUDE_RTOL:
        return Bosh3()
    return Tsit5()


def _default_gradient(solver):
    """MALI for reversible solvers (`ALF`, `ReversibleHeun`, `Reversible`: memory set by
    the stored states, not the steps), ACA otherwise (DESIGN.md §1)."""
    return MALI() if isinstance(solver, AbstractReversibleSolver) else ACA()


def _is_concrete(x):
    return not isinstance(x, jax.core.Tracer)


def _check_positive(name, value):
    if isinstance(value, numbers.Number) or (_is_concrete(value) and np.ndim(value) == 0):
        if not float(value) > 0:
            raise ValueError(f"`{name}` must be > 0, got {value}.")


def _validate(func, y0, ts, args, solver, gradient, rtol, atol, step_size, num_steps, max_steps):
    if not isinstance(solver, AbstractSolver):
        raise TypeError(
            f"`solver` must be a malijax solver such as mj.ALF() or mj.Dopri5(), got {solver!r}."
        )
    if gradient is not None and not isinstance(gradient, AbstractGradient):
        raise TypeError(
            f"`gradient` must be a malijax gradient strategy such as mj.Direct(), got {gradient!r}."
        )
    # ts
    if not hasattr(ts, "dtype"):
        ts = np.asarray(ts)
    if not jnp.issubdtype(ts.dtype, jnp.floating):
        raise TypeError(
            f"`ts` must have a floating dtype, got {ts.dtype}; pass e.g. "
            "jnp.array([0.0, 1.0]) rather than integers."
        )
    if np.ndim(ts) != 1 or np.shape(ts)[0] < 1:
        raise ValueError(f"`ts` must be 1-D with at least one time, got shape {np.shape(ts)}.")
    if _is_concrete(ts):
        t = np.asarray(ts)
        d = np.diff(t)
        if t.size > 1 and not (np.all(d >= 0) or np.all(d <= 0)):
            raise ValueError(
                "`ts` must be nondecreasing or nonincreasing (repeated times are "
                f"zero-length intervals; got {t.tolist() if t.size <= 10 else t})."
            )
        if not np.all(np.isfinite(t)):
            raise ValueError("`ts` must be finite.")
    # y0
    leaves = jtu.tree_leaves(y0)
    if not leaves:
        raise ValueError("`y0` must contain at least one array.")
    for path, leaf in jtu.tree_leaves_with_path(y0):
        if isinstance(leaf, (float, complex)):
            continue  # a Python float or complex becomes a default-precision array
        if not hasattr(leaf, "dtype") or not jnp.issubdtype(leaf.dtype, jnp.inexact):
            dt = getattr(leaf, "dtype", type(leaf).__name__)
            raise TypeError(
                f"`y0{jtu.keystr(path)}` must be a floating-point or complex array, got "
                f"{dt}; convert it, e.g. with jnp.asarray(y0, dtype=float)."
            )
    # grid keywords
    if step_size is not None and num_steps is not None:
        raise ValueError("Pass at most one of `step_size` and `num_steps`, not both.")
    if num_steps is not None:
        if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral):
            raise TypeError(f"`num_steps` must be a Python int (static), got {num_steps!r}.")
        if num_steps < 1:
            raise ValueError(f"`num_steps` must be >= 1, got {num_steps}.")
    if step_size is not None:
        _check_positive("step_size", step_size)
    if isinstance(max_steps, bool) or not isinstance(max_steps, numbers.Integral) or max_steps < 1:
        raise ValueError(f"`max_steps` must be a positive Python int, got {max_steps!r}.")
    adaptive = step_size is None and num_steps is None
    if adaptive:
        _check_positive("rtol", rtol)
        _check_positive("atol", atol)
        if solver.error_order is None:
            raise ValueError(
                f"{type(solver).__name__} has no embedded error estimate, so it cannot "
                "choose its own steps: pass `step_size=` or `num_steps=` for fixed steps, "
                "or use an adaptive solver (Dopri5, Tsit5, Bosh3, Heun, Midpoint, ALF, "
                "ReversibleHeun)."
            )
    return ts, adaptive


def _trace_func(func, y0, t0, args):
    """Trace `func(t0, y0, args)` once: check what it returns against `y0`, and return
    the arrays it holds or closes over (for `reverse_levels`). An exception raised by
    `func` keeps its type, with a note saying where malijax called it."""
    try:
        converted = eqx.filter_closure_convert(func, t0, y0, args)
        out = converted.out_struct  # (traced here if func closes over nothing)
    except Exception as e:
        e.add_note("(malijax: raised by `func(t, y, args)`, called at (ts[0], y0) to check "
                   "what it returns.)")
        raise
    y_struct, out_struct = jtu.tree_structure(y0), jtu.tree_structure(out)
    if y_struct != out_struct:
        raise ValueError(
            "`func(t, y, args)` must return a pytree with the same structure as `y`; "
            f"y is {y_struct} but func returned {out_struct}."
        )
    for (path, y), o in zip(jtu.tree_leaves_with_path(y0), jtu.tree_leaves(out)):
        if tuple(o.shape) != tuple(np.shape(y)):
            raise ValueError(
                f"`func` returned shape {tuple(o.shape)} for y{jtu.keystr(path)}, which "
                f"has shape {tuple(np.shape(y))}."
            )
        if o.dtype != y.dtype:
            raise TypeError(
                f"`func` returned dtype {o.dtype} for y{jtu.keystr(path)}, which has "
                f"dtype {y.dtype}; the derivative must keep the state's dtype."
            )
    return (func, getattr(converted, "consts", ()))  # no closure: nothing closed over


@eqx.filter_jit
def _solve(problem, config, gradient):
    out = gradient.apply(problem, config)
    ys = out.ys
    if config.throw:
        report = Report(config.max_steps, hint=stall_hint(config.solver), limit=config.limit)
        ys = error_if_failed(
            ys,
            out.result,
            out.stats["t_final"],
            out.stats["num_steps"],
            out.stats["num_rejected"],
            out.t_target,
            report,
        )
    return Solution(ts=problem.ts, ys=ys, result=out.result, stats=out.stats,
                    interpolation=out.dense)


def solve(
    func,
    y0,
    ts,
    args=None,
    *,
    solver=None,
    gradient=None,
    rtol=1e-3,
    atol=1e-6,
    step_size=None,
    num_steps=None,
    max_steps=4096,
    throw=True,
    land_on_outputs=False,
    dense=False,
):
    """Solve `dy/dt = func(t, y, args)` from `y(ts[0]) = y0`; returns a `Solution`.

    Takes the same arguments as [`malijax.odeint`][], which documents them, and
    `dense`: if `True`, the `Solution` keeps every accepted step's continuous extension,
    and `sol.evaluate(t)` / `sol.derivative(t)` work anywhere in `[ts[0], ts[-1]]` (Diffrax's
    `SaveAt(dense=True)`), with gradients through them for every strategy but the
    `Adjoint`. Memory: `(P + 1)` states per step, `P` the interpolant's degree (5 for
    Tsit5), in buffers sized by `max_steps` under adaptive stepping (by the grid's
    steps on a `num_steps` grid).
    """
    return run(
        func, y0, ts, args, solver=solver, gradient=gradient, rtol=rtol, atol=atol,
        step_size=step_size, num_steps=num_steps, max_steps=max_steps, throw=throw,
        land_on_outputs=land_on_outputs, dense=dense,
    )


def run(func, y0, ts, args, *, solver, gradient, rtol, atol, step_size, num_steps, max_steps,
        throw, land_on_outputs=False, dense=False, max_step=float("inf"), limit=None):
    """`solve`, plus options kept out of the public signature, used by
    `malijax.compat.odeint`: `max_step` (the largest adaptive step, its `hmax`) and
    `limit` (how messages name the step bound, `Config.limit`)."""
    if solver is None:
        solver = default_solver(rtol, adaptive=step_size is None and num_steps is None)
    ts, adaptive = _validate(
        func, y0, ts, args, solver, gradient, rtol, atol, step_size, num_steps, max_steps
    )
    y0 = jtu.tree_map(
        lambda x: jnp.asarray(x, jnp.result_type(type(x))) if isinstance(x, (float, complex))
        else jnp.asarray(x),
        y0,
    )
    ts = jnp.asarray(ts)
    ts = ts.astype(time_dtype(ts.dtype, y0))
    func_arrays = _trace_func(func, y0, ts[0], args)
    if gradient is None:
        gradient = _default_gradient(solver)
    if num_steps is not None:
        controller = None
    elif step_size is not None:
        controller = ConstantStepSize(step_size)
    else:
        controller = PIController(rtol=rtol, atol=atol, max_step=max_step)
    config = Config(
        solver=solver,
        controller=controller,
        num_steps=num_steps,
        max_steps=max_steps,
        throw=throw,
        sum_over_batch=innermost_is_vmap(),
        reverse_levels=reverse_levels((y0, ts, args, func_arrays)),
        limit=limit,
        call_site=call_site() if gradient.reconstructs else None,
        land_on_outputs=bool(land_on_outputs),
        dense=bool(dense),
    )
    if dense and ts.shape[0] < 2:
        raise ValueError("`dense=True` needs at least two output times (an interval).")
    gradient.check(solver, config)
    if forward_mode_innermost((y0, ts, args, func_arrays)) and not gradient.supports_forward_mode(config):
        name = type(gradient).__name__
        raise TypeError(
            f"can't apply forward-mode autodiff (jvp) to {name}: its gradient is a custom "
            "VJP, for reverse mode only. For jax.jvp/jax.jacfwd pass "
            "gradient=mj.ForwardMode() (or mj.Direct()); jax.hessian (forward over "
            f"reverse) works with {name}."
        )
    with solve_errors_raised_plainly():
        solution = _solve(Problem(func, y0, ts, args), config, gradient)
        if not any(isinstance(x, jax.core.Tracer) for x in jtu.tree_leaves(solution)):
            jax.block_until_ready(solution)  # eager: a failure surfaces here, as SolveError
    return solution


def odeint(
    func,
    y0,
    ts,
    args=None,
    *,
    solver=None,
    gradient=None,
    rtol=1e-3,
    atol=1e-6,
    step_size=None,
    num_steps=None,
    max_steps=4096,
    throw=True,
    land_on_outputs=False,
):
    r"""Integrate `dy/dt = func(t, y, args)` and return `y` at every time in `ts`.

    **Arguments:**

    - `func`: the vector field, called as `func(t, y, args)`; returns a pytree like `y`
      (same structure, shapes and dtypes). It may be an `eqx.Module`: its array
      leaves then receive gradients, as do arrays it closes over.
    - `y0`: the initial state at `ts[0]`, any pytree of floating or complex arrays
      (complex states: error norms use `|·|`; `ts` stay real).
    - `ts`: 1-D, nondecreasing or nonincreasing output times. A repeated time is a
      zero-length interval (its output repeats the previous one; all equal is the
      identity), as in padded sequences. Output times do not dictate steps: adaptive
      and `step_size` solves choose steps by the tolerance (or `step_size`) alone,
      clipping only the last onto `ts[-1]`, and an output inside a step comes from the
      solver's continuous extension (its order is in each solver's docstring), with
      exact gradients through it, `ts` included. `num_steps` grids land on every
      output.
    - `args`: passed to `func`; its array leaves receive gradients.
    - `solver`: `Bosh3()`, `Tsit5()`, `Dopri5()`, `Euler()`, `Midpoint()`, `Heun()`,
      `RK4()`, `Reversible(rk_solver)`, `ALF()`, `ReversibleHeun()`. Default: `Bosh3()`
      for adaptive steps at `rtol >= 1e-4` (the default tolerances included), `Tsit5()`
      otherwise, chosen by measurement (`benchmarks/results/defaults.md`,
      `default_policy.md`; `malijax._odeint.default_solver`). For the fewest steps on
      smooth neural fields at loose tolerances pass `Tsit5()`; for memory independent of
      the steps at any state size, `Reversible(Tsit5())` (with `MALI()`).
    - `gradient`: the gradient strategy, e.g. `Direct()` (default: `MALI()` for
      reversible solvers, with automatic checkpoints; `ACA()` otherwise;
      `ForwardMode()` for `jax.jvp`/`jax.jacfwd`, which the custom-VJP strategies
      refuse). All of them support `grad`, `vmap`, `jit`, `jax.hessian` and
      `grad(grad(...))` (README: "Gradients").
    - `rtol`, `atol`: tolerances for adaptive steps (used when neither `step_size` nor
      `num_steps` is given). The error norm is the RMS over every element of the state.
    - `step_size`: fixed steps of this size; the last is clipped onto `ts[-1]` (with
      `land_on_outputs=True`, the last before each output time onto it).
    - `num_steps`: a static int; every output interval is split into this many equal
      steps, run as a `lax.scan` (the cheapest, most predictable grid).
    - `max_steps`: a static bound on accepted plus rejected steps of the while loop
      (adaptive and `step_size` solves). It sizes no per-step record of a gradient
      strategy (those are a fixed number of slots, `malijax._records`), only
      `solve(..., dense=True)`'s interpolants.
    - `land_on_outputs`: if `True`, clip a step onto every output time instead of
      interpolating (outputs on step boundaries; more steps when outputs are dense).
    - `throw`: if `True` (default) a failed solve raises an error that says what
      happened, where and what to try; if `False` it never raises: inspect
      `solve(...).result`. Unreached outputs are NaN. Under `vmap` one failing element
      is reported; on a batch sharded over devices (`jit` with a `NamedSharding`) every
      device raises together. Inside `shard_map`, where devices could disagree about
      failing, pass `throw=False` and check `result` instead.

    **Returns:** a pytree like `y0` whose leaves have a leading axis of `len(ts)`;
    `ys[0]` is `y0`.

    **Raises:** `TypeError`/`ValueError` at trace time for misuse (and for per-step
    buffers sized by `max_steps` that cannot fit in device memory); at run time (with
    `throw=True`) `mj.SolveError` for `max_steps` reached, a non-finite state, step
    size underflow, non-monotone `ts`, or a traced `rtol`/`atol`/`step_size` ≤ 0 (under
    `jit` it arrives as `jax.errors.JaxRuntimeError` ending with its message). An
    exception raised by `func` propagates with its own type.
    """
    return solve(
        func,
        y0,
        ts,
        args,
        solver=solver,
        gradient=gradient,
        rtol=rtol,
        atol=atol,
        step_size=step_size,
        num_steps=num_steps,
        max_steps=max_steps,
        throw=throw,
        land_on_outputs=land_on_outputs,
    ).ys
