"""One parameter cotangent for a whole batch when a custom-VJP solve is `vmap`ped.

**The cost.** Under `jax.grad(lambda p: loss(jax.vmap(solve)(p, ys)))` JAX batches a
`custom_vjp` by running its backward under `vmap` and summing, *afterwards*, the
cotangents of inputs that were not batched (`func`'s weights, `args`). A reverse sweep
that carries `∂L/∂θ` from step to step therefore carried one per example: memory
`B × |θ|`, and per step `B` outer products (measured: 22× the memory of one batched
state for MALI, 5× for ACA).

**The mechanism.** Inside a summing sweep every VJP of `func` goes through
`value_and_vjp`, a `jax.custom_batching.custom_vmap` function. Unbatched it is
`eqx.filter_vjp`. Its batching rule takes the VJP of the *vmapped* function,
`vjp(vmap(f))` rather than `vmap(vjp(f))`: JAX's transpose of the batched matrix
products contracts over the batch for the unbatched weights (one BLAS product, the
backward of one batched state), and the rule returns those cotangents unbatched, so
the sweep's carried totals stay one array. `any_over_batch` keeps a while loop's
condition unbatched, since a batched condition would batch every carried value.
Letting XLA sum per-example outer products (`vmap(vjp)` and then a sum) was measured
first: the memory matched, but XLA lowers batched outer products to elementwise loops,
1.4× slower than the contraction. Nothing else in the sweep may be a `custom_vmap`: one
whose inputs are all unbatched is handed on to the enclosing transformation, and
reverse-over-reverse cannot linearise it (a summing accumulator did exactly that).

**When it is right to sum.** Summing inside is only correct where JAX would sum
afterwards: when `vmap` is applied *inside* the differentiation (`grad(vmap(solve))`,
or a plain `vmap(solve)` later differentiated). Under `vmap(grad(solve))` (per-example
gradients) the same backward also runs under `vmap`, but each example's `∂L/∂θ` is
wanted. The two cannot be told apart from inside the backward, only at the call: in
the first case the innermost transformation when `solve` is called is `vmap`, in the
second differentiation. `run` records `innermost_is_vmap()` in the static `Config`, and
only then do these functions sum (`custom_vmap` is also not reverse-differentiable, so
everything else keeps plain `eqx.filter_vjp`). A parameter leaf that is itself batched
(per-example weights) keeps per-example cotangents; primals other than the parameters
(states, times) always do, because their cotangents meet per-example terms later and
must be summed exactly once, by JAX.

**Limits.** `vmap(jit(f))` traces `f` before `vmap` sees it, so the call finds `jit`
innermost and the backward keeps per-example cotangents (correct, not cheaper): put
`jit` outside `vmap`. Nested `vmap`s sum over the innermost batch. The check reads
JAX's current trace through `jax.extend.core.find_top_trace` and the private
`BatchTrace` class; `tests/test_batching.py` pins it. Strategies outside the sweep:
`ANODE()` is a scan of `jax.checkpoint`ed steps on `num_steps` grids (JAX's own AD of
the batched program contracts) and ACA's sweep otherwise, but `ANODE(checkpoints=c)` is
Equinox's binomial loop, whose own custom VJP keeps per-example cotangents. The
`Adjoint`'s `a_θ` is part of its backward ODE's state, a quadrature summed stage by
stage: right only while every element takes the same steps. Its backward therefore runs
in normalised time on each output interval, where a `num_steps` grid is the same for all,
and shares one adaptive step sequence across the batch (`PIController(shared=True)`: the
largest error ratio decides); `expect_unbatched` checks at trace time that the steps
stayed shared. `step_size` steps keep per-example cotangents.
"""

import contextlib
import contextvars

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax.custom_batching import custom_vmap

try:  # JAX's batching trace; without it the sweep keeps per-example cotangents.
    from jax._src.interpreters.batching import BatchTrace as _BatchTrace
    from jax.extend.core import find_top_trace as _find_top_trace
except ImportError:  # pragma: no cover - depends on the JAX version
    _BatchTrace = None


def innermost_is_vmap():
    """Whether the innermost transformation at this call is `vmap` (see module doc)."""
    if _BatchTrace is None:
        return False
    return isinstance(_find_top_trace(()), _BatchTrace)


_SUMMING = contextvars.ContextVar("malijax_sum_over_batch", default=False)


@contextlib.contextmanager
def summing_over_batch(on):
    """While a reverse sweep is traced: whether `value_and_vjp` sums parameter
    cotangents over a vmapped batch (`Config.sum_over_batch`)."""
    token = _SUMMING.set(bool(on))
    try:
        yield
    finally:
        _SUMMING.reset(token)


def call_field(params, t, y):
    """`func(t, y, args)` with `params = (func, args)`, as `value_and_vjp` calls it."""
    func, args = params
    return func(t, y, args)


