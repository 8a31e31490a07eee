"""The one reverse sweep shared by the custom-VJP strategies (ACA, MALI, SymplecticAdjoint).

The forward map is `y0 -> x_0 -> x_1 -> ... -> x_N`, one solver step per arrow, where
`x_k` is what a strategy carries between steps (a checkpoint for ACA, the whole solver
state for MALI). Step `k` also forms its interpolant, a polynomial in `θ` whose
coefficients `C^k` are linear in the step's own values (`malijax/_dense.py`), and the
outputs it reached are `y(x_{k+1})` (those at its end) or `Σ_p θ_j^p C^k_p` (those
inside it). The sweep walks the recorded steps backwards carrying
`(x_{k+1}, ∂L/∂x_{k+1})`; before step `k` it gathers the outputs of step `k - 1` (a loop
over them, any number per step: `_gather_outputs`) into the cotangent of `y(x_k)` and of
`C^{k-1}`, so that a fused step may look one step back. A strategy only says how one step
is undone (`backward_step`): it returns `x_k`, the cotangent of `x_k` (including the output
cotangent attached to `x_k`), and the cotangents of `func`, `args`, `t_k` and `h_k`, given
those of `x_{k+1}` and of `C^k`. `prologue` may adjust the final state's cotangent.

Where a step is read from. On a `num_steps` grid `(t_k, h_k)` are recomputed from `ts`
and ACA's checkpoints are one per step. A while loop keeps its steps in a fixed number of
slots (`malijax._records`): before undoing step `k` the sweep makes sure the row of step
`k - 1` is there (`ensure`), replaying the forward loop (`_loop.replay`, the same
`_Stepper`, so the same steps) from the nearest stored step if it is not, into the
slots of steps already undone.

Stored states and reconstruction are the two ends of one scale. ACA stores `x_k` at
every step and its `backward_step` loads it; MALI stores none and rebuilds `x_k` from
`x_{k+1}` with the solver's algebraic inverse, which amplifies rounding by up to
`1/|det|` per step (damped ALF, coupled `Reversible`) and by the flow's own contraction.
In between, `MALI(checkpoints=K)` keeps `K` whole states (`_loop.Restarts`): whenever
the sweep reaches a step whose input state was kept, the rebuilt value is replaced by
the stored one, so rounding is amplified over one segment only, and the difference
between the two is the segment's reconstruction error (reported by the strategy's
`report_reconstruction`, worst segment first). The cotangents are untouched: the stored
and the rebuilt state stand for the same point of the same map.

Batches: under `grad(vmap(solve))` JAX runs this backward under `vmap` and only
afterwards sums the cotangents of unbatched inputs, so a sweep carrying `∂L/∂θ` would
carry one per example (`B × |θ|`, and `B` outer products per step). Instead, when the
call found `vmap` innermost (`Config.sum_over_batch`), every VJP of `func` in the sweep
is `malijax._batching.value_and_vjp`, a `custom_vmap` whose batching rule takes the VJP
of the vmapped step (`vjp(vmap(f))`, one contraction over the batch, exactly the
backward of one batched state) and returns unbatched parameter cotangents, so the
carried totals stay unbatched; the adaptive while loop runs on an unbatched
condition (`any_over_batch`), idling finished elements with zero cotangents. One
mechanism at the level of the VJP, so every strategy and solver inherits it; why it is
chosen at the call, and its limits, are in `malijax/_batching.py`.

Second derivatives: the backward is JVP-able, so `jax.hessian` (forward-over-reverse)
works everywhere. Reverse-over-reverse transposes the forward and this sweep too: on a
`num_steps` grid they are scans; otherwise, when the call counted two reverse-mode
levels (`Config.reverse_levels`, `malijax/_transforms.py`), both run in Equinox's bounded
loop instead of `lax.while_loop`, which JAX cannot transpose.

Time gradients are exact for the computed discretisation, the same as `Direct`: the
step sizes chosen by the controller are constants (`stop_gradient`), a step clipped onto
`ts[j]` (the last, or every output's with `land_on_outputs`) has `h_k = ts[j] - t_k` and
ends at `t_{k+1} = ts[j]`, any other step ends at `t_k + h_k`, on a `num_steps=N` grid
`t_k = ts[i] + n (ts[i+1] - ts[i]) / N`, and an output inside a step moves its `θ_j =
(ts[j] - t_k) / h_k`, not the step.
"""

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from .. import _dense, _records
from .._batching import any_over_batch, summing, summing_over_batch, value_and_vjp
from .._loop import LoopOutput, Problem, grid_step, integrate, replay
from .._misc import (
    cotangent_or_zeros, real_dtype, tree_add, tree_dot, tree_where, tree_zeros_like,
)


