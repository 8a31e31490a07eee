"""`malijax.nn`: NeuralODE, CNF and the training example."""

import importlib.util
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import malijax as mj

from helpers import max_rel_err

ROOT = Path(__file__).resolve().parents[1]


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------- NeuralODE


@pytest.mark.parametrize(
    "gradient, solver, kw",
    [
        (mj.MALI(), mj.ALF(), dict(num_steps=8)),
        (mj.ACA(), mj.Dopri5(), dict(rtol=1e-7, atol=1e-9)),
        (mj.Adjoint(rtol=1e-8, atol=1e-10), mj.Tsit5(), dict(num_steps=8)),
        (mj.Direct(), mj.RK4(), dict(num_steps=8)),
        (mj.ANODE(checkpoints=3), mj.Heun(), dict(num_steps=8)),
        (mj.SymplecticAdjoint(), mj.Tsit5(), dict(num_steps=8)),
    ],
    ids=["MALI-ALF-grid", "ACA-Dopri5-adaptive", "Adjoint-Tsit5", "Direct-RK4", "ANODE-Heun",
         "Symplectic-Tsit5"],
)
def test_neural_ode_gradients_equal_odeint(gradient, solver, kw, getkey):
    """The layer is `odeint(vf, y0, [t0, t1])[-1]`: same values and same gradients for the
    vector field's parameters and y0, under a strategy given to the layer."""
    field = mj.nn.MLPField(3, 16, 2, key=getkey())
    model = mj.nn.NeuralODE(field, t0=0.0, t1=1.5, solver=solver, gradient=gradient, **kw)
    y0 = jr.normal(getkey(), (3,))
    ts = jnp.array([0.0, 1.5])

    def layer_loss(model, y0):
        return jnp.sum(jnp.sin(model(y0)))

    def odeint_loss(model, y0):
        ys = mj.odeint(model.vector_field, y0, ts, solver=solver, gradient=gradient, **kw)
        return jnp.sum(jnp.sin(ys[-1]))

    grad = eqx.filter_grad
    (g_layer, g_y_layer) = grad(layer_loss)(model, y0), jax.grad(layer_loss, 1)(model, y0)
    (g_ref, g_y_ref) = grad(odeint_loss)(model, y0), jax.grad(odeint_loss, 1)(model, y0)
    assert float(layer_loss(model, y0)) == pytest.approx(float(odeint_loss(model, y0)), rel=1e-14)
    assert max_rel_err(g_layer, g_ref) < 1e-12
    assert max_rel_err(g_y_layer, g_y_ref) < 1e-12
    # and the parameter gradient is not trivially zero
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_layer)) > 1e-3


def test_neural_ode_ts_vmap_and_float32(getkey):
    field = mj.nn.MLPField(2, 8, 1, key=getkey(), dtype=jnp.float32)
    model = mj.nn.NeuralODE(field, t1=2.0, num_steps=10)
    y0s = jr.normal(getkey(), (4, 2), jnp.float32)
    ts = jnp.linspace(0.0, 2.0, 5, dtype=jnp.float32)
    batched = jax.vmap(lambda y: model(y, ts))(y0s)
    assert batched.shape == (4, 5, 2) and batched.dtype == jnp.float32
    one = model(y0s[1], ts)
    np.testing.assert_allclose(batched[1], one, rtol=1e-6)
    np.testing.assert_array_equal(batched[:, 0], y0s)
    # Without ts: y(t1) over [t0, t1] = [0, 2], float32 even under x64.
    last = model(y0s[1])
    assert last.dtype == jnp.float32
    span = jnp.array([0.0, 2.0], jnp.float32)
    np.testing.assert_array_equal(last, mj.odeint(field, y0s[1], span, num_steps=10)[-1])


def test_training_example_lowers_loss_tenfold():
    """The optax training example (fast settings): the loss falls by at least 10x."""
    example = load_example("train_neural_ode")
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam mixes int32 and float
        out = example.train("mali", steps=250, num_trajectories=8, num_times=10, progress=False)
    losses = np.array(out["losses"])
    assert np.all(np.isfinite(losses))
    assert losses[0] / losses[-1] > 10, (losses[0], losses[-1])


