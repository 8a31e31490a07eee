from .._loop import integrate
from .base import AbstractGradient


class ANODE(AbstractGradient):
    """Checkpointed discretise-then-optimise (Gholami, Keutzer & Biros, IJCAI 2019).

    Backprop through the solver's operations like `Direct`, but storing only
    checkpoints of the loop state and recomputing the steps between them in the
    backward pass (`equinox.internal.while_loop(kind="checkpointed")`, online binomial
    checkpointing in the style of revolve/treeverse). Exact for the computed
    discretisation.

    **Arguments:**

    - `checkpoints`: `None` stores a checkpoint at every step (ANODE's scheme: memory of
      one loop state per step, each step recomputed once). An int `c` uses binomial
      checkpointing with `c` checkpoints: memory of `c` states, at the cost of
      recomputing steps roughly `log(N)/log(c)` times (with `c` ~ log N, O(N log N)
      work). The loop state includes the solver state, so with `num_steps` each
      checkpoint holds one solver state; under adaptive stepping the buffers are sized
      by `max_steps`.

    **Under `vmap`.** `checkpoints=None` on a `num_steps` grid runs as a scan of
    `jax.checkpoint`ed steps, differentiated by JAX itself, so `grad(vmap(...))`
    contracts the parameter cotangent over the batch as for one batched state. The
    binomial loop (an int `checkpoints`, or adaptive steps) is Equinox's own custom
    VJP, whose backward under `vmap` keeps one parameter cotangent per example (memory
    `B x |θ|`; measured in `benchmarks/batching.py`).

    ??? cite "Reference"
        Gholami, Keutzer & Biros, "ANODE: Unconditionally accurate memory-efficient
        gradients for neural ODEs", IJCAI 2019. Griewank & Walther, "Algorithm 799:
        revolve", ACM TOMS 2000.
    """

    checkpoints: int | None = None

    def __check_init__(self):
        if self.checkpoints is not None and (
            isinstance(self.checkpoints, bool) or not isinstance(self.checkpoints, int)
            or self.checkpoints < 1
        ):
            raise ValueError(f"ANODE(checkpoints=...) must be None or an int >= 1, got {self.checkpoints!r}.")

    def apply(self, problem, config):
        if self.checkpoints is None and config.controller is None:
            # One stored state per step on a static grid: a scan of jax.checkpoint'ed
            # steps, differentiated by JAX itself, so that under vmap the parameter
            # cotangent is contracted over the batch (malijax/_batching.py).
            return integrate(problem, config, kind="remat")
        if self.checkpoints is None:
            num_out = problem.ts.shape[0]
            steps = config.max_steps if config.controller is not None else (
                config.num_steps * max(num_out - 1, 1)
            )
            checkpoints = steps  # one per step
        else:
            checkpoints = self.checkpoints
        return integrate(problem, config, kind="checkpointed", checkpoints=checkpoints)
