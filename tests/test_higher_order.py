"""Higher-order and forward-mode differentiation (issue 12).

Reverse over reverse: `grad(grad(.))` through every custom-VJP strategy, on adaptive
steps (where the forward and the reverse sweep switch to bounded loops,
`malijax/_transforms.py`) and on `num_steps` grids, equals central finite differences
of the strategy's own first-order gradient. Forward mode: `mj.ForwardMode()` equals
`Direct`'s reverse-mode Jacobian; the custom-VJP strategies refuse `jacfwd` with
advice. The counting of reverse-mode levels is pinned, since it reads JAX internals.
"""

import jax
import jax.numpy as jnp
import pytest

import malijax as mj
from malijax._transforms import reverse_levels


def field(t, y, a):
    return -a * y + jnp.sin(t) * y**2


Y0 = jnp.array([1.0, 0.5])
TS = jnp.array([0.0, 0.5, 1.0])
# Small bounds keep the bounded loops (nested scans, depth log16(max_steps)) cheap to compile.
ADAPTIVE = dict(rtol=1e-8, atol=1e-8, max_steps=256)


def loss(a, gradient, solver, kw):
    ys = mj.odeint(field, Y0, TS, a, solver=solver, gradient=gradient, **kw)
    return jnp.sum(ys[-1] ** 2) + jnp.sum(jnp.sin(ys[1]))


def _case(gradient, solver, kw, *, slow=False, id):
    marks = [pytest.mark.slow] if slow else []
    return pytest.param(gradient, solver, kw, marks=marks, id=id)


CASES = [
    _case(mj.ACA(), mj.Tsit5(), ADAPTIVE, id="ACA-adaptive"),  # the default's, and compat's
    _case(mj.MALI(), mj.Reversible(mj.Tsit5()), ADAPTIVE, slow=True, id="MALI-adaptive"),
    _case(mj.ANODE(checkpoints=4), mj.RK4(), dict(num_steps=8), id="ANODE4-grid"),
    _case(mj.SymplecticAdjoint(), mj.Dopri5(), ADAPTIVE, slow=True, id="Symplectic-adaptive"),
    _case(mj.ANODE(), mj.Dopri5(), ADAPTIVE, slow=True, id="ANODE-adaptive"),
    _case(mj.ANODE(checkpoints=4), mj.Dopri5(), ADAPTIVE, slow=True, id="ANODE4-adaptive"),
    _case(mj.ANODE(), mj.RK4(), dict(num_steps=8), slow=True, id="ANODE-grid"),
    _case(mj.MALI(), mj.ALF(eta=0.9), dict(num_steps=8), slow=True, id="MALI-ALF-grid"),
    _case(mj.ACA(), mj.Dopri5(), dict(step_size=0.1, max_steps=64), slow=True, id="ACA-step_size"),
    _case(mj.Adjoint(), mj.Dopri5(), ADAPTIVE, slow=True, id="Adjoint-adaptive"),
]


@pytest.mark.parametrize("gradient,solver,kw", CASES)
def test_reverse_over_reverse_equals_finite_differences(gradient, solver, kw):
    """d²L/da² by grad(grad) against central differences of the same strategy's
    first-order gradient: the adaptive steps stay the same within ±1e-5 at these
    tolerances, so the differences see one discretisation (error O(eps²) ≈ 1e-10)."""
    first = jax.jit(jax.grad(lambda a: loss(a, gradient, solver, kw)))
    second = jax.jit(jax.grad(lambda a: jax.grad(lambda b: loss(b, gradient, solver, kw))(a)))
    a, eps = 0.7, 1e-5
    want = (first(a + eps) - first(a - eps)) / (2 * eps)
    got = second(a)
    # Differences also see the adaptive step sizes move with `a` (AD holds them fixed):
    # measured 1.7e-8 relative with steps landing on ts[1], 1.0e-7 with ts[1] interpolated
    # (Dopri5, 8 steps). Direct's own reverse over reverse sees exactly the same steps.
    assert abs(float(got - want)) <= 1e-6 * abs(float(want)), (float(got), float(want))
    if "rtol" in kw and not isinstance(gradient, mj.Adjoint):
        exact = jax.grad(jax.grad(lambda b: loss(b, mj.Direct(), solver, kw)))(a)
        assert abs(float(got - exact)) <= 1e-10 * abs(float(exact)), (float(got), float(exact))
    # and the first-order gradient inside is the strategy's own (vs Direct's, to rounding)
    direct = jax.grad(lambda a: loss(a, mj.Direct(), solver, kw))(a)
    tol = 1e-4 if isinstance(gradient, mj.Adjoint) else 1e-10
    assert abs(float(first(a) - direct)) <= tol * abs(float(direct))


