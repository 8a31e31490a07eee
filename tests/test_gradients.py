"""Gradient strategies: exact for the computed discretisation, composable, cheap."""

import math
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import pytest

import malijax as mj
from helpers import RK_SOLVERS, MLPField, name, reported_error

TS = jnp.array([0.0, 0.4, 1.0])
Y0 = jnp.array([0.3, -0.5, 0.8])

# (solver, strategy) pairs whose gradient must equal Direct's through the same steps.
EXACT_PAIRS = [
    (mj.ALF(), mj.MALI()),
    (mj.ReversibleHeun(), mj.MALI()),
    (mj.ALF(), mj.ACA()),
    (mj.ReversibleHeun(), mj.ACA()),
    (mj.Euler(), mj.ACA()),
    (mj.Midpoint(), mj.ACA()),
    (mj.Heun(), mj.ACA()),
    (mj.RK4(), mj.ACA()),
    (mj.Bosh3(), mj.ACA()),
    (mj.Dopri5(), mj.ACA()),
    (mj.Tsit5(), mj.ACA()),
    (mj.Euler(), mj.SymplecticAdjoint()),
    (mj.Midpoint(), mj.SymplecticAdjoint()),  # b_1 = 0
    (mj.Heun(), mj.SymplecticAdjoint()),
    (mj.RK4(), mj.SymplecticAdjoint()),
    (mj.Bosh3(), mj.SymplecticAdjoint()),  # FSAL stage dropped
    (mj.Dopri5(), mj.SymplecticAdjoint()),  # b_2 = 0, FSAL stage dropped
    (mj.Tsit5(), mj.SymplecticAdjoint()),
    (mj.ALF(), mj.ANODE()),
    (mj.Dopri5(), mj.ANODE()),
    (mj.ALF(), mj.ANODE(checkpoints=3)),
    (mj.Dopri5(), mj.ANODE(checkpoints=3)),
    # The coupled reversible RK method with every base: MALI's fused backward (two
    # base-step VJPs), and the other strategies that serve any solver.
    *[(mj.Reversible(base), mj.MALI()) for base in RK_SOLVERS],
    (mj.Reversible(mj.Tsit5(), coupling=1.0), mj.MALI()),
    (mj.Reversible(mj.Tsit5()), mj.ACA()),
    (mj.Reversible(mj.Tsit5()), mj.ANODE()),
]
GRIDS = {
    "num_steps": dict(num_steps=6),
    "adaptive": dict(rtol=1e-3, atol=1e-6, max_steps=128),
}


def _flat(tree):
    return jnp.concatenate([jnp.ravel(x) for x in jtu.tree_leaves(tree)])


def _rel(a, b):
    a, b = _flat(a), _flat(b)
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def _loss(params, ts, solver, gradient, grid):
    field, y0, scale = params
    ys = mj.odeint(
        lambda t, y, a: a * field(t, y, None), y0, ts, scale,
        solver=solver, gradient=gradient, **grid,
    )
    return jnp.sum(jnp.sin(ys[1:]) * jnp.arange(1.0, 4.0)[None])


@pytest.fixture(scope="module")
def params():
    return (MLPField(3, 8, jr.PRNGKey(0)), Y0, jnp.array(1.3))


# Every pair on the fixed grid; the adaptive grid for one pair per strategy and solver
# family in the default suite and the rest under `-m slow` (compile time dominates).
ADAPTIVE_DEFAULT = {("ALF", "MALI"), ("ReversibleHeun", "MALI"), ("Dopri5", "ACA"),
                    ("Tsit5", "SymplecticAdjoint"), ("Dopri5", "ANODE(3)"),
                    ("Reversible(Tsit5,0.5)", "MALI")}
# Reversible(base) with every base runs under `-m slow`; by default the FSAL bases (Bosh3,
# Tsit5), whose zero-weight last stage the fused backward skips.
REVERSIBLE_SLOW = {"Reversible(Euler,0.5)", "Reversible(Midpoint,0.5)", "Reversible(Heun,0.5)",
                   "Reversible(RK4,0.5)", "Reversible(Dopri5,0.5)", "Reversible(Tsit5,1.0)"}