def _gather_outputs(ct_ys, ys_dot, ts, step, active, degree, while_kind):
    """The outputs step `k` reached, pulled back to what the step computed.

    `step = (t_k, h_k, lo, mid, hi)`: outputs `[lo, mid)` came from the step's
    interpolant (`malijax._dense`), `[mid, hi)` are its end state. Returns
    `(ct_end, ct_coeffs, ct_ts, g_t, g_h)`: the summed cotangent of the outputs at the
    end, `C̄_p = Σ_j θ_j^p ȳ_j` over the interpolated ones (None unless `dense`), and
    their `ts` terms: `∂L/∂s_j = ⟨ȳ_j, ẏ_j⟩` (from the forward's `ys_dot`, when `ts`
    is differentiated), and `-⟨ȳ_j, ẏ_j⟩`, `-θ_j ⟨ȳ_j, ẏ_j⟩` on `t_k`, `h_k` through
    `θ_j = (s_j - t_k) / h_k`. `degree` is the interpolant's (None: no output is inside
    a step). Empty unless `active`. A loop over the step's outputs: any number may
    fall in one step."""
    t, h, lo, mid, hi = step
    hi = jnp.where(active, hi, lo)
    zero_y = jtu.tree_map(lambda c: jnp.zeros_like(c[0]), ct_ys)
    dense = degree is not None
    ct_coeffs = None
    if dense:
        ct_coeffs = jtu.tree_map(lambda c: jnp.zeros((degree + 1,) + c.shape[1:], c.dtype), ct_ys)
    zero_t = jnp.zeros((), ts.dtype)

    def body(s):
        j, ct_end, ct_coeffs, ct_ts, g_t, g_h = s
        c = jtu.tree_map(lambda x: x[j], ct_ys)
        inside = j < mid
        ct_end = tree_add(ct_end, tree_where(inside, zero_y, c))
        if dense:
            theta = (ts[j] - t) / jnp.where(h == 0, 1, h)
            weights = jnp.where(inside, _dense.powers(theta, degree), 0)
            ct_coeffs = tree_add(ct_coeffs, _dense.transpose(c, weights))
            if ys_dot is not None:
                d = jnp.where(inside, tree_dot(c, jtu.tree_map(lambda x: x[j], ys_dot), ts.dtype), 0)
                ct_ts = ct_ts.at[j].add(d)
                g_t, g_h = g_t - d, g_h - theta * d
        return j + 1, ct_end, ct_coeffs, ct_ts, g_t, g_h

    init = (lo, zero_y, ct_coeffs, jnp.zeros_like(ts), zero_t, zero_t)
    _, ct_end, ct_coeffs, ct_ts, g_t, g_h = eqxi.while_loop(
        lambda s: s[0] < hi, body, init, max_steps=ts.shape[0], kind=while_kind
    )
    return ct_end, ct_coeffs, ct_ts, g_t, g_h


def relative_difference(rebuilt, stored):
    """max |rebuilt - stored| / max |stored| over the inexact leaves (NaN -> inf)."""
    pairs = [
        (a, b) for a, b in zip(jtu.tree_leaves(rebuilt), jtu.tree_leaves(stored))
        if eqx.is_inexact_array(b)
    ]
    if not pairs:
        return jnp.zeros(())
    pairs = jax.lax.stop_gradient(pairs)  # diagnostics only
    dtype = real_dtype(jnp.result_type(*[b.dtype for _, b in pairs]))
    diff = jnp.max(jnp.stack([jnp.max(jnp.abs(a - b)).astype(dtype) for a, b in pairs]))
    scale = jnp.max(jnp.stack([jnp.max(jnp.abs(b)).astype(dtype) for _, b in pairs]))
    error = diff / jnp.maximum(scale, jnp.finfo(dtype).tiny)
    return jnp.where(jnp.isnan(error), jnp.inf, error)


def _worse(worst, error, t):
    """`(error, t)` if `error` exceeds the worst so far, else `worst`."""
    worse = error > worst[0]
    return jnp.where(worse, error.astype(worst[0].dtype), worst[0]), jnp.where(worse, t, worst[1])


