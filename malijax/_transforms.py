"""How many reverse-mode differentiations surround a call, read at trace time.

A strategy with a custom VJP runs its forward and its reverse sweep as `lax.while_loop`s
(the cheapest loop; first-order gradients never differentiate them). Differentiated
*again* in reverse mode (`grad(grad(.))`, `check_grads(order=2, modes=["rev"])`), JAX
must transpose those loops too, which it cannot do for a `while_loop`; they must then
be Equinox's bounded loops (nested `scan`s, reverse-differentiable to any order, and
slower). Only the call can tell: `run` counts the reverse-mode traces that the inputs
(`y0`, `args`, `ts`, and the arrays `func` holds or closes over) are traced by, and
records the count in the static `Config`, so that first-order gradients keep the plain
loops by construction. Forward mode around a gradient (`jax.hessian`, `jacfwd(grad)`)
only needs the loops' JVP, which `while_loop` has.

**Limits.** `jit` between the two differentiations (`grad(jit(grad(f)))`) hides the
outer one from the call; JAX then reports that it cannot reverse-differentiate a
`while_loop`: put `jit` outermost. This reads JAX's private tracer classes (JAX
0.10: `LinearizeTrace` for `grad`/`vjp`, `JVPTrace` for `jvp`); `tests/test_higher_order.py`
pins it.
"""

import jax

try:
    from jax._src.interpreters.ad import JVPTrace as _JVPTrace
    from jax._src.interpreters.ad import LinearizeTrace as _LinearizeTrace
    from jax.extend.core import find_top_trace as _find_top_trace
except ImportError:  # pragma: no cover - depends on the JAX version
    _JVPTrace = _LinearizeTrace = None


def _reverse_trace_types():
    if _LinearizeTrace is None:
        return ()
    # Without direct linearisation `grad` runs a JVP trace and partial evaluation,
    # so every JVP trace may be a reverse-mode one.
    if jax.config.jax_use_direct_linearize:
        return (_LinearizeTrace,)
    return (_LinearizeTrace, _JVPTrace)


def _traces(tree):
    """The trace of every tracer in `tree`, each tracer followed down through the values
    it wraps (a JVP/linearize tracer's primal, a batch tracer's value)."""
    for leaf in jax.tree_util.tree_leaves(tree):
        while isinstance(leaf, jax.core.Tracer):
            yield leaf._trace
            leaf = getattr(leaf, "primal", getattr(leaf, "val", None))


def reverse_levels(tree):
    """The number of distinct reverse-mode traces among the tracers in `tree` (so
    `grad(vmap(grad(.)))` counts 2)."""
    kinds = _reverse_trace_types()
    return len({id(trace) for trace in _traces(tree) if isinstance(trace, kinds)})


def forward_mode_innermost(tree):
    """Whether the innermost transformation at this call is forward-mode AD (`jvp`,
    `jacfwd`) and the tracers in `tree` carry its tangents: a custom VJP would then
    meet JAX's "can't apply forward-mode autodiff" error."""
    if _JVPTrace is None:
        return False
    top = _find_top_trace(())
    return isinstance(top, _JVPTrace) and any(trace is top for trace in _traces(tree))