CASES = [
    pytest.param(s, g, "num_steps", id=f"{name(s)}-{name(g)}-num_steps",
                 marks=pytest.mark.slow if name(s) in REVERSIBLE_SLOW or
                 (isinstance(s, mj.Reversible) and not isinstance(g, (mj.MALI, mj.ACA))) else ())
    for s, g in EXACT_PAIRS
]
CASES += [
    pytest.param(s, g, "adaptive", id=f"{name(s)}-{name(g)}-adaptive",
                 marks=() if (name(s), name(g)) in ADAPTIVE_DEFAULT else pytest.mark.slow)
    for s, g in EXACT_PAIRS
    if s.error_order is not None
]


_DIRECT_CACHE = {}


def _direct_grad(params, solver, grid):
    """Direct's gradient, computed once per (solver, grid): compile time dominates."""
    key = (name(solver), grid)
    if key not in _DIRECT_CACHE:
        _DIRECT_CACHE[key] = jax.grad(_loss, argnums=(0, 1))(params, TS, solver, mj.Direct(), GRIDS[grid])
    return _DIRECT_CACHE[key]


@pytest.mark.parametrize("solver,strategy,grid", CASES)
def test_equals_direct(solver, strategy, grid, params):
    """Gradients w.r.t. an eqx.Module's weights, y0, args and ts, two output times."""
    got = jax.grad(_loss, argnums=(0, 1))(params, TS, solver, strategy, GRIDS[grid])
    want = _direct_grad(params, solver, grid)
    assert _rel(got, want) <= 1e-10
    assert float(jnp.max(jnp.abs(got[1]))) > 0  # ts gradients are not silently zero


@pytest.mark.parametrize("solver,strategy", [(mj.ALF(), mj.MALI()), (mj.Tsit5(), mj.ACA()),
                                             (mj.Reversible(mj.Bosh3()), mj.MALI())],
                         ids=lambda x: name(x))
def test_decreasing_time_step_size_equals_direct(solver, strategy, params):
    ts = jnp.array([1.0, 0.3, -0.5])
    kw = dict(step_size=0.13, max_steps=32)
    grad = jax.grad(_loss, argnums=(0, 1))
    assert _rel(grad(params, ts, solver, strategy, kw), grad(params, ts, solver, mj.Direct(), kw)) <= 1e-10


@pytest.mark.parametrize("solver,strategy", [(mj.ALF(), mj.MALI()), (mj.ALF(), mj.ACA()),
                                             (mj.Reversible(mj.Dopri5()), mj.MALI())],
                         ids=lambda x: name(x))
def test_pytree_state_equals_direct(solver, strategy):
    def f(t, y, a):
        return {"q": y["p"], "p": (-a * jnp.sin(y["q"][0]), jnp.cos(t) * y["p"][1])}

    y0 = {"q": (jnp.array([0.4, 0.1]),), "p": (jnp.array([0.0, 0.3]), jnp.array(0.7))}
    ts = jnp.array([0.0, 0.7, 1.5])

    def loss(y0, a, gradient):
        ys = mj.odeint(lambda t, y, a: {"q": (y["p"][0],), "p": (-a * jnp.sin(y["q"][0]), jnp.cos(t) * y["p"][1])},
                       y0, ts, a, solver=solver, gradient=gradient, num_steps=5)
        return sum(jnp.sum(x[1:] ** 2) for x in jtu.tree_leaves(ys))

    del f
    got = jax.grad(loss, argnums=(0, 1))(y0, 2.0, strategy)
    want = jax.grad(loss, argnums=(0, 1))(y0, 2.0, mj.Direct())
    assert _rel(got, want) <= 1e-10


def _alf_matrix(w, eta):
    """One ALF step on z' = kz in the scaled variables (z, h v) (ALGORITHMS.md §1.5)."""
    return jnp.array([[1 + eta * w, (2 - 2 * eta + eta * w) / 2], [2 * eta * w, 1 - 2 * eta + eta * w]])


