from .._loop import integrate
from .base import AbstractGradient


class Direct(AbstractGradient):
    """Differentiate straight through the solver's operations ("discretise then
    optimise" by plain reverse-mode autodiff): exact for the computed discretisation,
    and the reference the other strategies are tested against.

    Memory: every stage of every step is kept for the backward pass. With a
    `num_steps` grid the forward is a `lax.scan` and memory grows with the steps
    taken. Adaptive and `step_size` solves run in a reverse-differentiable *bounded*
    while loop (`equinox.internal.while_loop(kind="bounded")`): its work follows the
    steps taken, but because shapes are static its backward stores residuals for all
    `max_steps` iterations, so memory grows with `max_steps`, not with the steps
    taken. Prefer `ACA` or `MALI` for adaptive solves; keep `max_steps` small with
    `Direct`.
    """

    def apply(self, problem, config):
        return integrate(problem, config, kind="bounded", record=None)
