"""Weak instability is reported, never returned: a reversible solver whose parasitic
component outgrows the solution fails with `RESULTS.parasitic_instability`, and adaptive
stalls of undamped reversible solvers name that cause rather than stiffness."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import malijax as mj
from helpers import MLPField, f64, name


def decay(t, y, a):
    return -y


UNDAMPED = [mj.ALF(), mj.ReversibleHeun(), mj.Reversible(mj.Tsit5(), coupling=1.0)]


@pytest.mark.parametrize("solver", UNDAMPED, ids=name)
def test_fixed_grid_weak_instability_is_reported(solver):
    """y' = -y to T = 20 on a fixed grid: undamped ALF returned -4.84 for e^{-20}."""
    n = 200 if isinstance(solver, mj.Reversible) else 1000
    sol = mj.solve(decay, f64(1.0), f64(0.0, 20.0), solver=solver, num_steps=n, throw=False)
    assert sol.result == mj.RESULTS.parasitic_instability
    assert float(sol.stats["t_final"]) < 20.0  # the time it was first seen
    with pytest.raises(Exception, match="parasitic component outgrew the solution") as info:
        mj.odeint(decay, f64(1.0), f64(0.0, 20.0), solver=solver, num_steps=n)
    assert "mj.Reversible(mj.Tsit5())" in str(info.value)  # names the cures


def test_adaptive_stall_names_weak_instability_not_stiffness():
    with pytest.raises(Exception, match="rather than stiffness") as info:
        mj.odeint(decay, f64(1.0), f64(0.0, 20.0), solver=mj.ALF())
    assert "max_steps=4096" in str(info.value)


def test_reported_per_batch_element_under_vmap():
    """Only the decaying element of a batch fails; the oscillating one is fine."""
    def solve(k):
        return mj.solve(lambda t, y, k: jnp.stack([y[1], -k * y[1] - y[0]]), f64(1.0, 0.0),
                        f64(0.0, 30.0), k, solver=mj.ALF(), num_steps=3000, throw=False).result

    results = jax.vmap(solve)(f64(0.0, 3.0))
    assert np.array_equal(results == mj.RESULTS.successful, [True, False])
    assert np.array_equal(results == mj.RESULTS.parasitic_instability, [False, True])


@pytest.mark.parametrize("solver,kw", [
    (mj.ALF(), dict(num_steps=1000)),  # harmonic oscillator to T = 100: no decay
    (mj.ReversibleHeun(), dict(num_steps=1000)),
    (mj.ALF(eta=0.9), dict(num_steps=1000)),
    (mj.Reversible(mj.Tsit5()), dict(rtol=1e-3, atol=1e-6)),
    (mj.Reversible(mj.Tsit5(), coupling=1.0), dict(rtol=1e-6, atol=1e-9)),
], ids=lambda x: name(x) if not isinstance(x, dict) else "-".join(map(str, x)))
def test_no_false_alarm_on_accurate_solves(solver, kw):
    osc = mj.solve(lambda t, y, a: jnp.stack([y[1], -y[0]]), f64(1.0, 0.0),
                   jnp.linspace(0.0, 100.0, 11), solver=solver, throw=False, max_steps=20000, **kw)
    assert osc.result == mj.RESULTS.successful
    exact = jnp.cos(jnp.linspace(0.0, 100.0, 11))
    assert float(jnp.max(jnp.abs(osc.ys[:, 0] - exact))) < 0.1  # really accurate
    # A neural field over a short horizon, and a solution passing through zero.
    field = MLPField(3, 8, jax.random.PRNGKey(0))
    nn = mj.solve(field, f64(0.3, -0.5, 0.8), f64(0.0, 1.0), solver=solver, throw=False, **kw)
    assert nn.result == mj.RESULTS.successful
    sine = mj.solve(lambda t, y, a: jnp.cos(t) * jnp.ones_like(y), f64(0.0), f64(0.0, 10.0),
                    solver=solver, throw=False, **kw)
    assert sine.result == mj.RESULTS.successful
    assert abs(float(sine.ys[-1, 0]) - np.sin(10.0)) < 1e-2


def test_damped_solvers_are_not_flagged_on_decay():
    for solver, kw in [(mj.ALF(eta=0.9), dict(num_steps=1000)),
                       (mj.Reversible(mj.Tsit5()), dict(num_steps=200)),
                       (mj.Reversible(mj.Tsit5()), dict())]:
        ys = mj.odeint(decay, f64(1.0), f64(0.0, 20.0), solver=solver, **kw)
        assert abs(float(ys[-1, 0]) - np.exp(-20.0)) < 1e-6