@pytest.mark.parametrize("eta", [1.0, 0.8])
def test_mali_matches_closed_form_alf_oracle(eta):
    """z_N = [M(hk, η)^N (1, hk)ᵀ z0]_0, so ∂z_N/∂k and ∂z_N/∂z0 are closed-form."""
    n, t1, z0 = 12, 1.5, 0.7

    def oracle(k, z0):
        w = k * t1 / n
        return (jnp.linalg.matrix_power(_alf_matrix(w, eta), n) @ jnp.array([1.0, w]))[0] * z0

    def mali(k, z0):
        return mj.odeint(lambda t, z, k: k * z, z0, jnp.array([0.0, t1]), k,
                         solver=mj.ALF(eta=eta), gradient=mj.MALI(), num_steps=n)[-1]

    k = jnp.array(-0.8)
    assert abs(float(mali(k, z0)) - float(oracle(k, z0))) <= 1e-13
    got = jax.grad(mali, argnums=(0, 1))(k, jnp.array(z0))
    want = jax.grad(oracle, argnums=(0, 1))(k, jnp.array(z0))
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-12)


@pytest.mark.parametrize("strategy", [mj.MALI(), mj.ACA()], ids=name)
def test_closed_form_continuous_gradients(strategy):
    """z' = α cos(t) z: ∂z(t1)/∂α, ∂z(t1)/∂t1 and ∂z(t1)/∂t0 to discretisation accuracy."""
    alpha, t0, t1, z0 = 0.9, 0.2, 1.7, 1.3

    def z(alpha, t0, t1):
        return mj.odeint(lambda t, z, a: a * jnp.cos(t) * z, jnp.array(z0),
                         jnp.stack([t0, t1]), alpha, solver=mj.ALF(), gradient=strategy,
                         num_steps=400)[-1]

    args = (jnp.array(alpha), jnp.array(t0), jnp.array(t1))
    zt1 = z0 * np.exp(alpha * (np.sin(t1) - np.sin(t0)))
    got = np.array(jax.grad(z, argnums=(0, 1, 2))(*args))
    want = np.array([(np.sin(t1) - np.sin(t0)) * zt1, -alpha * np.cos(t0) * zt1,
                     alpha * np.cos(t1) * zt1])
    np.testing.assert_allclose(got, want, rtol=2e-5)  # O(h^2) with h = 1.5/400


@pytest.mark.parametrize("strategy,reverse_over_reverse", [
    (mj.MALI(), False), (mj.ACA(), False),
    pytest.param(mj.MALI(), True, marks=pytest.mark.slow),
    pytest.param(mj.ACA(), True, marks=pytest.mark.slow),
], ids=["MALI-hessian", "ACA-hessian", "MALI-rev-rev", "ACA-rev-rev"])
def test_second_derivatives_equal_direct(strategy, reverse_over_reverse):
    def loss(y0, a, gradient):
        ys = mj.odeint(lambda t, y, a: a * jnp.tanh(y[::-1]) - 0.3 * y, y0, TS, a,
                       solver=mj.ALF(), gradient=gradient, num_steps=5)
        return jnp.sum(ys[1:] ** 2)

    y0 = jnp.array([0.5, -0.2])
    if reverse_over_reverse:
        h2 = jax.jacrev(jax.jacrev(loss, argnums=(0, 1)), argnums=(0, 1))
    else:  # jax.hessian: forward-over-reverse
        h2 = jax.hessian(loss, argnums=(0, 1))
    assert _rel(h2(y0, 1.3, strategy), h2(y0, 1.3, mj.Direct())) <= 1e-10


