"""`odeint`/`solve` as a whole: pytree states, dtypes, decreasing time, several output
times, the identity solve, vmap/jit, Direct gradients against finite differences and
closed forms (ALGORITHMS.md §10), input validation, and run-time failures.

Vector fields are module-level functions so that `eqx.filter_jit` reuses compiled
solves between tests (the func is part of its static cache key); JAX compile time
dominates this file's runtime.
"""

import functools as ft

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest
import scipy.linalg
from jax.flatten_util import ravel_pytree

import malijax as mj
from helpers import ALL_SOLVERS, MLPField, name

F32, F64 = jnp.float32, jnp.float64

# Errors raised by a failed solve at run time: a SolveError, arriving through XLA's
# callback machinery wrapped in a JaxRuntimeError.
RUNTIME_ERRORS = (jax.errors.JaxRuntimeError, mj.SolveError)


# --------------------------------------------------------------------------------------
# Vector fields and oracles
# --------------------------------------------------------------------------------------


def decay(t, y, args):
    return -y


def cos_growth(t, y, alpha):
    """z' = alpha cos(t) z; exact z(t) = z(t0) exp(alpha (sin t - sin t0))."""
    return alpha * jnp.cos(t) * y


def cos1(t, y, args):
    """z' = cos(t) z for any floating dtype of y (t may be float64 while y is float32)."""
    return jnp.cos(t).astype(y.dtype) * y


def cos_growth_exact(y0, ts, alpha=1.0):
    ts = np.asarray(ts, np.float64)
    factor = np.exp(alpha * (np.sin(ts) - np.sin(ts[0])))
    return factor.reshape((-1,) + (1,) * np.ndim(y0)) * np.asarray(y0, np.float64)


def linear(t, z, A):
    return A @ z


def scalar_growth(t, z, k):
    return k * z


def square(t, y, args):
    """y' = y^2, from y0 = 1 blows up at t = 1."""
    return y**2


def nan_after_half(t, y, args):
    return jnp.where(t > 0.5, jnp.nan, -y)


_rng = np.random.default_rng(1234)
_NL_A = _rng.normal(size=(9, 9)) / 3.0
_NL_B = _rng.normal(size=(9,))


def nonlinear_flat(t, x, args):
    """A nonlinear, non-autonomous field on R^9."""
    return _NL_A @ jnp.tanh(x) + jnp.cos(2.0 * t) * _NL_B - 0.1 * x


def nonlinear_reflected(s, x, args):
    """g(s, z) = -f(-s, z): the time reflection of `nonlinear_flat`."""
    return -nonlinear_flat(-s, x, args)


def param_field(t, y, theta):
    """A nonlinear field with array parameters, for finite-difference checks."""
    W, b = theta
    return jnp.tanh(W @ y + b) - 0.5 * y + 0.3 * jnp.sin(t)


def manual_solve(solver, func, y0, steps, args=None):
    """Drive `solver.step` directly over a list of (t, h) pairs."""
    state = solver.init(func, jnp.asarray(steps[0][0], F64), y0, args)
    for t, h in steps:
        state, _ = solver.step(func, jnp.asarray(t, F64), jnp.asarray(h, F64), state, args)
    return solver.y(state)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def block(x):
    return jax.block_until_ready(x)


# --------------------------------------------------------------------------------------
# 1. Pytree states
# --------------------------------------------------------------------------------------


def _tuple_state():
    return (jnp.array([0.3, -0.2]), jnp.linspace(-0.5, 0.6, 6).reshape(2, 3), jnp.array(0.7))


def _dict_state():
    return {"x": jnp.array([0.3, -0.2]), "w": jnp.linspace(-0.5, 0.6, 6).reshape(3, 2),
            "s": jnp.array(0.7)}


def _nested_state():
    return {"p": (jnp.array(0.7), jnp.linspace(-0.5, 0.6, 6).reshape(3, 1, 2)),
            "q": jnp.array([0.3, -0.2])}


STATES = {"tuple": _tuple_state, "dict": _dict_state, "nested": _nested_state}

SLOW = pytest.mark.slow


def _case(*values, slow=False, id=None):
    return pytest.param(*values, marks=[SLOW] if slow else [], id=id)


PYTREE_CASES = [
    _case("tuple", mj.ALF(), {"num_steps": 7}, id="tuple-ALF-num_steps"),
    _case("dict", mj.ALF(), {}, id="dict-ALF-adaptive"),
    _case("nested", mj.Dopri5(), {"num_steps": 5}, id="nested-Dopri5-num_steps"),
    _case("nested", mj.Bosh3(), {"step_size": 0.15}, slow=True, id="nested-Bosh3-step_size"),
    _case("tuple", mj.Dopri5(), {}, slow=True, id="tuple-Dopri5-adaptive"),
    _case("nested", mj.ReversibleHeun(), {}, slow=True, id="nested-ReversibleHeun-adaptive"),
    _case("dict", mj.Tsit5(), {}, slow=True, id="dict-Tsit5-adaptive"),
    _case("dict", mj.RK4(), {"num_steps": 7}, slow=True, id="dict-RK4-num_steps"),
]


@pytest.mark.parametrize("structure,solver,kw", PYTREE_CASES)
def test_pytree_state_equals_flat_state(structure, solver, kw):
    y0 = STATES[structure]()
    flat0, unravel = ravel_pytree(y0)
    assert flat0.shape == (9,)

    def tree_field(t, y, args):
        return unravel(nonlinear_flat(t, ravel_pytree(y)[0], args))

    ts = jnp.array([0.0, 0.4, 1.0])
    kw = dict(kw, rtol=1e-5, atol=1e-8) if not kw else kw
    # Both solves in one compiled program (compiling is what costs time here).
    sol_tree, sol_flat = jax.jit(
        lambda y, x, ts: (mj.solve(tree_field, y, ts, solver=solver, **kw),
                          mj.solve(nonlinear_flat, x, ts, solver=solver, **kw))
    )(y0, flat0, ts)

    assert jtu.tree_structure(sol_tree.ys) == jtu.tree_structure(y0)
    for leaf, leaf0 in zip(jtu.tree_leaves(sol_tree.ys), jtu.tree_leaves(y0)):
        assert leaf.shape == (3,) + leaf0.shape
        assert leaf.dtype == leaf0.dtype
        assert jnp.array_equal(leaf[0], leaf0)
    tree_as_flat = jax.vmap(lambda y: ravel_pytree(y)[0])(sol_tree.ys)
    assert rel(tree_as_flat, sol_flat.ys) < 1e-13
    # The joint RMS error norm over all leaves makes the adaptive steps identical.
    for key in ("num_steps", "num_rejected", "num_fevals"):
        assert int(sol_tree.stats[key]) == int(sol_flat.stats[key])
    assert int(sol_tree.stats["num_steps"]) > 2  # the solve actually stepped


