import math

import equinox as eqx

from .._errors import warn_if_inexact_reconstruction
from .._solver import AbstractReversibleSolver
from ._sweep import solve_with_custom_vjp
from .base import AbstractGradient


class MALI(AbstractGradient):
    """Memory-efficient ALF integrator gradients (Zhuang et al., ICLR 2021).

    The forward keeps only the final solver state and the accepted `(t_k, h_k)` (a
    vector of scalars); the backward reconstructs each state with the solver's exact
    algebraic inverse and takes the step's local VJP. The two are fused: the
    inverse's evaluation of `func` is the VJP's forward, so the backward costs one VJP
    of `func` per step (ALGORITHMS.md §2.2; for `ReversibleHeun` the VJP at `ŷ_k` also
    serves step `k - 1`, plus one VJP for the final `f̂_N`). The gradient through the
    initial evaluation (`v0 = f(t0, z0)`) is included. Memory does not grow with the number of steps, apart from the
    `(t_k, h_k)` scalars (sized by `max_steps` under adaptive stepping).

    Needs a reversible solver (`ALF` or `ReversibleHeun`). With `ALF(eta < 1)` the
    inverse amplifies rounding by `1/|1 - 2η|` per step: gradients lose about
    `log10(1/|1-2η|)` digits per step (see `ALF`).

    The inverse is checked where it can be: the sweep ends on a rebuilt initial state,
    which is compared with the one the forward started from. Where they differ by more
    than `reconstruction_rtol` (relative to the state's largest entry; default `√ε` of
    its dtype: 1.5e-8 in float64, 3.5e-4 in float32), a `malijax.ReconstructionWarning`
    is issued at run time: the rebuilt states, and so the gradient, are inaccurate
    (strongly contracting dynamics, long horizons, `eta < 1`; on `z' = diag(-0.5, -5) z`
    with `h = 0.01`, a rebuilt-state error of 5e-5 at `T = 4` came with a gradient
    error of 3.5e-3).
    `reconstruction_rtol=math.inf` turns the check off.

    ??? cite "Reference"
        Zhuang, Dvornek, Tatikonda & Duncan, "MALI: A memory efficient and reverse
        accurate integrator for Neural ODEs", ICLR 2021.
    """

    reconstruction_rtol: float | None = eqx.field(default=None, static=True)

    record = "grid"

    def check_reconstruction(self, rebuilt, original):
        if self.reconstruction_rtol != math.inf:
            warn_if_inexact_reconstruction(rebuilt, original, self.reconstruction_rtol)

    def __check_init__(self):
        rtol = self.reconstruction_rtol
        if rtol is not None and not (isinstance(rtol, (int, float)) and rtol > 0):
            raise ValueError(f"MALI(reconstruction_rtol=...) must be None or > 0, got {rtol!r}.")

    def check(self, solver, config):
        del config
        if not isinstance(solver, AbstractReversibleSolver):
            raise TypeError(
                f"MALI() reconstructs states with an algebraic inverse, which "
                f"{type(solver).__name__} does not have. Use solver=mj.ALF() or "
                "mj.ReversibleHeun() with MALI, or gradient=mj.ACA() / "
                "mj.SymplecticAdjoint() / mj.Direct() with this solver."
            )
        if getattr(solver, "eta", None) == 0.5:
            raise ValueError("MALI() needs ALF(eta != 0.5): ALF(eta=0.5) has no inverse.")

    def apply(self, problem, config):
        return solve_with_custom_vjp(self, problem, config)

    def final_carry(self, solver, final_state):
        del solver
        return final_state

    def initial_carry(self, solver, state):
        del solver
        return state

    def carry_y(self, solver, x):
        return solver.y(x)

    def prologue(self, solver, func, args, x, ct_x, t, h_last):
        return solver.inverse_vjp_prologue(func, t, h_last, x, ct_x, args)

    def backward_step(self, solver, func, args, traj, k, t, h, x1, ct_x1, h_prev, ct_y0):
        del traj, k
        return solver.inverse_vjp(func, t, h, x1, ct_x1, args, h_prev=h_prev, ct_y0=ct_y0)
