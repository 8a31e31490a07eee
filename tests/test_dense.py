"""Dense output: outputs inside steps come from the solver's continuous extension, with
exact gradients through it (malijax/_dense.py)."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate

import malijax as mj
from malijax import _dense
from data.make_land_on_outputs import CASES as LAND_CASES, TS as LAND_TS, field as land_field
from helpers import ALL_SOLVERS, REVERSIBLE_RK, max_rel_err, name

# A damped, forced oscillator with a closed-form-free but smooth solution; `a` = (ω², γ).
A = jnp.array([2.0, 0.1])
Y0 = jnp.array([1.0, 0.2])


def field(t, y, a):
    return jnp.stack([y[1], -a[0] * y[0] - a[1] * y[1] + jnp.sin(t)])


def scipy_solution(ts, a=A, y0=Y0):
    a, y0 = np.asarray(a), np.asarray(y0)
    sol = scipy.integrate.solve_ivp(
        lambda t, y: [y[1], -a[0] * y[0] - a[1] * y[1] + np.sin(t)],
        (float(ts[0]), float(ts[-1])), y0, t_eval=np.asarray(ts), rtol=1e-13, atol=1e-13,
        method="DOP853",
    )
    return sol.y.T


# ---------------------------------------------------------------------------------------
# The interpolants' orders


@pytest.mark.parametrize(
    "solver", ALL_SOLVERS + REVERSIBLE_RK[4:] + (mj.Reversible(mj.Tsit5(), coupling=1.0),),
    ids=name,
)
def test_interpolant_order(solver):
    """One step from the exact state: the interpolant's error at θ ∈ {0.3, 0.5, 0.77}
    shrinks like h^(dense_order + 1), and θ = 1 gives the step's end."""
    t0 = 0.3
    y_start = scipy_solution(np.array([0.0, t0]))[-1]
    hs = np.array([0.2, 0.1, 0.05, 0.025])
    errors = []
    for h in hs:
        t0_, h_ = jnp.asarray(t0), jnp.asarray(h)
        state = solver.init(field, t0_, jnp.asarray(y_start), A)
        state1, _, coeffs = solver.step_dense(field, t0_, h_, state, A)
        thetas = np.array([0.3, 0.5, 0.77])
        exact = scipy_solution(np.concatenate([[0.0], t0 + thetas * h]))[1:]
        got = np.stack([np.asarray(_dense.evaluate(coeffs, th)) for th in thetas])
        errors.append(np.abs(got - exact).max())
        np.testing.assert_allclose(_dense.evaluate(coeffs, 1.0), solver.y(state1), rtol=1e-14,
                                   atol=1e-15)
        np.testing.assert_array_equal(_dense.evaluate(coeffs, 0.0), y_start)
    slopes = np.diff(np.log(errors)) / np.diff(np.log(hs))
    assert abs(slopes[-1] - (solver.dense_order + 1)) < 0.1, slopes


def test_derivative_is_the_polynomials_derivative():
    solver = mj.Tsit5()
    state = solver.init(field, jnp.asarray(0.0), Y0, A)
    h = jnp.asarray(0.3)
    _, _, coeffs = solver.step_dense(field, jnp.asarray(0.0), h, state, A)
    by_ad = jax.jacfwd(lambda th: _dense.evaluate(coeffs, th))(0.4) / h
    np.testing.assert_allclose(_dense.derivative(coeffs, 0.4, h), by_ad, rtol=1e-14)
    # At θ = 0 an RK interpolant's slope is f(t0, y0).
    np.testing.assert_allclose(_dense.derivative(coeffs, 0.0, h), field(0.0, Y0, A), rtol=1e-13)


# ---------------------------------------------------------------------------------------
# The forward: steps chosen by the tolerance alone


