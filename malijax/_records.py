"""Per-step records in a fixed number of slots: memory set by the slot count, never by
`max_steps`.

A strategy that stores every step (ACA, the symplectic adjoint) needs, in its reverse
sweep, for every accepted step `k` its input `x_k` (the solver's checkpoint) and how the
step was taken: `t_k`, `h_k` exactly as used, the output time it was clipped onto and
the outputs it reached (`Row`). Under adaptive stepping the number of steps is unknown
at trace time, so a buffer with one row per step would need `max_steps` rows, however
few steps are taken, and under `vmap` one such buffer per element (measured on a
Lorenz ensemble: 9x the memory of Diffrax's checkpointing, and time growing with
`max_steps × B` from merely initialising the buffers).

Instead the forward keeps rows in `num_slots` slots:

- **While they last, every step.** Step `k` is stored when `k % spacing == 0`, with
  `spacing = 1` at first, so a solve that fits costs nothing more than before.
- **When the forward's slots fill, thinning.** The spacing doubles and the rows of odd
  multiples of the old spacing become free for the next ones (online checkpointing, as
  `_loop.Restarts`): between half and all of the forward's slots stay evenly spread over
  however many steps were taken. Step 0 is never freed.
- **A missing step is replayed** by the reverse sweep (`_loop.replay`): it reruns the
  forward loop, with its controller, from the nearest stored step below, and stores the
  steps it passes in the slots free at that point (those of steps already swept, and
  `reserve` slots the forward never uses), evenly spread and always including the one
  needed. A row holds what the loop needs to continue from step `k` exactly as it did
  (the controller's proposal, its previous error ratio, whether the previous attempt
  was rejected), so the replay takes the same steps as the forward.

The cost beyond storing everything: none while the steps fit in the forward's slots;
past that, each step is recomputed about once more (twice when a segment between two
stored steps exceeds the free slots), the same order as ANODE's recompute, and far
below a binomial schedule's `log N` factor. `ANODE()` (every step stored) and
`MALI(checkpoints)` (states at a spacing, the rest rebuilt by the inverse) are points on
the same scale.

**Rows without states** (MALI, which rebuilds states with the solver's inverse and
keeps only how each step was taken) cannot be resumed from, save step 0's (`x_0` is
`init(y0)`). The forward keeps step 0 and the latest steps in a ring, the ones the
sweep needs first; past them a replay runs from step 0 and keeps the steps just below
the one needed, as many as the free slots hold. With `R` rows and `N > R` steps that
is about `N / R` replays of at most `N` steps: cheap while `N` is a few `R`
(`MAX_STEP_ROWS = 1024` rows of a few scalars by default), quadratic far beyond.

**How many slots** (`slots_for`): for rows with states `min(max_steps + reserve,
MAX_SLOTS, max(MIN_SLOTS, BUDGET // row))` where `row` is the bytes of one row (the
checkpoint plus a few scalars): every step of an ordinary solve is kept (up to
`MAX_SLOTS - reserve = 96`), and a large state to `BUDGET` bytes in all, per solve (per
element under `vmap`); for rows without, `min(max_steps, MAX_STEP_ROWS)`. A strategy's
`slots=` argument overrides either.

**Under `vmap`** each element thins and replays on its own schedule; a replay is a
while loop, so the batch runs it as long as its slowest element needs, and elements
that replay at different steps of the sweep each pay for all. Solves that fit in the
slots never replay.
"""

import math

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from ._batching import all_over_batch

# The slot-count rule (`slots_for`); see the module docstring.
MAX_SLOTS = 128
MIN_SLOTS = 8
BUDGET = 64 * 2**20
# Rows without a state (MALI's: a few scalars each) are cheap and costly to replay.
MAX_STEP_ROWS = 1024


class Row(eqx.Module):
    """What is kept of accepted step `k`: how it was taken, and how to resume there."""

    t: jax.Array  # t_k
    h: jax.Array  # h_k, signed, exactly as used
    end: jax.Array  # the index of the output time the step was clipped onto, or -1
    lo: jax.Array  # the first output the step reached (`Trajectory`)
    mid: jax.Array  # the first output it did not interpolate
    hi: jax.Array  # the first output after it
    h_try: jax.Array  # the controller's proposal before the step (before clipping)
    prev_ratio: jax.Array  # the controller's previous error ratio
    rejected_before: jax.Array  # whether the attempt before this one was rejected
    checkpoint: object  # solver.checkpoint(x_k)


def row_bytes(row_like):
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jtu.tree_leaves(row_like))


