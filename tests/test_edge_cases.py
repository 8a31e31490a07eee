"""Edge cases a newcomer hit (issue 12): errors that can be caught and read, traced
arguments validated at run time, repeated output times, complex states, buffers that
would not fit in memory, and the float32 livelock next to an output time."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import malijax as mj

RUNTIME_ERRORS = (jax.errors.JaxRuntimeError, mj.SolveError)


def decay(t, y, a):
    return -a * y


def square(t, y, args):
    return y**2


Y0 = jnp.array([1.0, 2.0])
TS = jnp.array([0.0, 1.0])


# --- errors ---------------------------------------------------------------------------


def test_eager_failure_is_a_solve_error_with_our_message_first(capfd):
    with pytest.raises(mj.SolveError) as info:
        mj.odeint(square, jnp.array(1.0), jnp.array([0.0, 2.0]), solver=mj.Dopri5())
    first_line = str(info.value).splitlines()[0]
    assert first_line.startswith("malijax: the adaptive step size underflowed at t=")
    assert "CpuCallback" not in str(info.value)
    # printed once (by the raise), not also logged by JAX's callback machinery
    assert "SolveError" not in capfd.readouterr().err
    # under jit it arrives through XLA, its message still ours at the end
    with pytest.raises(jax.errors.JaxRuntimeError, match="SolveError: malijax: the adaptive"):
        jax.block_until_ready(jax.jit(lambda y: mj.odeint(
            square, y, jnp.array([0.0, 2.0]), solver=mj.Dopri5()))(jnp.array(1.0)))


def test_exception_in_func_keeps_its_type():
    class Custom(Exception):
        pass

    def bad(t, y, args):
        raise Custom("from the user's field")

    with pytest.raises(Custom, match="from the user's field") as info:
        mj.odeint(bad, Y0, TS)
    assert any("malijax" in note for note in info.value.__notes__)
    with pytest.raises(KeyError):
        mj.odeint(lambda t, y, a: a["missing"] * y, Y0, TS, {})


def test_adjoint_backward_failure_says_backward_and_when():
    def loss(a):
        ys = mj.odeint(decay, Y0, jnp.array([0.0, 1.0, 2.0]), a, solver=mj.Dopri5(),
                       gradient=mj.Adjoint(max_steps=2), rtol=1e-8)
        return jnp.sum(ys)

    with pytest.raises(RUNTIME_ERRORS) as info:
        jax.block_until_ready(jax.grad(loss)(1.0))
    message = str(info.value)
    assert "the Adjoint's backward solve" in message
    assert "max_steps=2 (per output interval) reached at t=1.7" in message  # in (1, 2)
    assert "mj.Adjoint(max_steps=...)" in message


def _mali_grad(a):
    # undamped ALF, contracting: its rebuilt states lose digits (tests/test_gradients.py)
    def loss(a):
        ys = mj.odeint(lambda t, y, a: -a * y * jnp.array([0.5, 5.0]), Y0, jnp.array([0.0, 4.0]), a,
                       solver=mj.ALF(), gradient=mj.MALI(checkpoints=0), num_steps=400, throw=False)
        return jnp.sum(ys[-1])

    return jax.block_until_ready(jax.grad(loss)(a))


def test_reconstruction_warning_once_per_call_site_and_short():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for a in (1.0, 1.1, 1.2):  # one call site, three gradients
            _mali_grad(a)
        jax.effects_barrier()
    ours = [w for w in caught if issubclass(w.category, mj.ReconstructionWarning)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    assert len(str(ours[0].message)) < 250
    assert ours[0].filename == __file__  # the user's line, not malijax's
    # "always" (as pytest.warns sets) shows every one
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for a in (1.0, 1.1):
            _mali_grad(a)
        jax.effects_barrier()
    assert len([w for w in caught if issubclass(w.category, mj.ReconstructionWarning)]) == 2


# --- traced arguments -----------------------------------------------------------------


@pytest.mark.parametrize("name,kw,match", [
    ("rtol", {}, "`rtol` and `atol` must be > 0"),
    ("atol", {}, "`rtol` and `atol` must be > 0"),
    ("step_size", {}, "`step_size` must be > 0"),
])
def test_traced_tolerance_or_step_not_positive_fails_at_run_time(name, kw, match):
    f = jax.jit(lambda v: mj.odeint(decay, Y0, TS, 1.0, solver=mj.Dopri5(), **{name: v}))
    assert bool(jnp.all(jnp.isfinite(f(0.1))))  # the same compiled solve is fine
    for bad in (0.0, -1e-3, jnp.nan):
        with pytest.raises(RUNTIME_ERRORS, match=match):
            jax.block_until_ready(f(bad))
    sol = jax.jit(lambda v: mj.solve(decay, Y0, TS, 1.0, solver=mj.Dopri5(), throw=False,
                                     **{name: v}))(-1.0)
    code = mj.RESULTS.invalid_step_size if name == "step_size" else mj.RESULTS.invalid_tolerance
    assert bool(sol.result == code)


# --- repeated output times ------------------------------------------------------------


TS_PADDED = jnp.array([0.0, 0.5, 0.5, 1.0, 1.0, 1.0])
UNIQUE = jnp.array([0.0, 0.5, 1.0])
REPEAT = jnp.array([0, 1, 1, 2, 2, 2])


@pytest.mark.parametrize("gradient,solver,kw", [
    (mj.ACA(), mj.Tsit5(), {}),
    pytest.param(mj.MALI(), mj.Reversible(mj.Tsit5()), {}, marks=pytest.mark.slow),
    pytest.param(mj.Direct(), mj.Dopri5(), {"step_size": 0.1}, marks=pytest.mark.slow),
    (mj.ACA(), mj.RK4(), {"num_steps": 4}),
    (mj.MALI(), mj.ALF(eta=0.9), {"num_steps": 4}),
], ids=["ACA", "MALI", "Direct-step_size", "ACA-RK4-grid", "MALI-ALF-grid"])
def test_repeated_output_times_are_zero_length_intervals(gradient, solver, kw):
    """Padded ts: outputs repeat, and gradients equal those of the unpadded solve with its
    outputs repeated; ts gradients equal Direct's. (On a `num_steps` grid a reversible
    solver takes its N zero-length steps, which keep `y` but not its auxiliary state
    (ALF's `v`): later outputs then differ within the solver's error, and the gradient
    is compared with Direct's through the same padded grid instead.)"""
    w = jnp.arange(1.0, 7.0)[:, None] * jnp.array([[1.0, -0.5]])

    def loss(y0, a, ts, gradient, padded):
        ys = mj.odeint(lambda t, y, a: -a * y + jnp.sin(t) * y**2, y0, ts, a, solver=solver,
                       gradient=gradient, rtol=1e-8, atol=1e-8, **kw)
        return jnp.sum(w * (ys if padded else ys[REPEAT]) ** 2)

    y0, a = jnp.array([1.0, 0.5]), 0.7
    padded = jax.grad(loss, (0, 1, 2))(y0, a, TS_PADDED, gradient, True)
    if isinstance(solver, mj.ALF):
        unique = jax.grad(loss, (0, 1))(y0, a, TS_PADDED, mj.Direct(), True)
    else:
        unique = jax.grad(loss, (0, 1))(y0, a, UNIQUE, gradient, False)
    direct_ts = jax.grad(loss, 2)(y0, a, TS_PADDED, mj.Direct(), True)
    for p, u in zip(padded[:2], unique):
        assert float(jnp.max(jnp.abs(p - u))) <= 1e-9 * float(jnp.max(jnp.abs(u)))
    assert float(jnp.max(jnp.abs(padded[2] - direct_ts))) <= 1e-9 * float(jnp.max(jnp.abs(direct_ts)))
    ys = mj.odeint(lambda t, y, a: -a * y, y0, TS_PADDED, a, solver=solver, **kw)
    assert bool(jnp.all(ys[1] == ys[2])) and bool(jnp.all(ys[3] == ys[5]))


def test_non_monotone_ts_under_vmap_names_the_element():
    batch = jnp.array([[0.0, 0.5, 1.0], [0.0, 0.5, 0.5], [0.0, 1.0, 0.5]])
    with pytest.raises(RUNTIME_ERRORS, match=r"nondecreasing or nonincreasing.*batch element 2"):
        jax.block_until_ready(jax.vmap(lambda ts: mj.odeint(decay, Y0, ts, 1.0))(batch))
    with pytest.raises(ValueError, match="nondecreasing or nonincreasing"):
        mj.odeint(decay, Y0, jnp.array([0.0, 1.0, 0.5]))


# --- complex states -------------------------------------------------------------------


@pytest.mark.parametrize("gradient,solver", [
    (mj.ACA(), mj.Dopri5()), (mj.MALI(), mj.Reversible(mj.Tsit5())), (mj.Direct(), mj.Tsit5()),
], ids=["ACA", "MALI", "Direct"])
def test_complex_state_and_gradient(gradient, solver):
    """y' = (α + iω) y: y(t) = y0 e^{(α+iω)t}; the gradient of a real loss w.r.t. the
    complex y0 and the real ω against the closed form."""
    def field(t, y, w):
        return jax.lax.complex(jnp.asarray(-0.3), w) * y

    def loss(y0, omega):
        ys = mj.odeint(field, y0, jnp.array([0.0, 2.0]), omega, solver=solver,
                       gradient=gradient, rtol=1e-10, atol=1e-10)
        return jnp.abs(ys[-1]) ** 2 + jnp.real(ys[-1])

    y0, omega = jnp.asarray(1.0 + 2.0j), jnp.asarray(1.5)
    e = np.exp((-0.3 + 1j * float(omega)) * 2.0)
    y1 = complex(y0) * e
    ys = mj.odeint(field, y0, jnp.array([0.0, 2.0]), omega, solver=solver, rtol=1e-10, atol=1e-10)
    assert ys.dtype == jnp.complex128 and abs(complex(ys[-1]) - y1) < 1e-8
    g_y0, g_w = jax.grad(loss, (0, 1))(y0, omega)
    # JAX's convention for a real loss of complex z: grad = ∂L/∂Re z − i ∂L/∂Im z, carried
    # back through the holomorphic map y1 = e·y0 by multiplying with e.
    dL_dy1 = 2 * np.conj(y1) + 1  # for L = |y1|² + Re y1
    assert abs(complex(g_y0) - dL_dy1 * e) < 1e-7
    dy1_dw = 1j * 2.0 * y1
    assert abs(float(g_w) - float(np.real(dL_dy1 * dy1_dw))) < 1e-7


# --- memory and livelock --------------------------------------------------------------


def test_buffers_larger_than_memory_are_refused_at_trace_time():
    """The dense solution keeps every step's interpolant (5 states for Tsit5): 10^7 rows
    of 1000 float64s would not fit. ACA's records are bounded (`_records`): fine."""
    def solve(a, **kw):
        return mj.solve(decay, jnp.ones(1000), TS, a, solver=mj.Tsit5(), max_steps=10**7, **kw)

    with pytest.raises(ValueError, match=r"dense solution .* max_steps=10000000: .* GiB"):
        jax.jit(lambda a: solve(a, dense=True).ys).lower(1.0)
    loss = lambda a: solve(a, gradient=mj.ACA()).ys.sum()  # noqa: E731
    temp = jax.jit(jax.grad(loss)).lower(1.0).compile().memory_analysis().temp_size_in_bytes
    assert temp < 2**30, temp


def test_rejected_step_next_to_an_output_time_shrinks_float32():
    """The float32 livelock of JAX's test_hmax: a step rejected next to t=5 (where the
    field jumps) used to be stretched back onto t=5 and retried unchanged until max_steps."""
    def rhs(t, y, args):
        return jnp.piecewise(t, [t <= 2.0, (t >= 5.0) & (t <= 7.0)],
                             [lambda s: jnp.array(1.0, jnp.float32),
                              lambda s: jnp.array(-1.0, jnp.float32),
                              lambda s: jnp.array(0.0, jnp.float32)])

    ts = jnp.array([0.0, 5.0, 10.0], jnp.float32)
    sol = mj.solve(rhs, jnp.array(0.0, jnp.float32), ts, solver=mj.Dopri5(), rtol=1.4e-8,
                   atol=1.4e-8, max_steps=16384)
    assert abs(float(sol.ys[1]) - 2.0) < 1e-4 and abs(float(sol.ys[2])) < 1e-4
    assert int(sol.stats["num_steps"]) + int(sol.stats["num_rejected"]) < 400