def test_outputs_do_not_change_the_steps():
    """200 outputs take exactly the steps of 2 (the same last state, bit for bit); with
    `land_on_outputs=True` every output forces a step."""
    ts2 = jnp.array([0.0, 10.0])
    ts200 = jnp.linspace(0.0, 10.0, 200)
    kw = dict(solver=mj.Tsit5(), rtol=1e-6, atol=1e-9)
    sol2 = mj.solve(field, Y0, ts2, A, **kw)
    sol200 = mj.solve(field, Y0, ts200, A, **kw)
    landed = mj.solve(field, Y0, ts200, A, land_on_outputs=True, **kw)
    assert int(sol200.stats["num_steps"]) == int(sol2.stats["num_steps"]) < 100
    assert int(landed.stats["num_steps"]) >= 199
    np.testing.assert_array_equal(sol200.ys[-1], sol2.ys[-1])
    # Every output within 100 tolerances of a tight reference (the interpolant's error
    # is inside the solver's): scale = atol + rtol |y|.
    exact = scipy_solution(ts200)
    scale = 1e-9 + 1e-6 * np.abs(exact)
    assert np.max(np.abs(np.asarray(sol200.ys) - exact) / scale) < 100


@pytest.mark.parametrize("solver", [mj.Tsit5(), mj.Bosh3(), mj.ALF(), mj.ReversibleHeun(),
                                    mj.Reversible(mj.Dopri5())], ids=name)
def test_outputs_inside_steps_are_the_interpolant(solver):
    """`step_size=h`: the steps are known, so each output inside one can be rebuilt by
    hand from the state at the step's start and the step's coefficients."""
    h = 0.25
    ts = jnp.array([0.0, 0.1, 0.3, 0.3, 0.6, 1.0])
    a = jnp.array([2.0, 0.0])  # undamped: ALF and ReversibleHeun are stable on it
    ys = mj.odeint(field, Y0, ts, a, solver=solver, step_size=h)
    t, state = jnp.asarray(0.0), solver.init(field, jnp.asarray(0.0), Y0, a)
    expected = [Y0]
    for s in np.asarray(ts[1:]):
        while float(t + h) < s:  # the loop's own times: t_{k+1} = t_k + h
            state, _ = solver.step(field, t, jnp.asarray(h), state, a)
            t = t + h
        if float(t + h) == s:
            expected.append(solver.y(solver.step(field, t, jnp.asarray(h), state, a)[0]))
            continue
        _, _, coeffs = solver.step_dense(field, t, jnp.asarray(h), state, a)
        expected.append(_dense.evaluate(coeffs, (s - t) / h))
    np.testing.assert_allclose(ys, jnp.stack(expected), rtol=1e-13, atol=1e-15)


# ---------------------------------------------------------------------------------------
# Gradients through the interpolant: equal to Direct's through the same steps

# Several outputs in one step, repeats inside a step and at the end, and outputs at ts[0].
TS = jnp.array([0.0, 0.0, 0.3, 0.3, 1.1, 1.15, 1.17, 2.0, 2.0, 3.5, 3.5])
WEIGHTS = jnp.arange(1.0, 1.0 + TS.shape[0])[:, None] * jnp.array([[1.0, -0.5]])
GRIDS = {"adaptive": dict(rtol=1e-6, atol=1e-9), "step_size": dict(step_size=0.13)}
CASES = [
    (mj.Tsit5(), mj.ACA(), A),
    (mj.Tsit5(), mj.SymplecticAdjoint(), A),
    (mj.Dopri5(), mj.ANODE(), A),
    (mj.Bosh3(), mj.ANODE(checkpoints=3), A),
    (mj.Reversible(mj.Tsit5()), mj.MALI(), A),
    (mj.ALF(), mj.MALI(), jnp.array([2.0, 0.0])),
    (mj.ReversibleHeun(), mj.MALI(), jnp.array([2.0, 0.0])),
]
SLOW_CASES = [
    (mj.Dopri5(), mj.SymplecticAdjoint(), A),
    (mj.Bosh3(), mj.SymplecticAdjoint(), A),
    (mj.Heun(), mj.ACA(), A),
    (mj.Reversible(mj.Heun(), coupling=0.7), mj.MALI(), A),
    (mj.Reversible(mj.Tsit5(), coupling=1.0), mj.MALI(), A),
    (mj.ALF(eta=0.9), mj.MALI(), A),
    (mj.Reversible(mj.Tsit5()), mj.ACA(), A),
]


def _loss(y0, a, ts, solver, gradient, grid):
    kw = dict(GRIDS[grid])
    if "rtol" in kw and solver.order <= 2:
        kw["rtol"] = 1e-4
    ys = mj.odeint(field, y0, ts, a, solver=solver, gradient=gradient, **kw)
    return jnp.sum(WEIGHTS * ys**2)


