"""Result codes and the `Solution` returned by `solve`."""

import equinox as eqx
from jaxtyping import Array, PyTree


class RESULTS(eqx.Enumeration):
    """Outcome of a solve. Compare with `sol.result == mj.RESULTS.successful`."""

    successful = ""
    max_steps_reached = (
        "The maximum number of solver steps was reached before the last output time."
    )
    nonfinite_state = "The state became non-finite (NaN or inf)."
    step_size_underflow = "The adaptive step size underflowed."
    ts_not_monotone = "`ts` is not monotone (nondecreasing or nonincreasing)."
    parasitic_instability = (
        "The parasitic component of a reversible solver outgrew the solution (weak "
        "instability)."
    )
    invalid_tolerance = "A traced `rtol` or `atol` was not > 0."
    invalid_step_size = "A traced `step_size` was not > 0."


class Solution(eqx.Module):
    """What `malijax.solve` returns.

    **Fields:**

    - `ts`: the output times, as passed in (cast to the time dtype).
    - `ys`: the state at each output time; a pytree like `y0` with a leading axis of
      `len(ts)`. Outputs that were not reached (after a failure with `throw=False`) are NaN.
    - `result`: a `RESULTS` value.
    - `stats`: `num_steps` (accepted steps), `num_rejected`, `num_fevals` (forward
      evaluations of `func`, including the initial-step heuristic), `t_final` (the
      time the solve reached).
    - `interpolation`: with `solve(..., dense=True)`, every accepted step's continuous
      extension (`malijax._dense.DenseInterpolation`), which `evaluate` and
      `derivative` read; otherwise None.
    """

    ts: Array
    ys: PyTree[Array]
    result: RESULTS
    stats: dict[str, Array]
    interpolation: object = None

    def _dense(self):
        if self.interpolation is None:
            raise ValueError(
                "`evaluate`/`derivative` need the dense solution: call "
                "`mj.solve(..., dense=True)`."
            )
        return self.interpolation

    def evaluate(self, t):
        """`y(t)` for any `t` in `[ts[0], ts[-1]]`, from the solver's continuous extension
        over the accepted step holding `t` (its order is in the solver's docstring).
        Works under `jit`, `vmap` (e.g. over many `t`) and `grad`, with respect to `t`
        and to everything the solve depends on."""
        return self._dense().evaluate(t)

    def derivative(self, t):
        """`dy/dt` of the interpolant at `t` (not `func(t, y(t))`: the derivative of the
        piecewise polynomial that `evaluate` returns)."""
        return self._dense().derivative(t)
