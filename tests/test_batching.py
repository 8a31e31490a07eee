"""Batch-aware gradients (malijax/_batching.py): under `grad(vmap(solve))` the custom-VJP
strategies carry one parameter cotangent for the whole batch, and the results equal a
Python loop over the examples; `vmap(grad(...))` still gives per-example gradients, and
per-example parameters per-example cotangents."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import pytest
from helpers import MLPField, f64, max_rel_err, name

import malijax as mj
from malijax._batching import expect_unbatched, innermost_is_vmap

TS = f64(0.0, 0.4, 1.0)
Y0S = jr.normal(jr.PRNGKey(3), (3, 2), jnp.float64)

# (solver, gradient): every strategy built on the reverse sweep, and the default.
SWEEP_CASES = [
    (mj.Tsit5(), mj.ACA()),
    (mj.Tsit5(), mj.SymplecticAdjoint()),
    (mj.ALF(), mj.MALI()),
    (mj.Reversible(mj.Tsit5()), mj.MALI()),
    (mj.ReversibleHeun(), mj.MALI()),
]
GRIDS = {"num_steps": dict(num_steps=6), "adaptive": dict(rtol=1e-7, atol=1e-9)}
# The Adjoint (a_θ summed stage by stage) equals the loop on num_steps grids; adaptive,
# its backward steps are shared by the batch (tests below). ANODE() is a scan of
# jax.checkpoint'ed steps on a grid and ACA's sweep otherwise.
GRID_ONLY = [(mj.RK4(), mj.ANODE()), (mj.Tsit5(), mj.Adjoint())]
SLOW = pytest.mark.slow
# By default: every strategy on a grid once and the adaptive sweep with ACA (the default's
# strategy); the other combinations under -m slow.
# (ANODE on a grid is JAX's own AD of the batched scan, so it is under -m slow.)
FAST = {("Tsit5", "ACA", "num_steps"), ("ALF", "MALI", "num_steps"),
        ("Tsit5", "Adjoint", "num_steps"), ("Tsit5", "ACA", "adaptive")}


def _case(s, g, grid):
    marks = [] if (name(s), name(g), grid) in FAST else [SLOW]
    return pytest.param(s, g, grid, id=f"{name(s)}-{name(g)}-{grid}", marks=marks)


CASES = [_case(s, g, "num_steps") for s, g in SWEEP_CASES + GRID_ONLY] + [
    _case(s, g, "adaptive") for s, g in SWEEP_CASES + [(mj.Tsit5(), mj.ANODE())]
]
PER_EXAMPLE = [pytest.param(*SWEEP_CASES[0], id="Tsit5-ACA", marks=SLOW),
               pytest.param(*SWEEP_CASES[1], id="Tsit5-SymplecticAdjoint", marks=SLOW),
               pytest.param(*SWEEP_CASES[2], id="ALF-MALI")]


def _loss(field, y0, ts, solver, gradient, kw):
    ys = mj.odeint(field, y0, ts, solver=solver, gradient=gradient, **kw)
    return jnp.sum(ys[1] ** 2) + jnp.sum(jnp.sin(ys[-1]))


@pytest.mark.parametrize("solver,gradient,grid", CASES)
def test_grad_of_vmap_equals_loop(solver, gradient, grid):
    kw = GRIDS[grid]
    field = MLPField(2, 8, jr.PRNGKey(0))

    def batch_loss(field, y0s, ts):
        losses = jax.vmap(lambda y: _loss(field, y, ts, solver, gradient, kw))(y0s)
        return jnp.sum(losses)

    grads = jax.jit(jax.grad(batch_loss, argnums=(0, 1, 2)))(field, Y0S, TS)
    one = jax.jit(jax.grad(lambda f, y, t: _loss(f, y, t, solver, gradient, kw), argnums=(0, 1, 2)))
    loop = [one(field, y, TS) for y in Y0S]
    expected = (
        jtu.tree_map(lambda *g: sum(g), *[g[0] for g in loop]),
        jnp.stack([g[1] for g in loop]),
        sum(g[2] for g in loop),
    )
    for got, want in zip(grads, expected):
        assert max_rel_err(got, want) < 1e-12
    if grid == "adaptive":  # every element keeps its own steps
        steps = jax.vmap(lambda y: mj.solve(field, y, TS, solver=solver, gradient=gradient, **kw)
                         .stats["num_steps"])(Y0S)
        assert len(set(steps.tolist())) > 1, steps


@pytest.mark.parametrize("solver,gradient", PER_EXAMPLE)
def test_vmap_of_grad_stays_per_example(solver, gradient):
    """Differentiation inside `vmap`: each example's own parameter gradient."""
    kw = GRIDS["adaptive"]
    field = MLPField(2, 8, jr.PRNGKey(0))
    per_example = jax.jit(jax.vmap(eqx.filter_grad(lambda f, y: _loss(f, y, TS, solver, gradient, kw)),
                                   in_axes=(None, 0)))(field, Y0S)
    for i, y in enumerate(Y0S):
        want = eqx.filter_grad(lambda f: _loss(f, y, TS, solver, gradient, kw))(field)
        assert max_rel_err(jtu.tree_map(lambda g: g[i], per_example), want) < 1e-12


