"""Run-time errors with the time and step at which a solve failed.

`equinox.error_if` only carries static messages; ours say *where* it happened, so the
message is formatted inside the callback from run-time values.
"""

import functools as ft

import jax
import jax.numpy as jnp
import numpy as np

from ._solution import RESULTS


class SolveError(RuntimeError):
    """Raised (through XLA, so it may arrive wrapped in `JaxRuntimeError`) when a solve
    fails with `throw=True`."""


def _message(code, t, n_steps, n_rejected, t_target, max_steps):
    where = f"at t={t:.9g} after {n_steps} accepted and {n_rejected} rejected steps"
    if code == RESULTS.max_steps_reached._value:
        return (
            f"malijax: max_steps={max_steps} reached {where}, before the output time "
            f"t={t_target:.9g}. Increase `max_steps`, loosen `rtol`/`atol`, or check "
            "whether the problem is stiff (explicit solvers then need tiny steps)."
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
            "enough met the tolerances. The problem may be stiff or singular near "
            "this time; loosen `rtol`/`atol` or check `func`."
        )
    if code == RESULTS.ts_not_monotone._value:
        return "malijax: `ts` must be strictly increasing or strictly decreasing."
    return f"malijax: the solve failed with result code {code} {where}."


def _raise_if_failed(code, t, n_steps, n_rejected, t_target, *, max_steps):
    code, t, n_steps, n_rejected, t_target = map(
        np.asarray, (code, t, n_steps, n_rejected, t_target)
    )
    failed = np.flatnonzero(code.reshape(-1) != RESULTS.successful._value)
    if failed.size:
        i = failed[0]
        values = (code, t, n_steps, n_rejected, t_target)
        flat = [np.broadcast_to(a, code.shape).reshape(-1)[i].item() for a in values]
        msg = _message(*flat, max_steps)
        if code.size > 1:
            msg = f"(batch element {i} of {code.size}) " + msg
        raise SolveError(msg)


def error_if_failed(x, result, t, n_steps, n_rejected, t_target, max_steps):
    """Returns `x`, raising `SolveError` at run time if `result` is not successful.

    The check only runs on failure (a `lax.cond`), and there the output is produced by
    the callback itself, so XLA cannot remove the check as dead code. Under `vmap` the
    callback sees the whole batch and reports the first failed element."""
    return _checked(x, result._value, t, n_steps, n_rejected, t_target, max_steps)


@ft.partial(jax.custom_jvp, nondiff_argnums=(6,))
def _checked(x, code, t, n_steps, n_rejected, t_target, max_steps):
    struct = jax.eval_shape(lambda: x)

    def raise_and_return(x, *info):
        _raise_if_failed(*info, max_steps=max_steps)
        return x  # unreachable unless nothing failed (vmap: another element did)

    def on_failure():
        return jax.pure_callback(
            raise_and_return, struct, x, code, t, n_steps, n_rejected, t_target,
            vmap_method="broadcast_all",
        )

    failed = jnp.any(code != RESULTS.successful._value)
    return jax.lax.cond(failed, on_failure, lambda: x)


@_checked.defjvp
def _checked_jvp(max_steps, primals, tangents):
    # The check is an identity on values: tangents pass straight through.
    return _checked(*primals, max_steps), tangents[0]
