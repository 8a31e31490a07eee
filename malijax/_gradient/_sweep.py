"""The one reverse sweep shared by the custom-VJP strategies (ACA, MALI).

The forward map is `y0 -> x_0 -> x_1 -> ... -> x_N`, one solver step per arrow, where
`x_k` is what a strategy carries between steps (a checkpoint for ACA, the whole solver
state for MALI) and the output `ys[j]` is `y(x_{k+1})` for the step `k` that ends on
`ts[j]`. The sweep walks the recorded steps backwards carrying `(x_{k+1}, ∂L/∂x_{k+1})`;
a strategy only says how one step is undone (`backward_step`): it returns `x_k`, the
cotangent of `x_k` (including the output cotangent attached to `x_k`, which it is given
with `h_{k-1}` so that a fused step can look one step ahead), and the cotangents of
`func`, `args`, `t_k` and `h_k`. `prologue` may adjust the final state's cotangent.

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
step sizes chosen by the controller are constants (`stop_gradient`), a step clipped to
land on `ts[j]` has `h_k = ts[j] - t_k` and ends at `t_{k+1} = ts[j]`, any other step
ends at `t_k + h_k`, and on a `num_steps=N` grid `t_k = ts[i] + n (ts[i+1] - ts[i]) / N`.
"""

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from .._batching import any_over_batch, summing, summing_over_batch, value_and_vjp
from .._loop import LoopOutput, Problem, grid_step, integrate
from .._misc import cotangent_or_zeros, real_dtype, tree_add, tree_where, tree_zeros_like


def _output_cotangent(ct_ys, out):
    """`∂L/∂ys[out]`, or zeros when the step ends on no output (`out = -1`)."""
    return jtu.tree_map(
        lambda c: jnp.where(out >= 0, c[jnp.maximum(out, 0)], jnp.zeros_like(c[0])), ct_ys
    )


def fold_repeated_outputs(ct_ys, ts):
    """Move each output's cotangent to the first of its run of equal output times.

    The while loop takes no step over a zero-length interval (`ts[j+1] == ts[j]`): it
    copies `ys[j+1] = ys[j]`, so `∂L/∂ys[j+1]` belongs where the step reaching `ts[j]`
    ends. (All of `ts` equal: everything lands on `ys[0] = y0`.) A `num_steps` grid
    takes its `N` steps of size zero instead, each run of the scan ending on its own
    output, and needs no folding."""
    index = jnp.arange(ts.shape[0])
    starts_run = jnp.concatenate([jnp.array([True]), ts[1:] != ts[:-1]])
    first = jax.lax.cummax(jnp.where(starts_run, index, 0))
    return jtu.tree_map(lambda c: jnp.zeros_like(c).at[first].add(c), ct_ys)


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
    ys, result, stats, t_target = _solve(diff, config, strategy)
    return LoopOutput(ys, result, stats, None, None, t_target)


def _forward(diff, config, strategy):
    y0, func, args, ts = diff
    restarts = strategy.restarts(config, ts.shape[0], y0)
    return integrate(
        Problem(func, y0, ts, args), config, kind=config.while_kind(1), record=strategy.record,
        restarts=restarts,
    )


@eqx.filter_custom_vjp
def _solve(diff, config, strategy):
    out = _forward(diff, config, strategy)
    return out.ys, out.result, out.stats, out.t_target


@_solve.def_fwd
def _solve_fwd(perturbed, diff, config, strategy):
    del perturbed
    out = _forward(diff, config, strategy)
    return (out.ys, out.result, out.stats, out.t_target), (out.trajectory, out.final_state)


@_solve.def_bwd
def _solve_bwd(residuals, grad_obj, perturbed, diff, config, strategy):
    del perturbed
    trajectory, final_state = residuals
    num_out = diff[3].shape[0]
    ys_like = jtu.tree_map(lambda y: jax.ShapeDtypeStruct((num_out,) + y.shape, y.dtype), diff[0])
    ct_ys = cotangent_or_zeros(grad_obj[0], ys_like)
    with summing_over_batch(config.sum_over_batch):
        return reverse_sweep(strategy, diff, config, trajectory, final_state, ct_ys)