@pytest.mark.parametrize("solver,gradient", PER_EXAMPLE)
def test_per_example_args_keep_per_example_cotangents(solver, gradient):
    """Batched `args` (one decay rate per example) with shared weights in `func`."""
    field = MLPField(2, 8, jr.PRNGKey(0))
    rates = f64(0.5, 1.0, 2.0)

    def f(t, y, rate):
        return field(t, y, None) - rate * y

    def loss(rate, y):
        return jnp.sum(mj.odeint(f, y, TS, rate, solver=solver, gradient=gradient, num_steps=6)[-1] ** 2)

    got = jax.grad(lambda r: jnp.sum(jax.vmap(loss)(r, Y0S)))(rates)
    want = jnp.stack([jax.grad(loss)(r, y) for r, y in zip(rates, Y0S)])
    assert max_rel_err(got, want) < 1e-12


def test_second_derivative_under_vmap():
    """Forward-over-reverse through the summing sweep: the Hessian-vector product of a
    batch loss w.r.t. y0 equals the loop's."""
    field = MLPField(2, 8, jr.PRNGKey(0))
    kw = GRIDS["num_steps"]

    def batch_loss(y0s):
        return jnp.sum(jax.vmap(lambda y: _loss(field, y, TS, mj.ALF(), mj.MALI(), kw))(y0s))

    v = jnp.ones_like(Y0S)
    hvp = jax.jvp(jax.grad(batch_loss), (Y0S,), (v,))[1]
    one = jax.grad(lambda y: _loss(field, y, TS, mj.ALF(), mj.MALI(), kw))
    want = jnp.stack([jax.jvp(one, (y,), (w,))[1] for y, w in zip(Y0S, v)])
    assert max_rel_err(hvp, want) < 1e-10


@pytest.mark.parametrize("solver,gradient", [pytest.param(mj.ALF(), mj.MALI(), id="ALF-MALI"),
                                             pytest.param(mj.Tsit5(), mj.ACA(), id="Tsit5-ACA",
                                                          marks=SLOW)])
def test_reverse_over_reverse_under_vmap(solver, gradient):
    """grad of a function of grad(vmap(.)) on a num_steps grid: the summing rules are
    only used where something is batched, so reverse mode never meets a custom_vmap."""
    field = MLPField(2, 8, jr.PRNGKey(0))

    def one(y):
        return jnp.sum(mj.odeint(field, y, TS, solver=solver, gradient=gradient, num_steps=4)[-1] ** 2)

    def batch_loss(y0s):
        return jnp.sum(jax.vmap(one)(y0s))

    got = jax.grad(lambda y: jnp.sum(jax.grad(batch_loss)(y) ** 2))(Y0S)
    want = jnp.stack([jax.grad(lambda y: jnp.sum(jax.grad(one)(y) ** 2))(y) for y in Y0S])
    assert max_rel_err(got, want) < 1e-12


def test_innermost_transformation_is_detected():
    """The mechanism depends on telling `grad(vmap(.))` from `vmap(grad(.))` at the
    call; a JAX upgrade that breaks the detection fails here rather than silently
    falling back to per-example cotangents."""
    seen = []

    def probe(x):
        seen.append(innermost_is_vmap())
        return x

    probe(1.0)
    jax.vmap(probe)(jnp.ones(2))
    jax.grad(lambda x: jnp.sum(jax.vmap(probe)(x)))(jnp.ones(2))
    jax.vmap(jax.grad(probe))(jnp.ones(2))
    jax.jit(jax.vmap(probe))(jnp.ones(2))
    assert seen == [False, True, True, False, True]


