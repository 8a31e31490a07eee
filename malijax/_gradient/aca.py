import equinox as eqx

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

    **Memory.** With `num_steps` one checkpoint per step. Under adaptive stepping (or
    `step_size`), where the number of steps is unknown at trace time, a fixed number of
    slots, not `max_steps` rows (`malijax._records`): every step while the slots last
    (by default up to 96 steps, fewer for states past 512 KiB: 64 MiB in all), then
    evenly spread steps, the reverse sweep replaying the missing ones from the nearest
    stored step (about one more forward solve). `slots=` sets the number (at least 4;
    a quarter is kept free for the replays).

    ??? cite "Reference"
        Zhuang, Dvornek, Li, Tatikonda, Papademetris & Duncan, "Adaptive checkpoint
        adjoint method for gradient estimation in neural ODE", ICML 2020.
    """

    slots: int | None = eqx.field(default=None, static=True)

    record = "states"

    def __check_init__(self):
        s = self.slots
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or s < 4):
            raise ValueError(
                f"{type(self).__name__}(slots=...) must be None or an int >= 4, got {s!r}."
            )

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

    def backward_step(self, solver, func, args, stored, t, h, x1, ct_x1, h_prev, ct_y0, *,
                      ct_dense=None, ct_dense_prev=None):
        del x1, h_prev, ct_dense_prev
        c0 = stored
        ct_c0, g_func, g_args, g_t, g_h = self.step_vjp(
            solver, func, args, c0, t, h, ct_x1, ct_dense
        )
        ct_c0 = add_output_cotangent(self, solver, c0, ct_c0, ct_y0)
        return c0, ct_c0, g_func, g_args, g_t, g_h

    def step_vjp(self, solver, func, args, c0, t, h, ct_x1, ct_dense=None):
        """The VJP of the step from checkpoint `c0`, given the cotangents of its end and
        (or None) of its interpolant's coefficients: `(ct_c0, g_func, g_args, g_t, g_h)`."""

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
        return ct_c0, g_func, g_args, g_t, g_h

