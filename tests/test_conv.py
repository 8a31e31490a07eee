"""`mj.nn.ConvField`: the numbers of an `eqx.nn.Conv2d` stack (values and gradients), by
either way of computing the convolutions, and exact gradients of an ODE block with it."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

import malijax as mj

jax.config.update("jax_enable_x64", True)


def _eqx_stack(field, t, y):
    """The same layers applied as Equinox applies them: one image at a time."""

    def one(x):
        for i, conv in enumerate(field.convs):
            if i > 0:
                x = field.activation(x)
            inp = x
            if field.time_dependent:
                inp = jnp.concatenate([x, jnp.full((1,) + x.shape[1:], t, x.dtype)])
            x = conv(inp)
        return x

    return one(y) if y.ndim == 3 else jax.vmap(one)(y)


@pytest.mark.parametrize("method,time_dependent,shape", [
    ("nhwc", True, (2, 3, 5, 5)),
    ("nhwc", False, (3, 6, 7)),
    pytest.param("slices", False, (3, 6, 7), marks=pytest.mark.slow),
    pytest.param("slices", True, (2, 3, 5, 5), marks=pytest.mark.slow),
    ("xla", False, (2, 3, 5, 5)),
    pytest.param("xla", True, (3, 6, 7), marks=pytest.mark.slow),
])
def test_equals_an_eqx_conv2d_stack(method, time_dependent, shape):
    field = mj.nn.ConvField(3, 4, depth=3, time_dependent=time_dependent, method=method,
                            key=jr.key(0), dtype=jnp.float64)
    y = jr.normal(jr.key(1), shape, jnp.float64)
    np.testing.assert_allclose(eqx.filter_jit(field)(0.3, y, None), _eqx_stack(field, 0.3, y),
                               rtol=0, atol=1e-14)

    def loss(fn, field, y):
        return jnp.sum(jnp.sin(fn(field, y)))

    grad = eqx.filter_jit(eqx.filter_grad(lambda fy, fn: loss(fn, *fy)))
    ours = grad((field, y), lambda f, y: f(0.3, y, None))
    theirs = grad((field, y), lambda f, y: _eqx_stack(f, 0.3, y))
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-13)


def test_nhwc_reverse_over_reverse_and_forward_modes():
    """The hand-written VJP is itself differentiable (Hessian-vector products equal
    `method="xla"`'s); forward mode needs `method="slices"`, which agrees with the rest."""
    fields = {m: mj.nn.ConvField(2, 3, method=m, key=jr.key(0), dtype=jnp.float64)
              for m in ("nhwc", "slices", "xla")}
    y = jr.normal(jr.key(1), (2, 2, 4, 5), jnp.float64)
    v = jr.normal(jr.key(2), y.shape, jnp.float64)

    def loss(field, y):
        return jnp.sum(jnp.tanh(field(0.0, y, None)) ** 2)

    def hvp(field):
        return jax.jvp(jax.grad(lambda y: loss(field, y)), (y,), (v,))[1]

    def hvp_reverse(field):  # reverse over reverse: d/dy <grad loss(y), v>
        return jax.grad(lambda y: jnp.vdot(jax.grad(lambda z: loss(field, z))(y), v))(y)

    want = jax.jit(hvp)(fields["xla"])
    np.testing.assert_allclose(jax.jit(hvp_reverse)(fields["nhwc"]), want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(jax.jit(hvp)(fields["slices"]), want, rtol=0, atol=1e-12)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda y: fields["nhwc"](0.0, y, None), (y,), (v,))


def test_refuses_misuse():
    with pytest.raises(ValueError, match="odd"):
        mj.nn.ConvField(3, 4, kernel_size=4, key=jr.key(0))
    with pytest.raises(ValueError, match="method"):
        mj.nn.ConvField(3, 4, method="fft", key=jr.key(0))
    field = mj.nn.ConvField(3, 4, key=jr.key(0))
    with pytest.raises(ValueError, match="channels"):
        field(0.0, jnp.ones((2, 5, 5)), None)


def _tiny_odenet():
    """A tiny ODE-Net: a conv block, mean-pool, a linear head, cross-entropy."""
    field = mj.nn.ConvField(2, 3, time_dependent=True, key=jr.key(0), dtype=jnp.float64)
    head = eqx.nn.Linear(2, 3, key=jr.key(1), dtype=jnp.float64)
    images = jr.normal(jr.key(2), (4, 2, 5, 5), jnp.float64)
    labels = jnp.array([0, 1, 2, 1])
    ts = jnp.array([0.0, 1.0])

    def loss(model, solver, gradient):
        field, head = model
        y1 = mj.odeint(field, images, ts, solver=solver, gradient=gradient, num_steps=3)[-1]
        logits = jax.vmap(head)(jnp.mean(y1, axis=(-2, -1)))
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

    return (field, head), loss


@pytest.mark.parametrize("solver,gradient", [
    pytest.param(mj.Reversible(mj.RK4()), mj.MALI(), id="MALI"),
    pytest.param(mj.RK4(), mj.ACA(), id="ACA", marks=pytest.mark.slow),
])
def test_ode_block_gradients_equal_direct(solver, gradient):
    """MALI's and ACA's gradients of the tiny ODE-Net equal Direct's through the same steps."""
    model, loss = _tiny_odenet()
    grad = eqx.filter_jit(eqx.filter_grad(loss))
    got, want = grad(model, solver, gradient), grad(model, solver, mj.Direct())
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.slow
def test_ode_block_trains_with_mali():
    """20 Adam steps with MALI lower the tiny ODE-Net's loss by a fifth at least."""
    model, loss = _tiny_odenet()
    rev = mj.Reversible(mj.RK4())
    params, static = eqx.partition(model, eqx.is_inexact_array)
    optimiser = optax.adam(1e-2)
    state = optimiser.init(params)

    @jax.jit
    def step(params, state):
        value, grads = jax.value_and_grad(
            lambda p: loss(eqx.combine(p, static), rev, mj.MALI()))(params)
        updates, state = optimiser.update(grads, state)
        return optax.apply_updates(params, updates), state, value

    losses = []
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam mixes int32 and float
        for _ in range(20):
            params, state, value = step(params, state)
            losses.append(float(value))
    assert losses[-1] < 0.8 * losses[0], losses
