import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from .._batching import (
    call_field, expect_unbatched, summing, summing_over_batch, value_and_vjp,
)
from .._controller import ConstantStepSize, PIController
from .._errors import Report, error_if_failed
from .._loop import Config, LoopOutput, Problem, integrate
from .._misc import cotangent_or_zeros, tree_add, tree_dot, tree_zeros_like
from .._solution import RESULTS
from .base import AbstractGradient


class Adjoint(AbstractGradient):
    r"""The continuous adjoint method (Chen, Rubanova, Bettencourt & Duvenaud 2018).

    The forward stores only the outputs. The backward integrates, over each output
    interval from `ts[i]` back to `ts[i-1]`, the augmented system

        z' = f(t, z),   a' = -Jᵀa,   a_θ' = -f_θᵀa,   a_t' = -f_tᵀa,

    from `z(ts[i]) = ys[i]` (reset to the stored forward value at every output), adding
    `∂L/∂ys[i]` to `a` at each output time. Memory is constant in the number of steps,
    but the gradient is only as accurate as the two solves' tolerances: it is not the
    gradient of the computed discretisation, and the backward reconstruction of `z` can
    be unstable when the forward dynamics contract. Gradients w.r.t. `ts` use the
    continuous-time formula `∂L/∂ts[i] = <f(ts[i], ys[i]), ∂L/∂ys[i]>` (plus `a_t` at
    `ts[0]`).

    **Arguments:**

    - `rtol`, `atol`: tolerances of the backward solve (default: the forward's).
    - `solver`: solver of the backward solve (default: the forward's).
    - `seminorm`: if True (default) the backward's error control ignores the parameter
      and time quadratures `a_θ`, `a_t`, which never feed back into the dynamics
      (Kidger, Chen & Lyons 2021); far fewer steps for the same `z`, `a` accuracy.
    - `max_steps`: bound on each interval's backward solve (default: the forward's).

    With fixed steps (`step_size`, `num_steps`) the backward uses the same grid settings.
    The backward integrates each interval in normalised time `s ∈ [0, 1]`,
    `t = ts[i] + s (ts[i-1] − ts[i])` (every derivative scaled by the interval's
    length): the same steps, but independent of an element's own times, so under
    `jax.grad(vmap(...))` a batch shares them (adaptive: the largest of the elements'
    error ratios decides, so each meets its tolerance) and `a_θ` is one array summed
    over the batch, at the memory of one batched state.

    ??? cite "References"
        Chen, Rubanova, Bettencourt & Duvenaud, "Neural ordinary differential
        equations", NeurIPS 2018. Kidger, Chen & Lyons, "'Hey, that's not an ODE':
        faster ODE adjoints via seminorms", ICML 2021.
    """

    rtol: float | None = None
    atol: float | None = None
    solver: object = None
    seminorm: bool = True
    max_steps: int | None = None

    def check(self, solver, config):
        del solver
        if config.dense:
            raise ValueError(
                "Adjoint() cannot differentiate `solve(..., dense=True)`'s interpolant: its "
                "backward solve only meets the output times. Take the outputs you need as "
                "`ts`, or use a discretise-then-optimise strategy (ACA, MALI, Direct, ...)."
            )

    def apply(self, problem, config):
        func = eqx.filter_closure_convert(problem.func, problem.ts[0], problem.y0, problem.args)
        diff = (problem.y0, func, problem.args, problem.ts)
        ys, result, stats, t_target = _solve(diff, config, self)
        return LoopOutput(ys, result, stats, None, None, t_target)

    def backward_config(self, config):
        """The backward solve's settings. Its adaptive steps are shared by a vmapped batch
        when the parameter cotangent is summed over it (`Config.sum_over_batch`)."""
        controller = config.controller
        if isinstance(controller, PIController):
            controller = PIController(
                rtol=controller.rtol if self.rtol is None else self.rtol,
                atol=controller.atol if self.atol is None else self.atol,
                select=(lambda s: (s[0], s[1])) if self.seminorm else None,
                shared=config.sum_over_batch,
            )
        return Config(
            solver=config.solver if self.solver is None else self.solver,
            controller=controller,
            num_steps=config.num_steps,
            max_steps=config.max_steps if self.max_steps is None else self.max_steps,
            throw=config.throw,
            reverse_levels=config.reverse_levels,
        )


def _forward(diff, config):
    y0, func, args, ts = diff
    return integrate(Problem(func, y0, ts, args), config, kind=config.while_kind(1), record=None)


@eqx.filter_custom_vjp
def _solve(diff, config, strategy):
    out = _forward(diff, config)
    return out.ys, out.result, out.stats, out.t_target


@_solve.def_fwd
def _solve_fwd(perturbed, diff, config, strategy):
    del perturbed, strategy
    out = _forward(diff, config)
    return (out.ys, out.result, out.stats, out.t_target), out.ys


def _scaled(tree, delta):
    return jtu.tree_map(lambda x: delta.astype(x.dtype) * x, tree)