# --------------------------------------------------------------------------------------
# 2. float32 and float64
# --------------------------------------------------------------------------------------

DTYPE_Y0 = np.array([1.0, -0.5])
DTYPE_TS = np.array([0.0, 0.6, 1.2])


@pytest.mark.parametrize("solver", ALL_SOLVERS, ids=name)
def test_float32_fixed_grid(solver):
    """dtypes are preserved; float32 agrees with float64 to ~1e-5 (measured <= 4e-7)."""
    ref, sol32, sol_mixed = jax.jit(
        lambda y, ts: (
            mj.solve(cos1, y, ts, solver=solver, num_steps=16),
            # float32 state and times: everything stays float32.
            mj.solve(cos1, y.astype(F32), ts.astype(F32), solver=solver, num_steps=16),
            # A float64 time must not promote a float32 state (strict promotion is on).
            mj.solve(cos1, y.astype(F32), ts, solver=solver, num_steps=16),
        )
    )(jnp.asarray(DTYPE_Y0), jnp.asarray(DTYPE_TS))
    assert ref.ys.dtype == F64 and ref.ts.dtype == F64
    assert sol32.ys.dtype == F32 and sol32.ts.dtype == F32
    assert sol_mixed.ys.dtype == F32
    assert sol_mixed.ts.dtype == F64  # times are kept in at least the state's precision
    for sol in (sol32, sol_mixed):
        assert np.all(np.isfinite(np.asarray(sol.ys)))
        assert rel(sol.ys, ref.ys) < 1e-5
    # the float64 solve itself is accurate (so the comparison is meaningful)
    assert rel(ref.ys, cos_growth_exact(DTYPE_Y0, DTYPE_TS)) < 2e-2


@pytest.mark.parametrize(
    "solver",
    [s if isinstance(s, (mj.ALF, mj.Dopri5, mj.ReversibleHeun))
     else pytest.param(s, marks=SLOW) for s in ALL_SOLVERS if s.error_order is not None],
    ids=name,
)
def test_float32_adaptive(solver):
    exact = cos_growth_exact(DTYPE_Y0, DTYPE_TS)
    sol = mj.solve(cos1, jnp.asarray(DTYPE_Y0, F32), jnp.asarray(DTYPE_TS, F32), solver=solver,
                   rtol=1e-4, atol=1e-7)
    assert sol.ys.dtype == F32
    assert bool(sol.result == mj.RESULTS.successful)
    assert float(sol.stats["t_final"]) == float(np.float32(1.2))
    assert 2 < int(sol.stats["num_steps"]) < 200
    # Within the tolerance of the exact solution, as a float64 solve would be (errors
    # measured at rtol=1e-3 in float32 and float64 agree to ~1e-8, except ReversibleHeun
    # at ~2e-5); 10 x rtol.
    assert rel(sol.ys, exact) < 1e-3


def mixed_field(t, y, args):
    a, b = y["a"], y["b"]
    return {
        "a": jnp.cos(t).astype(F32) * a - 0.1 * b[:2].astype(F32),
        "b": -0.5 * b + jnp.sum(a).astype(F64),
    }


@pytest.mark.parametrize(
    "solver,kw", [_case(mj.Dopri5(), {}, id="Dopri5-adaptive"),
                  _case(mj.ALF(), {"num_steps": 20}, slow=True, id="ALF-num_steps")]
)
def test_mixed_float32_float64_state(solver, kw):
    y0_64 = {"a": jnp.array([1.0, -0.5]), "b": jnp.array([0.2, 0.4, -0.3])}
    y0 = {"a": y0_64["a"].astype(F32), "b": y0_64["b"]}
    ts = jnp.array([0.0, 0.5, 1.0])
    kw = kw or {"rtol": 1e-6, "atol": 1e-9}

    def field64(t, y, args):
        a, b = y["a"], y["b"]
        return {"a": jnp.cos(t) * a - 0.1 * b[:2], "b": -0.5 * b + jnp.sum(a)}

    sol, ref = jax.jit(
        lambda y, y64, ts: (mj.solve(mixed_field, y, ts, solver=solver, **kw),
                            mj.solve(field64, y64, ts, solver=solver, **kw))
    )(y0, y0_64, ts)
    assert sol.ys["a"].dtype == F32
    assert sol.ys["b"].dtype == F64
    assert bool(sol.result == mj.RESULTS.successful)
    assert rel(sol.ys["a"], ref.ys["a"]) < 1e-5
    assert rel(sol.ys["b"], ref.ys["b"]) < 1e-5


# --------------------------------------------------------------------------------------
# 3. Decreasing time
# --------------------------------------------------------------------------------------

REFLECT_Y0 = jnp.asarray(np.linspace(-1.0, 1.0, 9))


def _reflected_pair(solver, kw):
    """f from t = 1 down to 0, and g(s, z) = -f(-s, z) from s = -1 up to 0 (one program)."""
    return jax.jit(
        lambda y0, ts: (mj.solve(nonlinear_flat, y0, ts, solver=solver, **kw),
                        mj.solve(nonlinear_reflected, y0, -ts, solver=solver, **kw))
    )(REFLECT_Y0, jnp.array([1.0, 0.6, 0.0]))


@pytest.mark.parametrize(
    "solver",
    [_case(mj.ALF(), id="ALF"), _case(mj.Dopri5(), slow=True, id="Dopri5"),
     _case(mj.RK4(), slow=True, id="RK4"), _case(mj.ReversibleHeun(), slow=True, id="RevHeun"),
     _case(mj.Bosh3(), slow=True, id="Bosh3")],
)
def test_decreasing_time_is_reflected_forward_solve(solver):
    """ALGORITHMS.md §10.2: t0 = 1 -> t1 = 0 for f equals s = -1 -> 0 for g(s, z) = -f(-s, z)."""
    back, fwd = _reflected_pair(solver, {"num_steps": 8})
    assert rel(back.ys, fwd.ys) < 1e-13
    assert float(back.stats["t_final"]) == 0.0
    # It really moved (the reflection is not the trivial identity).
    assert rel(back.ys[-1], REFLECT_Y0) > 1e-2


