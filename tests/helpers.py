import re

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr

import malijax as mj

ALL_SOLVERS = (
    mj.Euler(),
    mj.Midpoint(),
    mj.Heun(),
    mj.RK4(),
    mj.Bosh3(),
    mj.Dopri5(),
    mj.Tsit5(),
    mj.ALF(),
    mj.ReversibleHeun(),
)
ADAPTIVE_SOLVERS = tuple(s for s in ALL_SOLVERS if s.error_order is not None)
REVERSIBLE_SOLVERS = tuple(s for s in ALL_SOLVERS if isinstance(s, mj.AbstractReversibleSolver))
RK_SOLVERS = tuple(s for s in ALL_SOLVERS if isinstance(s, mj.AbstractRungeKutta))
REVERSIBLE_RK = tuple(mj.Reversible(s) for s in RK_SOLVERS)


def f64(*xs):
    """A float64 vector of the given numbers."""
    return jnp.array(xs, jnp.float64)


def name(x):
    if isinstance(x, mj.Reversible):
        return f"Reversible({name(x.solver)},{x.coupling})"
    if isinstance(x, mj.ANODE) and x.checkpoints is not None:
        return f"ANODE({x.checkpoints})"
    return type(x).__name__


def tree_allclose(x, y, *, rtol=1e-5, atol=1e-8):
    return eqx.tree_equal(x, y, typematch=True, rtol=rtol, atol=atol) is True


def max_rel_err(x, y):
    """max |x - y| / max |y| over every leaf (pytrees of equal structure)."""
    import jax.tree_util as jtu

    num = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jtu.tree_leaves(x), jtu.tree_leaves(y)))
    den = max(float(jnp.max(jnp.abs(b))) for b in jtu.tree_leaves(y))
    return num / den


class MLPField(eqx.Module):
    """A small neural vector field `f(t, y) = W2 tanh(W1 y + b1 + t c) + b2`."""

    w1: jnp.ndarray
    b1: jnp.ndarray
    c: jnp.ndarray
    w2: jnp.ndarray
    b2: jnp.ndarray

    def __init__(self, dim, hidden, key, dtype=jnp.float64):
        k1, k2, k3, k4, k5 = jr.split(key, 5)
        self.w1 = jr.normal(k1, (hidden, dim), dtype) / jnp.sqrt(dim)
        self.b1 = 0.1 * jr.normal(k2, (hidden,), dtype)
        self.c = 0.1 * jr.normal(k3, (hidden,), dtype)
        self.w2 = jr.normal(k4, (dim, hidden), dtype) / jnp.sqrt(hidden)
        self.b2 = 0.1 * jr.normal(k5, (dim,), dtype)

    def __call__(self, t, y, args):
        del args
        t = jnp.asarray(t).astype(y.dtype)
        return self.w2 @ jnp.tanh(self.w1 @ y + self.b1 + t * self.c) + self.b2


def reported_error(message):
    """The relative error a `ReconstructionWarning`'s message reports."""
    return float(re.search(r"relative error of ([0-9.e+-]+)", message).group(1))
