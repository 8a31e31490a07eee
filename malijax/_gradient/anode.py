from .._loop import integrate
from .aca import ACA
from .base import AbstractGradient


class ANODE(AbstractGradient):
    """Checkpointed discretise-then-optimise (Gholami, Keutzer & Biros, IJCAI 2019).

    Backprop through the solver's operations like `Direct`, but storing only
    checkpoints of the state and recomputing the steps between them in the backward
    pass (one per step, or with `checkpoints=c`
    `equinox.internal.while_loop(kind="checkpointed")`'s online binomial checkpointing
    in the style of revolve/treeverse). Exact for the computed discretisation.

    **Arguments:**

    - `checkpoints`: `None` stores a checkpoint at every step (ANODE's scheme: memory of
      one state per step, each step recomputed once): on a `num_steps` grid a scan of
      `jax.checkpoint`ed steps, otherwise `ACA`'s reverse sweep, which is that same
      computation over the accepted steps. An int `c` uses binomial
      checkpointing with `c` checkpoints: memory of `c` states, at the cost of
      recomputing steps roughly `log(N)/log(c)` times (with `c` ~ log N, O(N log N)
      work). The loop state includes the solver state, so with `num_steps` each
      checkpoint holds one solver state; under adaptive stepping the buffers are sized
      by `max_steps`.

    **Under `vmap`.** With `checkpoints=None`, `grad(vmap(...))` contracts the parameter
    cotangent over the batch as for one batched state (JAX's own AD of the scan, or
    the sweep's, `malijax/_batching.py`). The binomial loop (an int `checkpoints`) is
    Equinox's own custom VJP, whose backward under `vmap` keeps one parameter cotangent
    per example (memory `B x |θ|`).

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

    def supports_forward_mode(self, config):
        return self.checkpoints is None and config.controller is None  # the remat scan

    def apply(self, problem, config):
        if self.checkpoints is None and config.controller is None:
            # One stored state per step on a static grid: a scan of jax.checkpoint'ed
            # steps, differentiated by JAX itself, so that under vmap the parameter
            # cotangent is contracted over the batch (malijax/_batching.py).
            return integrate(problem, config, kind="remat")
        if self.checkpoints is None:
            # One stored state per accepted step, each step recomputed once: exactly
            # ACA's sweep, which also keeps memory to the solver's checkpoint (not the
            # whole loop state) and is batch-aware.
            return ACA().apply(problem, config)
        if config.while_kind(1) == "bounded":
            # Differentiated again in reverse mode (malijax/_transforms.py): Equinox's
            # binomial loop is reverse-differentiable once, its bounded loop always
            # (memory growing with log16(max_steps), like `Direct`).
            return integrate(problem, config, kind="remat" if config.controller is None else "bounded")
        return integrate(problem, config, kind="checkpointed", checkpoints=self.checkpoints)