def slots_for(max_steps, row_like, slots=None, states=True):
    """The number of slots for rows like `row_like`, with or without states (see the
    module docstring)."""
    if not states:  # a ring of step rows (MALI)
        return max(2, min(max_steps, MAX_STEP_ROWS if slots is None else slots))
    if slots is not None:
        return min(slots, max_steps + reserve_for(slots))
    by_budget = BUDGET // max(row_bytes(row_like), 1)
    return min(max_steps + reserve_for(MAX_SLOTS), MAX_SLOTS, max(MIN_SLOTS, by_budget))


def reserve_for(num_slots):
    """The slots the forward leaves free for the sweep's replays: a quarter (at least 2)."""
    return max(2, num_slots // 4)


class Records(eqx.Module):
    """`num_slots` slots of `Row`s.

    With states (`Row.checkpoint`, ACA's) the forward uses the first `num_slots -
    reserve` and thins them; a missing step is replayed from the nearest stored one.
    Without (MALI's, which rebuilds states by the inverse) a row cannot be resumed
    from, save step 0's (`x_0` is `init(y0)`): the forward keeps step 0 and the latest
    steps in a ring, the steps the sweep needs first, and a replay runs from step 0
    and keeps the steps just below the one needed."""

    num_slots: int = eqx.field(static=True)
    states: bool = eqx.field(static=True, default=True)

    @property
    def reserve(self):
        return reserve_for(self.num_slots) if self.states else 0

    @property
    def forward_slots(self):
        return self.num_slots - self.reserve

    def init(self, row_like):
        """`(steps, rows, spacing)`: the step each slot holds (-1: free), the rows, and
        the forward's current spacing."""
        steps = jnp.full((self.num_slots,), -1, jnp.int32)
        rows = jtu.tree_map(
            lambda x: jnp.zeros((self.num_slots,) + x.shape, x.dtype), row_like
        )
        return steps, rows, jnp.ones((), jnp.int32)

    def store(self, slots, k, row, took):
        """Keep the row of step `k` (taken if `took`) if it is due, thinning when the
        forward's slots are full."""
        steps, rows, spacing = slots
        if not self.states:  # step 0 in slot 0, the others in a ring
            slot = jnp.where(k == 0, 0, 1 + (k - 1) % (self.num_slots - 1))
            return set_step(steps, slot, k, took), set_row(rows, slot, row, took), spacing
        # `spacing` is a power of two: `n & (spacing - 1)` is `n % spacing` for n >= 0,
        # without an integer division per slot (which made storing cost 10x the step).
        ours = steps[: self.forward_slots]
        full = jnp.all((ours >= 0) & ((ours & (spacing - 1)) == 0))
        due = took & ((k & (spacing - 1)) == 0)
        spacing = jnp.where(due & full, 2 * spacing, spacing)
        due = due & ((k & (spacing - 1)) == 0)
        slot = jnp.argmax((ours < 0) | ((ours & (spacing - 1)) != 0))  # free, or freed
        return set_step(steps, slot, k, due), set_row(rows, slot, row, due), spacing


def lookup(slots, k, in_order=None):
    """The row of step `k` (which must be stored). `in_order`: an unbatched bool, true
    when every step is in the slot of its own number (the forward never thinned), so
    that no search over the slots is needed (under `vmap` a search is a pass over every
    element's slots at each step of the sweep: measured, 45% of a Lorenz gradient)."""
    steps, rows = slots[:2]

    def search():
        return jnp.argmax(steps[...] == k).astype(jnp.int32)

    if in_order is None:
        index = search()
    else:
        index = jax.lax.cond(in_order, lambda: jnp.asarray(k, jnp.int32), search)
    return jtu.tree_map(lambda b: b[index], rows, is_leaf=_is_buffer)


def in_order(layout, num_steps):
    """Whether every step of the forward sits in the slot of its own number: it took no
    more steps than its slots (none thinned, so none to replay). One unbatched bool for
    a vmapped batch, which lets `lax.cond` skip the searches for all of it."""
    return all_over_batch(num_steps <= layout.forward_slots)


# Inside an Equinox while loop, slots declared as its buffers (written in place, never
# selected whole under `vmap`) are `_Buffer` pytrees: read with `[]`, written with
# `eqxi.buffer_at_set`, which takes plain arrays too.
def _is_buffer(x):
    return type(x).__name__ == "_Buffer"


def set_step(steps, index, k, pred):
    """`steps[index] = k` where `pred`."""
    return eqxi.buffer_at_set(steps, index, k, pred=pred)


def set_row(rows, index, row, pred):
    """`rows[index] = row` where `pred`."""
    return jtu.tree_map(lambda v, b: eqxi.buffer_at_set(b, index, v, pred=pred), row, rows)