@pytest.mark.parametrize("solver,gradient,grid", [
    pytest.param(mj.ALF(), mj.MALI(), "num_steps", id="ALF-MALI"),
    pytest.param(mj.Tsit5(), mj.ACA(), "num_steps", id="Tsit5-ACA", marks=SLOW),
    pytest.param(mj.Tsit5(), mj.Adjoint(), "adaptive", id="Tsit5-Adjoint-adaptive"),
])
def test_vmap_memory_equals_one_batched_state(solver, gradient, grid):
    """XLA's temporary memory for the gradient of `vmap` over B states is within 1.5x
    of that for one batched state of shape (B, d) (it was 22x for MALI and 5x for ACA
    when the sweep carried one parameter cotangent per example, and 17.8x for the
    adaptive Adjoint, benchmarks/results/records.md part 4). On a grid both take the
    same steps, so their gradients agree to float32 rounding."""
    dim, batch = 8, 64
    mlp = eqx.nn.MLP(dim, dim, 64, 1, activation=jnp.tanh, key=jr.PRNGKey(0), dtype=jnp.float32)
    params, static = eqx.partition(mlp, eqx.is_array)
    y0s = jr.normal(jr.PRNGKey(1), (batch, dim), jnp.float32)
    ts = jnp.array([0.0, 1.0], jnp.float32)
    steps = dict(num_steps=16) if grid == "num_steps" else dict(rtol=1e-3, atol=1e-6)
    kw = dict(solver=solver, gradient=gradient, **steps)

    def batched(p):
        m = eqx.combine(p, static)
        return jnp.mean(mj.odeint(lambda t, y, a: jax.vmap(m)(y), y0s, ts, **kw)[-1] ** 2)

    def vmapped(p):
        m = eqx.combine(p, static)
        one = lambda y: mj.odeint(lambda t, y, a: m(y), y, ts, **kw)[-1]  # noqa: E731
        return jnp.mean(jax.vmap(one)(y0s) ** 2)

    def temp_bytes(loss):
        return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes

    ratio = temp_bytes(vmapped) / temp_bytes(batched)
    assert ratio <= 1.5, ratio
    if grid == "num_steps":  # adaptive: the two error norms choose different steps
        g_b, g_v = jax.grad(batched)(params), jax.grad(vmapped)(params)
        assert max_rel_err(g_v, g_b) < 1e-5


def _adjoint_batch(field, y0s, tss, kw):
    def loss(field, y0, ts):
        return _loss(field, y0, ts, mj.Tsit5(), mj.Adjoint(), kw)

    return jnp.sum(jax.vmap(loss, in_axes=(None, 0, 0))(field, y0s, tss))


TSS = jnp.stack([f64(0.0, 0.4, 1.0), f64(0.0, 1.0, 2.0), f64(0.0, 0.3, 3.0)])  # one row each


def test_adjoint_with_per_example_times_on_a_grid_equals_the_loop():
    """Each trajectory on its own output times, `num_steps` grid: the batch-summed a_θ
    equals the loop's (it was off by O(1) when each element's step h_b multiplied a
    parameter cotangent already summed over the batch)."""
    field, kw = MLPField(2, 8, jr.PRNGKey(0)), dict(num_steps=6)
    got = jax.grad(_adjoint_batch, argnums=(0, 1, 2))(field, Y0S, TSS, kw)
    one = jax.grad(lambda f, y, t: _loss(f, y, t, mj.Tsit5(), mj.Adjoint(), kw), argnums=(0, 1, 2))
    loop = [one(field, y, t) for y, t in zip(Y0S, TSS)]
    want = (jtu.tree_map(lambda *g: sum(g), *[g[0] for g in loop]),
            jnp.stack([g[1] for g in loop]), jnp.stack([g[2] for g in loop]))
    for g, w in zip(got, want):
        assert max_rel_err(g, w) < 1e-12


def test_adjoint_adaptive_under_vmap_shares_steps_and_meets_the_tolerance():
    """Adaptive, per-example times: the backward takes one step sequence for the batch
    (the largest error ratio decides), so its gradient is within the tolerance's reach
    of `Direct()`'s, as each example's own Adjoint is, and no example's is worse."""
    field, kw = MLPField(2, 8, jr.PRNGKey(0)), dict(rtol=1e-8, atol=1e-10)
    got = jax.grad(_adjoint_batch)(field, Y0S, TSS, kw)
    direct = [eqx.filter_grad(lambda f: _loss(f, y, t, mj.Tsit5(), mj.Direct(), kw))(field)
              for y, t in zip(Y0S, TSS)]
    own = [eqx.filter_grad(lambda f: _loss(f, y, t, mj.Tsit5(), mj.Adjoint(), kw))(field)
           for y, t in zip(Y0S, TSS)]
    sum_tree = lambda gs: jtu.tree_map(lambda *g: sum(g), *gs)  # noqa: E731
    err_batch = max_rel_err(got, sum_tree(direct))
    err_own = max_rel_err(sum_tree(own), sum_tree(direct))
    assert 0 < err_batch < 1e-6, err_batch  # tolerance-accurate, not the loop's rounding
    assert err_batch <= 2 * err_own + 1e-12, (err_batch, err_own)


def test_expect_unbatched_refuses_a_batched_value():
    """The Adjoint's guard: its summed a_θ is right only if the step count is shared."""
    shared = jax.vmap(lambda x: expect_unbatched(jnp.float64(3), "steps") + x)(jnp.ones(2))
    assert shared.tolist() == [4.0, 4.0]
    with pytest.raises(AssertionError, match="differs across the vmapped batch"):
        jax.vmap(lambda x: expect_unbatched(x, "steps"))(jnp.ones(2))
