"""Run-time errors with the time and step at which a solve failed.

`equinox.error_if` only carries static messages; ours say *where* it happened, so the
message is formatted inside the callback from run-time values.
"""

import contextlib
import functools as ft
import logging
import os
import sys
import warnings

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_batching import custom_vmap

from ._solution import RESULTS


class SolveError(RuntimeError):
    """Raised when a solve fails with `throw=True`.

    An eager call (`odeint(...)`, or `jax.grad` of a function calling it, without
    `jit`) raises `SolveError` itself, whose message is malijax's. Under `jax.jit` or
    `eqx.filter_jit` the failure is found while the compiled program runs, and XLA
    raises it as `jax.errors.JaxRuntimeError`, whose message ends with
    `SolveError: malijax: ...`: catch `(mj.SolveError, jax.errors.JaxRuntimeError)`, or
    pass `throw=False` and inspect `solve(...).result`."""


class ReconstructionWarning(RuntimeWarning):
    """Warned when `MALI`'s algebraic inverse rebuilt a state inaccurately: the gradient
    just computed is then inaccurate too, typically by more. Issued once per line that
    calls the solve (Python's default for warnings), every time under
    `warnings.simplefilter("always")`; turn it into an error with
    `warnings.simplefilter("error", mj.ReconstructionWarning)`.

    Why: the inverse amplifies rounding where the dynamics contract and, for damped
    solvers (`ALF(eta<1)`, `Reversible(coupling<1)`), by `1/|det|` per step. Cures: keep
    more states (`MALI(checkpoints=K)`), float64, other steps, or `gradient=mj.ACA()`."""


_MARKER = "SolveError: malijax: "


@contextlib.contextmanager
def solve_errors_raised_plainly():
    """Re-raise a `SolveError` that XLA wrapped in `JaxRuntimeError` (an eager call,
    executed while this context is open) as itself, with malijax's message first."""
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        text = str(e)
        if _MARKER not in text:
            raise
        message = text[text.rindex(_MARKER) + len("SolveError: "):].strip()
        raise SolveError(message) from None


class _DropSolveErrorLog(logging.Filter):
    """`jax.debug.callback` logs an exception its callback raises before XLA re-raises
    it, so a `SolveError` was printed twice; the raised one suffices."""

    def filter(self, record):
        return not (record.exc_info and isinstance(record.exc_info[1], SolveError))


logging.getLogger("jax._src.debugging").addFilter(_DropSolveErrorLog())


# Why undamped reversible solvers fail on dissipative problems (both messages say it).
WEAK_INSTABILITY = (
    "on a dissipative problem an undamped reversible solver's second, parasitic mode grows "
    "like exp(|λ|t) whatever the step"
)
WEAK_INSTABILITY_CURES = (
    "Cures: a damped reversible solver, mj.Reversible(mj.Tsit5()) with its default "
    "coupling < 1 (its base's order; MALI gradients stay exact with MALI(checkpoints=None)); "
    "or a non-reversible solver (mj.Tsit5()) with gradient=mj.ACA(). (ALF(eta<1) is stable "
    "too, but only first order.)"
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


class Report(eqx.Module):
    """Static context for a failure message: which solve (`stage`, e.g. "the Adjoint's
    backward solve"), how the step bound is named to the user (`limit`: its
    description and the keyword to raise), and a hint for stalls."""

    max_steps: int = eqx.field(static=True)
    hint: str = eqx.field(static=True, default="")
    stage: str = eqx.field(static=True, default="")
    limit: tuple | None = eqx.field(static=True, default=None)


def _message(code, t, n_steps, n_rejected, t_target, element, report):
    batch = f" (batch element {element} of the innermost vmap)" if element >= 0 else ""
    where = f"at t={t:.9g} after {n_steps} accepted and {n_rejected} rejected steps{batch}"
    stage = f"{report.stage}: " if report.stage else ""
    backward = bool(report.stage)
    limit, keyword = report.limit or (f"max_steps={report.max_steps}", "`max_steps`")
    if code == RESULTS.max_steps_reached._value:
        return (
            f"malijax: {stage}{limit} reached {where}, before the output time "
            f"t={t_target:.9g}."
            + (report.hint or f" Increase {keyword}, loosen `rtol`/`atol`, or check whether "
               "the problem is stiff (explicit solvers then need tiny steps).")
        )
    if code == RESULTS.parasitic_instability._value:
        return (
            f"malijax: {stage}the reversible solver's parasitic component outgrew the "
            f"solution {where} (weak instability: {WEAK_INSTABILITY}, so the answer would be "
            f"wrong). {WEAK_INSTABILITY_CURES}"
        )
    if code == RESULTS.nonfinite_state._value:
        if backward:
            return (
                f"malijax: {stage}the state became non-finite (NaN or inf) {where}. Solving "
                "the forward dynamics backwards in time is unstable where they contract "
                "(and the adjoint equation grows there); tighten the backward tolerances, "
                "or use a strategy that does not solve backwards (gradient=mj.ACA(), or "
                "MALI with a damped reversible solver)."
            )
        return (
            f"malijax: the state became non-finite (NaN or inf) {where}. `func` "
            "returned NaN/inf there, or the solution blows up (finite-time "
            "singularity, or an unstable step size). Check `func` and `y0`, or use "
            "smaller steps."
        )
    if code == RESULTS.step_size_underflow._value:
        return (
            f"malijax: {stage}the adaptive step size underflowed {where}: no step small "
            "enough met the tolerances."
            + (report.hint or " The problem may be stiff or singular near this time; loosen "
               "`rtol`/`atol` or check `func`.")
        )
    if code == RESULTS.ts_not_monotone._value:
        return (
            "malijax: `ts` must be nondecreasing or nonincreasing (repeated times are "
            f"zero-length intervals){batch}."
        )
    if code == RESULTS.invalid_tolerance._value:
        return f"malijax: `rtol` and `atol` must be > 0, but a traced value was not{batch}."
    if code == RESULTS.invalid_step_size._value:
        return f"malijax: `step_size` must be > 0, but a traced value was not{batch}."
    return f"malijax: {stage}the solve failed with result code {code} {where}."


def _raise_if_failed(code, t, n_steps, n_rejected, t_target, element, *, report):
    code = int(np.asarray(code))
    if code != RESULTS.successful._value:
        values = (float(np.asarray(t)), int(np.asarray(n_steps)), int(np.asarray(n_rejected)),
                  float(np.asarray(t_target)), int(np.asarray(element)))
        raise SolveError(_message(code, *values, report))


@custom_vmap
def _batch_index(x):
    """-1 outside `vmap`; each element's index inside the innermost `vmap`."""
    del x
    return jnp.asarray(-1, jnp.int32)


@_batch_index.def_vmap
def _batch_index_vmap(axis_size, in_batched, x):
    del in_batched, x
    return jnp.arange(axis_size, dtype=jnp.int32), True


def error_if_failed(x, result, t, n_steps, n_rejected, t_target, report):
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
    - `report` (a `Report`) names the solve and its step bound in the message.
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
        pick(_batch_index(code), -1),
    )

    _on_host_if(worst != RESULTS.successful._value,
                ft.partial(_raise_if_failed, report=report), *info)
    return x