@pytest.mark.slow  # test_batching's grad-of-vmap and vmap-of-grad tests cover it by default
@pytest.mark.parametrize("strategy", [mj.ACA(), mj.MALI()], ids=name)
def test_vmap_and_grad_compose(strategy):
    field = MLPField(2, 8, jr.PRNGKey(1))
    y0s = jr.normal(jr.PRNGKey(2), (3, 2))

    def loss(field, y0, gradient):
        return jnp.sum(mj.odeint(field, y0, TS, solver=mj.ALF(), gradient=gradient,
                                 rtol=1e-3, atol=1e-6, max_steps=128)[-1] ** 2)

    per_example = jax.vmap(eqx.filter_grad(loss), in_axes=(None, 0, None))
    batched = eqx.filter_grad(lambda f, y, g: jnp.sum(jax.vmap(loss, in_axes=(None, 0, None))(f, y, g)))
    want = [eqx.filter_grad(loss)(field, y0s[i], mj.Direct()) for i in range(3)]
    got_per = per_example(field, y0s, strategy)
    for i in range(3):
        assert _rel(jtu.tree_map(lambda x: x[i], got_per), want[i]) <= 1e-10
    summed = jtu.tree_map(lambda *x: sum(x), *want)
    assert _rel(batched(field, y0s, strategy), summed) <= 1e-10
    # vmap over parameters
    scales = jnp.array([0.5, 1.0, 2.0])
    grad_k = jax.vmap(jax.grad(lambda k, g: jnp.sum(mj.odeint(
        lambda t, y, k: -k * y, Y0, TS, k, solver=mj.ALF(), gradient=g, num_steps=8)[-1])), (0, None))
    assert _rel(grad_k(scales, strategy), grad_k(scales, mj.Direct())) <= 1e-10


def test_closed_over_arrays_get_gradients():
    def loss(w, gradient):
        return jnp.sum(mj.odeint(lambda t, y, a: jnp.tanh(w @ y), Y0, TS, solver=mj.ALF(),
                                 gradient=gradient, num_steps=4)[-1])

    w = jr.normal(jr.PRNGKey(3), (3, 3))
    got, want = jax.grad(loss)(w, mj.MALI()), jax.grad(loss)(w, mj.Direct())
    assert float(jnp.max(jnp.abs(want))) > 0.1
    assert _rel(got, want) <= 1e-10


@pytest.mark.parametrize("solver,extra", [(mj.ALF(), 0), (mj.ReversibleHeun(), 1)], ids=name)
def test_mali_backward_costs_one_vjp_per_step(solver, extra):
    """Forward: init + N steps; backward: N fused VJPs + the VJP through the initial
    evaluation (v0 = f(t0, z0), f̂0 = f(t0, y0)); reversible Heun adds one VJP for its
    cached f̂_N."""
    count = [0]

    def f(t, y, a):
        jax.debug.callback(lambda: count.__setitem__(0, count[0] + 1))
        return a * jnp.tanh(y) - 0.3 * y

    n_per, n_out = 10, 2
    grad = jax.jit(jax.grad(lambda y0: jnp.sum(mj.odeint(
        f, y0, TS, 1.3, solver=solver, gradient=mj.MALI(), num_steps=n_per) ** 2)))
    grad(Y0).block_until_ready()
    count[0] = 0
    grad(Y0).block_until_ready()
    jax.effects_barrier()
    n = n_per * n_out
    assert count[0] == (1 + n) + (n + 1 + extra)


