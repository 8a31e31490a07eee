"""Small pytree and dtype helpers shared by the solvers, the controller and the loop."""

import functools as ft

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu


def tree_lincomb(y, h, coeffs, ks):
    """`y + h * sum_j coeffs[j] * ks[j]` leaf by leaf, skipping zero coefficients
    (`y=None`: just the sum).

    `h` is cast to each leaf's dtype so that a float64 time never promotes a float32
    state (tests run with strict dtype promotion)."""
    terms = [(c, k) for c, k in zip(coeffs, ks) if c != 0]
    if not terms:
        return y
    h = jnp.asarray(h)

    def leaf(y_leaf, *k_leaves):
        acc = sum(c * k for (c, _), k in zip(terms, k_leaves))
        update = h.astype(k_leaves[0].dtype) * acc
        return update if y_leaf is None else y_leaf + update

    if y is None:
        return jtu.tree_map(lambda *k: leaf(None, *k), *[k for _, k in terms])
    return jtu.tree_map(leaf, y, *[k for _, k in terms])


def tree_scale_add(x, a, y):
    """`x + a * y` leaf by leaf, with the scalar `a` cast to each leaf's dtype."""
    return jtu.tree_map(lambda xi, yi: xi + jnp.asarray(a).astype(xi.dtype) * yi, x, y)


def tree_all_finite(tree):
    leaves = [jnp.all(jnp.isfinite(x)) for x in jtu.tree_leaves(tree)]
    return ft.reduce(jnp.logical_and, leaves, jnp.array(True))


def tree_where(pred, on_true, on_false):
    return jtu.tree_map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def tree_dot(a, b, dtype):
    """Σ over leaves of `sum(a * b)`, accumulated in `dtype` (e.g. the time dtype)."""
    # The real part: the cotangent of a real time through a complex state.
    terms = [
        jnp.real(jnp.sum(x * y)).astype(dtype) for x, y in zip(jtu.tree_leaves(a), jtu.tree_leaves(b))
    ]
    return sum(terms, jnp.zeros((), dtype))


def tree_add(a, b):
    """Leafwise `a + b` where `None` stands for zero (cotangents of non-arrays)."""
    if a is None or b is None:
        return b if a is None else a
    return jtu.tree_map(
        lambda x, y: x if y is None else (y if x is None else x + y), a, b,
        is_leaf=lambda x: x is None,
    )


def tree_zeros_like(tree):
    """Zeros for every inexact array of `tree`, `None` for everything else."""
    return jtu.tree_map(lambda x: jnp.zeros_like(x) if eqx.is_inexact_array(x) else None, tree)


def cotangent_or_zeros(ct, like):
    """The cotangent `ct` of outputs shaped like `like` (arrays or ShapeDtypeStructs),
    with zeros wherever JAX passed `None` (an output leaf the loss does not use)."""
    if ct is None:
        return jtu.tree_map(lambda y: jnp.zeros(y.shape, y.dtype), like)
    return jtu.tree_map(
        lambda c, y: jnp.zeros(y.shape, y.dtype) if c is None else c, ct, like,
        is_leaf=lambda x: x is None,
    )


def rms_norm(tree, dtype):
    """Root mean square over every element of every leaf, computed in `dtype`."""
    leaves = jtu.tree_leaves(tree)
    size = sum(x.size for x in leaves)
    if size == 0:
        return jnp.zeros((), dtype)
    total = sum(jnp.sum(jnp.square(magnitude(x).astype(dtype))) for x in leaves)
    return jnp.sqrt(total / size)


def magnitude(x):
    """`|x|` for complex arrays (error norms measure complex states by modulus), else `x`."""
    return jnp.abs(x) if jnp.iscomplexobj(x) else x


def real_dtype(dtype):
    """float32 for complex64, float64 for complex128, itself for a floating dtype."""
    return jnp.finfo(dtype).dtype


def time_dtype(ts_dtype, y0):
    """Times are kept in at least the precision of the state (DESIGN.md §2): the most
    precise floating dtype among `ts` and the leaves of `y0` (for complex leaves, their
    real dtype). (Chosen explicitly: `jnp.promote_types` refuses float32/float64 under
    strict promotion.)"""
    dtypes = [real_dtype(ts_dtype)] + [real_dtype(x.dtype) for x in jtu.tree_leaves(y0)]
    return max(dtypes, key=lambda d: (jnp.finfo(d).bits, jnp.finfo(d).nmant))


def stop_gradient_tree(tree):
    return jtu.tree_map(
        lambda x: jax.lax.stop_gradient(x) if isinstance(x, jax.Array) else x, tree
    )
