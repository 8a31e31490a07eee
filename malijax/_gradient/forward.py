from .._loop import integrate
from .base import AbstractGradient


class ForwardMode(AbstractGradient):
    """Forward-mode differentiation: for `jax.jvp`, `jax.jacfwd` and `jax.linearize`.

    The solve runs in the plain loops (`lax.while_loop` for adaptive and `step_size`
    solves, `lax.scan` on `num_steps` grids) with no custom VJP, and JAX's JVP carries
    each tangent alongside the state, step by step: nothing is stored, so memory is
    that of the solve per tangent, and the work is about one extra solve per tangent
    (`jacfwd` runs them as one `vmap`ped batch). Exact for the computed
    discretisation: the accepted step sizes are constants, as for every strategy.

    The custom-VJP strategies (`ACA`, `MALI`, `SymplecticAdjoint`, `Adjoint`,
    `ANODE(checkpoints=c)`) refuse forward mode (JAX cannot push a tangent through a
    custom VJP); `Direct` allows it but runs a bounded loop made for reverse mode,
    measured slower (`benchmarks/results/higher_order.md`). Under `jax.grad` this
    strategy switches to that bounded loop too, so reverse mode still works, but
    another strategy is the better choice there.
    """

    def supports_forward_mode(self, config):
        return True

    def apply(self, problem, config):
        # A reverse-mode differentiation around the call must transpose the loop.
        return integrate(problem, config, kind=config.while_kind(0))
