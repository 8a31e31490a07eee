"""The one forward loop.

`integrate` steps a solver from `ts[0]` to `ts[-1]` and writes `y` at every output time:

- a static grid (`num_steps=N`: each output interval split into N equal steps) runs as
  a `lax.scan` over output intervals with an inner `lax.scan` over steps, landing on
  every output;
- adaptive steps and `step_size=h` run as one while loop bounded by `max_steps`
  (accepted plus rejected steps). Steps are chosen by the tolerance (or `h`) alone and
  clipped only onto `ts[-1]`; an output inside a step is the step's interpolant
  (`malijax._dense`), one at a step's end is its state. With
  `Config.land_on_outputs` every output time is a step's end instead (clipped onto
  it). The loop's `kind` is chosen by the gradient strategy: `"lax"` (not
  reverse-differentiable; strategies with a custom VJP), `"bounded"`
  (reverse-differentiable, for `Direct`) or `"checkpointed"` (ANODE).

For a gradient strategy the loop can record, per accepted step `k`, the start time
`t_k`, the step `h_k` exactly as used, the index of the output time it was clipped onto
(or -1), the range of outputs it reached, and optionally the solver's checkpoint of the
state at `t_k`: on a grid one row per step, in a while loop a fixed number of slots
(`malijax._records`), whatever `max_steps` is, from which the reverse sweep replays
(`replay`) the steps it lacks. One iteration of the while loop is a `_Stepper.advance`,
shared by the forward and the replay so that both take the same steps. Independently
the loop can keep whole solver states at a few steps in *restart slots* (`Restarts`),
from which a reconstructing strategy (MALI) restarts its inverse.
"""

import dataclasses
import os

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from . import _dense, _records
from ._batching import all_over_batch, any_over_batch
from ._controller import ConstantStepSize, PIController
from ._misc import rms_norm, tree_all_finite, tree_where
from ._solution import RESULTS


class Problem(eqx.Module):
    func: object
    y0: object
    ts: jax.Array
    args: object


class Config(eqx.Module):
    """Everything static about a solve, fixed by `odeint`'s keywords."""

    solver: object
    controller: PIController | ConstantStepSize | None  # None: a num_steps grid
    num_steps: int | None = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)
    throw: bool = eqx.field(static=True)
    # Sum parameter cotangents over a vmapped batch inside the reverse sweep
    # (`malijax._batching`): set when `vmap` is the innermost transformation at the call.
    sum_over_batch: bool = eqx.field(static=True, default=False)
    # How many reverse-mode differentiations surround the call (`malijax._transforms`).
    reverse_levels: int = eqx.field(static=True, default=0)
    # How failure messages name the step bound: (description, keyword), e.g. compat's
    # `mxstep`; None for `max_steps`.
    limit: tuple | None = eqx.field(static=True, default=None)
    # The user's line that called the solve, for MALI's ReconstructionWarning
    # (`_errors.call_site`); set only for strategies that rebuild states.
    call_site: tuple | None = eqx.field(static=True, default=None)
    # Clip steps onto every output time instead of interpolating inside steps.
    land_on_outputs: bool = eqx.field(static=True, default=False)
    # Keep every accepted step's interpolant (`solve(..., dense=True)`).
    dense: bool = eqx.field(static=True, default=False)

    def interpolates(self, num_out):
        """Whether outputs may fall inside steps: adaptive and `step_size` solves with an
        output time between `ts[0]` and `ts[-1]` (those equal to either need no step of
        their own: they take `y0`, or land with the last step, clipped onto `ts[-1]`)."""
        return self.controller is not None and not self.land_on_outputs and num_out > 2

    def steps_dense(self, num_out):
        """Whether each step also forms its interpolant (`AbstractSolver.step_dense`)."""
        return self.interpolates(num_out) or self.dense

    def while_kind(self, absorbed):
        """The kind of while loop to run: `"lax"`, unless more reverse-mode
        differentiations surround the call than the strategy's own custom VJP absorbs
        (`absorbed`: 1 for a custom VJP, 0 without), so that JAX will transpose the
        loop; then `"bounded"` (reverse-differentiable, slower)."""
        return "bounded" if self.reverse_levels > absorbed else "lax"


