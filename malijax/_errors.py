"""Run-time errors with the time and step at which a solve failed.

`equinox.error_if` only carries static messages; ours say *where* it happened, so the
message is formatted inside the callback from run-time values.
"""

import functools as ft
import warnings

import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import numpy as np

from ._solution import RESULTS


class SolveError(RuntimeError):
    """Raised (through XLA, so it may arrive wrapped in `JaxRuntimeError`) when a solve
    fails with `throw=True`."""


class ReconstructionWarning(RuntimeWarning):
    """Warned when `MALI`'s algebraic inverse rebuilt the initial state inaccurately: the
    gradient just computed is then inaccurate too, typically by more (turn it into an
    error with `warnings.simplefilter("error", mj.ReconstructionWarning)`)."""


# Why undamped reversible solvers fail on dissipative problems (both messages say it).
WEAK_INSTABILITY = (
    "on a dissipative problem an undamped reversible solver's second, parasitic mode grows "
    "like exp(|λ|t) whatever the step"
)
WEAK_INSTABILITY_CURES = (
    "Cures: a damped reversible solver (mj.Reversible(mj.Tsit5()) with its default "
    "coupling < 1, or ALF(eta=0.9)), whose MALI gradients stay exact with "
    "MALI(checkpoints=None); or a non-reversible solver (mj.Tsit5()) with gradient=mj.ACA()."
)


def stall_hint(solver):
    """A sentence for stall messages of undamped reversible solvers, which stall on
    dissipative problems for a reason other than stiffness."""
    if getattr(solver, "inverse_amplification", None) == 1:
        return (
            f" {type(solver).__name__} is undamped and only weakly stable: {WEAK_INSTABILITY},"
            " and the controller shrinks the step trying to contain it; that, rather than "
            f"stiffness, is the likely cause. {WEAK_INSTABILITY_CURES}"
        )
    return ""


def _message(code, t, n_steps, n_rejected, t_target, max_steps, hint=""):
    where = f"at t={t:.9g} after {n_steps} accepted and {n_rejected} rejected steps"
    if code == RESULTS.max_steps_reached._value:
        return (
            f"malijax: max_steps={max_steps} reached {where}, before the output time "
            f"t={t_target:.9g}."
            + (hint or " Increase `max_steps`, loosen `rtol`/`atol`, or check whether the "
               "problem is stiff (explicit solvers then need tiny steps).")
        )
    if code == RESULTS.parasitic_instability._value:
        return (
            f"malijax: the reversible solver's parasitic component outgrew the solution "
            f"{where} (weak instability: {WEAK_INSTABILITY}, so the answer would be wrong). "
            f"{WEAK_INSTABILITY_CURES}"
        )
    if code == RESULTS.nonfinite_state._value:
        return (
            f"malijax: the state became non-finite (NaN or inf) {where}. `func` "
            "returned NaN/inf there, or the solution blows up (finite-time "
            "singularity, or an unstable step size). Check `func` and `y0`, or use "
            "smaller steps."
        )
    if code == RESULTS.step_size_underflow._value:
        return (
            f"malijax: the adaptive step size underflowed {where}: no step small "
            "enough met the tolerances."
            + (hint or " The problem may be stiff or singular near this time; loosen "
               "`rtol`/`atol` or check `func`.")
        )
    if code == RESULTS.ts_not_monotone._value:
        return "malijax: `ts` must be strictly increasing or strictly decreasing."
    return f"malijax: the solve failed with result code {code} {where}."


def _raise_if_failed(code, t, n_steps, n_rejected, t_target, *, max_steps, hint):
    code = int(np.asarray(code))
    if code != RESULTS.successful._value:
        values = (float(np.asarray(t)), int(np.asarray(n_steps)), int(np.asarray(n_rejected)),
                  float(np.asarray(t_target)))
        raise SolveError(_message(code, *values, max_steps, hint))


def error_if_failed(x, result, t, n_steps, n_rejected, t_target, max_steps, hint=""):
    """Returns `x`, raising `SolveError` at run time if `result` is not successful.

    How, and why this way:

    - Under `vmap` the diagnostics are first reduced over the batch (equinox's
      `unvmap_max`): the failure with the largest result code and, among those, the
      one with the most accepted steps is reported. The reductions make the `lax.cond`
      predicate unbatched, so the check costs nothing unless something failed.
    - The host callback is a `jax.debug.callback` (an effect, never removed as dead
      code) with `partitioned=True`: on a batch sharded over devices every device runs
      it on the same, already reduced, diagnostics and every device raises together.
      A callback on one device only (`pure_callback`) raises there while the others
      wait forever in the program's next collective.
    - `x` passes through untouched, so it keeps its sharding.
    """
    code = result._value
    t, t_target = jax.lax.stop_gradient((t, t_target))  # diagnostics only
    failed = code != RESULTS.successful._value
    worst = eqxi.unvmap_max(jnp.where(failed, code, 0))
    chosen = failed & (code == worst)
    steps = eqxi.unvmap_max(jnp.where(chosen, n_steps, -1))
    chosen = chosen & (n_steps == steps)

    def pick(a, fill):
        a = jnp.asarray(a)
        return eqxi.unvmap_max(jnp.where(chosen, a, jnp.asarray(fill, a.dtype)))

    info = (
        worst,
        pick(t, -jnp.inf),
        steps,
        pick(n_rejected, -1),
        pick(t_target, -jnp.inf),
    )

    _on_host_if(worst != RESULTS.successful._value,
                ft.partial(_raise_if_failed, max_steps=max_steps, hint=hint), *info)
    return x


def _on_host_if(pred, fn, *info):
    """Call `fn(*info)` on the host if the unbatched `pred` holds: a `jax.debug.callback`
    (an effect, never removed as dead code) that every device of a sharded program runs
    together (`partitioned=True`), under a `lax.cond` that costs nothing otherwise."""

    def report(info):
        jax.debug.callback(fn, *info, partitioned=True)

    jax.lax.cond(pred, report, lambda info: None, info)


def _warn_reconstruction(error, t, *, rtol):
    warnings.warn(
        f"malijax: MALI's algebraic inverse rebuilt the state at t={float(np.asarray(t)):.6g} "
        f"with a relative error of {float(np.asarray(error)):.2e} (tolerance {rtol:.1e}), so "
        "this gradient is inaccurate. The inverse amplifies rounding where the dynamics "
        "contract and, for damped solvers (ALF(eta<1), Reversible(coupling<1)), by 1/|det| "
        "per step. Store more states (MALI(checkpoints=K)), use float64 or other steps, or "
        "gradient=mj.ACA().",
        ReconstructionWarning,
        stacklevel=2,
    )


def warn_if_inexact_reconstruction(error, t, rtol):
    """Warn at run time (`ReconstructionWarning`) if the relative reconstruction `error`
    (found at time `t`) exceeds `rtol`.

    Reduced and reported like `error_if_failed`: under `vmap` the worst element; on a
    sharded batch every device warns with the same message (Python shows it once).
    """
    error, t = jax.lax.stop_gradient((error, t))
    worst = eqxi.unvmap_max(error)
    t = eqxi.unvmap_max(jnp.where(error == worst, t, -jnp.inf))
    _on_host_if(worst > rtol, ft.partial(_warn_reconstruction, rtol=rtol), worst, t)