@pytest.mark.parametrize(
    "solver,kw",
    [_case(mj.Dopri5(), {"step_size": 0.15}, id="Dopri5-step_size"),
     _case(mj.ALF(), {"rtol": 1e-5, "atol": 1e-8}, id="ALF-adaptive"),
     _case(mj.ALF(), {"step_size": 0.15}, slow=True, id="ALF-step_size"),
     _case(mj.Dopri5(), {"rtol": 1e-5, "atol": 1e-8}, slow=True, id="Dopri5-adaptive")],
)
def test_decreasing_time_reflection_step_size_and_adaptive(solver, kw):
    back, fwd = _reflected_pair(solver, kw)
    assert rel(back.ys, fwd.ys) < 1e-13
    assert int(back.stats["num_steps"]) == int(fwd.stats["num_steps"]) > 5
    assert int(back.stats["num_rejected"]) == int(fwd.stats["num_rejected"])
    assert float(back.stats["t_final"]) == 0.0


@pytest.mark.parametrize(
    "solver,rtol,tol",
    [_case(mj.Dopri5(), 1e-9, 1e-8, id="Dopri5"), _case(mj.ALF(), 1e-5, 2e-5, slow=True, id="ALF")],
)
def test_decreasing_time_adaptive_matches_analytic(solver, rtol, tol):
    ts = jnp.array([2.0, 1.3, 0.5, -0.4])
    y0 = jnp.array([1.0, -2.0])
    alpha = jnp.array(0.8)
    # measured relative errors: Dopri5 6.5e-10, ALF 4.7e-6
    sol = mj.solve(cos_growth, y0, ts, alpha, solver=solver, rtol=rtol, atol=rtol * 1e-3)
    assert bool(sol.result == mj.RESULTS.successful)
    assert float(sol.stats["t_final"]) == -0.4
    exact = cos_growth_exact(np.asarray(y0), np.asarray(ts), 0.8)
    assert rel(sol.ys, exact) < tol


# --------------------------------------------------------------------------------------
# 4. Several output times
# --------------------------------------------------------------------------------------

MULTI_TS = jnp.array([0.0, 0.3, 1.1, 2.0, 3.5])


@pytest.mark.parametrize(
    "solver,rtol,tol",
    [_case(mj.Dopri5(), 1e-9, 1e-8, id="Dopri5"), _case(mj.ALF(), 1e-5, 2e-5, id="ALF")],
)
def test_several_outputs_adaptive_closed_form(solver, rtol, tol):
    y0 = jnp.array([1.0, 0.25])
    alpha = jnp.array(1.3)
    # measured relative errors per output: Dopri5 <= 1.3e-9, ALF <= 3.7e-6
    sol = mj.solve(cos_growth, y0, MULTI_TS, alpha, solver=solver, rtol=rtol, atol=rtol * 1e-3)
    exact = cos_growth_exact(np.asarray(y0), np.asarray(MULTI_TS), 1.3)
    assert sol.ys.shape == (5, 2)
    assert jnp.array_equal(sol.ys[0], y0)
    for j in range(1, 5):
        assert rel(sol.ys[j], exact[j]) < tol, j
    # The last output is hit exactly (steps are clipped onto every output time).
    assert float(sol.stats["t_final"]) == float(MULTI_TS[-1])
    assert jnp.array_equal(sol.ts, MULTI_TS)


@pytest.mark.parametrize(
    "solver", [_case(mj.ALF(), id="ALF"), _case(mj.RK4(), slow=True, id="RK4"),
               _case(mj.Dopri5(), slow=True, id="Dopri5")]
)
def test_several_outputs_num_steps_grid(solver):
    n = 3
    y0 = jnp.array([1.0, 0.25])
    sol = mj.solve(cos_growth, y0, MULTI_TS, 1.3, solver=solver, num_steps=n)
    num_intervals = len(MULTI_TS) - 1
    assert int(sol.stats["num_steps"]) == n * num_intervals
    assert int(sol.stats["num_rejected"]) == 0
    fevals = {"ALF": 1 + n * num_intervals, "RK4": 4 * n * num_intervals,
              "Dopri5": 1 + 6 * n * num_intervals}[name(solver)]
    assert int(sol.stats["num_fevals"]) == fevals
    assert float(sol.stats["t_final"]) == 3.5

    # The same grid, stepped by hand: interval i is split into n equal steps.
    ts = np.asarray(MULTI_TS)
    expected = [np.asarray(y0)]
    state = solver.init(cos_growth, jnp.asarray(ts[0]), y0, 1.3)
    for i in range(num_intervals):
        h = (ts[i + 1] - ts[i]) / n
        for k in range(n):
            state, _ = solver.step(cos_growth, jnp.asarray(ts[i] + k * h), jnp.asarray(h),
                                   state, 1.3)
        expected.append(np.asarray(solver.y(state)))
    assert rel(sol.ys, np.stack(expected)) < 1e-13
    # and it converges to the closed form
    assert rel(sol.ys, cos_growth_exact(np.asarray(y0), ts, 1.3)) < 0.2