class Restarts(eqx.Module):
    """Keep the solver state `x_k` (the input of step `k`) at every `spacing`-th step in
    `num_slots` slots: memory set by the slot count, never by the number of steps.

    When the steps outnumber the slots (`doubling=True`, for while loops whose step
    count is unknown at trace time) the spacing doubles: the states at odd multiples
    of the old spacing become free slots for the next ones, as in online
    checkpointing. So between `num_slots / 2` and `num_slots` states stay evenly spread
    over however many steps were taken, and a slot, once written, always holds an
    exact state until it is reused. On a `num_steps` grid the spacing is chosen so the
    slots suffice, and nothing doubles.
    """

    num_slots: int = eqx.field(static=True)
    spacing: int = eqx.field(static=True)
    doubling: bool = eqx.field(static=True, default=True)

    def init(self, state):
        steps = jnp.full((self.num_slots,), -1, jnp.int32)
        return steps, _nan_buffer((self.num_slots,), state), jnp.asarray(self.spacing, jnp.int32)

    def update(self, slots, k, state, took):
        """Keep `state` (the input of step `k`, taken if `took`) if `k` is due."""
        steps, states, spacing = slots
        due = took & (k > 0) & (k % spacing == 0)
        if self.doubling:
            full = jnp.all((steps[...] >= 0) & (steps[...] % spacing == 0))
            spacing = jnp.where(due & full, 2 * spacing, spacing)
            due = due & (k % spacing == 0)
        slot = jnp.argmax((steps[...] < 0) | (steps[...] % spacing != 0))  # a free slot
        return (_records.set_step(steps, slot, k, due), _records.set_row(states, slot, state, due),
                spacing)


# A reversible solver's parasitic component has outgrown the solution when its RMS
# exceeds the solution's RMS plus this fraction of the largest RMS the solution has had
# (so that a solution passing through zero, or decayed to nothing, is not mistaken for
# one): the answer is then dominated by the weak instability, not the dynamics.
PARASITIC_FLOOR = 0.1


def parasitic_check(solver, state1, error, y_max, dtype):
    """`(y_max, outgrown)` after a step to `state1`: the running largest RMS of `y`, and
    whether the solver's parasitic component has outgrown the solution."""
    par = solver.parasitic(state1, error)
    if par is None:  # nothing to watch: no norms on every step of other solvers
        return y_max, jnp.array(False)
    y_norm = rms_norm(solver.y(state1), dtype)
    y_max = jnp.maximum(y_max, jnp.where(jnp.isfinite(y_norm), y_norm, 0))
    return y_max, rms_norm(par, dtype) > y_norm + PARASITIC_FLOOR * y_max


class Trajectory(eqx.Module):
    """The accepted discretisation, recorded for a gradient strategy.

    A `num_steps=N` grid records no times (`grid_step` recomputes them) and, for
    `record="states"`, exactly `(len(ts) - 1) * N` checkpoints (`states`). A while loop
    keeps its steps in `records`, a fixed number of slots (`malijax._records`, laid out
    as `layout` says), whatever `max_steps` is."""

    num_steps: jax.Array
    states: object  # a grid's solver.checkpoint(state at t_k) per step, or None
    slot_steps: jax.Array | None = None  # Restarts: the step k each slot holds, or -1
    slot_states: object = None  # Restarts: the solver state x_k in each slot
    first: jax.Array | None = None  # outputs [0, first) are at ts[0]: y0
    records: object = None  # a while loop's `_records` slots: (steps, rows, spacing)
    layout: _records.Records | None = eqx.field(static=True, default=None)


class LoopOutput(eqx.Module):
    ys: object
    result: RESULTS
    stats: dict
    final_state: object
    trajectory: Trajectory | None
    t_target: jax.Array  # the output time being aimed at when the loop stopped
    ys_dot: object = None  # dy/dt at the outputs inside steps (`derivatives=True`)
    dense: _dense.DenseInterpolation | None = None  # every step's interpolant (Config.dense)


def grid_steps(ts, n):
    """h_i = (ts[i+1] - ts[i]) / n, the step of output interval i on a `num_steps` grid."""
    return (ts[1:] - ts[:-1]) / n


def grid_time(t_start, h, k):
    """t_k = ts[i] + k h_i: one rounding, no drift; the backward recomputes it bit for bit."""
    return t_start + k.astype(t_start.dtype) * h


def grid_step(ts, n, k):
    """`(t_k, h_k, out_k)` of flat step `k` on a `num_steps=n` grid, as the forward used
    them; `out_k` is the index of the output time the step ends on, or -1."""
    i, m = k // n, k % n
    h = grid_steps(ts, n)[i]
    return grid_time(ts[i], h, m), h, jnp.where(m == n - 1, i + 1, -1)