def _on_host_if(pred, fn, *info):
    """Call `fn(*info)` on the host if the unbatched `pred` holds: a `jax.debug.callback`
    (an effect, never removed as dead code) that every device of a sharded program runs
    together (`partitioned=True`), under a `lax.cond` that costs nothing otherwise."""

    def report(info):
        jax.debug.callback(fn, *info, partitioned=True)

    jax.lax.cond(pred, report, lambda info: None, info)


def call_site():
    """`(filename, lineno, module)` of the first frame outside malijax: the user's line
    that called the solve (read at trace time, so under `jit` the traced line)."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back
    if frame is None:  # pragma: no cover
        return ("<unknown>", 0, "malijax")
    return (frame.f_code.co_filename, frame.f_lineno, frame.f_globals.get("__name__", ""))


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# One registry per call site: Python's warning machinery then shows a message once per
# site under its default filter (its text varies with the error, so the site itself is
# recorded under a fixed key), and every time under "always"; "error" raises.
_REGISTRIES = {}


def _first_matching_action(category, text, module, lineno):
    for action, message, cat, mod, line in warnings.filters:
        if ((message is None or message.match(text)) and issubclass(category, cat)
                and (mod is None or mod.match(module)) and (line == 0 or line == lineno)):
            return action
    return warnings.defaultaction


def _warn_reconstruction(error, t, *, rtol, site):
    text = (
        f"malijax: MALI rebuilt the state at t={float(np.asarray(t)):.6g} with a relative "
        f"error of {float(np.asarray(error)):.2e} (tolerance {rtol:.1e}), so this gradient is "
        "inaccurate; see help(mj.ReconstructionWarning), or use gradient=mj.ACA()."
    )
    filename, lineno, module = site or ("<unknown>", 0, "malijax")
    registry = _REGISTRIES.setdefault(site, {})
    action = _first_matching_action(ReconstructionWarning, text, module, lineno)
    if action not in ("always", "error") and registry.get("shown"):
        return
    warnings.warn_explicit(text, ReconstructionWarning, filename, lineno, module=module,
                           registry=registry)
    registry["shown"] = True  # after: warn_explicit clears a registry when filters change


def warn_if_inexact_reconstruction(error, t, rtol, site):
    """Warn at run time (`ReconstructionWarning`) if the relative reconstruction `error`
    (found at time `t`) exceeds `rtol`, attributed to the call `site` (`call_site()`).

    Reduced and reported like `error_if_failed`: under `vmap` the worst element; on a
    sharded batch every device warns with the same message (Python shows it once).
    """
    error, t = jax.lax.stop_gradient((error, t))
    worst = eqxi.unvmap_max(error)
    t = eqxi.unvmap_max(jnp.where(error == worst, t, -jnp.inf))
    _on_host_if(worst > rtol, ft.partial(_warn_reconstruction, rtol=rtol, site=site), worst, t)
