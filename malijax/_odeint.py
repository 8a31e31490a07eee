"""`odeint` and `solve`: validate at trace time, then run a gradient strategy."""

import numbers

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from ._batching import innermost_is_vmap
from ._controller import ConstantStepSize, PIController
from ._errors import error_if_failed, stall_hint
from ._gradient import ACA, MALI, AbstractGradient
from ._loop import Config, Problem
from ._misc import time_dtype
from ._solution import Solution
from ._solver import AbstractReversibleSolver, AbstractSolver, Reversible, Tsit5


def default_solver():
    """`Reversible(Tsit5())`, chosen by measurement (benchmarks/results/defaults.md): of
    six candidates on dissipative, oscillatory and CNF problems at the default
    tolerances, the most accurate of those that solved every one within 100 tolerances
    with exact MALI gradients and memory independent of `max_steps` (worst 7.7
    tolerances); `ALF()` stalled on five of them."""
    return Reversible(Tsit5())


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
        if t.size > 1 and not (np.all(d > 0) or np.all(d < 0) or np.all(d == 0)):
            raise ValueError(
                "`ts` must be strictly increasing or strictly decreasing "
                f"(got {t.tolist() if t.size <= 10 else t})."
            )
        if not np.all(np.isfinite(t)):
            raise ValueError("`ts` must be finite.")
    # y0
    leaves = jtu.tree_leaves(y0)
    if not leaves:
        raise ValueError("`y0` must contain at least one array.")
    for path, leaf in jtu.tree_leaves_with_path(y0):
        if isinstance(leaf, float):
            continue  # a Python float becomes a default-precision array
        if not hasattr(leaf, "dtype") or not jnp.issubdtype(leaf.dtype, jnp.floating):
            dt = getattr(leaf, "dtype", type(leaf).__name__)
            raise TypeError(
                f"`y0{jtu.keystr(path)}` must be a floating-point array, got {dt}; "
                "convert it, e.g. with jnp.asarray(y0, dtype=float)."
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


def _check_func(func, y0, t0, args):
    try:
        out = jax.eval_shape(func, t0, y0, args)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise TypeError(f"Calling `func(t, y, args)` at (ts[0], y0) failed: {e}") from e
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


@eqx.filter_jit
def _solve(problem, config, gradient):
    out = gradient.apply(problem, config)
    ys = out.ys
    if config.throw:
        ys = error_if_failed(
            ys,
            out.result,
            out.stats["t_final"],
            out.stats["num_steps"],
            out.stats["num_rejected"],
            out.t_target,
            config.max_steps,
            stall_hint(config.solver),
        )
    return Solution(ts=problem.ts, ys=ys, result=out.result, stats=out.stats)


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
):
    """Solve `dy/dt = func(t, y, args)` from `y(ts[0]) = y0`; returns a `Solution`.

    Takes the same arguments as [`malijax.odeint`][], which documents them.
    """
    return run(
        func, y0, ts, args, solver=solver, gradient=gradient, rtol=rtol, atol=atol,
        step_size=step_size, num_steps=num_steps, max_steps=max_steps, throw=throw,
    )


def run(func, y0, ts, args, *, solver, gradient, rtol, atol, step_size, num_steps, max_steps,
        throw, max_step=float("inf")):
    """`solve`, plus controller options kept out of the public signature (`max_step`:
    the largest adaptive step, used by `malijax.compat.odeint`'s `hmax`)."""
    if solver is None:
        solver = default_solver()
    ts, adaptive = _validate(
        func, y0, ts, args, solver, gradient, rtol, atol, step_size, num_steps, max_steps
    )
    y0 = jtu.tree_map(
        lambda x: jnp.asarray(x, jnp.result_type(float)) if isinstance(x, float) else jnp.asarray(x),
        y0,
    )
    ts = jnp.asarray(ts)
    ts = ts.astype(time_dtype(ts.dtype, y0))
    _check_func(func, y0, ts[0], args)
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
    )
    gradient.check(solver, config)
    return _solve(Problem(func, y0, ts, args), config, gradient)


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
):
    r"""Integrate `dy/dt = func(t, y, args)` and return `y` at every time in `ts`.

    **Arguments:**

    - `func`: the vector field, called as `func(t, y, args)`; returns a pytree like `y`
      (same structure, shapes and dtypes). It may be an `eqx.Module`: its array
      leaves then receive gradients, as do arrays it closes over.
    - `y0`: the initial state at `ts[0]`, any pytree of floating arrays.
    - `ts`: 1-D, strictly increasing or strictly decreasing output times (all equal is
      allowed: the identity). Every output time is hit exactly by clipping a step to
      it; there is no interpolation.
    - `args`: passed to `func`; its array leaves receive gradients.
    - `solver`: `Reversible(Tsit5())` (default: stable on dissipative problems, exact
      MALI gradients; see `benchmarks/results/defaults.md`), `Reversible(rk_solver)`,
      `ALF()`, `ReversibleHeun()`, `Euler()`, `Midpoint()`, `Heun()`, `RK4()`,
      `Bosh3()`, `Dopri5()`, `Tsit5()`.
    - `gradient`: the gradient strategy, e.g. `Direct()` (default: `MALI()` for
      reversible solvers, with automatic checkpoints; `ACA()` otherwise).
    - `rtol`, `atol`: tolerances for adaptive steps (used when neither `step_size` nor
      `num_steps` is given). The error norm is the RMS over every element of the state.
    - `step_size`: fixed steps of this size; the last step before each output time is
      clipped to land on it.
    - `num_steps`: a static int; every output interval is split into this many equal
      steps, run as a `lax.scan` (the cheapest, most predictable grid).
    - `max_steps`: a static bound on accepted plus rejected steps of the while loop
      (adaptive and `step_size` solves). It sizes the buffers strategies record into.
    - `throw`: if `True` (default) a failed solve raises an error that says what
      happened, where and what to try; if `False` it never raises: inspect
      `solve(...).result`. Unreached outputs are NaN. Under `vmap` one failing element
      is reported; on a batch sharded over devices (`jit` with a `NamedSharding`) every
      device raises together. Inside `shard_map`, where devices could disagree about
      failing, pass `throw=False` and check `result` instead.

    **Returns:** a pytree like `y0` whose leaves have a leading axis of `len(ts)`;
    `ys[0]` is `y0`.

    **Raises:** `TypeError`/`ValueError` at trace time for misuse; at run time (with
    `throw=True`) an error for `max_steps` reached, a non-finite state, step size
    underflow, or non-monotone `ts`.
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
    ).ys