def _restart(traj, k, t, x, worst):
    """Replace the rebuilt `x = x_k` by the stored state if step `k`'s input was kept,
    tracking the worst relative difference and the time it occurred at."""
    hit = traj.slot_steps == k
    stored = jnp.any(hit)
    x_stored = jtu.tree_map(lambda b: b[jnp.argmax(hit)], traj.slot_states)
    error = jnp.where(stored, relative_difference(x, x_stored), 0)
    return tree_where(stored, x_stored, x), _worse(worst, error, t)


def add_output_cotangent(strategy, solver, x, ct_x, ct_y):
    """`ct_x + (∂y(x)/∂x)ᵀ ct_y`: an output's cotangent added to a carried value."""
    _, pull_y = jax.vjp(lambda x: strategy.carry_y(solver, x), x)
    (ct,) = pull_y(ct_y)
    return tree_add(ct_x, ct)


def solve_with_custom_vjp(strategy, problem, config):
    """Run the forward loop under a custom VJP whose backward is `reverse_sweep`."""
    func = eqx.filter_closure_convert(problem.func, problem.ts[0], problem.y0, problem.args)
    diff = (problem.y0, func, problem.args, problem.ts)
    ys, result, stats, t_target, dense = _solve(diff, config, strategy)
    return LoopOutput(ys, result, stats, None, None, t_target, dense=dense)


def _forward(diff, config, strategy, derivatives=False, record=True):
    """The forward loop; with `record`, keeping what the strategy's sweep reads."""
    y0, func, args, ts = diff
    restarts = strategy.restarts(config, ts.shape[0], y0) if record else None
    return integrate(
        Problem(func, y0, ts, args), config, kind=config.while_kind(1),
        record=strategy.record if record else None, restarts=restarts,
        derivatives=derivatives, slots=getattr(strategy, "slots", None),
    )


@eqx.filter_custom_vjp
def _solve(diff, config, strategy):
    # Not differentiated: nothing to record (XLA does not remove a loop's dead records).
    out = _forward(diff, config, strategy, record=False)
    return out.ys, out.result, out.stats, out.t_target, out.dense


@_solve.def_fwd
def _solve_fwd(perturbed, diff, config, strategy):
    # dy/dt at outputs inside steps is kept only when `ts` is differentiated.
    ts_perturbed = any(jtu.tree_leaves(perturbed[3]))
    out = _forward(diff, config, strategy, derivatives=ts_perturbed)
    residuals = (out.trajectory, out.final_state, out.ys_dot)
    return (out.ys, out.result, out.stats, out.t_target, out.dense), residuals


@_solve.def_bwd
def _solve_bwd(residuals, grad_obj, perturbed, diff, config, strategy):
    del perturbed
    trajectory, final_state, ys_dot = residuals
    num_out = diff[3].shape[0]
    ys_like = jtu.tree_map(lambda y: jax.ShapeDtypeStruct((num_out,) + y.shape, y.dtype), diff[0])
    ct_ys = cotangent_or_zeros(grad_obj[0], ys_like)
    ct_steps = None
    if config.dense and grad_obj[4] is not None:  # every step's (t_k, h_k, interpolant)
        ct = grad_obj[4]
        like = jax.eval_shape(lambda: _forward(diff, config, strategy).dense)  # no run-time cost
        ct_steps = cotangent_or_zeros(
            (ct.ts, ct.hs, ct.coeffs), (like.ts, like.hs, like.coeffs)
        )
    with summing_over_batch(config.sum_over_batch):
        return reverse_sweep(strategy, diff, config, trajectory, final_state, ct_ys, ys_dot,
                             ct_steps)


class _Step(eqx.Module):
    """What the sweep knows of recorded step `k`."""

    t: jax.Array  # t_k
    h: jax.Array  # h_k
    end: jax.Array  # the output time it was clipped onto, or -1
    lo: jax.Array  # outputs [lo, mid) came from its interpolant, [mid, hi) are its end
    mid: jax.Array
    hi: jax.Array
    stored: object  # the checkpoint of its input x_k, if one was kept (ACA)


