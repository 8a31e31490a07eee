"""`malijax.compat.odeint` against `jax.experimental.ode.odeint`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.ode import odeint as jax_odeint

import malijax as mj
from malijax._odeint import run

from helpers import max_rel_err

RUNTIME_ERRORS = (jax.errors.JaxRuntimeError, mj.SolveError)


def decay(y, t, k, c):
    return -k * y + c * jnp.sin(t)


def lotka_volterra(y, t, theta):
    a, b, c, d = theta[0], theta[1], theta[2], theta[3]
    x, z = y[0], y[1]
    return jnp.stack([a * x - b * x * z, c * x * z - d * z])


def van_der_pol(y, t, mu):
    return jnp.stack([y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]])


def oscillator(y, t, omega):
    # a pytree state
    return {"q": y["p"], "p": -(omega**2) * y["q"]}


PROBLEMS = {
    "decay": (decay, jnp.array([1.0, -2.0, 0.5]), jnp.linspace(0.0, 3.0, 4),
              (jnp.array(0.8), jnp.array(0.3))),
    "lotka_volterra": (lotka_volterra, jnp.array([1.0, 0.5]), jnp.linspace(0.0, 5.0, 6),
                       (jnp.array([1.1, 0.4, 0.4, 0.8]),)),
    "van_der_pol": (van_der_pol, jnp.array([2.0, 0.0]), jnp.linspace(0.0, 4.0, 5),
                    (jnp.array(1.0),)),
    "oscillator": (oscillator, {"q": jnp.array([1.0, 0.0]), "p": jnp.array([0.0, 2.0])},
                   jnp.linspace(0.0, 6.0, 7), (jnp.array(1.3),)),
}


@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_values_and_gradients_match_jax_experimental(problem):
    func, y0, t, args = PROBLEMS[problem]
    kw = dict(rtol=1e-10, atol=1e-10)
    ours = mj.compat.odeint(func, y0, t, *args, **kw)
    theirs = jax_odeint(func, y0, t, *args, **kw)
    assert max_rel_err(ours, theirs) < 1e-7

    def loss(odeint, y0, args):
        ys = odeint(func, y0, t, *args, **kw)
        return sum(jnp.sum(jnp.cos(y)) for y in jax.tree.leaves(ys))

    g_ours = jax.grad(lambda y0, a: loss(mj.compat.odeint, y0, a), (0, 1))(y0, args)
    g_theirs = jax.grad(lambda y0, a: loss(jax_odeint, y0, a), (0, 1))(y0, args)
    assert max_rel_err(g_ours, g_theirs) < 1e-6


def test_default_tolerances_match():
    func, y0, t, args = PROBLEMS["lotka_volterra"]
    ours, theirs = mj.compat.odeint(func, y0, t, *args), jax_odeint(func, y0, t, *args)
    assert max_rel_err(ours, theirs) < 1e-6


def test_mxstep_raises_where_jax_returns_garbage():
    func, y0, t, args = PROBLEMS["van_der_pol"]
    with pytest.raises(mj.SolveError, match=r"^malijax: mxstep=5 \(enforced as 20 steps in all "
                       r"over 4 output intervals\) reached at t=.*Increase `mxstep`"):
        mj.compat.odeint(func, y0, t, *args, mxstep=5).block_until_ready()
    # jax.experimental.ode silently returns a wrong answer here:
    wrong = jax_odeint(func, y0, t, *args, mxstep=5)
    right = mj.compat.odeint(func, y0, t, *args)
    assert max_rel_err(wrong, right) > 0.1


def test_nonfinite_state_raises():
    def blows_up(y, t):
        return jnp.where(t > 0.5, jnp.nan, -y)

    with pytest.raises(RUNTIME_ERRORS, match="non-finite"):
        mj.compat.odeint(blows_up, jnp.ones(2), jnp.array([0.0, 1.0])).block_until_ready()


def test_hmax_bounds_the_step():
    func, y0, t, args = PROBLEMS["decay"]

    def vector_field(t, y, args):
        return func(y, t, *args)

    def steps(max_step):
        sol = run(vector_field, y0, jnp.array([0.0, 3.0]), args, solver=mj.Dopri5(),
                  gradient=mj.ACA(), rtol=1e-6, atol=1e-6, step_size=None, num_steps=None,
                  max_steps=4096, throw=True, max_step=max_step)
        return int(sol.stats["num_steps"])

    assert steps(np.inf) < 30
    assert steps(0.01) >= 300
    a = mj.compat.odeint(func, y0, t, *args, hmax=0.01)
    b = mj.compat.odeint(func, y0, t, *args)
    assert max_rel_err(a, b) < 1e-6


def test_bad_mxstep_and_hmax():
    func, y0, t, args = PROBLEMS["decay"]
    with pytest.raises(ValueError, match="mxstep"):
        mj.compat.odeint(func, y0, t, *args, mxstep=0)
    with pytest.raises(ValueError, match="hmax"):
        mj.compat.odeint(func, y0, t, *args, hmax=-1.0)


def test_large_state_gradient_uses_bounded_memory():
    """With `mxstep=inf` (16384 steps) per-step buffers would hold 125 MiB for 1000
    float64s; ACA's records are bounded by their slots (`malijax._records`), the same
    gradient as with `mxstep=1000`."""
    y0 = jnp.linspace(-1.0, 1.0, 1000)
    ts = jnp.array([0.0, 0.5, 1.0])

    def loss(y0, mxstep):
        ys = mj.compat.odeint(lambda y, t, k: -k * jnp.sin(y), y0, ts, 1.3, mxstep=mxstep)
        return jnp.sum(jnp.cos(ys[1:]))

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    bounded, aca = grad(y0, float("inf")), grad(y0, 1000)  # mxstep=1000: ACA within 64 MiB
    assert max_rel_err(bounded, aca) <= 1e-12
    temp = grad.lower(y0, float("inf")).compile().memory_analysis().temp_size_in_bytes
    # 128 slots (`_records.MAX_SLOTS`) and the sweep's working states (measured: 154
    # states' worth, the same as with mxstep=1000), against 16384 for one per step
    assert temp <= 200 * y0.nbytes, temp


def test_list_and_array_outputs_are_raveled_like_jax():
    """JAX ravels the state and what `func` returns: a list for an array state, an array
    for a list state. Values and gradients agree with jax.experimental.ode."""
    def pend_list(y, t, m, g):  # array state, list output (JAX's test_pend_grads)
        return [y[1], -m * y[1] - g * jnp.sin(y[0])]

    def pend_array(y, t, m, g):  # list state, array output (JAX's weird_time test)
        return jnp.stack([y[1] * -t, -m * y[1] - g * jnp.sin(y[0])])

    ts = jnp.linspace(0.0, 1.0, 11)
    args = (jnp.array(0.25), jnp.array(9.8))
    for func, y0 in ((pend_list, jnp.array([np.pi - 0.1, 0.0])),
                     (pend_array, [jnp.array(np.pi - 0.1), jnp.array(0.0)])):
        ours = mj.compat.odeint(func, y0, ts, *args)
        theirs = jax_odeint(func, y0, ts, *args)
        assert jax.tree.structure(ours) == jax.tree.structure(theirs)
        assert max_rel_err(ours, theirs) < 1e-6

        def loss(odeint, m):
            return sum(jnp.sum(y**2) for y in jax.tree.leaves(odeint(func, y0, ts, m, args[1])))

        g_ours = jax.grad(lambda m: loss(mj.compat.odeint, m))(args[0])
        g_theirs = jax.grad(lambda m: loss(jax_odeint, m))(args[0])
        assert max_rel_err(g_ours, g_theirs) < 1e-5
    with pytest.raises(ValueError, match="returned 3 numbers in all, but the state `y0` has 2"):
        mj.compat.odeint(lambda y, t: [y[0], y[1], y[0]], jnp.ones(2), ts)


def test_complex_state_matches_jax():
    """JAX's test_complex_odeint: y' = α y e^{-t}, complex y and α; values and the gradient
    of the real part agree with jax.experimental.ode (and with the closed form)."""
    def dy_dt(y, t, alpha):
        return alpha * y * jnp.exp(-t).astype(y.dtype)

    y0, alpha, ts = jnp.asarray(1 + 2j), jnp.asarray(3 + 4j), jnp.linspace(0.0, 1.0, 11)
    with jax.numpy_dtype_promotion("standard"):
        ours = mj.compat.odeint(dy_dt, y0, ts, alpha)
        theirs = jax_odeint(dy_dt, y0, ts, alpha)
        exact = y0 * jnp.exp(alpha * (1 - jnp.exp(-ts)))
        assert ours.dtype == jnp.complex128
        assert max_rel_err(ours, exact) < 1e-6 and max_rel_err(ours, theirs) < 1e-6

        def loss(odeint, alpha):
            return jnp.sum(odeint(dy_dt, y0, ts, alpha).real)

        g_ours = jax.grad(lambda a: loss(mj.compat.odeint, a))(alpha)
        g_theirs = jax.grad(lambda a: loss(jax_odeint, a))(alpha)
        assert abs(complex(g_ours) - complex(g_theirs)) < 1e-5 * abs(complex(g_theirs))