@pytest.mark.parametrize(
    "solver", [_case(mj.ALF(), id="ALF"), _case(mj.RK4(), slow=True, id="RK4")]
)
def test_step_size_last_step_clipped(solver):
    y0 = jnp.array([1.0, 0.25])
    # h = 0.3 on [0, 1]: steps 0 -> 0.3 -> 0.6 -> 0.9 -> 1.0 (the last clipped to 0.1).
    sol = mj.solve(cos_growth, y0, jnp.array([0.0, 1.0]), 1.3, solver=solver, step_size=0.3)
    assert int(sol.stats["num_steps"]) == 4
    assert float(sol.stats["t_final"]) == 1.0
    grid = [0.0, 0.3, 0.3 + 0.3, 0.3 + 0.3 + 0.3]
    steps = [(t, 0.3) for t in grid[:3]] + [(grid[3], 1.0 - grid[3])]
    manual = manual_solve(solver, cos_growth, y0, steps, 1.3)
    assert rel(sol.ys[-1], manual) < 1e-13
    # Not the unclipped state at 0.9 (TorchDiffEqPack's quirk).
    at_09 = manual_solve(solver, cos_growth, y0, steps[:3], 1.3)
    assert rel(sol.ys[-1], at_09) > 1e-2

    # With several outputs the steps are the same (0.5 is interpolated, tests/test_dense.py)
    sol = mj.solve(cos_growth, y0, jnp.array([0.0, 0.5, 1.0]), 1.3, solver=solver,
                   step_size=0.3)
    assert int(sol.stats["num_steps"]) == 4
    assert rel(sol.ys[2], manual) < 1e-13
    # ... unless steps land on outputs: then the last step before each is clipped onto it.
    sol = mj.solve(cos_growth, y0, jnp.array([0.0, 0.5, 1.0]), 1.3, solver=solver,
                   step_size=0.3, land_on_outputs=True)
    assert int(sol.stats["num_steps"]) == 4
    steps = [(0.0, 0.3), (0.3, 0.5 - 0.3), (0.5, 0.3), (0.5 + 0.3, 1.0 - (0.5 + 0.3))]
    assert rel(sol.ys[1], manual_solve(solver, cos_growth, y0, steps[:2], 1.3)) < 1e-13
    assert rel(sol.ys[2], manual_solve(solver, cos_growth, y0, steps, 1.3)) < 1e-13


# --------------------------------------------------------------------------------------
# 5. t1 == t0
# --------------------------------------------------------------------------------------

IDENTITY_MODES = {"adaptive": {}, "step_size": {"step_size": 0.1}, "num_steps": {"num_steps": 4}}


@pytest.mark.parametrize(
    "solver,mode",
    [_case(mj.ALF(), "adaptive", id="ALF-adaptive"),
     _case(mj.ALF(), "num_steps", id="ALF-num_steps"),
     _case(mj.Dopri5(), "step_size", id="Dopri5-step_size"),
     _case(mj.Dopri5(), "adaptive", slow=True, id="Dopri5-adaptive"),
     _case(mj.ALF(), "step_size", slow=True, id="ALF-step_size"),
     _case(mj.Dopri5(), "num_steps", slow=True, id="Dopri5-num_steps")],
)
def test_zero_length_interval_is_identity(solver, mode):
    """ts = [t0, t0]: ys == y0 bit for bit, and the Jacobian d ys[-1] / d y0 is I."""
    # max_steps=16: the loop takes no step; a small bound keeps the compile cheap.
    kw = dict(IDENTITY_MODES[mode], solver=solver, gradient=mj.Direct(), max_steps=16)
    y0 = jnp.array([0.7, -1.3])

    def loss(y, c):
        sol = mj.solve(cos_growth, y, jnp.array([0.5, 0.5]), 1.3, **kw)
        return c @ sol.ys[-1], sol

    grad = jax.jit(jax.grad(loss, has_aux=True))
    # Rows of the Jacobian, from one compiled gradient: c^T J for c = e_1, e_2.
    (row0, sol), (row1, _) = grad(y0, jnp.array([1.0, 0.0])), grad(y0, jnp.array([0.0, 1.0]))
    assert jnp.array_equal(jnp.stack([row0, row1]), jnp.eye(2))
    assert bool(jnp.all(sol.ys == y0[None]))  # exactly, bit for bit
    assert bool(sol.result == mj.RESULTS.successful)
    assert float(sol.stats["t_final"]) == 0.5
    if mode != "num_steps":  # the while loop takes no step at all
        assert int(sol.stats["num_steps"]) == 0

    sol = mj.solve(cos_growth, y0, jnp.array([0.5]), 1.3, **kw)
    assert sol.ys.shape == (1, 2)
    assert bool(jnp.all(sol.ys == y0[None]))
    assert bool(sol.result == mj.RESULTS.successful)


def test_all_equal_ts_is_identity():
    y0 = jnp.array([0.7, -1.3])
    ys = mj.odeint(cos_growth, y0, jnp.array([0.5, 0.5, 0.5]), 1.3, solver=mj.Dopri5())
    assert ys.shape == (3, 2)
    assert bool(jnp.all(ys == y0[None]))


@pytest.mark.parametrize("gradient", [mj.Direct(), None], ids=["Direct", "default"])
@pytest.mark.parametrize("solver", [mj.ALF(), mj.Dopri5()], ids=name)
def test_length_one_ts_gradient_is_identity(solver, gradient):
    """len(ts) == 1 returns y0 with a leading axis; its Jacobian is the identity, for
    the default gradient strategy too."""
    jac = jax.jacrev(
        lambda y: mj.odeint(cos_growth, y, jnp.array([0.5]), 1.3, solver=solver,
                            gradient=gradient)[0]
    )(jnp.array([0.7, -1.3]))
    assert jnp.array_equal(jac, jnp.eye(2))


# --------------------------------------------------------------------------------------
# 6. vmap and jit
# --------------------------------------------------------------------------------------

BATCH_Y0 = jnp.array([[1.0, 0.3], [-0.5, 2.0], [0.1, -0.1]])


@pytest.mark.parametrize(
    "solver,kw", [_case(mj.Dopri5(), {"rtol": 1e-6, "atol": 1e-9}, id="Dopri5-adaptive"),
                  _case(mj.ALF(), {"num_steps": 10}, slow=True, id="ALF-num_steps")],
)
def test_vmap_equals_loop(solver, kw):
    ts = jnp.array([0.0, 0.7, 1.5])

    def one(y0):
        return mj.solve(param_field, y0, ts, PARAMS, solver=solver, **kw)

    batched = jax.vmap(one)(BATCH_Y0)
    singles = [one(y) for y in BATCH_Y0]
    for i, single in enumerate(singles):
        assert rel(batched.ys[i], single.ys) < 1e-14, i
        # each batch element keeps its own step sequence
        assert int(batched.stats["num_steps"][i]) == int(single.stats["num_steps"])
    assert bool(jnp.all(batched.result == mj.RESULTS.successful))