@pytest.mark.slow  # the ACA-adaptive case above checks reverse over reverse by default
def test_reverse_over_reverse_through_compat_matches_jax():
    """The second derivative of a compat solve by reverse over reverse equals central
    differences of its first-order gradient, and jax.experimental.ode's."""
    from jax.experimental.ode import odeint as jax_odeint

    def f(y, t, a):
        return -a * y + jnp.sin(t) * y**2

    def l(odeint, a):
        return jnp.sum(odeint(f, Y0, TS, a, rtol=1e-10, atol=1e-10, mxstep=64) ** 2)

    first = jax.jit(jax.grad(lambda a: l(mj.compat.odeint, a)))
    ours = jax.grad(jax.grad(lambda a: l(mj.compat.odeint, a)))(0.7)
    theirs = jax.grad(jax.grad(lambda a: l(jax_odeint, a)))(0.7)
    fd = (first(0.7 + 1e-5) - first(0.7 - 1e-5)) / 2e-5
    assert abs(float(ours - fd)) <= 1e-7 * abs(float(fd))
    assert abs(float(ours - theirs)) <= 1e-6 * abs(float(theirs))


@pytest.mark.slow
def test_hessian_forward_over_reverse_keeps_plain_loops():
    """jax.hessian (forward over reverse) needs no bounded loop and agrees with grad(grad)."""
    g = lambda a: loss(a, mj.ACA(), mj.Tsit5(), ADAPTIVE)  # noqa: E731
    assert abs(float(jax.hessian(g)(0.7) - jax.grad(jax.grad(g))(0.7))) <= 1e-9


def test_reverse_levels_are_counted():
    """Pins the reading of JAX's tracers: one level per enclosing reverse-mode
    differentiation the inputs carry, forward mode and vmap not counted."""
    seen = []

    def f(x):
        seen.append(reverse_levels(x))
        return jnp.sin(x)

    x = jnp.array(0.3)
    f(x)
    jax.grad(f)(x)
    jax.grad(jax.grad(f))(x)
    jax.jacfwd(jax.grad(f))(x)
    jax.grad(lambda y: jax.vmap(jax.grad(f))(y * jnp.ones(2)).sum())(x)
    jax.jvp(f, (x,), (x,))
    assert seen == [0, 1, 2, 1, 2, 0]

    # a closed-over tracer counts: the outer level only reaches the solve through func
    def outer(p):
        return jax.grad(lambda y0: mj.odeint(lambda t, y, a: -p * y, y0, TS,
                                             solver=mj.Tsit5(), max_steps=64)[-1])(1.0)

    h = jax.grad(outer)(0.5)  # d/dp (d/dy0 y0 e^{-p}) = -e^{-p}, to the solver tolerance
    assert abs(float(h) + float(jnp.exp(-0.5))) <= 1e-4


@pytest.mark.parametrize("kw", [ADAPTIVE, dict(num_steps=8),
                                pytest.param(dict(step_size=0.1, max_steps=64), marks=pytest.mark.slow)],
                         ids=["adaptive", "num_steps", "step_size"])
def test_forward_mode_equals_reverse_jacobian(kw):
    def sol(a, gradient):
        return mj.odeint(field, Y0, TS, a, solver=mj.Tsit5(), gradient=gradient, **kw)

    fwd = jax.jacfwd(sol)(0.7, mj.ForwardMode())
    rev = jax.jacrev(sol)(0.7, mj.Direct())
    assert float(jnp.max(jnp.abs(fwd - rev))) <= 1e-13
    # and reverse mode through ForwardMode still works (it switches to a bounded loop)
    g = jax.grad(lambda a: jnp.sum(sol(a, mj.ForwardMode())))(0.7)
    assert abs(float(g - jnp.sum(rev))) <= 1e-13


def test_custom_vjp_strategies_refuse_forward_mode_with_advice():
    def sol(a, gradient):
        return mj.odeint(field, Y0, TS, a, solver=mj.Tsit5(), gradient=gradient, max_steps=64)

    for gradient in (mj.ACA(), mj.MALI(), mj.Adjoint(), mj.SymplecticAdjoint()):
        solver = mj.Reversible(mj.Tsit5()) if isinstance(gradient, mj.MALI) else mj.Tsit5()
        with pytest.raises(TypeError, match="can't apply forward-mode.*mj.ForwardMode"):
            jax.jacfwd(lambda a: mj.odeint(field, Y0, TS, a, solver=solver, gradient=gradient))(0.7)
    # ANODE() on a grid is JAX's own AD of a scan: forward mode works
    j = jax.jacfwd(lambda a: mj.odeint(field, Y0, TS, a, solver=mj.RK4(), gradient=mj.ANODE(),
                                       num_steps=4))(0.7)
    d = jax.jacrev(lambda a: mj.odeint(field, Y0, TS, a, solver=mj.RK4(), gradient=mj.Direct(),
                                       num_steps=4))(0.7)
    assert float(jnp.max(jnp.abs(j - d))) <= 1e-13
