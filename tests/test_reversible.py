"""The coupled reversible Runge--Kutta method (`Reversible`) and checkpointed MALI
(`MALI(checkpoints=...)`): stability matrix, round trips, exactness where plain MALI
fails, the restart slots, the fused backward's evaluations and memory."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import malijax as mj
from malijax._loop import Config, Problem, Restarts, integrate
from helpers import RK_SOLVERS, f64, name

EPS = float(jnp.finfo(jnp.float64).eps)


# --------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------


def _stability_function(tableau, w):
    """R(w) = 1 + w bᵀ (I - wA)⁻¹ 1 from the Butcher tableau (independent of the step)."""
    s = tableau.num_stages
    a = np.zeros((s, s))
    for i, row in enumerate(tableau.a, start=1):
        a[i, : len(row)] = row
    b = np.asarray(tableau.b)
    return 1 + w * b @ np.linalg.solve(np.eye(s) - w * a, np.ones(s))


@pytest.mark.parametrize("base", RK_SOLVERS, ids=name)
@pytest.mark.parametrize("coupling", [1.0, 0.7])
def test_step_matrix_matches_formula(base, coupling):
    """On y' = μy one step maps (y, z) linearly; ALGORITHMS.md §15.1:
    M = [[λ, R(w) - λ], [(1 - R(-w)) λ, 1 + (1 - R(-w))(R(w) - λ)]], det M = λ."""
    solver = mj.Reversible(base, coupling=coupling)
    mu, h = -1.3, 0.25
    w = mu * h

    def step(y, z):
        (y1, z1), _ = solver.step(lambda t, y, a: mu * y, f64(0.3)[0], f64(h)[0], (y, z), None)
        return jnp.stack([y1, z1])

    m = np.column_stack([np.asarray(step(f64(1.0)[0], f64(0.0)[0])),
                         np.asarray(step(f64(0.0)[0], f64(1.0)[0]))])
    r, r_back = _stability_function(base.tableau, w), _stability_function(base.tableau, -w)
    lam = coupling
    want = np.array([[lam, r - lam], [(1 - r_back) * lam, 1 + (1 - r_back) * (r - lam)]])
    np.testing.assert_allclose(m, want, rtol=1e-14, atol=1e-15)
    assert abs(np.linalg.det(m) - lam) <= 1e-13
    # The physical eigenvalue follows e^w to the base's order; the other is ≈ λ e^{-w}.
    eig = sorted(np.linalg.eigvals(m).real, key=lambda e: abs(e - np.exp(w)))
    assert abs(eig[0] - np.exp(w)) <= 2 * abs(w) ** (base.order + 1)
    assert abs(eig[1] / (lam * np.exp(-w)) - 1) <= 4 * abs(w) ** (base.order + 1)


def _round_trip(solver, n, y0, h=0.1):
    func = lambda t, y, a: jnp.stack([y[1], -y[0]])  # noqa: E731 - harmonic oscillator

    @jax.jit
    def run(y0):
        state0 = solver.init(func, f64(0.0)[0], y0, None)
        h_ = f64(h)[0]

        def fwd(state, k):
            return solver.step(func, k * h_, h_, state, None)[0], None

        def bwd(state, k):
            return solver.inverse(func, k * h_, h_, state, None), None

        ks = jnp.arange(n, dtype=jnp.float64)
        state1, _ = jax.lax.scan(fwd, state0, ks)
        back, _ = jax.lax.scan(bwd, state1, ks[::-1])
        return state0, back

    state0, back = run(y0)
    return max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(state0, back))


def test_round_trip_exact_undamped_and_grows_like_inverse_coupling():
    """`inverse^N ∘ step^N` is the identity to rounding for λ = 1; for λ < 1 the
    inverse amplifies rounding by up to 1/λ per step (λ = 0.9: 0.9^{-300} = 5e13)."""
    y0 = f64(1.0, 0.0)
    assert _round_trip(mj.Reversible(mj.Tsit5(), coupling=1.0), 1000, y0) <= 1e3 * EPS
    solver = mj.Reversible(mj.Tsit5(), coupling=0.9)
    errors = {n: _round_trip(solver, n, y0) for n in (10, 100, 300)}
    assert errors[10] <= 1e3 * EPS
    for n in (100, 300):  # within a few decades of ε λ^{-N}, below it
        bound = EPS * 0.9 ** (-n)
        assert 1e-4 * bound <= errors[n] <= 10 * bound, (n, errors[n], bound)


def test_coupling_damps_the_parasitic_mode():
    """y' = -y, h = 0.1, T = 20 (ALGORITHMS.md §15.1): λ = 1 is as weakly unstable as
    ALF; λ = 0.5 < e^{-|hμ|} is stable and accurate."""
    def solve(coupling):
        ys = mj.odeint(lambda t, y, a: -y, f64(1.0), f64(0.0, 20.0),
                       solver=mj.Reversible(mj.RK4(), coupling=coupling), num_steps=200,
                       throw=False)
        return float(ys[-1, 0])

    assert abs(solve(1.0) - np.exp(-20)) > 1.0
    assert abs(solve(0.5) - np.exp(-20)) <= 1e-12


def test_validation():
    with pytest.raises(TypeError, match="explicit Runge--Kutta"):
        mj.Reversible(mj.ALF())
    with pytest.raises(ValueError, match="coupling"):
        mj.Reversible(mj.Tsit5(), coupling=0.0)
    with pytest.raises(ValueError, match="coupling"):
        mj.Reversible(mj.Tsit5(), coupling=1.5)
    with pytest.raises(ValueError, match="checkpoints"):
        mj.MALI(checkpoints=-1)
    with pytest.raises(ValueError, match="no embedded error estimate"):
        mj.odeint(lambda t, y, a: -y, f64(1.0), f64(0.0, 1.0), solver=mj.Reversible(mj.RK4()))
    assert mj.Reversible(mj.Dopri5()).fevals_step == 13  # 7 stages forward, 6 backward


def test_error_estimate_tracks_local_error():
    """From an exact point (y = z) on y' = -6y the estimate `|e| + |y1 - z1|` bounds
    the true local error of one step and scales like h^q, the base's error order q = 5
    (`e` estimates the embedded 4th-order solution, as for plain Tsit5)."""
    solver = mj.Reversible(mj.Tsit5())
    func = lambda t, y, a: -6.0 * y  # noqa: E731
    hs, estimates, true = (0.1, 0.05, 0.025), [], []
    for h in hs:
        state = solver.init(func, 0.0, f64(1.0), None)
        (y1, _), err = solver.step(func, f64(0.0)[0], f64(h)[0], state, None)
        estimates.append(abs(float(err[0])))
        true.append(abs(float(y1[0]) - np.exp(-6 * h)))
    assert all(e >= t for e, t in zip(estimates, true)), (estimates, true)
    slope = np.polyfit(np.log(hs), np.log(estimates), 1)[0]
    assert abs(slope - solver.error_order) <= 0.5, slope


def test_adaptive_steps_see_the_parasitic_mode():
    """y' = -y to T = 20 at rtol 1e-3: the base's estimate alone lets the steps grow past
    the stable |hμ| < log(1/λ) on the decayed tail (1.6e3 times the tolerance, measured);
    with the growth of y - z in the estimate the answer is within a few tolerances (7.7,
    plain Tsit5 2.3); and with λ = 1 a problem without decay does not stall on the
    accumulated y - z (it did at rtol 1e-6 with |y - z| as the estimate)."""
    ts = jnp.linspace(0.0, 20.0, 5)

    def scaled_error(solver):
        ys = mj.odeint(lambda t, y, a: -y, f64(1.0), ts, solver=solver, rtol=1e-3, atol=1e-6)
        exact = jnp.exp(-ts)[:, None]
        return float(jnp.max(jnp.abs(ys - exact) / (1e-6 + 1e-3 * exact)))

    assert scaled_error(mj.Reversible(mj.Tsit5())) <= 10 * max(1.0, scaled_error(mj.Tsit5()))
    ys = mj.odeint(lambda t, y, a: jnp.cos(t) * jnp.ones_like(y), f64(0.0), f64(0.0, 10.0),
                   solver=mj.Reversible(mj.Tsit5(), coupling=1.0), rtol=1e-6, atol=1e-9)
    assert abs(float(ys[-1, 0]) - np.sin(10.0)) <= 1e-6


# --------------------------------------------------------------------------------------
# Checkpointed MALI
# --------------------------------------------------------------------------------------

# z' = (diag(-0.5, -5) + 0.3 J) z over 400 steps: damped inverses and the contraction
# itself make plain MALI's reconstruction fail (ALGORITHMS.md §15.2).
A_STIFF = jnp.diag(f64(-0.5, -5.0)) + 0.3 * jnp.array([[0.0, 1.0], [-1.0, 0.0]])
TS_STIFF = f64(0.0, 2.0, 4.0)


def _stiff_loss(y0, a, solver, gradient, kw):
    # Undamped solvers are weakly unstable here, which the forward reports (see
    # test_stability.py); throw=False lets it run on so that the gradients can be compared.
    ys = mj.odeint(lambda t, y, a: a @ y, y0, TS_STIFF, a, solver=solver, gradient=gradient,
                   throw=False, **dict(kw))
    return jnp.sum(ys[1:] ** 2)


_stiff_grad = jax.jit(jax.grad(_stiff_loss, argnums=(0, 1)), static_argnums=(2, 3, 4))


def _rel(got, want):
    """max |got - want| / max |want| over the leaves; NaN counts as inf (Python's `max`
    would skip a NaN that is not first)."""
    errors = [float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in zip(got, want)]
    return max(e if e == e else float("inf") for e in errors)


def _grad_and_warnings(solver, gradient, kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", mj.ReconstructionWarning)
        g = jax.block_until_ready(_stiff_grad(f64(1.0, -0.7), A_STIFF, solver, gradient, kw))
    return g, [w for w in caught if issubclass(w.category, mj.ReconstructionWarning)]


GRID = (("num_steps", 200),)


@pytest.mark.parametrize("solver,checkpoints", [
    (mj.ALF(eta=0.8), None), pytest.param(mj.ALF(eta=0.8), 32, marks=pytest.mark.slow),
    (mj.ALF(), 8), pytest.param(mj.ReversibleHeun(), 8, marks=pytest.mark.slow),
    (mj.Reversible(mj.Tsit5(), coupling=0.5), None),
    pytest.param(mj.Reversible(mj.Tsit5(), coupling=0.9), 8, marks=pytest.mark.slow),
], ids=lambda x: name(x) if not isinstance(x, (int, type(None))) else f"K={x}")
def test_checkpointed_mali_exact_where_plain_mali_fails(solver, checkpoints):
    want = _stiff_grad(f64(1.0, -0.7), A_STIFF, solver, mj.Direct(), GRID)
    plain, caught = _grad_and_warnings(solver, mj.MALI(checkpoints=0), GRID)
    assert _rel(plain, want) > 1e-6  # plain MALI is far off ...
    assert len(caught) == 1 and "t=0 " in str(caught[0].message)  # ... and says so
    got, caught = _grad_and_warnings(solver, mj.MALI(checkpoints=checkpoints), GRID)
    assert _rel(got, want) <= 1e-10
    assert not caught


def test_checkpoints_warn_with_the_worst_segment():
    """Too few stored states for λ = 0.5 (400 steps, K = 8: segments of 45 steps, 2^45
    amplification): the check compares at every stored state and names the time of
    the worst, which is a segment boundary, not t0."""
    solver = mj.Reversible(mj.Tsit5(), coupling=0.5)
    got, caught = _grad_and_warnings(solver, mj.MALI(checkpoints=8), GRID)
    assert len(caught) == 1
    message = str(caught[0].message)
    t = float(message.split("state at t=")[1].split()[0])
    boundaries = {round(k * 0.01, 9) for k in range(45, 400, 45)}  # 400 steps of 0.01
    assert round(t, 9) in boundaries, (t, message)


def test_adaptive_checkpoints_exact():
    """Adaptive ALF(0.8): 1301 steps; automatic checkpoints (a stored state every 17
    steps, spacing doubling past 64 slots) give Direct's gradient, plain MALI does not."""
    kw = (("rtol", 1e-5), ("atol", 1e-8), ("max_steps", 2048))
    solver = mj.ALF(eta=0.8)
    want = _stiff_grad(f64(1.0, -0.7), A_STIFF, solver, mj.Direct(), kw)
    plain, caught = _grad_and_warnings(solver, mj.MALI(checkpoints=0), kw)
    assert _rel(plain, want) > 1.0 and caught
    got, caught = _grad_and_warnings(solver, mj.MALI(), kw)
    assert _rel(got, want) <= 1e-10 and not caught


