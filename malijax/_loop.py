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
state at `t_k`. Independently it can keep whole solver states at a few steps in a fixed
number of *restart slots* (`Restarts`), from which a reconstructing strategy (MALI)
restarts its inverse.
"""

import os

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from . import _dense
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

    def update(self, slots, k, state, took, write):
        """Keep `state` (the input of step `k`, taken if `took`) if `k` is due."""
        steps, states, spacing = slots
        due = took & (k > 0) & (k % spacing == 0)
        if self.doubling:
            full = jnp.all((steps >= 0) & (steps % spacing == 0))
            spacing = jnp.where(due & full, 2 * spacing, spacing)
            due = due & (k % spacing == 0)
        slot = jnp.argmax((steps < 0) | (steps % spacing != 0))  # a free slot
        steps = steps.at[slot].set(jnp.where(due, k, steps[slot]))
        return steps, write(states, slot, state, due), spacing


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


def _set_row(buffer, index, value, pred):
    """`buffer[index] = value` where `pred` (plain arrays, e.g. a scan's carry)."""
    return jtu.tree_map(
        lambda v, b: b.at[index].set(jnp.where(pred, v, b[index])), value, buffer
    )


class Trajectory(eqx.Module):
    """The accepted discretisation, recorded for a gradient strategy.

    Buffers have `max_steps` rows for a while loop (only the first `num_steps` are
    meaningful). A `num_steps=N` grid records no times (`ts`, `hs`, `out`, `mid`, `hi`
    are None: `grid_step` recomputes them) and exactly `(len(ts) - 1) * N` state rows.

    Step `k` reached outputs `[hi[k-1], hi[k])` (`hi[-1] = first`): those in
    `[hi[k-1], mid[k])` from its interpolant, those in `[mid[k], hi[k])` at its end."""

    ts: jax.Array | None  # t_k, start of step k
    hs: jax.Array | None  # h_k, signed, exactly as the step used it
    out: jax.Array | None  # index j of the output time step k was clipped onto, or -1
    num_steps: jax.Array
    states: object  # solver.checkpoint(state at t_k) per step, or None
    slot_steps: jax.Array | None = None  # Restarts: the step k each slot holds, or -1
    slot_states: object = None  # Restarts: the solver state x_k in each slot
    mid: jax.Array | None = None  # first output step k did not interpolate
    hi: jax.Array | None = None  # first output after step k
    first: jax.Array | None = None  # outputs [0, first) are at ts[0]: y0


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


def check_buffer_memory(max_steps, buffers):
    """Refuse at trace time the per-step `buffers` (`max_steps` rows each) when they
    alone would exceed the device's memory: compiled, such a solve would die allocating
    them (`RESOURCE_EXHAUSTED`), even if it takes only a few steps."""
    total = sum(x.size * x.dtype.itemsize for x in jtu.tree_leaves(buffers))
    row_bytes, limit = total // max_steps, device_memory_bytes()
    if total > limit:
        raise ValueError(
            f"malijax: this gradient strategy records each step in buffers sized by "
            f"max_steps={max_steps}: {max_steps} rows of {row_bytes} bytes = "
            f"{total / 2**30:.1f} GiB, more than the {limit / 2**30:.1f} GiB of device memory "
            "(and a vmapped batch multiplies it). Lower `max_steps` to what the solve "
            "needs; or take a strategy whose memory does not grow with `max_steps`: MALI "
            "with a reversible solver (the default), ANODE(checkpoints=c) (binomial), or "
            "Direct; or a `num_steps` grid (one row per step actually taken)."
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
              derivatives=False):
    """Solve `problem`; `record` is None, "grid" ((t_k, h_k) only) or "states";
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
    result0 = RESULTS.where(
        tree_all_finite(state0) | ~ts_ok, result0, RESULTS.nonfinite_state
    )
    # Traced tolerances and step sizes are only known now (concrete ones were checked
    # at the call); NaN fails too.
    controller = config.controller
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
        derivatives,
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
            slots = restarts.update(slots, flat_k, state, jnp.array(True), _set_row)
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
        trajectory = Trajectory(None, None, None, num_steps, flat(recs), *_slot_fields(slots))
    if config.dense:
        dense = _dense.DenseInterpolation(*flat(dense), num_steps)
    return LoopOutput(ys, result, stats, state, trajectory, ts[-1], dense=dense)


def _slot_fields(slots):
    return (None, None) if slots is None else slots[:2]


class _Carry(eqx.Module):
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
    ys: object
    ys_dot: object  # dy/dt at outputs inside steps (for ∂/∂ts), or None
    dense: object  # every accepted step's (t_k, h_k, interpolant), or None
    rec: object
    slots: object  # Restarts: (slot steps, slot states, spacing), or None


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
        if coeffs is None:
            y = y1
        else:
            inside = s_j != t1
            # (h = 0 for an element that finished before the others of a vmapped batch:
            # no NaN, not even in an unselected branch, where gradients would see it.)
            h_safe = jnp.where(h == 0, 1, h)
            theta = (s_j - t_k) / h_safe
            y = tree_where(inside, _dense.evaluate(coeffs, theta), y1)
            mid = jnp.where(inside, j + 1, mid)
            if ys_dot is not None:
                ys_dot = _write(ys_dot, j, _dense.derivative(coeffs, theta, h_safe), inside)
        return j + 1, mid, _write(ys, j, y, True), ys_dot

    has_dot = ys_dot is not None
    return eqxi.while_loop(
        cond, body, (j, j, ys, ys_dot), max_steps=num_out, kind=kind,
        buffers=lambda s: (s[2], s[3]) if has_dot else s[2], **_loop_kwargs(kind, num_out),
    )


def _integrate_while(
    problem, config, state0, result0, direction, kind, record, checkpoints, restarts,
    derivatives,
):
    """Adaptive steps or `step_size` (or, for checkpointing, a `num_steps` grid): one
    while loop bounded by `max_steps`. Each iteration proposes a step (`propose`),
    takes and judges it (`attempt`), writes the outputs it reached (`_save_outputs`),
    records it for a gradient strategy (`record_step`) and notes failures (`judge`)."""
    func, y0, ts, args = problem.func, problem.y0, problem.ts, problem.args
    solver, controller, max_steps = config.solver, config.controller, config.max_steps
    dtype = ts.dtype
    eps = jnp.finfo(dtype).eps
    num_out = ts.shape[0]
    adaptive = isinstance(controller, PIController)
    grid = controller is None
    # Steps chosen by the tolerance (or step_size) alone, outputs from the interpolant.
    interpolate = config.interpolates(num_out)
    if grid:
        max_steps = config.num_steps * (num_out - 1)  # exactly the grid's steps

    if grid:
        h0 = jnp.zeros((), dtype)
        init_fevals = solver.fevals_init
    elif adaptive:
        h0 = controller.initial_step(func, solver, ts[0], y0, args, direction, dtype)
        init_fevals = solver.fevals_init + 2
    else:
        h0 = jnp.abs(jnp.asarray(controller.step_size, dtype))
        init_fevals = solver.fevals_init

    j0 = jnp.ones((), jnp.int32) if grid else leading_outputs(ts)
    # Outputs at ts[0] (repeats included) take y0 before any step.
    leading = jnp.arange(num_out, dtype=jnp.int32) < j0
    ys = jtu.tree_map(
        lambda y: jnp.where(leading.reshape((-1,) + (1,) * y.ndim), y[None],
                            jnp.full((num_out,) + y.shape, jnp.nan, y.dtype)),
        y0,
    )
    # Zeros, not NaN: only the rows of interpolated outputs are read, but a second
    # derivative of the sweep would meet NaN · 0 in the others.
    ys_dot = None
    if interpolate and derivatives:
        ys_dot = jtu.tree_map(lambda y: jnp.zeros((num_out,) + y.shape, y.dtype), y0)
    rec = None
    if record is not None:
        checkpoint = solver.checkpoint(state0) if record == "states" else None
        minus = jnp.full((max_steps,), -1, jnp.int32)
        rec = (jnp.zeros((max_steps,), dtype), jnp.zeros((max_steps,), dtype), minus, minus,
               minus, _nan_buffer((max_steps,), checkpoint))
        check_buffer_memory(max_steps, rec)  # traced: nothing is allocated yet
    slots0 = None if restarts is None else restarts.init(state0)
    dense0 = None
    if config.dense:
        coeffs = jax.eval_shape(lambda: solver.step_dense(func, ts[0], ts[0], state0, args)[2])
        dense0 = (jnp.zeros((max_steps,), dtype), jnp.ones((max_steps,), dtype),
                  _nan_buffer((max_steps,), coeffs))
        check_buffer_memory(max_steps, dense0)

    def propose(c):
        """`(c, t_k, h, reach, target)`: the step to try, whether it ends on the output
        time it aims at (clipped onto it), and that time's index."""
        if grid:  # the same (t_k, h_k) as the scan over a num_steps grid
            t_k, h, out = grid_step(ts, config.num_steps, c.num_steps)
            return eqx.tree_at(lambda c: c.t, c, t_k), t_k, h, out >= 0, out
        target = jnp.asarray(num_out - 1, jnp.int32) if interpolate else c.j
        t_target = ts[target]
        remaining = t_target - c.t
        h_try = direction * c.h
        # A step within `tiny` of its target is stretched onto it, sparing a sliver of
        # a step later, but not right after a rejection: the shrunk step would be
        # stretched back to the size just rejected, and retried unchanged until
        # max_steps (a livelock, seen in float32 next to a discontinuity at an output).
        tiny = jnp.where(
            c.rejected_before, 0, 100 * eps * jnp.maximum(jnp.abs(t_target), jnp.abs(c.t))
        )
        reach = jnp.abs(remaining) <= jnp.abs(h_try) + tiny
        return c, c.t, jnp.where(reach, remaining, h_try), reach, target

    def attempt(c, h):
        """Take the step; `(state1, coeffs, accept, h_next, prev_ratio, finite, outgrown)`."""
        if config.steps_dense(num_out):
            state1, error, coeffs = solver.step_dense(func, c.t, h, c.state, args)
        else:
            (state1, error), coeffs = solver.step(func, c.t, h, c.state, args), None
        finite = tree_all_finite(state1)
        y_max, outgrown = parasitic_check(solver, state1, error, c.y_max, dtype)
        if adaptive:
            accept, h_next, prev_ratio = controller.adapt(
                solver.y(c.state), solver.y(state1), error, jnp.abs(h), c.prev_ratio,
                c.rejected_before, finite, solver.error_order, dtype,
            )
        else:
            accept, h_next, prev_ratio = finite, c.h, c.prev_ratio
        return state1, coeffs, accept, h_next, prev_ratio, finite, y_max, outgrown

    def record_step(c, h, reach, target, mid, hi, took):
        if record is None:
            return c.rec
        checkpoint = solver.checkpoint(c.state) if record == "states" else None
        end = jnp.where(reach, target, -1).astype(jnp.int32)
        return _write(c.rec, c.num_steps, (c.t, h, end, mid, hi, checkpoint), took)

    def judge(c, accept, h_next, finite, took, outgrown, t_target):
        """The result after this iteration: a failure is noted once, where it happens."""
        if adaptive:
            # The smallest step that still moves t: a couple of units in the last place.
            floor = 2 * eps * jnp.maximum(jnp.abs(c.t), jnp.abs(t_target))
            failed = ~accept & (h_next <= floor)
            code = RESULTS.where(finite, RESULTS.step_size_underflow, RESULTS.nonfinite_state)
        else:
            failed, code = ~accept, RESULTS.nonfinite_state
        result = RESULTS.where(failed, code, c.result)
        # Only accepted steps count: a rejected trial may be as wild as it likes.
        return RESULTS.where(
            took & outgrown & (result == RESULTS.successful), RESULTS.parasitic_instability, result
        )

    def cond(c):
        return (c.j < num_out) & (c.result == RESULTS.successful)

    def body(c):
        c, t_k, h, reach, target = propose(c)
        state1, coeffs, accept, h_next, prev_ratio, finite, y_max, outgrown = attempt(c, h)
        if adaptive:  # clipping to an output time must not shrink the steps that follow
            h_next = jnp.where(accept & reach, jnp.maximum(h_next, c.h), h_next)
        took = accept
        state = tree_where(took, state1, c.state)
        t1 = jnp.where(reach, ts[target], t_k + h)
        if grid:  # exactly one output per interval, even where ts repeats
            j, mid = c.j + reach.astype(jnp.int32), c.j
            ys, ys_dot = _write(c.ys, c.j, solver.y(state), reach), None
        else:
            j, mid, ys, ys_dot = _save_outputs(
                ts, c.j, took, t_k, h, t1, solver.y(state1), coeffs if interpolate else None,
                c.ys, c.ys_dot, direction, kind,
            )
        rec = record_step(c, h, reach, target, mid, j, took)
        dense = c.dense
        if config.dense:
            dense = _write(dense, c.num_steps, (t_k, h, coeffs), took)
        slots = c.slots
        if restarts is not None:
            slots = restarts.update(slots, c.num_steps, c.state, took, _write)
        return _Carry(
            t=jnp.where(took, t1, c.t),
            h=h_next,
            state=state,
            j=j,
            num_steps=c.num_steps + took.astype(jnp.int32),
            num_rejected=c.num_rejected + (~accept).astype(jnp.int32),
            num_iters=c.num_iters + 1,
            prev_ratio=prev_ratio,
            rejected_before=~accept,
            result=judge(c, accept, h_next, finite, took, outgrown, ts[target]),
            y_max=jnp.where(took, y_max, c.y_max),
            ys=ys,
            ys_dot=ys_dot,
            dense=dense,
            rec=rec,
            slots=slots,
        )

    zero_i = jnp.zeros((), jnp.int32)
    carry0 = _Carry(
        t=ts[0],
        h=h0,
        state=state0,
        j=j0,
        num_steps=zero_i,
        num_rejected=zero_i,
        num_iters=zero_i,
        prev_ratio=jnp.ones((), dtype),
        rejected_before=jnp.array(False),
        result=result0,
        y_max=rms_norm(y0, dtype),
        ys=ys,
        ys_dot=ys_dot,
        dense=dense0,
        rec=rec,
        slots=slots0,
    )
    # Buffers written in place; equinox's checkpointed loop refuses None among them.
    kept = (True, ys_dot is not None, rec is not None, restarts is not None, dense0 is not None)

    def buffers(c):
        parts = (c.ys, c.ys_dot, c.rec, None if restarts is None else c.slots[1], c.dense)
        return tuple(b for b, keep in zip(parts, kept) if keep)

    c = eqxi.while_loop(
        cond,
        body,
        carry0,
        max_steps=max_steps,
        buffers=buffers,
        kind=kind,
        **_loop_kwargs(kind, checkpoints),
    )
    result = RESULTS.where(
        (c.j < num_out) & (c.result == RESULTS.successful),
        RESULTS.max_steps_reached,
        c.result,
    )
    stats = {
        "num_steps": c.num_steps,
        "num_rejected": c.num_rejected,
        "num_fevals": init_fevals + solver.fevals_step * c.num_iters,
        "t_final": c.t,
    }
    trajectory = None
    if record is not None:
        t_k, h_k, end, mid, hi, states = c.rec
        trajectory = Trajectory(t_k, h_k, end, c.num_steps, states, *_slot_fields(c.slots),
                                mid=mid, hi=hi, first=j0)
    t_target = ts[jnp.minimum(c.j, num_out - 1)]
    dense = None if dense0 is None else _dense.DenseInterpolation(*c.dense, c.num_steps)
    return LoopOutput(c.ys, result, stats, c.state, trajectory, t_target, c.ys_dot, dense)