class _Sweep:
    """The reverse sweep's phases (`reverse_sweep`): where each recorded step is read
    from (`step_at`, `ensure`), its outputs (`gather`), undoing one step (`step_back`),
    the final state (`start`), the loop (`run`) and the initial map (`finish`)."""

    def __init__(self, strategy, diff, config, traj, ct_ys, ys_dot, ct_steps):
        y0, func, args, ts = diff
        self.strategy, self.diff, self.config, self.traj = strategy, diff, config, traj
        self.ct_ys, self.ys_dot, self.ct_steps = ct_ys, ys_dot, ct_steps
        self.solver = config.solver
        self.ts = ts
        self.num_out = num_out = ts.shape[0]
        # A num_steps grid (scan) rather than a while loop; one output time takes no steps.
        self.grid = config.controller is None or num_out == 1
        self.degree = (self.solver.dense_degree if config.steps_dense(num_out) and num_out > 1
                       else None)
        self.n_per = config.num_steps if num_out > 1 and self.grid else 0
        self.loop_kind = config.while_kind(1)
        self.restarts = traj is not None and traj.slot_steps is not None
        self.slotted = traj is not None and traj.records is not None
        self.problem = Problem(func, y0, ts, args)
        self.direction = jnp.sign(ts[-1] - ts[0])
        # Every step in the slot of its number: no searches, no replays (one branch for
        # a vmapped batch). Not under reverse-over-reverse, whose loops are linearised.
        self.in_order = None
        if self.slotted and self.loop_kind == "lax":
            self.in_order = _records.in_order(traj.layout, traj.num_steps)

    def step_at(self, k, records):
        """`_Step` k, from the grid or the records' slots."""
        traj = self.traj
        if self.grid:
            t, h, out = grid_step(self.ts, self.n_per, k)
            lo = jnp.maximum(out, 0)
            stored = None
            if traj is not None and traj.states is not None:
                stored = jtu.tree_map(lambda x: x[k], traj.states)
            return _Step(t, h, out, lo, lo, jnp.where(out >= 0, out + 1, 0), stored)
        row = _records.lookup(records, k, self.in_order)
        return _Step(row.t, row.h, row.end, row.lo, row.mid, row.hi, row.checkpoint)

    def ensure(self, records, swept, k, spare=0):
        """The records with step `k` in a slot (replayed if missing), every step after
        `swept` having been undone (`_loop.replay`)."""
        if not self.slotted:
            return records
        return replay(self.problem, self.config, self.direction, self.traj.layout, records,
                      swept, k, self.loop_kind, spare, self.in_order)

    def gather(self, k, step, active):
        """Step k's outputs (`_gather_outputs`), plus the dense solution's own rows."""
        out = _gather_outputs(
            self.ct_ys, self.ys_dot, self.ts, (step.t, step.h, step.lo, step.mid, step.hi),
            active, self.degree, self.loop_kind,
        )
        if self.ct_steps is None:
            return out
        # The cotangents of this step's t_k, h_k and coefficients in the dense solution.
        ct_end, ct_coeffs, ct_ts, g_t, g_h = out
        row = jtu.tree_map(lambda c: jnp.where(active, c[k], jnp.zeros_like(c[k])), self.ct_steps)
        ct_coeffs = tree_add(ct_coeffs, row[2])
        return ct_end, ct_coeffs, ct_ts, g_t + row[0], g_h + row[1]

    def step_back(self, k, carry):
        """Undo step k: from `(x_{k+1}, ∂L/∂x_{k+1})` to `(x_k, ∂L/∂x_k)`, accumulating
        the cotangents of `func`, `args`, `ts`."""
        x1, ct_x1, ct_func, ct_args, ct_t1, ct_ts, worst, ahead, records = carry
        ct_coeffs, g_t_out, g_h_out = ahead  # this step's interpolated outputs
        ts, solver = self.ts, self.solver
        records = self.ensure(records, k, k - 1)
        step = self.step_at(k, records)
        t, h, end = step.t, step.h, step.end
        if self.restarts:  # x_{k+1}: stored if it was kept (never the final state)
            x1, worst = _restart(self.traj, k + 1, t + h, x1, worst)
        # What the strategy needs about step k - 1: its size, its outputs at x_k (the
        # state step k starts from) and its interpolated outputs' cotangent, gathered
        # here one step ahead and carried (a fused step may look one step back).
        prev = self.step_at(jnp.maximum(k - 1, 0), records)
        h_prev = jnp.where(k > 0, prev.h, jnp.zeros_like(prev.h))
        ct_y0, ct_coeffs_prev, ct_ts_prev, g_t_prev, g_h_prev = self.gather(
            jnp.maximum(k - 1, 0), prev, k > 0
        )
        ct_ts = ct_ts + ct_ts_prev
        x0, ct_x0, g_func, g_args, g_t, g_h = self.strategy.backward_step(
            solver, self.diff[1], self.diff[2], step.stored, t, h, x1, ct_x1, h_prev, ct_y0,
            ct_dense=ct_coeffs, ct_dense_prev=ct_coeffs_prev,
        )
        g_t = (jnp.zeros_like(t) if g_t is None else g_t) + g_t_out
        g_h = (jnp.zeros_like(h) if g_h is None else g_h) + g_h_out
        if self.grid:
            n_per = self.n_per
            i, n = k // n_per, k % n_per
            frac = n.astype(ts.dtype) / n_per
            ct_ts = ct_ts.at[i].add(g_t * (1 - frac) - g_h / n_per)
            ct_ts = ct_ts.at[i + 1].add(g_t * frac + g_h / n_per)
            ct_t0 = ct_t1  # unused on a grid: every t_k comes from ts directly
        else:  # clipped: h_k = ts[end] - t_k, so t_{k+1} = ts[end]; else t_k + h_k
            ends = end >= 0
            j = jnp.maximum(end, 0)
            ct_ts = ct_ts.at[j].add(jnp.where(ends, ct_t1 + g_h, 0))
            ct_t0 = jnp.where(ends, g_t - g_h, g_t + ct_t1)
        ct_func = tree_add(ct_func, g_func)
        ct_args = tree_add(ct_args, g_args)
        ahead = (ct_coeffs_prev, g_t_prev, g_h_prev)
        return x0, ct_x0, ct_func, ct_args, ct_t0, ct_ts, worst, ahead, records

    def start(self, final_state):
        """The carry at the final state: the outputs of the last step, then the
        strategy's prologue (for the fused reversible Heun, the pull-back through its
        cached f̂_N)."""
        strategy, solver, ts, traj = self.strategy, self.solver, self.ts, self.traj
        func, args = self.diff[1], self.diff[2]
        x_final = strategy.final_carry(solver, final_state)
        records = traj.records if self.slotted else None
        if self.num_out == 1:  # no steps: the output is y0 itself (`finish`)
            ct_x_final, g_func_n, g_args_n, g_t_n = tree_zeros_like(x_final), None, None, None
            zero_t = jnp.zeros((), ts.dtype)
            ct_ts0, ahead = jnp.zeros_like(ts), (None, zero_t, zero_t)
        else:
            num_steps = self.n_per * (self.num_out - 1) if self.grid else traj.num_steps
            last = jnp.maximum(num_steps - 1, 0)
            # One slot spare: the first step undone will still hold this one's.
            records = self.ensure(records, num_steps, jnp.where(num_steps > 0, last, -1), spare=1)
            step = self.step_at(last, records)
            ct_end, ct_coeffs_last, ct_ts0, g_t_last, g_h_last = self.gather(
                last, step, num_steps > 0
            )
            ct_x_final = add_output_cotangent(
                strategy, solver, x_final, tree_zeros_like(x_final), ct_end
            )
            ct_x_final, g_func_n, g_args_n, g_t_n = strategy.prologue(
                solver, func, args, x_final, ct_x_final, ts[-1], step.h, ct_dense=ct_coeffs_last
            )
            ahead = (ct_coeffs_last, g_t_last, g_h_last)
        g_t_n = jnp.zeros((), ts.dtype) if g_t_n is None else g_t_n
        if self.grid:  # t_N = ts[-1]; the grid's chain never reads the carried ∂L/∂t_{k+1}
            ct_ts0 = ct_ts0.at[-1].add(g_t_n)
            g_t_n = jnp.zeros_like(g_t_n)
        return (
            x_final,
            ct_x_final,
            tree_add(tree_zeros_like(func), g_func_n),
            tree_add(tree_zeros_like(args), g_args_n),
            g_t_n,  # ∂L/∂t_N so far
            ct_ts0,
            (jnp.zeros((), ts.dtype), ts[-1]),  # worst reconstruction error, and where
            ahead,
            records,
        )

    def run(self, carry):
        """Every recorded step, last first: a scan on a grid, else a while loop."""
        if self.grid:
            if self.num_out == 1:
                return carry  # no steps: only the initial map (`finish`)
            num = self.n_per * (self.num_out - 1)

            def scan_body(c, _):
                k, inner = c
                return (k - 1, self.step_back(k, inner)), None

            # A carried counter, not `xs=arange(num)`: memory must not grow with the steps.
            (_, carry), _ = jax.lax.scan(
                scan_body, (jnp.asarray(num - 1, jnp.int32), carry), None, length=num
            )
            return carry

        def while_body(c):
            k, inner = c
            if not summing():
                return k - 1, self.step_back(k, inner)
            # Summing over a vmapped batch, the loop runs (unbatched condition) until
            # the element with the most steps is done; the others idle at step 0 with
            # a zero cotangent, so their share of the parameter totals is exactly zero,
            # and keep their own carry. (Their records are unchanged: step 0 is stored.)
            active = k >= 0
            x1, ct_x1, *rest = inner
            ct_x1 = tree_where(active, ct_x1, tree_zeros_like(ct_x1))
            ct_coeffs, g_t_out, g_h_out = rest[5]
            rest[5] = (_zero_where(~active, ct_coeffs), g_t_out, g_h_out)
            new = self.step_back(jnp.maximum(k, 0), (x1, ct_x1, *rest))
            kept = tree_where(active, new[:-1], inner[:-1])
            ct_params = (new[2], new[3])  # shared totals: not selected per element
            return k - 1, (*kept[:2], *ct_params, *kept[4:], new[-1])

        def cond(c):
            return any_over_batch(c[0] >= 0) if summing() else c[0] >= 0

        init = (self.traj.num_steps - 1, carry)
        if self.loop_kind == "bounded":  # to be reverse-differentiated (_transforms)
            _, carry = eqxi.while_loop(cond, while_body, init, max_steps=self.config.max_steps,
                                       kind="bounded")
        else:
            # The records as buffers: written in place by replays, and under `vmap` not
            # selected whole every iteration.
            buffers = (lambda c: c[1][-1][:2]) if self.slotted else None
            _, carry = eqxi.while_loop(cond, while_body, init, max_steps=self.config.max_steps,
                                       kind="lax", buffers=buffers)
        return carry

    def finish(self, carry):
        """Through `x_0 = to_carry(init(func, t0, y0, args))` (for ALF: `v0 = f(t0, z0)`),
        and the outputs at `ts[0]`: the cotangents `(y0, func, args, ts)`."""
        strategy, solver, ts, config = self.strategy, self.solver, self.ts, self.config
        y0, func, args = self.diff[:3]
        x0_rebuilt, ct_x0, ct_func, ct_args, ct_t0, ct_ts, worst, _, _ = carry
        ct_ts = ct_ts.at[0].add(ct_t0)

        def init_map(params, y0, t0):
            return strategy.initial_carry(solver, solver.init(params[0], t0, y0, params[1]))

        x0, (g_func, g_args), (ct_y0, g_t0) = value_and_vjp(
            init_map, (func, args), (y0, ts[0]), ct_x0
        )
        if strategy.reconstructs:
            worst = _worse(worst, relative_difference(x0_rebuilt, x0), ts[0])
            strategy.report_reconstruction(
                *worst, dtype=real_dtype(jnp.result_type(*jtu.tree_leaves(x0))), config=config
            )
        # Outputs [0, first) are at ts[0]: y0 itself.
        first = 1 if self.grid else self.traj.first
        leading = jnp.arange(self.num_out, dtype=jnp.int32) < first
        ct_y0 = tree_add(ct_y0, jtu.tree_map(
            lambda c: jnp.sum(jnp.where(leading.reshape((-1,) + (1,) * (c.ndim - 1)), c, 0), 0),
            self.ct_ys,
        ))
        ct_ts = ct_ts.at[0].add(jnp.zeros_like(ts[0]) if g_t0 is None else g_t0)
        return ct_y0, tree_add(ct_func, g_func), tree_add(ct_args, g_args), ct_ts


def reverse_sweep(strategy, diff, config, traj, final_state, ct_ys, ys_dot=None, ct_steps=None):
    """Walk the recorded steps backwards (see the module docstring). `ys_dot`: `dy/dt` at
    the outputs inside steps (when `ts` is differentiated); `ct_steps`: the cotangents of
    every step's `(t_k, h_k, interpolant coefficients)` from `solve(..., dense=True)`.
    Returns the cotangents of `(y0, func, args, ts)`."""
    sweep = _Sweep(strategy, diff, config, traj, ct_ys, ys_dot, ct_steps)
    return sweep.finish(sweep.run(sweep.start(final_state)))


def _zero_where(pred, tree):
    return None if tree is None else tree_where(pred, tree_zeros_like(tree), tree)