@pytest.mark.parametrize("num_slots,num_steps", [(8, 5), (8, 9), (8, 100), (5, 1000)])
def test_restart_slots_spread_evenly_and_hold_exact_states(num_slots, num_steps):
    """Under a while loop (step count unknown at trace time) the slots keep between K/2
    and K states at multiples of a doubling spacing, and each is the state at its step."""
    solver = mj.Euler()
    ts = f64(0.0, 1.0)
    config = Config(solver=solver, controller=mj._controller.ConstantStepSize(1 / num_steps),
                    num_steps=None, max_steps=num_steps + 1, throw=False)
    problem = Problem(lambda t, y, a: -y, f64(1.0), ts, None)
    out = integrate(problem, config, record="steps", restarts=Restarts(num_slots, 1))
    traj = out.trajectory
    assert int(traj.num_steps) == num_steps
    steps = np.asarray(traj.slot_steps)
    kept = set(steps[steps >= 0].tolist())
    assert len(kept) == int(np.sum(steps >= 0))  # no step stored twice
    # Every multiple of the final spacing (a power of 2) is kept: evenly spread to the end.
    spacing = next(s for s in 2 ** np.arange(12) if len(range(s, num_steps, s)) <= num_slots)
    due = set(range(spacing, num_steps, spacing))
    assert due <= kept and len(due) >= min(num_slots // 2, num_steps - 1), (spacing, kept)
    h = 1 / num_steps
    for slot, k in enumerate(steps):
        if k >= 0:  # Euler on y' = -y: y_k = (1 - h)^k
            y, _ = np.asarray(traj.slot_states[0][slot]), None
            assert abs(float(y[0]) - (1 - h) ** k) <= 1e-12


def test_fused_backward_takes_two_base_step_vjps_per_step():
    """Counted with a callback inside `func`: the forward of Reversible(Tsit5) evaluates
    f 7 + 6 times per step (its fevals_step), the backward 2 x 6 (two base-step VJPs,
    the zero-weight FSAL stage skipped), and nothing else."""
    count = [0]

    def func(t, y, a):
        jax.debug.callback(lambda: count.__setitem__(0, count[0] + 1))
        return a * jnp.sin(y)

    solver, n = mj.Reversible(mj.Tsit5()), 10
    ts = f64(0.0, 1.0)

    def loss(a):
        return jnp.sum(mj.odeint(func, f64(0.4, -0.3), ts, a, solver=solver,
                                 gradient=mj.MALI(), num_steps=n)[-1])

    jax.block_until_ready(jax.jit(loss)(0.7))
    forward = count[0]
    count[0] = 0
    jax.block_until_ready(jax.jit(jax.grad(loss))(0.7))
    assert forward == solver.fevals_step * n == 13 * n
    assert count[0] - forward == 2 * 6 * n


def _temp_bytes(solver, gradient, n, dim=64):
    a = jnp.eye(dim) * -0.1

    def loss(y0, a):
        ys = mj.odeint(lambda t, y, a: jnp.tanh(a @ y), y0, f64(0.0, 1.0), a, solver=solver,
                       gradient=gradient, num_steps=n)
        return jnp.sum(ys[-1] ** 2)

    lowered = jax.jit(jax.grad(loss, argnums=1)).lower(jnp.ones(dim), a)
    return lowered.compile().memory_analysis().temp_size_in_bytes


def test_memory_set_by_checkpoints_not_steps():
    """XLA's temp bytes: MALI(checkpoints=8) is flat in N (256 -> 4096 within 10%) and
    at least 20x below ACA at N = 4096; likewise Reversible(Tsit5) + MALI(checkpoints=8)."""
    mali = {}
    for solver in (mj.ALF(eta=0.8), mj.Reversible(mj.Tsit5())):
        small = _temp_bytes(solver, mj.MALI(checkpoints=8), 256)
        mali[name(solver)] = large = _temp_bytes(solver, mj.MALI(checkpoints=8), 4096)
        assert large <= 1.1 * small, (name(solver), small, large)
    aca = _temp_bytes(mj.ALF(eta=0.8), mj.ACA(), 4096)
    assert aca >= 20 * mali["ALF"], (aca, mali)