def test_vmap_over_args_and_jit_equals_eager():
    ts = jnp.array([0.0, 0.7, 1.5])
    y0 = jnp.array([1.0, 0.25])
    alphas = jnp.array([0.5, 1.0, -0.8])

    def f(alpha, y0):
        return mj.odeint(cos_growth, y0, ts, alpha, solver=mj.ALF(), num_steps=40)

    eager = [f(a, y0) for a in alphas]
    batched = jax.vmap(f, in_axes=(0, None))(alphas, y0)
    jitted = jax.jit(f)
    for i, a in enumerate(alphas):
        assert rel(batched[i], eager[i]) < 1e-14
        assert rel(jitted(a, y0), eager[i]) < 1e-14
        exact = cos_growth_exact(np.asarray(y0), np.asarray(ts), float(a))
        assert rel(eager[i], exact) < 1e-3


def test_jit_with_traced_ts_equals_eager():
    y0 = jnp.array([1.0, 0.25])
    ts = jnp.array([0.0, 0.4, 1.1])
    for kw in ({"num_steps": 6}, {}):
        eager = mj.odeint(cos_growth, y0, ts, 1.3, solver=mj.Heun(), **kw)
        jitted = jax.jit(
            lambda y, t, kw=kw: mj.odeint(cos_growth, y, t, 1.3, solver=mj.Heun(), **kw)
        )
        assert rel(jitted(y0, ts), eager) < 1e-15, kw


# --------------------------------------------------------------------------------------
# 7. Gradients with Direct
# --------------------------------------------------------------------------------------

_prng = np.random.default_rng(7)
PARAMS = (jnp.asarray(_prng.normal(size=(2, 2))), jnp.asarray(_prng.normal(size=(2,))))
FD_Y0 = jnp.array([0.4, -0.8])
FD_TS = jnp.array([0.0, 0.5, 1.2])
FD_W = jnp.array([[0.3, -1.0], [0.7, 0.2], [1.1, 0.5]])  # weights of each output


def _central_fd(f, x, eps):
    """Central differences of a scalar f at the pytree x, leaf element by element."""
    flat, unravel = ravel_pytree(x)
    out = []
    for i in range(flat.size):
        e = jnp.zeros_like(flat).at[i].set(eps)
        out.append((f(unravel(flat + e)) - f(unravel(flat - e))) / (2 * eps))
    return unravel(jnp.stack(out))


@pytest.mark.parametrize(
    "solver,kw",
    [_case(mj.RK4(), {"num_steps": 12}, id="RK4-num_steps"),
     _case(mj.Dopri5(), {"rtol": 1e-6, "atol": 1e-9}, id="Dopri5-adaptive"),
     _case(mj.ALF(), {"step_size": 0.1}, slow=True, id="ALF-step_size")],
)
def test_direct_gradient_vs_finite_differences(solver, kw):
    def loss(y0, theta):
        sol = mj.solve(param_field, y0, FD_TS, theta, solver=solver, gradient=mj.Direct(), **kw)
        return jnp.sum(FD_W * sol.ys), sol.stats["num_steps"]

    # One compiled program gives the loss, the step count and the gradient; the finite
    # differences reuse it.
    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (_, n_steps), (g_y0, g_theta) = value_and_grad(FD_Y0, PARAMS)
    # float64 central differences, eps = 1e-6: truncation ~1e-12, rounding ~1e-10.
    # For the adaptive solve the step sizes are functions of y0 and args (the controller
    # is stop_gradient'ed, so Direct differentiates the accepted steps with h fixed),
    # so FD also sees the step sizes move. That is a valid oracle only while the step
    # sequence does not jump (same step count, asserted below), and then only to about
    # tolerance x sensitivity: measured ~1e-10 relative on a linear system.
    eps = 1e-6
    counts = set()

    def value(y0, theta):
        (v, n), _ = value_and_grad(y0, theta)
        counts.add(int(n))
        return v

    fd_y0 = _central_fd(lambda y: value(y, PARAMS), FD_Y0, eps)
    fd_theta = _central_fd(lambda th: value(FD_Y0, th), PARAMS, eps)
    assert counts == {int(n_steps)}
    assert int(n_steps) > 3
    assert float(jnp.max(jnp.abs(fd_y0))) > 0.1
    assert rel(g_y0, fd_y0) < 1e-7
    for g, fd in zip(g_theta, fd_theta):
        assert rel(g, fd) < 1e-7


def _stability_polynomial(solver_name, w):
    fact = [1.0, 1.0, 2.0, 6.0, 24.0, 120.0]

    def taylor(p):
        return sum(w**j / fact[j] for j in range(p + 1))

    return {
        "Euler": lambda: taylor(1),
        "Midpoint": lambda: taylor(2),
        "Heun": lambda: taylor(2),
        "RK4": lambda: taylor(4),
        "Bosh3": lambda: taylor(3),
        "Dopri5": lambda: taylor(5) + w**6 / 600.0,
    }[solver_name]()


@pytest.mark.parametrize(
    "solver",
    [_case(mj.Euler(), id="Euler"), _case(mj.Heun(), id="Heun"), _case(mj.RK4(), id="RK4"),
     _case(mj.Bosh3(), id="Bosh3"), _case(mj.Dopri5(), id="Dopri5"),
     _case(mj.Midpoint(), slow=True, id="Midpoint")],  # Midpoint: the same R as Heun
)
def test_scalar_growth_discrete_oracle_rk(solver):
    """z' = k z on a num_steps grid: z_N = R(hk)^N z0 exactly (ALGORITHMS.md §10.1)."""
    n, T = 8, 1.3
    h = T / n
    ts = jnp.array([0.0, T])
    R = ft.partial(_stability_polynomial, name(solver))

    def computed(z0, k):
        return mj.odeint(scalar_growth, z0, ts, k, solver=solver, gradient=mj.Direct(),
                         num_steps=n)[-1]

    z0, k = jnp.array(1.3), jnp.array(-0.7)
    value, (d_z0, d_k) = jax.jit(jax.value_and_grad(computed, argnums=(0, 1)))(z0, k)
    w = h * float(k)
    dR = float(jax.grad(R)(w))
    assert float(value) == pytest.approx(R(w) ** n * 1.3, rel=1e-13)
    assert float(d_z0) == pytest.approx(R(w) ** n, rel=1e-12)
    # dz_N/dk = N R(hk)^(N-1) R'(hk) h z0
    assert float(d_k) == pytest.approx(n * R(w) ** (n - 1) * dR * h * 1.3, rel=1e-12)