_DIRECT = {}


def _direct(solver, a, grid):
    """Direct's gradient through the same steps, or forward mode's (`jacfwd` through the
    plain loop) for damped `Reversible` under adaptive steps: there Direct's bounded
    loop, which recomputes the forward in its backward, deviates by 8e-10 once `ts` is
    differentiated too (2e-10 before dense output, with steps landing on every output),
    while forward mode, ACA and MALI agree to 1e-14."""
    key = (name(solver), float(a[1]), grid)
    if key not in _DIRECT:
        damped_reversible = isinstance(solver, mj.Reversible) and solver.coupling < 1
        if damped_reversible and grid == "adaptive":
            _DIRECT[key] = jax.jacfwd(_loss, argnums=(0, 1, 2))(
                Y0, a, TS, solver, mj.ForwardMode(), grid
            )
        else:
            _DIRECT[key] = jax.grad(_loss, argnums=(0, 1, 2))(
                Y0, a, TS, solver, mj.Direct(), grid
            )
    return _DIRECT[key]


def _check_equal_to_direct(solver, gradient, a, grid):
    got = jax.grad(_loss, argnums=(0, 1, 2))(Y0, a, TS, solver, gradient, grid)
    for g, r in zip(got, _direct(solver, a, grid)):
        assert max_rel_err(g, r) < 1e-10


def _by_grid(cases):
    """Every case on the adaptive grid; on the `step_size` grid (the same interpolants,
    other steps) only the first two by default, the rest with -m slow."""
    for i, (solver, gradient, a) in enumerate(cases):
        for grid in GRIDS:
            marks = [pytest.mark.slow] if grid != "adaptive" and i >= 2 else []
            yield pytest.param(solver, gradient, a, grid, marks=marks,
                               id=f"{name(solver)}-{name(gradient)}-{grid}")


@pytest.mark.parametrize("solver,gradient,a,grid", list(_by_grid(CASES)))
def test_gradients_through_interpolant_equal_direct(solver, gradient, a, grid):
    """y0, args and ts (an output inside a step moves the interpolation point, not the
    step) to 1e-10, with several outputs per step and repeated output times."""
    _check_equal_to_direct(solver, gradient, a, grid)


@pytest.mark.slow
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("solver,gradient,a", SLOW_CASES, ids=lambda x: name(x) if not
                         isinstance(x, jax.Array) else "")
def test_gradients_through_interpolant_equal_direct_slow(solver, gradient, a, grid):
    _check_equal_to_direct(solver, gradient, a, grid)


def test_ts_gradient_matches_finite_differences():
    """∂L/∂ts through an interpolated output is dy/dt there (the steps do not move)."""
    ts = jnp.array([0.0, 0.37, 0.81, 2.0])

    def loss(ts):
        ys = mj.odeint(field, Y0, ts, A, solver=mj.Tsit5(), gradient=mj.ACA(), rtol=1e-6,
                       atol=1e-9)
        return jnp.sum(ys[1] * jnp.array([1.0, 2.0]) + ys[2] ** 2)

    g = jax.grad(loss)(ts)
    eps = 1e-6
    for i in (1, 2):
        e = jnp.zeros_like(ts).at[i].set(eps)
        fd = (loss(ts + e) - loss(ts - e)) / (2 * eps)
        np.testing.assert_allclose(g[i], fd, rtol=1e-6)


def test_forward_mode_through_interpolant():
    def outputs(a):
        return mj.odeint(field, Y0, TS, a, solver=mj.Tsit5(), gradient=mj.ForwardMode(),
                         rtol=1e-6, atol=1e-9)

    def outputs_direct(a):
        return mj.odeint(field, Y0, TS, a, solver=mj.Tsit5(), gradient=mj.Direct(),
                         rtol=1e-6, atol=1e-9)

    np.testing.assert_allclose(jax.jacfwd(outputs)(A), jax.jacrev(outputs_direct)(A),
                               rtol=1e-11, atol=1e-13)