def value_and_vjp(fn, params, primals, ct):
    """`(fn(params, *primals), ∂/∂params, ∂/∂primals)`: one VJP of `fn` at `ct`.

    `params` are the parameters (`(func, args)`). Unbatched, and outside a summing
    sweep, this is `eqx.filter_vjp`. Under `vmap` in a summing sweep the VJP is taken
    of the vmapped `fn` (`vjp(vmap(fn))`, not `vmap(vjp(fn))`): the cotangents of
    unbatched parameters come out unbatched, contracted over the batch by one matrix
    product as for a batched state, while every other primal keeps per-example
    cotangents. `ct` must be known before the output is used (true of every fused
    inverse here), since the two are computed together.
    """
    if not _SUMMING.get():
        out, pull = eqx.filter_vjp(fn, params, *primals)
        ct_params, *ct_primals = pull(ct)
        return out, ct_params, tuple(ct_primals)
    # Closed-over values become explicit leaves: custom_vmap refuses batched constants.
    closed = eqx.filter_closure_convert(fn, params, *primals)
    dynamic, static = eqx.partition((closed, params, tuple(primals), ct), eqx.is_array)
    s_closed, s_params, s_primals, s_ct = static

    def call(dynamic):
        closed, params, primals, ct = eqx.combine(dynamic, static)
        out, pull = eqx.filter_vjp(closed, params, *primals)
        ct_params, *ct_primals = pull(ct)
        return out, ct_params, tuple(ct_primals)

    call = custom_vmap(call)

    @call.def_vmap
    def rule(axis_size, in_batched, dynamic):
        (b_closed, b_params, b_primals, b_ct), = in_batched
        d_closed, d_params, d_primals, d_ct = dynamic

        def per_example(x, b):  # x with a leading batch axis (broadcast if it has none)
            return x if b else jnp.broadcast_to(x, (axis_size,) + x.shape)

        def axis(b):
            return 0 if b else None

        def one(closed, params, primals):
            closed = eqx.combine(closed, s_closed)
            return closed(eqx.combine(params, s_params), *eqx.combine(primals, s_primals))

        # Parameters keep their own batching (unbatched ones are summed by the VJP of
        # the vmapped function); every other primal is made per-example.
        batched_fn = jax.vmap(
            one, in_axes=(jtu.tree_map(axis, b_closed), jtu.tree_map(axis, b_params), 0)
        )
        primals = jtu.tree_map(per_example, d_primals, b_primals)
        out, pull = eqx.filter_vjp(lambda p, q: batched_fn(d_closed, p, q), d_params, primals)
        ct_params, ct_primals = pull(eqx.combine(jtu.tree_map(per_example, d_ct, b_ct), s_ct))
        is_none = lambda x: x is None  # noqa: E731
        out_batched = (
            jtu.tree_map(lambda _: True, out),
            jtu.tree_map(lambda c, b: None if c is None else b, ct_params, b_params, is_leaf=is_none),
            jtu.tree_map(lambda _: True, ct_primals),
        )
        return (out, ct_params, ct_primals), out_batched

    return call(dynamic)


def summing():
    """Whether the sweep being traced sums parameter cotangents over a batch."""
    return _SUMMING.get()


def _over_batch(reduce, doc):
    """`x` itself, or under `vmap` one unbatched `reduce(x, axis=0)` over the batch."""

    @custom_vmap
    def fn(x):
        return x

    @fn.def_vmap
    def rule(axis_size, in_batched, x):
        del axis_size
        (batched,) = in_batched
        return (reduce(x, 0) if batched else x), False

    fn.__doc__ = doc
    return fn


any_over_batch = _over_batch(
    jnp.any,
    """`pred` itself, or under `vmap` one unbatched `any` over the batch: a loop whose
    condition stays unbatched keeps its unbatched carry (a batched condition would
    batch every carried value, the parameter totals included).""",
)
# A batch that shares one step sequence (`PIController(shared=True)`): each element's
# error ratio must pass, every state must be finite, the first step suits all of them.
max_over_batch = _over_batch(jnp.max, "`x`, or under `vmap` its maximum over the batch.")
min_over_batch = _over_batch(jnp.min, "`x`, or under `vmap` its minimum over the batch.")
all_over_batch = _over_batch(jnp.all, "`x`, or under `vmap` `all` over the batch.")


def expect_unbatched(x, what):
    """`x`; at trace time under `vmap`, an error if `x` is batched. Guards sums over the
    batch that are only right while every element takes the same steps."""

    def refuse(x, axis):
        raise AssertionError(f"malijax internal error: {what} differs across the vmapped "
                             "batch, where it must be shared (please report this).")

    return _over_batch(refuse, expect_unbatched.__doc__)(x)
