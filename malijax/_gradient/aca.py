import jax.tree_util as jtu

from .._batching import value_and_vjp
from ._sweep import add_output_cotangent, solve_with_custom_vjp
from .base import AbstractGradient


class ACA(AbstractGradient):
    """Adaptive checkpoint adjoint (Zhuang et al., ICML 2020).

    The forward stores a checkpoint of the state at every accepted step (one state
    for Runge--Kutta methods, whose FSAL stage is recomputed; `(z, v)` for ALF) and
    the accepted `(t_k, h_k)`. The backward walks the steps in reverse, recomputes
    each step from its checkpoint and takes its VJP. Rejected trial steps are never
    differentiated. The gradient is that of the computed discretisation, equal to
    `Direct` up to rounding, with memory of one checkpoint per step and one step's
    activations.

    Memory: under adaptive stepping the checkpoint buffer has `max_steps` rows
    (shapes are static in JAX); with `num_steps` it has exactly one row per step.

    ??? cite "Reference"
        Zhuang, Dvornek, Li, Tatikonda, Papademetris & Duncan, "Adaptive checkpoint
        adjoint method for gradient estimation in neural ODE", ICML 2020.
    """

    record = "states"

    def apply(self, problem, config):
        return solve_with_custom_vjp(self, problem, config)

    # --- the sweep's hooks: the carried value x_k is the solver's checkpoint ---

    def final_carry(self, solver, final_state):
        return solver.checkpoint(final_state)

    def initial_carry(self, solver, state):
        return solver.checkpoint(state)

    def carry_y(self, solver, x):
        return solver.checkpoint_y(x)

    def prologue(self, solver, func, args, x, ct_x, t, h_last, ct_dense=None):
        del solver, func, args, x, t, h_last, ct_dense
        return ct_x, None, None, None

    def backward_step(self, solver, func, args, traj, k, t, h, x1, ct_x1, h_prev, ct_y0, *,
                      ct_dense=None, ct_dense_prev=None):
        del ct_dense_prev
        c0, ct_c0, g_func, g_args, g_t, g_h = self.step_vjp(
            solver, func, args, traj, k, t, h, ct_x1, ct_dense
        )
        ct_c0 = add_output_cotangent(self, solver, c0, ct_c0, ct_y0)
        return c0, ct_c0, g_func, g_args, g_t, g_h

    def step_vjp(self, solver, func, args, traj, k, t, h, ct_x1, ct_dense=None):
        """The checkpoint at step k and the VJP of the step from it, given the
        cotangents of its end and (or None) of its interpolant's coefficients."""
        c0 = jtu.tree_map(lambda x: x[k], traj.states)

        def local(c, func, args, t, h):
            state = solver.restore(func, t, c, args)
            if ct_dense is None:
                return solver.checkpoint(solver.step(func, t, h, state, args)[0])
            state1, _, coeffs = solver.step_dense(func, t, h, state, args)
            return solver.checkpoint(state1), coeffs

        ct = ct_x1 if ct_dense is None else (ct_x1, ct_dense)
        _, (g_func, g_args), (ct_c0, g_t, g_h) = value_and_vjp(
            lambda p, c, t, h: local(c, *p, t, h), (func, args), (c0, t, h), ct
        )
        return c0, ct_c0, g_func, g_args, g_t, g_h

