"""Solver interfaces.

A solver is an immutable `eqx.Module`. It carries a *state* between steps (for an
explicit Runge--Kutta method with FSAL the state is `(y, f(t, y))`, for ALF `(z, v)`),
and exposes pure functions over it. Step sizes are signed: `h < 0` integrates
backwards in time.
"""

import abc
from typing import ClassVar

import equinox as eqx
import jax
import jax.tree_util as jtu

from .._batching import value_and_vjp


class AbstractSolver(eqx.Module):
    """Base class of every solver.

    Class attributes:

    - `order`: the classical order of the method.
    - `error_order`: the exponent `q` the step-size controller uses (`h ∝ r^(-1/q)`),
      or `None` when the solver has no embedded error estimate (fixed steps only).
    - `fevals_init`, `fevals_step`: evaluations of `func` made by `init` and by one
      `step`; the loop uses them for `Solution.stats["num_fevals"]`.
    - `dense_order`: the order of the continuous extension (`step_dense`): its local
      error is `O(h^(dense_order + 1))`.
    """

    order: ClassVar[int]
    error_order: ClassVar[int | None]
    fevals_init: ClassVar[int]
    fevals_step: ClassVar[int]
    dense_order: ClassVar[int]

    @abc.abstractmethod
    def init(self, func, t0, y0, args):
        """The solver state at `(t0, y0)`."""

    @abc.abstractmethod
    def step(self, func, t, h, state, args):
        """One step from `t` to `t + h`: returns `(state1, error)`, where `error` is a
        pytree like `y` (the local error estimate) or `None`."""

    @abc.abstractmethod
    def y(self, state):
        """The ODE state `y` held in a solver state."""

    @property
    def dense_degree(self) -> int:
        """`P`, the degree of the interpolant's polynomial in `θ` (`malijax._dense`)."""
        raise NotImplementedError

    def dense_from_states(self, h, state0, state1):
        """The interpolant's coefficients (stacked: leaves with a leading axis `P + 1`,
        `malijax._dense`) from the step's two end states, for solvers whose continuous
        extension needs nothing else."""
        raise NotImplementedError

    def step_dense(self, func, t, h, state, args):
        """`step`, also returning the step's dense-output coefficients (a pytree like `y`
        whose leaves stack `C_0, ..., C_P`): `y(t + θh) = Σ_p θ^p C_p` for `θ ∈ [0, 1]`
        (`malijax._dense`). The default builds them from the end states
        (`dense_from_states`)."""
        state1, error = self.step(func, t, h, state, args)
        return state1, error, self.dense_from_states(h, state, state1)

    def parasitic(self, state, error):
        """The parasitic component of `state` (just stepped to, with that step's
        `error`), a pytree like `y`, or `None` for solvers without one. The loop reports
        a weak instability when it outgrows the solution."""
        del state, error
        return None

    def checkpoint(self, state):
        """What a checkpointing strategy stores for `state` (default: all of it)."""
        return state

    def restore(self, func, t, checkpoint, args):
        """Inverse of `checkpoint`: the solver state at time `t`."""
        del func, t, args
        return checkpoint

    def checkpoint_y(self, checkpoint):
        """The ODE state `y` held in a checkpoint."""
        return self.y(checkpoint)


class AbstractReversibleSolver(AbstractSolver):
    """A solver whose step has an exact algebraic inverse (ALF, reversible Heun)."""

    @property
    def inverse_amplification(self) -> float:
        """`1/|det|` of one step on a linear problem at `h -> 0`: the factor by which
        the inverse can amplify rounding per step (1 for undamped, volume-preserving
        solvers). `MALI(checkpoints=None)` spaces its stored states by it."""
        return 1.0

    @abc.abstractmethod
    def inverse(self, func, t, h, state1, args):
        """The state at `t` from the state at `t + h`: `step(t, h, inverse(t, h, s)) == s`
        up to rounding, with `t` and `h` exactly those the forward step used."""

    def inverse_vjp(self, func, t, h, state1, ct_state1, args, *, h_prev, ct_y0, ct_dense=None,
                    ct_dense_prev=None):
        """Undo one step and pull a cotangent back through it.

        Returns `(state0, ct_state0, ct_func, ct_args, ct_t, ct_h)`: the cotangents of
        the step's inputs given `ct_state1` on its output and `ct_dense` (or None) on
        its dense-output coefficients (`step_dense`), with `ct_y0` (the cotangent of an
        output equal to `y(state0)`) added to `ct_state0`. `h_prev` is the size of the
        step before (0 for the first) and `ct_dense_prev` its dense cotangent, for
        solvers that fuse across steps. The default reconstructs `state0` with
        `inverse` and then takes the VJP of the step; solvers override it to share
        function evaluations between the two.
        """
        del h_prev, ct_dense_prev
        state0 = self.inverse(func, t, h, state1, args)

        def step(params, state, t, h):
            if ct_dense is None:
                return self.step(params[0], t, h, state, params[1])[0]
            state1, _, coeffs = self.step_dense(params[0], t, h, state, params[1])
            return state1, coeffs

        ct = ct_state1 if ct_dense is None else (ct_state1, ct_dense)
        _, (g_func, g_args), (ct_state0, g_t, g_h) = value_and_vjp(
            step, (func, args), (state0, t, h), ct
        )
        ct_state0 = self.add_y_cotangent(state0, ct_state0, ct_y0)
        return state0, ct_state0, g_func, g_args, g_t, g_h

    def dense_from_states_vjp(self, h, state0, state1, ct_dense):
        """`(ct_state0, ct_state1, ct_h)` through `dense_from_states` (linear in the
        states for a fixed `h`, so the state cotangents do not depend on their values:
        a fused inverse may add `ct_state1` before it has rebuilt `state0`)."""
        _, pull = jax.vjp(lambda s0, s1, h: self.dense_from_states(h, s0, s1), state0, state1, h)
        return pull(ct_dense)

    def inverse_vjp_prologue(self, func, t, h_last, state, ct_state, args, ct_dense=None):
        """Adjust the final state's cotangent before the reverse sweep (default: no-op);
        `ct_dense` is the last step's dense cotangent. Returns
        `(ct_state, ct_func, ct_args, ct_t)`."""
        del func, t, h_last, state, args, ct_dense
        return ct_state, None, None, None

    def add_y_cotangent(self, state, ct_state, ct_y):
        _, pull = jax.vjp(self.y, state)
        (ct,) = pull(ct_y)
        return jtu.tree_map(lambda a, b: a + b, ct_state, ct)