# --------------------------------------------------------------------------------- CNF


def _cnf(key, **kw):
    field = mj.nn.MLPField(2, 16, 2, key=key)
    # A visibly non-Gaussian flow: scale the output layer up.
    field = eqx.tree_at(lambda f: f.mlp.layers[-1].weight, field, 3 * field.mlp.layers[-1].weight)
    kw = dict(solver=mj.RK4(), num_steps=8) | kw
    return mj.nn.CNF(field, 2, **kw)


def test_cnf_density_integrates_to_one(getkey):
    cnf = _cnf(getkey())
    grid = jnp.linspace(-8.0, 8.0, 161)
    xx, yy = jnp.meshgrid(grid, grid)
    points = jnp.stack([xx.ravel(), yy.ravel()], axis=1)
    log_p = eqx.filter_jit(cnf.log_prob)(points)
    mass = float(jnp.sum(jnp.exp(log_p)) * (grid[1] - grid[0]) ** 2)
    assert abs(mass - 1) < 0.02, mass
    # ... and the flow is far from the identity (else the test proves little).
    gauss = -0.5 * jnp.sum(points**2, axis=1) - jnp.log(2 * jnp.pi)
    assert float(jnp.max(jnp.abs(jnp.exp(log_p) - jnp.exp(gauss)))) > 0.02


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_cnf_hutchinson_is_unbiased(noise, getkey):
    """Averaged over probes, the Hutchinson log-density equals the exact-trace one (on a
    fixed grid the state path does not depend on the probe and ℓ is linear in the trace
    estimate, so equality holds in expectation exactly, not just to O(h))."""
    key = getkey()
    exact = _cnf(key)
    hutch = _cnf(key, trace="hutchinson", noise=noise)
    x = jnp.array([0.3, -0.7])
    n = 4000
    estimates = hutch.log_prob(jnp.broadcast_to(x, (n, 2)), key=getkey())
    mean, sem = float(jnp.mean(estimates)), float(jnp.std(estimates)) / np.sqrt(n)
    assert sem > 0
    assert abs(mean - float(exact.log_prob(x))) < 4 * sem, (mean, float(exact.log_prob(x)), sem)


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_cnf_mali_gradient_equals_direct(trace, getkey):
    key, data_key = getkey(), getkey()
    x = jr.normal(data_key, (6, 2))
    kw = dict(solver=mj.ALF(), num_steps=10, trace=trace)

    def mean_log_likelihood(cnf):
        return jnp.mean(cnf.log_prob(x, key=jr.key(3)))

    mali = _cnf(key, gradient=mj.MALI(), **kw)
    direct = _cnf(key, gradient=mj.Direct(), **kw)
    g_mali = eqx.filter_grad(mean_log_likelihood)(mali)
    g_direct = eqx.filter_grad(mean_log_likelihood)(direct)
    assert max_rel_err(g_mali.vector_field, g_direct.vector_field) < 1e-10


def test_cnf_sample_inverts_the_flow(getkey):
    cnf = _cnf(getkey(), num_steps=40)
    key = getkey()
    samples = cnf.sample(key, 5)
    assert samples.shape == (5, 2) and bool(jnp.all(jnp.isfinite(samples)))
    z = jr.normal(key, (5, 2))
    forward = jax.vmap(lambda s: mj.odeint(cnf.vector_field, s, jnp.array([0.0, 1.0]),
                                           solver=mj.RK4(), num_steps=40)[-1])(samples)
    np.testing.assert_allclose(forward, z, atol=1e-6)


def test_cnf_misuse_raises(getkey):
    field = mj.nn.MLPField(2, 4, 1, key=getkey())
    with pytest.raises(ValueError, match="trace"):
        mj.nn.CNF(field, 2, trace="stochastic")
    cnf = mj.nn.CNF(field, 2, trace="hutchinson", num_steps=2, solver=mj.RK4())
    with pytest.raises(ValueError, match="key"):
        cnf.log_prob(jnp.zeros(2))
    with pytest.raises(ValueError, match="shape"):
        cnf.log_prob(jnp.zeros(3), key=getkey())