def test_adjoint_takes_its_outputs_from_the_interpolating_forward():
    """The continuous adjoint: tolerance-accurate, against Direct's exact gradient."""
    got = jax.grad(_loss, argnums=(0, 1))(Y0, A, TS, mj.Tsit5(), mj.Adjoint(), "adaptive")
    ref = _direct(mj.Tsit5(), A, "adaptive")
    for g, r in zip(got, ref[:2]):
        assert max_rel_err(g, r) < 1e-4


def test_per_example_ts_under_vmap():
    """Irregular, padded observation times per element: each element keeps its own steps,
    and the gradient of the batch equals the sum of the elements' gradients."""
    ts = jnp.array([[0.0, 0.2, 0.9, 1.7, 3.0], [0.0, 1.3, 2.2, 2.2, 2.2],
                    [0.0, 0.05, 0.1, 0.15, 4.0]])
    y0s = jnp.array([[1.0, 0.0], [0.5, 0.5], [-1.0, 0.3]])

    def one(a, y0, ts, gradient):
        ys = mj.odeint(field, y0, ts, a, solver=mj.Tsit5(), gradient=gradient, rtol=1e-6,
                       atol=1e-9)
        return jnp.sum(ys**2)

    def batch(a, gradient):
        return jnp.sum(jax.vmap(one, in_axes=(None, 0, 0, None))(a, y0s, ts, gradient))

    for gradient in (mj.ACA(), mj.SymplecticAdjoint()):
        g = jax.grad(batch)(A, gradient)
        loop = sum(jax.grad(one)(A, y0s[i], ts[i], mj.Direct()) for i in range(3))
        np.testing.assert_allclose(g, loop, rtol=1e-10)
    steps = jax.vmap(lambda y0, ts: mj.solve(field, y0, ts, A, solver=mj.Tsit5(), rtol=1e-6,
                                             atol=1e-9).stats["num_steps"])(y0s, ts)
    alone = [int(mj.solve(field, y0s[i], ts[i, jnp.array([0, -1])], A, solver=mj.Tsit5(),
                          rtol=1e-6, atol=1e-9).stats["num_steps"]) for i in range(3)]
    assert [int(s) for s in steps] == alone


@pytest.mark.slow  # (MALI under vmap with per-example times: also test_records.py)
def test_reversible_tsit5_mali_per_example_ts():
    ts = jnp.array([[0.0, 0.2, 0.9, 3.0], [0.0, 1.3, 2.2, 2.2]])
    y0s = jnp.array([[1.0, 0.0], [0.5, 0.5]])

    def batch(a, gradient):
        ys = jax.vmap(lambda y0, ts: mj.odeint(field, y0, ts, a, solver=mj.Reversible(mj.Tsit5()),
                                               gradient=gradient))(y0s, ts)
        return jnp.sum(ys**2)

    np.testing.assert_allclose(jax.grad(batch)(A, mj.MALI()), jax.grad(batch)(A, mj.Direct()),
                               rtol=1e-10)


# ---------------------------------------------------------------------------------------
# land_on_outputs=True: the behaviour before dense output

REFERENCE = pathlib.Path(__file__).parent / "data" / "land_on_outputs.npz"


@pytest.mark.parametrize("case", LAND_CASES)
def test_land_on_outputs_reproduces_the_previous_release(case):
    """Values and gradients recorded by malijax before dense output (commit 0dd34fe, with
    `tests/data/make_land_on_outputs.py`): equal to within 2 ulps (XLA fuses the changed
    loop differently, so a few outputs move by one ulp; most are bit for bit)."""
    reference = np.load(REFERENCE)
    solver, gradient, kw = LAND_CASES[case]
    y0, a = jnp.array([1.0, 0.2]), jnp.array([2.0])

    def loss(y0, a, ts):
        ys = mj.odeint(land_field, y0, ts, a, solver=solver, gradient=gradient,
                       land_on_outputs=True, **kw)
        return jnp.sum(ys**2)

    ys = mj.odeint(land_field, y0, LAND_TS, a, solver=solver, gradient=gradient,
                   land_on_outputs=True, **kw)
    np.testing.assert_allclose(ys, reference[f"{case}_ys"], rtol=5e-16, atol=0)
    grads = jax.grad(loss, argnums=(0, 1, 2))(y0, a, LAND_TS)
    for i, g in enumerate(grads):
        np.testing.assert_allclose(g, reference[f"{case}_g{i}"], rtol=1e-14, atol=1e-15)