def _alf_matrix(w, eta):
    return jnp.array([[1 + eta * w, (2 - 2 * eta + eta * w) / 2],
                      [2 * eta * w, 1 - 2 * eta + eta * w]])


@pytest.mark.parametrize("eta", [1.0, 0.9])
def test_scalar_growth_discrete_oracle_alf(eta):
    """(z_N, h v_N) = M(w, eta)^N (1, w)^T z0 with w = hk (ALGORITHMS.md §1.5, §10.1)."""
    n, T = 10, 1.2
    h = T / n
    ts = jnp.array([0.0, T])

    def computed(z0, k):
        return mj.odeint(scalar_growth, z0, ts, k, solver=mj.ALF(eta=eta),
                         gradient=mj.Direct(), num_steps=n)[-1]

    def oracle(z0, k):
        w = h * k
        x = jnp.stack([z0, w * z0])
        M = _alf_matrix(w, eta)
        for _ in range(n):
            x = M @ x
        return x[0]

    z0, k = jnp.array(0.8), jnp.array(0.9)
    value, g = jax.jit(jax.value_and_grad(computed, argnums=(0, 1)))(z0, k)
    value_oracle, g_oracle = jax.value_and_grad(oracle, argnums=(0, 1))(z0, k)
    assert float(value) == pytest.approx(float(value_oracle), rel=1e-13)
    assert float(g[0]) == pytest.approx(float(g_oracle[0]), rel=1e-12)
    assert float(g[1]) == pytest.approx(float(g_oracle[1]), rel=1e-12)


_lrng = np.random.default_rng(3)
LIN_A = jnp.asarray(0.5 * _lrng.normal(size=(3, 3)))
LIN_Z0 = jnp.asarray(_lrng.normal(size=3))
LIN_W = jnp.asarray(_lrng.normal(size=3))


def _van_loan(A, z0, w, T):
    """Exact dL/dA and dL/dz0 for L = w^T expm(A T) z0 (ALGORITHMS.md §10.1)."""
    A, z0, w = map(np.asarray, (A, z0, w))
    n = A.shape[0]
    big = np.block([[A.T, np.outer(w, z0)], [np.zeros((n, n)), A.T]])
    return scipy.linalg.expm(big * T)[:n, n:], scipy.linalg.expm(A.T * T) @ w


def test_linear_system_gradient_vs_van_loan():
    T = 1.0
    ts = jnp.array([0.0, T])

    def loss(z0, A):
        zs = mj.odeint(linear, z0, ts, A, solver=mj.Dopri5(), gradient=mj.Direct(),
                       rtol=1e-10, atol=1e-12)
        return LIN_W @ zs[-1]

    value, (g_z0, g_A) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(LIN_Z0, LIN_A)
    exact = np.asarray(LIN_W) @ scipy.linalg.expm(np.asarray(LIN_A) * T) @ np.asarray(LIN_Z0)
    assert float(value) == pytest.approx(float(exact), rel=1e-9)
    ex_A, ex_z0 = _van_loan(LIN_A, LIN_Z0, LIN_W, T)
    # measured: 1.0e-11 (A) and 6.8e-13 (z0) relative
    assert rel(g_A, ex_A) < 1e-9
    assert rel(g_z0, ex_z0) < 1e-9


def test_gradient_through_closed_over_array():
    """An array closed over by func receives the same gradient as when passed as args."""
    T = 1.0
    ts = jnp.array([0.0, T])

    def loss_closure(A):
        ys = mj.odeint(lambda t, z, args: A @ z, LIN_Z0, ts, solver=mj.Dopri5(),
                       gradient=mj.Direct(), num_steps=20)
        return LIN_W @ ys[-1]

    def loss_args(A):
        ys = mj.odeint(linear, LIN_Z0, ts, A, solver=mj.Dopri5(),
                       gradient=mj.Direct(), num_steps=20)
        return LIN_W @ ys[-1]

    g_closure = jax.jit(jax.grad(loss_closure))(LIN_A)
    g_args = jax.jit(jax.grad(loss_args))(LIN_A)
    assert float(jnp.max(jnp.abs(g_closure))) > 0.1
    assert rel(g_closure, g_args) < 1e-13
    ex_A, _ = _van_loan(LIN_A, LIN_Z0, LIN_W, T)
    assert rel(g_closure, ex_A) < 1e-6  # Dopri5 with h = 0.05 on this system


def test_gradient_wrt_eqx_module_field():
    model = MLPField(dim=2, hidden=8, key=jax.random.PRNGKey(0))
    y0 = jnp.array([0.5, -0.3])
    ts = jnp.array([0.0, 0.5, 1.0])

    def loss(m):
        ys = mj.odeint(m, y0, ts, solver=mj.ALF(), gradient=mj.Direct(), num_steps=10)
        return jnp.sum(FD_W * ys)

    value_and_grad = eqx.filter_jit(eqx.filter_value_and_grad(loss))
    _, grads = value_and_grad(model)
    assert jtu.tree_structure(grads) == jtu.tree_structure(model)
    eps = 1e-6
    for where, idx in ((lambda m: m.w1, (3, 1)), (lambda m: m.b2, (0,)), (lambda m: m.c, (5,))):
        leaf = where(model)
        up = eqx.tree_at(where, model, leaf.at[idx].add(eps))
        down = eqx.tree_at(where, model, leaf.at[idx].add(-eps))
        fd = (value_and_grad(up)[0] - value_and_grad(down)[0]) / (2 * eps)
        g = where(grads)[idx]
        assert abs(float(fd)) > 1e-3
        assert float(g) == pytest.approx(float(fd), rel=1e-7)


# --------------------------------------------------------------------------------------
# 8. Misuse: clear errors at trace time
# --------------------------------------------------------------------------------------

Y0 = jnp.array([1.0, 2.0])
TS = jnp.array([0.0, 1.0])


def test_ts_must_be_1d():
    with pytest.raises(ValueError, match="1-D"):
        mj.odeint(decay, Y0, jnp.array([[0.0, 1.0]]))
    with pytest.raises(ValueError, match="1-D"):
        mj.odeint(decay, Y0, jnp.array(1.0))
    with pytest.raises(ValueError, match="1-D"):
        mj.odeint(decay, Y0, jnp.zeros((0,)))