@pytest.mark.parametrize("strategy", [mj.ACA(), mj.SymplecticAdjoint()], ids=name)
def test_tsit5_backward_step_costs_six_vjps(strategy):
    """Tsit5 is FSAL: its 7th stage f(t + h, y1) is the next step's first, so a step's
    backward needs the VJPs of its 6 distinct stages only. Counted with a callback in
    the backward rule of a `custom_vjp` inside `func` (a callback in `func` itself
    would also count the 7th stage's evaluation, which XLA removes for a pure field)."""
    count = [0]

    @jax.custom_vjp
    def act(y, a):
        return a * jnp.tanh(y)

    def act_fwd(y, a):
        return act(y, a), (y, a)

    def act_bwd(res, g):
        y, a = res
        jax.debug.callback(lambda: count.__setitem__(0, count[0] + 1))
        return g * a * (1 - jnp.tanh(y) ** 2), jnp.sum(g * jnp.tanh(y))

    act.defvjp(act_fwd, act_bwd)
    ts = jnp.array([0.0, 1.0])
    for kw in (dict(num_steps=10), dict(rtol=1e-6, atol=1e-9)):
        def loss(a, kw=kw):
            ys = mj.odeint(lambda t, y, a: act(y, a) - 0.3 * y, Y0, ts, a,
                           solver=mj.Tsit5(), gradient=strategy, **kw)
            return jnp.sum(ys[-1] ** 2)

        grad = jax.jit(jax.grad(loss))
        grad(1.3).block_until_ready()
        count[0] = 0
        grad(1.3).block_until_ready()
        jax.effects_barrier()
        steps = mj.solve(lambda t, y, a: a * jnp.tanh(y) - 0.3 * y, Y0, ts, 1.3,
                         solver=mj.Tsit5(), gradient=strategy, **kw).stats["num_steps"]
        assert int(steps) >= 5
        assert count[0] == 6 * int(steps), (kw, count[0], int(steps))


def _temp_bytes(strategy, solver, n):
    field = MLPField(16, 32, jr.PRNGKey(0))
    dynamic, static = eqx.partition(field, eqx.is_array)

    def loss(d):
        ys = mj.odeint(eqx.combine(d, static), jnp.ones(16), jnp.array([0.0, 1.0]),
                       solver=solver, gradient=strategy, num_steps=n)
        return jnp.sum(ys[-1] ** 2)

    compiled = jax.jit(jax.grad(loss)).lower(dynamic).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_memory():
    state_bytes = 16 * 8
    mali = {n: _temp_bytes(mj.MALI(), mj.ALF(), n) for n in (16, 1024)}
    assert mali[1024] <= 1.1 * mali[16], mali  # constant in N (measured: equal)
    aca = {n: _temp_bytes(mj.ACA(), mj.Dopri5(), n) for n in (16, 1024)}
    per_step = (aca[1024] - aca[16]) / (1024 - 16)
    # one stored state per step (plus the (t, h, out) scalars), no activations
    assert state_bytes <= per_step <= 2 * state_bytes + 3 * 8, (aca, per_step)
    direct = _temp_bytes(mj.Direct(), mj.Dopri5(), 1024)
    assert direct > 3 * aca[1024], (direct, aca)


def test_memory_symplectic_and_anode():
    state_bytes = 16 * 8
    symplectic = {n: _temp_bytes(mj.SymplecticAdjoint(), mj.Dopri5(), n) for n in (16, 1024)}
    per_step = (symplectic[1024] - symplectic[16]) / (1024 - 16)
    assert state_bytes <= per_step <= 2 * state_bytes + 3 * 8, (symplectic, per_step)
    # binomial checkpointing: flat in N, and far below a checkpoint per step at large N
    anode = {c: _temp_bytes(mj.ANODE(checkpoints=c), mj.Dopri5(), 1024) for c in (None, 8)}
    assert anode[8] <= 1.1 * _temp_bytes(mj.ANODE(checkpoints=8), mj.Dopri5(), 16), anode
    assert anode[8] < anode[None] / 5, anode


def test_strategy_solver_mismatch_raises_at_trace_time():
    with pytest.raises(TypeError, match="ALF"):
        mj.odeint(lambda t, y, a: -y, Y0, TS, solver=mj.Dopri5(), gradient=mj.MALI())
    with pytest.raises(TypeError, match="Runge--Kutta"):
        mj.odeint(lambda t, y, a: -y, Y0, TS, solver=mj.ALF(), gradient=mj.SymplecticAdjoint())
    with pytest.raises(ValueError, match="checkpoints"):
        mj.ANODE(checkpoints=0)
    with pytest.raises(ValueError, match="eta"):
        mj.odeint(lambda t, y, a: -y, Y0, TS, solver=mj.ALF(eta=0.5), gradient=mj.MALI(), num_steps=2)