def reverse_sweep(strategy, diff, config, traj, final_state, ct_ys):
    y0, func, args, ts = diff
    solver = config.solver
    num_out = ts.shape[0]
    # A num_steps grid (scan) rather than a while loop; one output time takes no steps.
    grid = config.controller is None or num_out == 1
    if not grid:
        ct_ys = fold_repeated_outputs(ct_ys, ts)
    n_per = config.num_steps if num_out > 1 and grid else 0
    x_final = strategy.final_carry(solver, final_state)

    def step_at(k):
        """(t_k, h_k, out_k) of recorded step k."""
        if grid:
            return grid_step(ts, n_per, k)
        return traj.ts[k], traj.hs[k], traj.out[k]

    restarts = traj is not None and traj.slot_steps is not None

    def step_back(k, carry):
        x1, ct_x1, ct_func, ct_args, ct_t1, ct_ts, worst = carry
        t, h, out = step_at(k)
        if restarts:  # x_{k+1}: stored if it was kept (never the final state)
            x1, worst = _restart(traj, k + 1, t + h, x1, worst)
        # What the strategy needs about step k - 1: its size, and the output cotangent
        # attached to x_k (the state step k starts from; ys[0] is handled at the end).
        _, h_prev, out_prev = step_at(jnp.maximum(k - 1, 0))
        h_prev = jnp.where(k > 0, h_prev, jnp.zeros_like(h_prev))
        ct_y0 = _output_cotangent(ct_ys, jnp.where(k > 0, out_prev, -1))
        x0, ct_x0, g_func, g_args, g_t, g_h = strategy.backward_step(
            solver, func, args, traj, k, t, h, x1, ct_x1, h_prev, ct_y0
        )
        g_t = jnp.zeros_like(t) if g_t is None else g_t
        g_h = jnp.zeros_like(h) if g_h is None else g_h
        if grid:
            i, n = k // n_per, k % n_per
            frac = n.astype(ts.dtype) / n_per
            ct_ts = ct_ts.at[i].add(g_t * (1 - frac) - g_h / n_per)
            ct_ts = ct_ts.at[i + 1].add(g_t * frac + g_h / n_per)
            ct_t0 = ct_t1  # unused on a grid: every t_k comes from ts directly
        else:
            ends = out >= 0
            j = jnp.maximum(out, 0)
            ct_ts = ct_ts.at[j].add(jnp.where(ends, ct_t1 + g_h, 0))
            ct_t0 = jnp.where(ends, g_t - g_h, g_t + ct_t1)
        ct_func = tree_add(ct_func, g_func)
        ct_args = tree_add(ct_args, g_args)
        return x0, ct_x0, ct_func, ct_args, ct_t0, ct_ts, worst

    # The final state: its output cotangent, then the strategy's prologue (for the
    # fused reversible Heun, the pull-back through its cached f̂_N).
    num_steps = n_per * (num_out - 1) if grid else traj.num_steps
    if grid and num_out == 1:
        ct_x_final, g_func_n, g_args_n, g_t_n = tree_zeros_like(x_final), None, None, None
    else:
        last = jnp.maximum(num_steps - 1, 0)
        _, h_last, out_last = step_at(last)
        ct_x_final = add_output_cotangent(
            strategy, solver, x_final, tree_zeros_like(x_final),
            _output_cotangent(ct_ys, jnp.where(num_steps > 0, out_last, -1)),
        )
        ct_x_final, g_func_n, g_args_n, g_t_n = strategy.prologue(
            solver, func, args, x_final, ct_x_final, ts[-1], h_last
        )
    g_t_n = jnp.zeros((), ts.dtype) if g_t_n is None else g_t_n
    ct_ts0 = jnp.zeros_like(ts)
    if grid:  # t_N = ts[-1]; the grid's chain below never reads the carried ∂L/∂t_{k+1}
        ct_ts0 = ct_ts0.at[-1].add(g_t_n)
        g_t_n = jnp.zeros_like(g_t_n)

    carry = (
        x_final,
        ct_x_final,
        tree_add(tree_zeros_like(func), g_func_n),
        tree_add(tree_zeros_like(args), g_args_n),
        g_t_n,  # ∂L/∂t_N so far
        ct_ts0,
        (jnp.zeros((), ts.dtype), ts[-1]),  # worst reconstruction error, and where
    )
    if grid and num_out == 1:
        pass  # no steps: only the initial map below
    elif grid:
        num = n_per * (num_out - 1)

        def scan_body(c, _):
            k, inner = c
            return (k - 1, step_back(k, inner)), None

        # A carried counter, not `xs=arange(num)`: memory must not grow with the steps.
        (_, carry), _ = jax.lax.scan(
            scan_body, (jnp.asarray(num - 1, jnp.int32), carry), None, length=num
        )
    else:

        def while_body(c):
            k, inner = c
            if not summing():
                return k - 1, step_back(k, inner)
            # Summing over a vmapped batch, the loop runs (unbatched condition) until
            # the element with the most steps is done; the others idle at step 0 with
            # a zero cotangent, so their share of the parameter totals is exactly zero,
            # and keep their own carry.
            active = k >= 0
            x1, ct_x1, *rest = inner
            ct_x1 = tree_where(active, ct_x1, tree_zeros_like(ct_x1))
            new = step_back(jnp.maximum(k, 0), (x1, ct_x1, *rest))
            kept = tree_where(active, new, inner)
            ct_params = (new[2], new[3])  # shared totals: not selected per element
            return k - 1, (*kept[:2], *ct_params, *kept[4:])

        def cond(c):
            return any_over_batch(c[0] >= 0) if summing() else c[0] >= 0

        init = (traj.num_steps - 1, carry)
        if config.while_kind(1) == "bounded":  # to be reverse-differentiated (_transforms)
            _, carry = eqxi.while_loop(cond, while_body, init, max_steps=config.max_steps,
                                       kind="bounded")
        else:
            _, carry = jax.lax.while_loop(cond, while_body, init)
    x0_rebuilt, ct_x0, ct_func, ct_args, ct_t0, ct_ts, worst = carry
    ct_ts = ct_ts.at[0].add(ct_t0)

    # Through x_0 = to_carry(init(func, t0, y0, args)) (for ALF: v0 = f(t0, z0)).
    def init_map(params, y0, t0):
        return strategy.initial_carry(solver, solver.init(params[0], t0, y0, params[1]))

    x0, (g_func, g_args), (ct_y0, g_t0) = value_and_vjp(init_map, (func, args), (y0, ts[0]), ct_x0)
    if strategy.reconstructs:
        worst = _worse(worst, relative_difference(x0_rebuilt, x0), ts[0])
        strategy.report_reconstruction(
            *worst, dtype=real_dtype(jnp.result_type(*jtu.tree_leaves(x0))), config=config
        )
    ct_y0 = tree_add(ct_y0, jtu.tree_map(lambda c: c[0], ct_ys))
    ct_ts = ct_ts.at[0].add(jnp.zeros_like(ts[0]) if g_t0 is None else g_t0)
    ct_func = tree_add(ct_func, g_func)
    ct_args = tree_add(ct_args, g_args)
    return (ct_y0, ct_func, ct_args, ct_ts)