def test_ts_must_be_finite():
    with pytest.raises(ValueError, match="finite"):
        mj.odeint(decay, Y0, jnp.array([0.0, 1.0, jnp.inf]))


@pytest.mark.parametrize("ts", [[0.0, 1.0, 0.5], [1.0, 0.5, 0.7], [0.0, 0.0, 1.0, 0.5]])
def test_ts_not_monotone_concrete(ts):
    with pytest.raises(ValueError, match="nondecreasing or nonincreasing"):
        mj.odeint(decay, Y0, jnp.array(ts))
    with pytest.raises(ValueError, match="nondecreasing or nonincreasing"):
        mj.odeint(decay, Y0, np.array(ts), num_steps=3)


def test_ts_not_monotone_traced():
    bad = jnp.array([0.0, 1.0, 0.5])
    for kw in ({"num_steps": 2}, {}):
        f = jax.jit(lambda ts, kw=kw: mj.odeint(decay, Y0, ts, solver=mj.Dopri5(), **kw))
        with pytest.raises(RUNTIME_ERRORS, match="nondecreasing or nonincreasing"):
            block(f(bad))
        # a monotone ts through the same compiled function is fine
        assert bool(jnp.all(jnp.isfinite(f(jnp.array([0.0, 0.5, 1.0])))))
        g = jax.jit(
            lambda ts, kw=kw: mj.solve(decay, Y0, ts, solver=mj.Dopri5(), throw=False, **kw)
        )
        for ts in (bad, jnp.array([0.5, 0.0, 1.0])):
            sol = block(g(ts))
            assert bool(sol.result == mj.RESULTS.ts_not_monotone), kw


def test_ts_integer_dtype():
    with pytest.raises(TypeError, match="floating"):
        mj.odeint(decay, Y0, jnp.array([0, 1]))
    with pytest.raises(TypeError, match="floating"):
        mj.odeint(decay, Y0, [0, 1])


def test_y0_integer_dtype():
    with pytest.raises(TypeError, match="floating"):
        mj.odeint(decay, jnp.array([1, 2]), TS)
    with pytest.raises(TypeError, match=r"y0\['b'\]"):
        mj.odeint(decay, {"a": jnp.array(1.0), "b": jnp.array(2)}, TS)


def test_func_returns_wrong_structure():
    with pytest.raises(ValueError, match="structure"):
        mj.odeint(lambda t, y, a: (y, y), Y0, TS)
    with pytest.raises(ValueError, match="structure"):
        mj.odeint(lambda t, y, a: y["a"], {"a": Y0}, TS)


def test_func_returns_wrong_shape():
    with pytest.raises(ValueError, match="shape"):
        mj.odeint(lambda t, y, a: jnp.sum(y), Y0, TS)
    with pytest.raises(ValueError, match="shape"):
        mj.odeint(lambda t, y, a: {"a": y["a"][:1]}, {"a": Y0}, TS)


def test_func_returns_wrong_dtype():
    with pytest.raises(TypeError, match="dtype"):
        mj.odeint(lambda t, y, a: y.astype(F32), Y0, TS)
    with pytest.raises(TypeError, match="dtype"):
        mj.odeint(lambda t, y, a: y.astype(F64), Y0.astype(F32), TS.astype(F32))


@pytest.mark.parametrize("bad", [0.0, -1e-3])
def test_tolerances_must_be_positive(bad):
    with pytest.raises(ValueError, match="rtol"):
        mj.odeint(decay, Y0, TS, rtol=bad)
    with pytest.raises(ValueError, match="atol"):
        mj.odeint(decay, Y0, TS, atol=bad)


def test_step_size_and_num_steps_exclusive():
    with pytest.raises(ValueError, match="step_size.*num_steps"):
        mj.odeint(decay, Y0, TS, step_size=0.1, num_steps=10)


@pytest.mark.parametrize("solver", [mj.Euler(), mj.RK4()], ids=name)
def test_adaptive_needs_error_estimate(solver):
    with pytest.raises(ValueError, match="step_size") as info:
        mj.odeint(decay, Y0, TS, solver=solver)
    assert "num_steps" in str(info.value)
    assert name(solver) in str(info.value)


def test_bad_grid_keywords():
    with pytest.raises(ValueError, match="num_steps"):
        mj.odeint(decay, Y0, TS, num_steps=0)
    with pytest.raises(ValueError, match="num_steps"):
        mj.odeint(decay, Y0, TS, num_steps=-3)
    with pytest.raises(TypeError, match="num_steps"):
        mj.odeint(decay, Y0, TS, num_steps=2.0)
    with pytest.raises(TypeError, match="num_steps"):
        mj.odeint(decay, Y0, TS, num_steps=jnp.array(4))
    with pytest.raises(ValueError, match="max_steps"):
        mj.odeint(decay, Y0, TS, max_steps=0)
    with pytest.raises(ValueError, match="max_steps"):
        mj.odeint(decay, Y0, TS, max_steps=10.0)
    with pytest.raises(ValueError, match="step_size"):
        mj.odeint(decay, Y0, TS, step_size=0.0)
    with pytest.raises(ValueError, match="step_size"):
        mj.odeint(decay, Y0, TS, step_size=-0.1)


def test_bad_solver_or_gradient_type():
    with pytest.raises(TypeError, match="solver"):
        mj.odeint(decay, Y0, TS, solver="dopri5")
    with pytest.raises(TypeError, match="gradient"):
        mj.odeint(decay, Y0, TS, gradient="direct")


