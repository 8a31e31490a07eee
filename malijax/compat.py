"""A drop-in for `jax.experimental.ode.odeint` that never returns a silently wrong answer."""

import math

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from ._gradient import ACA
from ._odeint import run
from ._solver import Dopri5

# `mxstep=inf` still needs a static bound on the while loop.
_MAX_STEPS_FOR_INF = 16_384


def odeint(func, y0, t, *args, rtol=1.4e-8, atol=1.4e-8, mxstep=math.inf, hmax=math.inf):
    r"""Solve `dy/dt = func(y, t, *args)` with adaptive Dopri5, like `jax.experimental.ode.odeint`.

    The call signature, defaults and result (`y` at every time of `t`, leading axis
    `len(t)`) are those of `jax.experimental.ode.odeint`; results agree with it to
    the solver tolerance (both take steps by the tolerance alone and interpolate at the
    output times, with Dopri5's 4th-order interpolant). The differences are what make
    it safe:

    - hitting `mxstep` or a non-finite state raises an error that says where (t and
      step counts) and what to try, instead of returning garbage;
    - gradients are those of the computed solution (exact for the discretisation),
      not of a continuous adjoint solved to tolerance;
    - `t` may also be decreasing.

    As in JAX, `y0` may be any pytree of floating or complex arrays: it is raveled into
    one array, and so is what `func` returns (which need only hold as many numbers,
    e.g. a list for an array state).

    `mxstep` bounds the accepted plus rejected steps per output interval, as in JAX;
    malijax enforces it as a total of `mxstep·(len(t) − 1)` over the solve, since
    its buffers need one static size (with `mxstep=inf`, 16384 steps in all).
    `hmax` caps the step size. `*args` are passed to `func` and receive gradients.

    Gradients use ACA: the state at every step while its slots last, a bounded
    recompute past them (`malijax._records`: memory set by the slot count, not by
    `mxstep`).
    """
    t = jnp.asarray(t)
    intervals = max(t.shape[0] - 1, 1) if t.ndim == 1 else 1
    if mxstep == math.inf:
        max_steps = _MAX_STEPS_FOR_INF
        limit = (f"mxstep=inf (taken as {max_steps} steps in all)", "`mxstep`")
    elif mxstep >= 1 and float(mxstep).is_integer():
        max_steps = int(mxstep) * intervals
        limit = (f"mxstep={int(mxstep)} (enforced as {max_steps} steps in all over "
                 f"{intervals} output intervals)", "`mxstep`")
    else:
        raise ValueError(f"`mxstep` must be a positive integer or inf, got {mxstep!r}.")
    if not hmax > 0:
        raise ValueError(f"`hmax` must be > 0, got {hmax!r}.")

    # Like JAX, integrate the state raveled into one array, and ravel what `func`
    # returns: so `func` may return a list for an array state, or an array for a list.
    y0_flat, unravel = ravel_pytree(y0)
    if not jnp.issubdtype(y0_flat.dtype, jnp.inexact):  # e.g. y0=[1, 0]: as JAX does
        y0_flat = y0_flat.astype(jnp.result_type(float))

    def vector_field(t, y_flat, args):
        out = func(unravel(y_flat), t, *args)
        out_flat, _ = ravel_pytree(out)
        if out_flat.shape != y0_flat.shape:
            raise ValueError(
                f"`func(y, t, *args)` returned {out_flat.size} numbers in all, but the state "
                f"`y0` has {y0_flat.size}."
            )
        if jnp.iscomplexobj(out_flat) and not jnp.iscomplexobj(y0_flat):
            raise TypeError("`func` returned complex values for a real `y0`: pass a complex `y0`.")
        return out_flat.astype(y0_flat.dtype)

    solution = run(
        vector_field, y0_flat, t, args, solver=Dopri5(), gradient=ACA(), rtol=rtol,
        atol=atol, step_size=None, num_steps=None, max_steps=max_steps, throw=True,
        max_step=hmax, limit=limit,
    )
    return jax.vmap(unravel)(solution.ys)
