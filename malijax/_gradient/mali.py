import math

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu

from .._errors import warn_if_inexact_reconstruction
from .._loop import Restarts
from .._solver import AbstractReversibleSolver
from ._sweep import solve_with_custom_vjp
from .base import AbstractGradient

# Under adaptive stepping the number of steps is unknown at trace time, so automatic
# checkpointing keeps at most this many states (the spacing doubles past that).
AUTO_MAX_SLOTS = 64


def segment_length(amplification, dtype):
    """The most steps one reconstruction segment may take: the inverse amplifies
    rounding by up to `amplification` per step, and a segment may amplify it by
    `ε^(-1/4)` in all (8e3 in float64: ~12 digits kept; 54 in float32: ~5.2 digits),
    so `s = floor(log(ε^(-1/4)) / log(amplification))`."""
    budget = -0.25 * math.log(float(jnp.finfo(dtype).eps))
    return max(1, math.floor(budget / math.log(amplification)))


class MALI(AbstractGradient):
    r"""Memory-efficient ALF integrator gradients (Zhuang et al., ICLR 2021), for every
    algebraically reversible solver (`ALF`, `ReversibleHeun`, `Reversible`).

    The forward keeps the final solver state and the accepted `(t_k, h_k)` (a vector of
    scalars); the backward reconstructs each state with the solver's exact algebraic
    inverse and takes the step's local VJP. The two are fused: for `ALF` the inverse's
    evaluation of `func` is the VJP's forward (one VJP of `func` per step,
    ALGORITHMS.md §2.2); for `ReversibleHeun` the VJP at `ŷ_k` also serves step `k - 1`;
    for `Reversible(base)` two base-step VJPs per step. The gradient through the initial
    evaluation (`v0 = f(t0, z0)`) is included.

    **Checkpoints.** A damped solver (`ALF(eta < 1)`: `|det| = |1 - 2η|`;
    `Reversible(coupling=λ < 1)`: `det = λ`) is stable on dissipative problems, but its
    inverse amplifies rounding by `1/|det|` per step, so reconstructing over many steps
    loses every digit. `checkpoints` keeps whole solver states on the way, and the
    reverse sweep restarts its reconstruction from each: rounding is amplified over one
    segment only, and memory is set by the number of stored states, not of steps.

    - `checkpoints=None` (default): automatic. Undamped solvers (`|det| = 1`) store
      nothing. Damped ones store a state every `s = floor(log(ε^(-1/4)) / log(1/|det|))`
      steps (`ε` of the state's dtype; λ = 0.5 gives s = 13 in float64, 5 in float32):
      exactly that many on `num_steps` grids; under adaptive stepping at most
      `min(max_steps / s, 64)` slots, the spacing doubling when they fill.
    - `checkpoints=K`: `K` stored states, evenly spread: on a `num_steps` grid every
      `ceil(N / (K + 1))` steps; under adaptive stepping (or `step_size`), where the step
      count is unknown at trace time, the first `K` steps are stored and, whenever the
      slots fill, every other one is freed and the spacing doubles, so between `K/2` and
      `K` states stay evenly spread over the steps taken.
    - `checkpoints=0`: none (plain MALI).

    **Reconstruction check.** Wherever a rebuilt state can be compared with the true one
    (at every stored state, and at the initial state), the relative difference
    (`max |rebuilt - true| / max |true|`) is measured; past `reconstruction_rtol`
    (default `√ε` of the state's dtype: 1.5e-8 in float64, 3.5e-4 in float32) a
    `malijax.ReconstructionWarning` names the worst one and its time. Such a gradient is
    inaccurate, typically by more (on `z' = diag(-0.5, -5) z` with ALF, `h = 0.01`, a
    rebuilt-state error of 5e-5 at `T = 4` came with a gradient error of 3.5e-3).
    `reconstruction_rtol=math.inf` turns the check off.

    **Memory**: the final state, the stored states, and how each step was taken
    (`t_k`, `h_k` and a few scalars), which under adaptive stepping is kept for step 0
    and the latest `slots - 1` steps (default `min(max_steps, 1024)` rows, never sized by
    `max_steps` beyond that): past them the reverse sweep replays the forward from
    step 0 to recover the step sizes of the earlier steps (`malijax._records`; about
    `N / slots` replays for `N` steps).

    ??? cite "Reference"
        Zhuang, Dvornek, Tatikonda & Duncan, "MALI: A memory efficient and reverse
        accurate integrator for Neural ODEs", ICLR 2021. McCallum & Foster, "Efficient,
        accurate and stable gradients for neural ODEs", 2024 (the coupled method).
    """

    checkpoints: int | None = eqx.field(default=None, static=True)
    reconstruction_rtol: float | None = eqx.field(default=None, static=True)
    slots: int | None = eqx.field(default=None, static=True)

    record = "steps"
    reconstructs = True

    def __check_init__(self):
        rtol = self.reconstruction_rtol
        if rtol is not None and not (isinstance(rtol, (int, float)) and rtol > 0):
            raise ValueError(f"MALI(reconstruction_rtol=...) must be None or > 0, got {rtol!r}.")
        k = self.checkpoints
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise ValueError(f"MALI(checkpoints=...) must be None or an int >= 0, got {k!r}.")
        s = self.slots
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or s < 4):
            raise ValueError(f"MALI(slots=...) must be None or an int >= 4, got {s!r}.")

    def check(self, solver, config):
        del config
        if not isinstance(solver, AbstractReversibleSolver):
            raise TypeError(
                f"MALI() reconstructs states with an algebraic inverse, which "
                f"{type(solver).__name__} does not have. Use a reversible solver "
                "(mj.Reversible(...), mj.ALF(), mj.ReversibleHeun()) with MALI, or "
                "gradient=mj.ACA() / mj.SymplecticAdjoint() / mj.Direct() with this solver."
            )
        if getattr(solver, "eta", None) == 0.5:
            raise ValueError("MALI() needs ALF(eta != 0.5): ALF(eta=0.5) has no inverse.")

    def restarts(self, config, num_out, y0):
        if self.checkpoints == 0 or num_out < 2:
            return None
        grid = config.controller is None
        num_steps = config.num_steps * (num_out - 1) if grid else None
        if self.checkpoints is None:
            amplification = config.solver.inverse_amplification
            if amplification <= 1:
                return None
            dtype = max((jnp.dtype(x.dtype) for x in jtu.tree_leaves(y0)),
                        key=lambda d: jnp.finfo(d).eps)
            spacing = segment_length(amplification, dtype)
            if grid:
                slots = math.ceil(num_steps / spacing) - 1
                return Restarts(slots, spacing, doubling=False) if slots > 0 else None
            slots = min(math.ceil(config.max_steps / spacing), AUTO_MAX_SLOTS)
            return Restarts(slots, spacing)
        if grid:
            slots = min(self.checkpoints, num_steps - 1)
            if slots < 1:
                return None
            return Restarts(slots, math.ceil(num_steps / (slots + 1)), doubling=False)
        return Restarts(self.checkpoints, 1)

    def report_reconstruction(self, error, t, *, dtype, config):
        rtol = self.reconstruction_rtol
        if rtol == math.inf:
            return
        if rtol is None:
            rtol = float(math.sqrt(jnp.finfo(dtype).eps))
        warn_if_inexact_reconstruction(error, t, rtol, config.call_site)

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

    def prologue(self, solver, func, args, x, ct_x, t, h_last, ct_dense=None):
        return solver.inverse_vjp_prologue(func, t, h_last, x, ct_x, args, ct_dense=ct_dense)

    def backward_step(self, solver, func, args, stored, t, h, x1, ct_x1, h_prev, ct_y0, *,
                      ct_dense=None, ct_dense_prev=None):
        del stored
        return solver.inverse_vjp(func, t, h, x1, ct_x1, args, h_prev=h_prev, ct_y0=ct_y0,
                                  ct_dense=ct_dense, ct_dense_prev=ct_dense_prev)