def device_memory_bytes():
    """The memory of the default device: its allocator's limit where it reports one
    (GPUs), else the machine's physical memory (CPU)."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - not every backend implements memory_stats
        stats = {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_buffer_memory(max_steps, buffers, what, advice):
    """Refuse at trace time the per-step `buffers` (`max_steps` rows each) when they
    alone would exceed the device's memory: compiled, such a solve would die allocating
    them (`RESOURCE_EXHAUSTED`), even if it takes only a few steps."""
    total = sum(x.size * x.dtype.itemsize for x in jtu.tree_leaves(buffers))
    row_bytes, limit = total // max_steps, device_memory_bytes()
    if total > limit:
        raise ValueError(
            f"malijax: {what} is kept in buffers sized by max_steps={max_steps}: "
            f"{max_steps} rows of {row_bytes} bytes = {total / 2**30:.1f} GiB, more than the "
            f"{limit / 2**30:.1f} GiB of device memory (and a vmapped batch multiplies it). "
            f"Lower `max_steps` to what the solve needs; {advice}"
        )


def _nan_buffer(shape, like):
    return jtu.tree_map(lambda x: jnp.full(shape + x.shape, jnp.nan, x.dtype), like)


def _ts_ok(ts):
    if ts.shape[0] < 2:
        return jnp.array(True), jnp.zeros((), ts.dtype)
    diffs = ts[1:] - ts[:-1]
    direction = jnp.sign(ts[-1] - ts[0])
    # Weakly monotone: repeated times are zero-length intervals (padded sequences).
    ok = jnp.all(direction * diffs >= 0) & ((direction != 0) | jnp.all(diffs == 0))
    return ok, direction


def integrate(problem, config, *, kind="lax", record=None, checkpoints=None, restarts=None,
              derivatives=False, slots=None):
    """Solve `problem`; `record` is None, "steps" (how each step was taken) or
    "states" (and the checkpoint of its input, `malijax._records`);
    `restarts` (a `Restarts`, with a `record`) also keeps a few whole solver states;
    `derivatives` keeps `dy/dt` at outputs inside steps (for gradients w.r.t. `ts`).

    `kind="checkpointed"` (with `checkpoints`, None for one per step) runs even a
    `num_steps` grid in the while loop, so that it is reverse-differentiated with
    online binomial checkpointing; `kind="remat"` runs a `num_steps` grid as a scan
    of `jax.checkpoint`ed steps."""
    func, y0, ts, args = problem.func, problem.y0, problem.ts, problem.args
    solver = config.solver
    num_out = ts.shape[0]
    t0 = ts[0]

    ts_ok, direction = _ts_ok(ts)
    state0 = solver.init(func, t0, y0, args)
    result0 = RESULTS.where(ts_ok, RESULTS.successful, RESULTS.ts_not_monotone)
    controller = config.controller
    finite0 = tree_all_finite(state0)
    if isinstance(controller, PIController) and controller.shared:
        finite0 = all_over_batch(finite0)  # the loop's condition stays one for the batch
    result0 = RESULTS.where(finite0 | ~ts_ok, result0, RESULTS.nonfinite_state)
    # Traced tolerances and step sizes are only known now (concrete ones were checked
    # at the call); NaN fails too.
    if isinstance(controller, PIController):
        tol_ok = (jnp.asarray(controller.rtol) > 0) & (jnp.asarray(controller.atol) > 0)
        result0 = RESULTS.where(tol_ok, result0, RESULTS.invalid_tolerance)
    elif isinstance(controller, ConstantStepSize):
        h_ok = jnp.asarray(controller.step_size) > 0
        result0 = RESULTS.where(h_ok, result0, RESULTS.invalid_step_size)
    if num_out == 1 or (controller is None and kind != "checkpointed"):
        return _integrate_grid(
            problem, config, state0, result0, direction, record, restarts, remat=kind == "remat"
        )
    return _integrate_while(
        problem, config, state0, result0, direction, kind, record, checkpoints, restarts,
        derivatives, slots,
    )


def _integrate_grid(problem, config, state0, result0, direction, record, restarts, *, remat=False):
    """`num_steps=N`: a static grid, run as nested `lax.scan`s (differentiable). With
    `remat` each step is `jax.checkpoint`ed: its backward keeps only the step's input
    state and recomputes the step (ANODE's scheme), by JAX's own AD."""
    del direction
    func, y0, ts, args = problem.func, problem.y0, problem.ts, problem.args
    solver = config.solver
    n = 0 if ts.shape[0] == 1 else config.num_steps
    num_intervals = ts.shape[0] - 1
    hs = grid_steps(ts, max(n, 1))

    def step(carry, _):
        # The step counter is carried, not scanned over: an index vector would cost
        # memory proportional to the number of steps.
        state, result, t_fail, y_max, i, h, t_start, k, slots = carry
        t = grid_time(t_start, h, k)
        if restarts is not None:
            flat_k = i * n + k
            slots = restarts.update(slots, flat_k, state, jnp.array(True))
        if config.dense:
            state1, error, coeffs = solver.step_dense(func, t, h, state, args)
        else:
            (state1, error), coeffs = solver.step(func, t, h, state, args), None
        ok = result == RESULTS.successful
        bad = ~tree_all_finite(solver.y(state1)) & ok
        y_max, outgrown = parasitic_check(solver, state1, error, y_max, ts.dtype)
        result = RESULTS.where(bad, RESULTS.nonfinite_state, result)
        outgrown = outgrown & ok & ~bad
        result = RESULTS.where(outgrown, RESULTS.parasitic_instability, result)
        # A non-finite state is blamed on the step from t; an outgrown parasitic
        # component is seen at the time it was measured, t + h.
        t_fail = jnp.where(bad, t, jnp.where(outgrown, t + h, t_fail))
        # The grid itself is never stored: `grid_step` recomputes (t_k, h_k) from ts.
        rec = solver.checkpoint(state) if record == "states" else None
        dense = (t, h, coeffs) if config.dense else None
        return (state1, result, t_fail, y_max, i, h, t_start, k + 1, slots), (rec, dense)

    if remat:
        step = jax.checkpoint(step)

    def interval(carry, x):
        state, result, t_fail, y_max, slots = carry
        i, h, t_start = x
        k0 = jnp.zeros((), jnp.int32)
        (state, result, t_fail, y_max, *_, slots), (rec, dense) = jax.lax.scan(
            step, (state, result, t_fail, y_max, i, h, t_start, k0, slots), None, length=n
        )
        return (state, result, t_fail, y_max, slots), (solver.y(state), rec, dense)

    t_fail0 = jnp.where(result0 == RESULTS.successful, ts[-1], ts[0])
    slots0 = None if restarts is None else restarts.init(state0)
    y_max0 = rms_norm(y0, ts.dtype)
    (state, result, t_fail, _, slots), (ys, recs, dense) = jax.lax.scan(
        interval,
        (state0, result0, t_fail0, y_max0, slots0),
        (jnp.arange(num_intervals, dtype=jnp.int32), hs, ts[:-1]),
    )
    ys = jtu.tree_map(lambda a, b: jnp.concatenate([a[None], b]), y0, ys)
    num_steps = jnp.asarray(n * num_intervals, jnp.int32)
    stats = {
        "num_steps": num_steps,
        "num_rejected": jnp.zeros((), jnp.int32),
        "num_fevals": jnp.asarray(
            solver.fevals_init + solver.fevals_step * n * num_intervals, jnp.int32
        ),
        "t_final": t_fail,
    }
    def flat(tree):  # (interval, step) -> flat step
        return jtu.tree_map(lambda x: x.reshape((-1,) + x.shape[2:]), tree)

    trajectory = None
    if record is not None:
        trajectory = Trajectory(num_steps, flat(recs), *_slot_fields(slots))
    if config.dense:
        dense = _dense.DenseInterpolation(*flat(dense), num_steps)
    return LoopOutput(ys, result, stats, state, trajectory, ts[-1], dense=dense)


def _slot_fields(slots):
    return (None, None) if slots is None else slots[:2]


class _Core(eqx.Module):
    """What the adaptive loop carries from one iteration to the next (outputs aside)."""

    t: jax.Array
    h: jax.Array  # magnitude of the next step to try
    state: object
    j: jax.Array  # index of the next output time
    num_steps: jax.Array
    num_rejected: jax.Array
    num_iters: jax.Array
    prev_ratio: jax.Array
    rejected_before: jax.Array
    result: RESULTS
    y_max: jax.Array  # the largest RMS of y so far (parasitic_check)


class _Attempt(eqx.Module):
    """One iteration's step, as the forward records it."""

    took: jax.Array  # accepted
    t: jax.Array  # t_k
    h: jax.Array  # h_k as used (signed, clipped)
    reach: jax.Array  # ended on the output time it aimed at
    target: jax.Array  # that output time's index
    mid: jax.Array  # outputs [c.j, mid) were interpolated, [mid, j') landed
    coeffs: object  # the step's interpolant, or None


def _write(buffer, index, value, pred):
    # `value` leads: each of its leaves lines up with a whole buffer (itself a pytree).
    return jtu.tree_map(lambda v, b: b.at[index].set(v, pred=pred), value, buffer)


def _loop_kwargs(kind, checkpoints):
    return {"checkpoints": checkpoints} if kind == "checkpointed" else {}


def leading_outputs(ts):
    """`j0`: how many output times equal `ts[0]` (they all take `y0`, no step)."""
    later = ts != ts[0]
    return jnp.where(jnp.any(later), jnp.argmax(later), ts.shape[0]).astype(jnp.int32)


def _save_outputs(ts, j, took, t_k, h, t1, y1, coeffs, ys, ys_dot, direction, kind):
    """After a step from `t_k` to `t1 = t_k + h` (taken if `took`), write the outputs
    from `ts[j]` on that it reaches: those strictly inside from the step's interpolant
    (`coeffs`, `malijax._dense`; None when no output can be inside a step), those at
    `t1` itself (repeats included) as the new state `y1`. Returns `(j', mid, ys,
    ys_dot)`: outputs `[j, mid)` were interpolated, `[mid, j')` landed. A nested loop,
    since any number of outputs may fall in one step."""
    num_out = ts.shape[0]

    def cond(s):
        j = s[0]
        return took & (j < num_out) & (direction * (ts[jnp.minimum(j, num_out - 1)] - t1) <= 0)

    def body(s):
        j, mid, ys, ys_dot = s
        s_j = ts[j]
        y = y1
        if coeffs is not None:
            inside = s_j != t1
            mid = jnp.where(inside, j + 1, mid)
            # (h = 0 for an element that finished before the others of a vmapped batch:
            # no NaN, not even in an unselected branch, where gradients would see it.)
            h_safe = jnp.where(h == 0, 1, h)
            theta = (s_j - t_k) / h_safe
            if ys is not None:
                y = tree_where(inside, _dense.evaluate(coeffs, theta), y1)
            if ys_dot is not None:
                ys_dot = _write(ys_dot, j, _dense.derivative(coeffs, theta, h_safe), inside)
        if ys is not None:
            ys = _write(ys, j, y, True)
        return j + 1, mid, ys, ys_dot

    parts = (ys is not None, ys_dot is not None)
    if not parts[0]:  # a replay: only where the outputs fall, nothing written
        kind = "lax" if kind == "checkpointed" else kind

    def buffers(s):
        return tuple(b for b, keep in zip(s[2:], parts) if keep)

    return eqxi.while_loop(
        cond, body, (j, j, ys, ys_dot), max_steps=num_out, kind=kind,
        buffers=buffers, **_loop_kwargs(kind, num_out),
    )


class _Stepper:
    """One iteration of the adaptive (or `step_size`) loop: propose a step, take and
    judge it, find the outputs it reached. Shared by the forward (`_integrate_while`)
    and the reverse sweep's replay (`replay`), so that both take the same steps."""

    def __init__(self, problem, config, direction, kind):
        self.func, self.ts, self.args = problem.func, problem.ts, problem.args
        self.solver, self.controller = config.solver, config.controller
        self.config, self.direction, self.kind = config, direction, kind
        self.dtype = self.ts.dtype
        self.eps = jnp.finfo(self.dtype).eps
        self.num_out = self.ts.shape[0]
        self.adaptive = isinstance(self.controller, PIController)
        self.grid = self.controller is None
        # Steps chosen by the tolerance (or step_size) alone, outputs from the interpolant.
        self.interpolate = config.interpolates(self.num_out)
        self.steps_dense = config.steps_dense(self.num_out)

    def propose(self, c):
        """`(c, t_k, h, reach, target)`: the step to try, whether it ends on the output
        time it aims at (clipped onto it), and that time's index."""
        ts = self.ts
        if self.grid:  # the same (t_k, h_k) as the scan over a num_steps grid
            t_k, h, out = grid_step(ts, self.config.num_steps, c.num_steps)
            return dataclasses.replace(c, t=t_k), t_k, h, out >= 0, out
        target = jnp.asarray(self.num_out - 1, jnp.int32) if self.interpolate else c.j
        t_target = ts[target]
        remaining = t_target - c.t
        h_try = self.direction * c.h
        # A step within `tiny` of its target is stretched onto it, sparing a sliver of
        # a step later, but not right after a rejection: the shrunk step would be
        # stretched back to the size just rejected, and retried unchanged until
        # max_steps (a livelock, seen in float32 next to a discontinuity at an output).
        tiny = jnp.where(
            c.rejected_before, 0,
            100 * self.eps * jnp.maximum(jnp.abs(t_target), jnp.abs(c.t)),
        )
        reach = jnp.abs(remaining) <= jnp.abs(h_try) + tiny
        return c, c.t, jnp.where(reach, remaining, h_try), reach, target

    def attempt(self, c, h):
        """Take the step; `(state1, coeffs, accept, h_next, prev_ratio, finite, y_max,
        outgrown)`."""
        solver = self.solver
        if self.steps_dense:
            state1, error, coeffs = solver.step_dense(self.func, c.t, h, c.state, self.args)
        else:
            (state1, error), coeffs = solver.step(self.func, c.t, h, c.state, self.args), None
        finite = tree_all_finite(state1)
        y_max, outgrown = parasitic_check(solver, state1, error, c.y_max, self.dtype)
        if self.adaptive and self.controller.shared:  # one step sequence for a batch
            finite, outgrown = all_over_batch(finite), any_over_batch(outgrown)
        if self.adaptive:
            accept, h_next, prev_ratio = self.controller.adapt(
                solver.y(c.state), solver.y(state1), error, jnp.abs(h), c.prev_ratio,
                c.rejected_before, finite, solver.error_order, self.dtype,
            )
        else:
            accept, h_next, prev_ratio = finite, c.h, c.prev_ratio
        return state1, coeffs, accept, h_next, prev_ratio, finite, y_max, outgrown

    def judge(self, c, accept, h_next, finite, took, outgrown, t_target):
        """The result after this iteration: a failure is noted once, where it happens."""
        if self.adaptive:
            # The smallest step that still moves t: a couple of units in the last place.
            floor = 2 * self.eps * jnp.maximum(jnp.abs(c.t), jnp.abs(t_target))
            failed = ~accept & (h_next <= floor)
            code = RESULTS.where(finite, RESULTS.step_size_underflow, RESULTS.nonfinite_state)
        else:
            failed, code = ~accept, RESULTS.nonfinite_state
        result = RESULTS.where(failed, code, c.result)
        # Only accepted steps count: a rejected trial may be as wild as it likes.
        return RESULTS.where(
            took & outgrown & (result == RESULTS.successful), RESULTS.parasitic_instability, result
        )

    def advance(self, c, ys=None, ys_dot=None):
        """One iteration from `c`: `(c', attempt, ys, ys_dot)`, the outputs the step
        reached written into `ys` (and `ys_dot`) unless `ys` is None (a replay)."""
        ts, solver = self.ts, self.solver
        c, t_k, h, reach, target = self.propose(c)
        state1, coeffs, accept, h_next, prev_ratio, finite, y_max, outgrown = self.attempt(c, h)
        if self.adaptive:  # clipping to an output time must not shrink the steps that follow
            h_next = jnp.where(accept & reach, jnp.maximum(h_next, c.h), h_next)
        took = accept
        state = tree_where(took, state1, c.state)
        t1 = jnp.where(reach, ts[target], t_k + h)
        if self.grid:  # exactly one output per interval, even where ts repeats
            j, mid = c.j + reach.astype(jnp.int32), c.j
            if ys is not None:
                ys = _write(ys, c.j, solver.y(state), reach)
        else:
            j, mid, ys, ys_dot = _save_outputs(
                ts, c.j, took, t_k, h, t1, solver.y(state1),
                coeffs if self.interpolate else None, ys, ys_dot, self.direction, self.kind,
            )
        new = _Core(
            t=jnp.where(took, t1, c.t),
            h=h_next,
            state=state,
            j=j,
            num_steps=c.num_steps + took.astype(jnp.int32),
            num_rejected=c.num_rejected + (~accept).astype(jnp.int32),
            num_iters=c.num_iters + 1,
            prev_ratio=prev_ratio,
            rejected_before=~accept,
            result=self.judge(c, accept, h_next, finite, took, outgrown, ts[target]),
            y_max=jnp.where(took, y_max, c.y_max),
        )
        return new, _Attempt(took, t_k, h, reach, target, mid, coeffs), ys, ys_dot

    def row(self, c, a, hi, record="states"):
        """The record of the step attempted from `c` (`_records.Row`), with the
        checkpoint of its input state for `record="states"`."""
        checkpoint = self.solver.checkpoint(c.state) if record == "states" else None
        return _records.Row(
            t=a.t, h=a.h, end=jnp.where(a.reach, a.target, -1).astype(jnp.int32), lo=c.j,
            mid=a.mid, hi=hi, h_try=c.h, prev_ratio=c.prev_ratio,
            rejected_before=c.rejected_before, checkpoint=checkpoint,
        )

    def resume(self, row, num_steps, state=None):
        """The loop's carry at the start of the attempt that took step `num_steps`
        (recorded in `row`; `state`: its input, if the row holds none): running on from
        it takes the same steps again."""
        zero_i = jnp.zeros((), jnp.int32)
        if state is None:
            state = self.solver.restore(self.func, row.t, row.checkpoint, self.args)
        return _Core(
            t=row.t,
            h=row.h_try,
            state=state,
            j=row.lo,
            num_steps=num_steps,
            num_rejected=zero_i,
            num_iters=zero_i,
            prev_ratio=row.prev_ratio,
            rejected_before=row.rejected_before,
            result=RESULTS.successful,  # (a replay only covers steps the forward took)
            y_max=jnp.zeros((), self.dtype),  # (only judges the result, not the steps)
        )


class _Buffers(eqx.Module):
    """What the forward writes as it goes (each None unless asked for)."""

    ys: object
    ys_dot: object  # dy/dt at outputs inside steps (for ∂/∂ts)
    dense: object  # every accepted step's (t_k, h_k, interpolant)
    records: object  # `_records` slots of the steps (a `record`)
    slots: object  # Restarts: (slot steps, slot states, spacing)


def _initial_step(stepper, y0, args, direction):
    """`(h0, fevals)`: the first step to try and the evaluations spent choosing it."""
    solver, controller, dtype = stepper.solver, stepper.controller, stepper.dtype
    if stepper.grid:
        return jnp.zeros((), dtype), solver.fevals_init
    if stepper.adaptive:
        h0 = controller.initial_step(
            stepper.func, solver, stepper.ts[0], y0, args, direction, dtype
        )
        return h0, solver.fevals_init + 2
    return jnp.abs(jnp.asarray(controller.step_size, dtype)), solver.fevals_init


def _output_buffers(y0, j0, num_out, derivatives):
    """`ys` with the outputs at ts[0] (repeats included) already `y0`, and `ys_dot`."""
    leading = jnp.arange(num_out, dtype=jnp.int32) < j0
    ys = jtu.tree_map(
        lambda y: jnp.where(leading.reshape((-1,) + (1,) * y.ndim), y[None],
                            jnp.full((num_out,) + y.shape, jnp.nan, y.dtype)),
        y0,
    )
    # Zeros, not NaN: only the rows of interpolated outputs are read, but a second
    # derivative of the sweep would meet NaN · 0 in the others.
    ys_dot = None
    if derivatives:
        ys_dot = jtu.tree_map(lambda y: jnp.zeros((num_out,) + y.shape, y.dtype), y0)
    return ys, ys_dot


def _integrate_while(
    problem, config, state0, result0, direction, kind, record, checkpoints, restarts,
    derivatives, slots,
):
    """Adaptive steps or `step_size` (or, for checkpointing, a `num_steps` grid): one
    while loop bounded by `max_steps`, each iteration one `_Stepper.advance`, whose
    step is then recorded as the gradient strategy asked."""
    func, y0, ts, args = problem.func, problem.y0, problem.ts, problem.args
    solver, max_steps = config.solver, config.max_steps
    dtype, num_out = ts.dtype, ts.shape[0]
    stepper = _Stepper(problem, config, direction, kind)
    if stepper.grid:
        max_steps = config.num_steps * (num_out - 1)  # exactly the grid's steps
    h0, init_fevals = _initial_step(stepper, y0, args, direction)
    j0 = jnp.ones((), jnp.int32) if stepper.grid else leading_outputs(ts)
    ys, ys_dot = _output_buffers(y0, j0, num_out, derivatives and stepper.interpolate)
    zero_i = jnp.zeros((), jnp.int32)
    core0 = _Core(
        t=ts[0], h=h0, state=state0, j=j0, num_steps=zero_i, num_rejected=zero_i,
        num_iters=zero_i, prev_ratio=jnp.ones((), dtype), rejected_before=jnp.array(False),
        result=result0, y_max=rms_norm(y0, dtype),
    )
    records = records0 = None
    if record is not None:
        row_like = jax.eval_shape(lambda: stepper.row(core0, stepper.advance(core0)[1], j0, record))
        states = record == "states"
        records = _records.Records(
            _records.slots_for(max_steps, row_like, slots, states), states=states
        )
        records0 = records.init(row_like)
    dense0 = None
    if config.dense:
        coeffs = jax.eval_shape(lambda: solver.step_dense(func, ts[0], ts[0], state0, args)[2])
        dense0 = (jnp.zeros((max_steps,), dtype), jnp.ones((max_steps,), dtype),
                  _nan_buffer((max_steps,), coeffs))
        check_buffer_memory(
            max_steps, dense0, "the dense solution (every step's interpolant)",
            "or ask for the output times you need in `ts` instead of `dense=True`.",
        )
    slots0 = None if restarts is None else restarts.init(state0)
    buffers0 = _Buffers(ys, ys_dot, dense0, records0, slots0)

    def body(carry):
        c, b = carry
        new, a, ys, ys_dot = stepper.advance(c, b.ys, b.ys_dot)
        k, took = c.num_steps, a.took
        records_, dense, slots_ = b.records, b.dense, b.slots
        if records is not None:
            row = stepper.row(c, a, new.j, record)
            records_ = records.store(records_, k, row, took)
        if dense is not None:
            dense = _write(dense, k, (a.t, a.h, a.coeffs), took)
        if restarts is not None:
            slots_ = restarts.update(slots_, k, c.state, took)
        return new, _Buffers(ys, ys_dot, dense, records_, slots_)

    def cond(carry):
        c = carry[0]
        return (c.j < num_out) & (c.result == RESULTS.successful)

    # Written in place, each row once (Equinox's contract for a buffer; its checkpointed
    # loop refuses None among them). Slots, which are overwritten, are buffers only in
    # a loop that is not reverse-differentiated (kind "lax"), where the contract only
    # guards cotangents; otherwise they are carried whole, and under `vmap` selected
    # whole every iteration (measured: 20x the forward's time for 128 Lorenz slots).
    kept = (True, ys_dot is not None, dense0 is not None)
    slotted = kind == "lax"

    def buffers(carry):
        b = carry[1]
        out = [p for p, keep in zip((b.ys, b.ys_dot, b.dense), kept) if keep]
        if slotted:
            out += [s[:2] for s in (b.records, b.slots) if s is not None]
        return tuple(out)

    c, b = eqxi.while_loop(
        cond, body, (core0, buffers0), max_steps=max_steps, buffers=buffers, kind=kind,
        **_loop_kwargs(kind, checkpoints),
    )
    result = RESULTS.where(
        (c.j < num_out) & (c.result == RESULTS.successful), RESULTS.max_steps_reached, c.result
    )
    stats = {
        "num_steps": c.num_steps,
        "num_rejected": c.num_rejected,
        "num_fevals": init_fevals + solver.fevals_step * c.num_iters,
        "t_final": c.t,
    }
    trajectory = None
    if record is not None:
        trajectory = Trajectory(c.num_steps, None, *_slot_fields(b.slots), first=j0,
                                records=b.records, layout=records)
    t_target = ts[jnp.minimum(c.j, num_out - 1)]
    dense = None if dense0 is None else _dense.DenseInterpolation(*b.dense, c.num_steps)
    return LoopOutput(b.ys, result, stats, c.state, trajectory, t_target, b.ys_dot, dense)


def replay(problem, config, direction, layout, records, swept, target, kind, spare=0,
           in_order=None):
    """Make the row of step `target` available to the reverse sweep, which has undone
    every step after `swept` (`malijax._records`; `layout` is the `Records`). If it is
    not stored, rerun the forward loop from the nearest stored step below it that can
    be resumed from (step 0 for rows without states), storing the steps it passes in
    the free slots (those of steps after `swept`, and the reserve), `target` included,
    but `spare` of them: evenly spread for rows with states, the steps just below
    `target` for rows without. Nothing to do for `target < 0`, nor when `in_order`
    (`_records.in_order`: every step stored, so the searches and the resumed state,
    which costs an evaluation of `func`, are skipped). Returns the records."""
    steps, rows, spacing = records
    stepper = _Stepper(problem, config, direction, kind)

    def setup():
        have = jnp.any(steps[...] == target) | (target < 0)
        free = (steps[...] < 0) | (steps[...] > swept)
        budget = jnp.maximum(jnp.sum(free, dtype=jnp.int32) - spare, 1)
        if layout.states:
            stored = steps[...]
            base = jnp.max(jnp.where((stored >= 0) & (stored <= target), stored, 0))
            # Store target, target - every, target - 2 every, ...: at most `budget` steps.
            every = jnp.maximum(1, -(-(target - base) // budget))
            c0 = stepper.resume(_records.lookup(records, base), base)
        else:
            base, every = jnp.zeros((), jnp.int32), jnp.ones((), jnp.int32)
            state0 = config.solver.init(problem.func, problem.ts[0], problem.y0, problem.args)
            c0 = stepper.resume(_records.lookup(records, base), base, state0)
        return have, budget, base.astype(jnp.int32), every.astype(jnp.int32), c0

    if in_order is None:
        have, budget, base, every, c0 = setup()
    else:
        def nothing_to_do():
            like = jax.eval_shape(setup)
            return (jnp.array(True), *jtu.tree_map(lambda x: jnp.zeros(x.shape, x.dtype),
                                                   like[1:]))

        have, budget, base, every, c0 = jax.lax.cond(in_order, nothing_to_do, setup)

    def cond(s):
        c = s[0]
        return ~have & (c.num_steps <= target) & (c.result == RESULTS.successful)

    def body(s):
        c, steps, rows = s
        new, a, _, _ = stepper.advance(c)
        k = c.num_steps
        due = a.took & (k > base) & ((target - k) % every == 0) & (target - k < every * budget)
        slot = jnp.argmax((steps[...] < 0) | (steps[...] > swept))
        row = stepper.row(c, a, new.j, "states" if layout.states else "steps")
        return new, _records.set_step(steps, slot, k, due), _records.set_row(rows, slot, row, due)

    _, steps, rows = eqxi.while_loop(
        cond, body, (c0, steps, rows), max_steps=config.max_steps, kind=kind,
        buffers=(lambda s: s[1:]) if kind == "lax" else None,
    )
    return steps, rows, spacing