def _in_unit_time(config, delta):
    """`config` for an interval of length |Δ| mapped onto s ∈ [0, 1]: `step_size` h
    becomes h / |Δ| (one step for an empty interval); tolerances and grids are unchanged."""
    controller = config.controller
    if not isinstance(controller, ConstantStepSize):
        return config
    size = jnp.abs(delta)
    step = jnp.where(size == 0, 1, controller.step_size / jnp.where(size == 0, 1, size))
    return dataclasses.replace(config, controller=ConstantStepSize(step))


@_solve.def_bwd
def _solve_bwd(ys, grad_obj, perturbed, diff, config, strategy):
    del perturbed
    # The backward runs in s ∈ [0, 1] on every output interval, so on a num_steps grid,
    # and with adaptive steps shared by the batch (`PIController(shared=True)`), every
    # element of a vmapped batch takes the same steps in s: a_θ is one array, summed over
    # the batch stage by stage (malijax/_batching.py). `step_size` steps, h / |Δt| in s,
    # differ between elements with their own output times: a_θ stays per example.
    summed = config.sum_over_batch and not isinstance(config.controller, ConstantStepSize)
    with summing_over_batch(summed):
        return _backward(ys, grad_obj, diff, config, strategy)


def _backward(ys, grad_obj, diff, config, strategy):
    y0, func, args, ts = diff
    ct_ys = cotangent_or_zeros(grad_obj[0], ys)
    bconfig = strategy.backward_config(config)
    dtype = ts.dtype

    def augmented(s, state, interval):
        # The adjoint system in s ∈ [0, 1], t = t_i + s·Δ (Δ = ts[i-1] − ts[i]): each
        # derivative scales by Δ, which the VJP takes in its cotangent. The steps in s
        # need not depend on an element's own times, so a batch can share them.
        t_i, delta = interval
        z, a, _, _, _ = state
        t = t_i + s * delta
        fz, (g_func, g_args), (g_t, g_z) = value_and_vjp(
            call_field, (func, args), (t, z), _scaled(a, delta)
        )
        g_t = jnp.zeros_like(t) if g_t is None else g_t
        neg = lambda tree: jtu.tree_map(lambda x: -x, tree)  # noqa: E731
        return (_scaled(fz, delta), neg(g_z), neg(g_func), neg(g_args), -g_t)

    def interval(carry, i):
        a, a_func, a_args, a_t, ct_ts, result, n_steps, where = carry
        z_i = jtu.tree_map(lambda y: y[i], ys)
        ct_i = jtu.tree_map(lambda c: c[i], ct_ys)
        g_i = tree_dot(func(ts[i], z_i, args), ct_i, dtype)  # ∂L/∂ts[i], continuous time
        ct_ts = ct_ts.at[i].add(g_i)
        a = tree_add(a, ct_i)
        state = (z_i, a, a_func, a_args, a_t - g_i)
        delta = ts[i - 1] - ts[i]
        out = integrate(Problem(augmented, state, unit, (ts[i], delta)),
                        _in_unit_time(bconfig, delta), kind=bconfig.while_kind(1))
        _, a, a_func, a_args, a_t = jtu.tree_map(lambda x: x[-1], out.ys)
        steps = out.stats["num_steps"]
        if summing():  # a_func is one sum over the batch: right only for shared steps
            steps = expect_unbatched(steps, "the Adjoint's backward steps")
        first = (result == RESULTS.successful) & (out.result != RESULTS.successful)
        failure = (ts[i] + out.stats["t_final"] * delta, n_steps + steps,
                   out.stats["num_rejected"], ts[i - 1])
        where = jtu.tree_map(lambda new, old: jnp.where(first, new, old), failure, where)
        result = RESULTS.where(result == RESULTS.successful, out.result, result)
        n_steps = n_steps + steps
        return (a, a_func, a_args, a_t, ct_ts, result, n_steps, where), None

    unit = jnp.array([0.0, 1.0], dtype)
    num_out = ts.shape[0]
    carry = (
        tree_zeros_like(y0),
        tree_zeros_like(func),
        tree_zeros_like(args),
        jnp.zeros((), dtype),
        jnp.zeros_like(ts),
        RESULTS.successful,
        jnp.zeros((), jnp.int32),
        (ts[0], jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), ts[0]),  # where it failed
    )
    if num_out > 1:
        carry, _ = jax.lax.scan(interval, carry, jnp.arange(num_out - 1, 0, -1))
    a, a_func, a_args, a_t, ct_ts, result, _, where = carry
    ct_y0 = tree_add(a, jtu.tree_map(lambda c: c[0], ct_ys))
    ct_ts = ct_ts.at[0].add(a_t)
    if config.throw:
        # (t, accepted steps so far, rejected in that interval, the interval's end)
        n = bconfig.max_steps
        report = Report(n, stage="the Adjoint's backward solve (the adjoint system, "
                        "integrated from ts[-1] back to ts[0])",
                        limit=(f"max_steps={n} (per output interval)",
                               "`max_steps` (of the solve, or `mj.Adjoint(max_steps=...)`)"))
        ct_y0 = error_if_failed(ct_y0, result, *where, report)
    return (ct_y0, a_func, a_args, ct_ts)