# ---------------------------------------------------------------------------------------
# solve(..., dense=True): the solution anywhere, differentiable

QUERY = jnp.array([0.1, 0.77, 1.3, 2.9, 3.5])


def _dense_loss(y0, a, q, solver, gradient, kw):
    sol = mj.solve(field, y0, jnp.array([0.0, 3.5]), a, solver=solver, gradient=gradient,
                   dense=True, **kw)
    return jnp.sum(jax.vmap(sol.evaluate)(q) ** 2) + jnp.sum(sol.derivative(1.7) * sol.ys[-1])


DENSE_CASES = [
    (mj.Tsit5(), mj.ACA(), dict(rtol=1e-6, atol=1e-9)),
    (mj.Reversible(mj.Tsit5()), mj.MALI(), dict(step_size=0.1)),
    (mj.Dopri5(), mj.SymplecticAdjoint(), dict(num_steps=20)),
]


@pytest.mark.parametrize("solver,gradient,kw", DENSE_CASES,
                         ids=lambda x: name(x) if not isinstance(x, dict) else list(x)[0])
def test_dense_solution_and_its_gradient(solver, gradient, kw):
    sol = jax.jit(lambda y0: mj.solve(field, y0, jnp.array([0.0, 3.5]), A, solver=solver,
                                      gradient=gradient, dense=True, **kw))(Y0)
    exact = scipy_solution(jnp.concatenate([jnp.zeros(1), QUERY]))[1:]
    got = jax.vmap(sol.evaluate)(QUERY)
    assert np.max(np.abs(np.asarray(got) - exact)) < 1e-4
    np.testing.assert_allclose(sol.evaluate(3.5), sol.ys[-1], rtol=1e-13)
    np.testing.assert_allclose(sol.evaluate(0.0), Y0, rtol=1e-15)
    # dy/dt of the interpolant: close to the field, and the derivative of evaluate
    np.testing.assert_allclose(sol.derivative(1.3), field(1.3, got[2], A), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sol.derivative(1.3), jax.jacfwd(sol.evaluate)(1.3), rtol=1e-12)
    # Gradients (y0, args and the query times) equal Direct's through the same steps.
    args = (Y0, A, QUERY, solver)
    got = jax.grad(_dense_loss, argnums=(0, 1, 2))(*args, gradient, kw)
    ref = jax.grad(_dense_loss, argnums=(0, 1, 2))(*args, mj.Direct(), kw)
    for g, r in zip(got, ref):
        assert max_rel_err(g, r) < 1e-10


def test_dense_refuses_the_adjoint_and_a_single_time():
    with pytest.raises(ValueError, match="dense=True"):
        mj.solve(field, Y0, jnp.array([0.0, 1.0]), A, solver=mj.Tsit5(), gradient=mj.Adjoint(),
                 dense=True)
    with pytest.raises(ValueError, match="two output times"):
        mj.solve(field, Y0, jnp.array([0.0]), A, dense=True)
    with pytest.raises(ValueError, match="dense=True"):
        mj.solve(field, Y0, jnp.array([0.0, 1.0]), A).evaluate(0.5)


@pytest.mark.slow  # test_higher_order's ACA-adaptive case also interpolates its outputs
def test_reverse_over_reverse_through_an_interpolated_output_time():
    """d²L/dts[1]² by grad(grad) (ts[1] inside a step: the steps do not move) against
    central differences of the first-order gradient; the sweep keeps no NaN in rows it
    does not read (JAX's own `check_grads(order=2)` met NaN · 0 there)."""
    def loss(s1):
        ts = jnp.array([0.0, 0.0, 1.0, 2.0]).at[2].set(s1)
        ys = mj.odeint(field, Y0, ts, A, solver=mj.Tsit5(), gradient=mj.ACA(), rtol=1e-8,
                       atol=1e-8, max_steps=256)
        return jnp.sum(jnp.sin(ys[2]) * ys[-1])  # the last output's cotangent moves too

    first = jax.jit(jax.grad(loss))
    second = jax.jit(jax.grad(jax.grad(loss)))
    eps = 1e-5
    fd = (first(1.0 + eps) - first(1.0 - eps)) / (2 * eps)
    np.testing.assert_allclose(second(1.0), fd, rtol=1e-6)