def test_default_gradient():
    from malijax._odeint import _default_gradient

    assert isinstance(_default_gradient(mj.ALF()), mj.MALI)
    assert isinstance(_default_gradient(mj.ReversibleHeun()), mj.MALI)
    assert isinstance(_default_gradient(mj.Dopri5()), mj.ACA)


def _van_loan(a, w, z0, t):
    """∂(wᵀ e^{At} z0)/∂A: the top-right block of expm([[Aᵀ, w z0ᵀ], [0, Aᵀ]] t)."""
    import scipy.linalg

    n = a.shape[0]
    m = np.zeros((2 * n, 2 * n))
    m[:n, :n] = a.T
    m[:n, n:] = np.outer(w, z0)
    m[n:, n:] = a.T
    return scipy.linalg.expm(m * t)[:n, n:]


def test_adjoint_converges_to_exact_gradient():
    """Only tolerance-accurate: assert the trend and a tolerance-scaled bound."""
    a = np.array([[-0.3, 1.0, 0.2], [-1.0, -0.2, 0.1], [0.3, 0.0, -0.5]])
    z0, w, t1 = np.array([1.0, 0.5, -0.3]), np.array([0.7, -1.1, 0.4]), 2.0
    exact = _van_loan(a, w, z0, t1)

    def loss(a, rtol):
        ys = mj.odeint(lambda t, z, a: a @ z, jnp.asarray(z0), jnp.array([0.0, t1]), a,
                       solver=mj.Dopri5(), gradient=mj.Adjoint(), rtol=rtol, atol=1e-2 * rtol)
        return jnp.asarray(w) @ ys[-1]

    errors = [float(np.max(np.abs(jax.grad(loss)(jnp.asarray(a), r) - exact))) for r in (1e-4, 1e-6, 1e-8)]
    assert errors[0] > 30 * errors[1] > 30 * 30 * errors[2], errors  # measured ~200x per step
    for rtol, err in zip((1e-4, 1e-6, 1e-8), errors):
        assert err <= 20 * rtol * np.max(np.abs(exact)), (rtol, err)


def test_adjoint_outputs_args_times_and_pytrees():
    """Several output times, a pytree state, args and ts against Direct at tight tolerance."""
    def loss(y0, k, ts, gradient):
        ys = mj.odeint(lambda t, y, k: {"a": -k * y["a"] + jnp.sin(t) * y["b"], "b": -y["a"]},
                       y0, ts, k, solver=mj.Tsit5(), gradient=gradient, rtol=1e-9, atol=1e-11)
        return jnp.sum(ys["a"][1:] ** 2) + jnp.sum(ys["b"][1:] * jnp.arange(1.0, 4.0))

    y0 = {"a": jnp.array(0.8), "b": jnp.array(-0.3)}
    ts = jnp.array([0.1, 0.6, 1.2, 2.0])
    grad = jax.grad(loss, argnums=(0, 1, 2))
    got, want = grad(y0, 0.7, ts, mj.Adjoint()), grad(y0, 0.7, ts, mj.ACA())
    assert _rel(got, want) <= 1e-6
    assert _rel(got, want) > 0  # not the discrete gradient: different by design


def test_seminorm_takes_fewer_backward_steps():
    count = [0]

    def f(t, y, w):
        jax.debug.callback(lambda: count.__setitem__(0, count[0] + 1))
        return jnp.tanh(w @ y)

    w = jr.normal(jr.PRNGKey(4), (3, 3))
    nfe = {}
    for semi in (True, False):
        g = jax.jit(jax.grad(lambda w: jnp.sum(mj.odeint(
            f, Y0, TS, w, solver=mj.Dopri5(), gradient=mj.Adjoint(seminorm=semi), rtol=1e-6, atol=1e-9)[-1])))
        g(w).block_until_ready()
        count[0] = 0
        g(w).block_until_ready()
        jax.effects_barrier()
        nfe[semi] = count[0]
    assert nfe[True] < nfe[False], nfe