# --------------------------------------------------------------------------------------
# 9. Run-time conditions
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw", [{"step_size": 0.01, "max_steps": 30}, {"rtol": 1e-10, "atol": 1e-12, "max_steps": 20}],
    ids=["step_size", "adaptive"],
)
def test_max_steps_reached(kw):
    ts = jnp.array([0.0, 0.05, 2.0, 4.0])
    args = jnp.array(1.3)
    with pytest.raises(RUNTIME_ERRORS, match=f"max_steps={kw['max_steps']} reached at t="):
        block(mj.odeint(cos_growth, Y0, ts, args, solver=mj.Dopri5(), **kw))

    sol = block(mj.solve(cos_growth, Y0, ts, args, solver=mj.Dopri5(), throw=False, **kw))
    assert bool(sol.result == mj.RESULTS.max_steps_reached)
    assert not bool(sol.result == mj.RESULTS.successful)
    assert int(sol.stats["num_steps"]) + int(sol.stats["num_rejected"]) == kw["max_steps"]
    t_final = float(sol.stats["t_final"])
    assert 0.05 <= t_final < 2.0
    if "step_size" in kw:
        assert t_final == pytest.approx(0.3, abs=1e-12)
    # reached outputs are finite and right; unreached ones are NaN
    assert bool(jnp.all(jnp.isfinite(sol.ys[:2])))
    assert rel(sol.ys[1], cos_growth_exact(np.asarray(Y0), np.asarray(ts), 1.3)[1]) < 1e-8
    assert bool(jnp.all(jnp.isnan(sol.ys[2:])))
    # odeint with throw=False returns the same, without raising
    ys = block(mj.odeint(cos_growth, Y0, ts, args, solver=mj.Dopri5(), throw=False, **kw))
    assert jnp.array_equal(ys, sol.ys, equal_nan=True)


NONFINITE_CASES = [
    _case(mj.Dopri5(), {}, id="Dopri5-adaptive"),
    _case(mj.Dopri5(), {"step_size": 0.01}, id="Dopri5-step_size"),
    _case(mj.Dopri5(), {"num_steps": 100}, id="Dopri5-num_steps"),
    _case(mj.ALF(), {}, slow=True, id="ALF-adaptive"),
    _case(mj.ALF(), {"num_steps": 100}, slow=True, id="ALF-num_steps"),
]


@pytest.mark.parametrize("solver,kw", NONFINITE_CASES)
def test_nonfinite_state(solver, kw):
    """func returns NaN for t > 0.5: reported as a non-finite state near t = 0.5, not as
    max_steps (the adaptive controller shrinks the step towards 0.5 and then stops)."""
    ts = jnp.array([0.0, 0.25, 1.0])
    sol = block(mj.solve(nan_after_half, Y0, ts, solver=solver, throw=False, **kw))
    assert bool(sol.result == mj.RESULTS.nonfinite_state), sol.result
    t_final = float(sol.stats["t_final"])
    if isinstance(solver, mj.Dopri5):  # its last stage is at t + h: it cannot pass 0.5
        assert 0.485 <= t_final <= 0.5
        if not kw:
            assert t_final == pytest.approx(0.5, abs=1e-9)
    else:  # ALF evaluates f only at t + h/2, so a step may end a little past 0.5
        assert abs(t_final - 0.5) <= 0.02
    assert int(sol.stats["num_steps"]) + int(sol.stats["num_rejected"]) < 4096
    assert bool(jnp.all(jnp.isfinite(sol.ys[:2])))
    assert rel(sol.ys[1], np.asarray(Y0) * np.exp(-0.25)) < 1e-3
    assert bool(jnp.all(jnp.isnan(sol.ys[2])))


@pytest.mark.parametrize(
    "solver,kw", [_case(mj.Dopri5(), {}, id="Dopri5-adaptive"),
                  _case(mj.ALF(), {"num_steps": 100}, slow=True, id="ALF-num_steps")]
)
def test_nonfinite_state_raises(solver, kw):
    with pytest.raises(RUNTIME_ERRORS, match=r"non-finite \(NaN or inf\) at t=0\.[45]\d* after"):
        block(mj.odeint(nan_after_half, Y0, jnp.array([0.0, 0.25, 1.0]), solver=solver, **kw))


def test_nonfinite_initial_state():
    y0 = jnp.array([1.0, jnp.nan])
    sol = block(mj.solve(decay, y0, TS, solver=mj.Dopri5(), throw=False))
    assert bool(sol.result == mj.RESULTS.nonfinite_state)
    assert int(sol.stats["num_steps"]) == 0
    with pytest.raises(RUNTIME_ERRORS, match="non-finite"):
        block(mj.odeint(decay, y0, TS, num_steps=3))


@pytest.mark.parametrize(
    "solver", [_case(mj.Dopri5(), id="Dopri5"), _case(mj.Tsit5(), slow=True, id="Tsit5")]
)
def test_finite_time_blowup(solver):
    """y' = y^2, y(0) = 1 blows up at t = 1: step-size underflow or non-finite, near t = 1.

    (The numerical solution's own pole lies within ~1e-4 of 1, on either side: Dopri5
    stops at 0.99991, Tsit5 at 1.0000017.)"""
    ts = jnp.array([0.0, 0.5, 2.0])
    sol = block(mj.solve(square, jnp.array(1.0), ts, solver=solver, throw=False))
    assert bool(
        (sol.result == mj.RESULTS.step_size_underflow) | (sol.result == mj.RESULTS.nonfinite_state)
    ), sol.result
    assert float(sol.stats["t_final"]) == pytest.approx(1.0, abs=1e-3)
    assert float(sol.ys[1]) == pytest.approx(2.0, rel=1e-3)
    assert bool(jnp.isnan(sol.ys[2]))
    if isinstance(solver, mj.Dopri5):
        with pytest.raises(RUNTIME_ERRORS, match=r"(underflowed|non-finite).* at t=(0\.99|1\.00)"):
            block(mj.odeint(square, jnp.array(1.0), ts, solver=solver))


def test_vmap_failure_reports_the_failed_element():
    ts = jnp.array([0.0, 2.0])
    y0s = jnp.array([0.1, 1.0, 0.2])

    def f(y0, throw):
        return mj.solve(square, y0, ts, solver=mj.Dopri5(), throw=throw)

    # y0 = 1 blows up at t = 1: the only failure, so its time is the one reported.
    with pytest.raises(RUNTIME_ERRORS, match=r"(underflowed|non-finite).* at t=(0\.99|1\.00)"):
        block(jax.vmap(lambda y: f(y, True).ys)(y0s))

    sol = block(jax.vmap(lambda y: f(y, False))(y0s))
    assert np.asarray(sol.result == mj.RESULTS.successful).tolist() == [True, False, True]
    # the healthy elements are unaffected: y(2) = y0 / (1 - 2 y0)
    exact = np.array([0.1, 0.2]) / (1 - 2 * np.array([0.1, 0.2]))
    assert rel(sol.ys[jnp.array([0, 2]), -1], exact) < 1e-3
    assert bool(jnp.isnan(sol.ys[1, -1]))