@pytest.mark.parametrize("strategy", [mj.MALI(), mj.ACA(), mj.Adjoint()], ids=name)
def test_loss_using_one_leaf_of_a_pytree_state(strategy):
    """Output leaves the loss ignores reach the backward as `None` cotangents."""
    def loss(a, gradient):
        ys = mj.odeint(lambda t, y, a: {"a": -a * y["b"], "b": y["a"]},
                       {"a": jnp.array([0.3, 0.1]), "b": jnp.array([1.0, -0.5])}, TS, a,
                       solver=mj.ALF(), gradient=gradient, num_steps=8)
        return jnp.sum(ys["a"][-1])

    got, want = jax.grad(loss)(1.3, strategy), jax.grad(loss)(1.3, mj.Direct())
    tol = 1e-4 if isinstance(strategy, mj.Adjoint) else 1e-12
    assert abs(float(got) - float(want)) <= tol * abs(float(want))


def _reconstruction_warnings(fn):
    """`fn()`'s value and the `ReconstructionWarning`s its run issued."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = jax.block_until_ready(fn())
        jax.effects_barrier()  # the warning comes from a host callback
    return out, [w for w in caught if issubclass(w.category, mj.ReconstructionWarning)]


def _contracting_grad(gradient, horizon, scale=1.0):
    """z' = diag(-0.5, -5) z with ALF, h = 0.01: undamped ALF's parasitic mode grows like
    exp(5 T), so MALI's rebuilt states lose digits as the horizon grows. (The forward
    reports that weak instability past t ≈ 2; `throw=False` on a `num_steps` grid lets it
    run on, so that the reconstruction check is what is tested.)"""
    def loss(z0, k):
        ys = mj.odeint(lambda t, z, k: k * jnp.array([-0.5, -5.0]) * z, z0,
                       jnp.array([0.0, horizon]), k, solver=mj.ALF(), gradient=gradient,
                       num_steps=round(100 * horizon), throw=False)
        return jnp.sum(ys[-1] ** 2)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.array([1.0, 1.0]), jnp.asarray(scale))


def test_mali_warns_when_its_reconstruction_is_inaccurate():
    direct = _contracting_grad(mj.Direct(), 4.0)
    got, caught = _reconstruction_warnings(lambda: _contracting_grad(mj.MALI(), 4.0))
    assert _rel(got, direct) > 1e-4  # the warning is warranted (measured: 3.5e-3)
    assert len(caught) == 1, caught
    # Rebuilt z0 off by 4.2e-4 (the rounding of ALF's parasitic mode, amplified ~e^{5T}).
    assert 1e-5 < reported_error(str(caught[0].message)) < 1e-2, caught[0].message
    assert "gradient=mj.ACA()" in str(caught[0].message)
    # A short horizon rebuilds z0 to rounding and stays silent.
    got, caught = _reconstruction_warnings(lambda: _contracting_grad(mj.MALI(), 1.0))
    assert _rel(got, _contracting_grad(mj.Direct(), 1.0)) <= 1e-12 and not caught
    # The tolerance is the user's to set, or to switch off.
    for gradient in (mj.MALI(reconstruction_rtol=1e-3), mj.MALI(reconstruction_rtol=math.inf)):
        _, caught = _reconstruction_warnings(lambda: _contracting_grad(gradient, 4.0))
        assert not caught
    with pytest.raises(ValueError, match="reconstruction_rtol"):
        mj.MALI(reconstruction_rtol=0.0)


def test_mali_reconstruction_warning_reports_the_worst_element_of_a_batch():
    # Per-element rate scales 0.25 and 1: only the second element's reconstruction fails.
    def batch():
        return jax.vmap(lambda s: _contracting_grad(mj.MALI(), 4.0, s))(jnp.array([0.25, 1.0]))

    got, caught = _reconstruction_warnings(batch)
    assert len(caught) == 1 and 1e-5 < reported_error(str(caught[0].message)) < 1e-2, caught
    good = _contracting_grad(mj.Direct(), 4.0, 0.25)
    assert _rel(jtu.tree_map(lambda g: g[0], got), good) <= 1e-12
