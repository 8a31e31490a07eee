"""Per-step records in a fixed number of slots (malijax/_records.py): memory set by the
slot count, not by `max_steps`; steps past the slots replayed by the reverse sweep."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import malijax as mj
from malijax import _records
from helpers import max_rel_err, name

# Van der Pol with a parameter vector a = (ω², μ): about 100 Tsit5 steps at rtol 1e-8.
A = jnp.array([1.3, 0.7])
Y0 = jnp.array([1.0, 0.5])
TS = jnp.linspace(0.0, 6.0, 7)  # five outputs inside steps
TOL = dict(rtol=1e-8, atol=1e-10)


def vdp(t, y, a):
    return jnp.stack([y[1], -a[0] * y[0] - a[1] * y[1] * (y[0] ** 2 - 1)])


def loss(y0, a, ts, gradient, max_steps=4096):
    ys = mj.odeint(vdp, y0, ts, a, solver=mj.Tsit5(), gradient=gradient, max_steps=max_steps,
                   **TOL)
    return jnp.sum(jnp.sin(ys))


def test_slot_rule():
    small = jax.ShapeDtypeStruct((3,), jnp.float64)
    large = jax.ShapeDtypeStruct((10**6,), jnp.float64)  # 8 MB: 8 slots of 64 MiB
    assert _records.slots_for(4096, small) == _records.MAX_SLOTS
    assert _records.slots_for(16384, small) == _records.MAX_SLOTS  # not max_steps
    assert _records.slots_for(10, small) == 10 + _records.reserve_for(_records.MAX_SLOTS)
    assert _records.slots_for(4096, large) == _records.MIN_SLOTS
    assert _records.slots_for(4096, jax.ShapeDtypeStruct((2 * 10**5,), jnp.float64)) == 41
    assert _records.slots_for(4096, small, slots=12) == 12
    assert _records.slots_for(4096, small, states=False) == _records.MAX_STEP_ROWS
    assert _records.slots_for(100, small, states=False) == 100


def test_thinning_keeps_evenly_spread_steps():
    """The forward's rule, run step by step: step 0 always, then every step while the
    slots last, then every other one with the spacing doubled."""
    records = _records.Records(8)  # 6 for the forward, 2 in reserve
    row = jnp.zeros(())
    slots = records.init(row)
    for k in range(50):
        slots = records.store(slots, jnp.int32(k), jnp.float64(k), jnp.array(True))
        steps, rows, spacing = (np.asarray(x) for x in slots)
        kept = sorted(int(s) for s in steps if s >= 0 and s % spacing == 0)
        assert kept[0] == 0 and kept[-1] == k - k % spacing
        assert len(kept) >= min(k + 1, records.forward_slots // 2), (k, kept)
        assert np.all(steps[records.forward_slots:] == -1)  # the reserve is untouched
        assert np.all(rows[steps >= 0] == steps[steps >= 0])  # each row is its step's
    assert int(spacing) == 16 and kept == [0, 16, 32, 48]


@pytest.mark.parametrize("slots", [4, 10], ids=lambda s: f"slots{s}")
@pytest.mark.parametrize("gradient", [mj.ACA, mj.SymplecticAdjoint], ids=lambda g: g.__name__)
def test_gradients_past_the_slots_equal_direct(gradient, slots):
    """103 steps in 4 or 10 slots: the sweep replays the missing steps from the
    nearest stored one and gets Direct's gradient, w.r.t. y0, args and the output times
    (five of them inside steps)."""
    num_steps = int(mj.solve(vdp, Y0, TS, A, solver=mj.Tsit5(), **TOL).stats["num_steps"])
    assert num_steps > 10 * slots
    grad = jax.grad(loss, argnums=(0, 1, 2))
    got, want = grad(Y0, A, TS, gradient(slots=slots)), grad(Y0, A, TS, mj.Direct())
    assert max_rel_err(got, want) <= 1e-10


def tanh_field(t, y, a):
    return a[0] * jnp.tanh(y[::-1]) - a[1] * y


@pytest.mark.parametrize("solver", [mj.ALF(), mj.ReversibleHeun(), mj.Reversible(mj.Bosh3())],
                         ids=name)
def test_mali_past_its_step_rows_equals_direct(solver):
    """MALI keeps no states, only how each step was taken, in a ring of the latest steps
    (and step 0): past them the sweep replays from step 0. 4 rows for 13-200 steps."""
    y0, a, ts = jnp.array([1.0, 0.5]), jnp.array([1.3, 0.4]), jnp.linspace(0.0, 3.0, 4)

    def loss(y0, a, ts, gradient):
        ys = mj.odeint(tanh_field, y0, ts, a, solver=solver, gradient=gradient, rtol=1e-4,
                       atol=1e-6)
        return jnp.sum(jnp.sin(ys))

    num_steps = mj.solve(tanh_field, y0, ts, a, solver=solver, rtol=1e-4, atol=1e-6).stats
    assert int(num_steps["num_steps"]) > 10  # 13 to 200
    grad = jax.grad(loss, argnums=(0, 1, 2))
    got, want = grad(y0, a, ts, mj.MALI(slots=4)), grad(y0, a, ts, mj.Direct())
    assert max_rel_err(got, want) <= 1e-10


@pytest.mark.parametrize("solver,gradient", [
    pytest.param(mj.Tsit5(), mj.ACA(slots=6), id="ACA"),
    pytest.param(mj.Reversible(mj.Tsit5()), mj.MALI(slots=8), id="MALI", marks=pytest.mark.slow),
])
def test_vmap_with_differing_step_counts(solver, gradient):
    """Each element thins, and replays, on its own schedule."""
    a = jnp.stack([jnp.linspace(0.5, 3.0, 4), jnp.linspace(0.2, 1.5, 4)], axis=1)

    def batch_loss(a, gradient):
        def one(a):
            return jnp.sum(jnp.sin(mj.odeint(vdp, Y0, TS, a, solver=solver, gradient=gradient,
                                             **TOL)))
        return jnp.sum(jax.vmap(one)(a))

    steps = jax.vmap(lambda a: mj.solve(vdp, Y0, TS, a, solver=solver, **TOL)
                     .stats["num_steps"])(a)
    assert len(set(np.asarray(steps).tolist())) == 4 and int(steps.min()) > 40
    want = jax.grad(batch_loss)(a, mj.Direct())
    assert max_rel_err(jax.grad(batch_loss)(a, gradient), want) <= 1e-10


def _grad_temp_bytes(max_steps):
    y0 = jnp.linspace(-1.0, 1.0, 1000)

    def loss(y0):
        ys = mj.odeint(lambda t, y, k: -k * jnp.sin(y), y0, jnp.array([0.0, 1.0]), 1.3,
                       solver=mj.Tsit5(), gradient=mj.ACA(), max_steps=max_steps)
        return jnp.sum(ys[-1] ** 2)

    compiled = jax.jit(jax.grad(loss)).lower(y0).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_memory_independent_of_max_steps():
    """ACA's gradient memory at max_steps 1024 and 16384 (a 1000-float state: one state
    per step would be 7.8 and 125 MiB): the same slots, the same memory."""
    small, large = _grad_temp_bytes(1024), _grad_temp_bytes(16384)
    assert large == small, (small, large)
    assert small < 200 * 8000, small  # 128 slots and a few working states


def test_replay_costs_a_bounded_recompute():
    """Counted with a callback inside `func`: past the slots, the sweep's replays
    evaluate `func` about once more per step (measured: 1.2 forward solves with 16
    slots for 103 steps), not once per missing step per step."""
    count = [0]

    def counted(t, y, a):
        jax.debug.callback(lambda: count.__setitem__(0, count[0] + 1))
        return vdp(t, y, a)

    def evaluations(fn, *args):
        fn(*args).block_until_ready()
        jax.effects_barrier()
        count[0] = 0
        fn(*args).block_until_ready()
        jax.effects_barrier()
        return count[0]

    def solve(a, gradient):
        return mj.odeint(counted, Y0, TS, a, solver=mj.Tsit5(), gradient=gradient, **TOL)

    forward = evaluations(jax.jit(lambda a: solve(a, mj.ACA())), A)
    grads = {s: evaluations(jax.jit(jax.grad(lambda a: jnp.sum(solve(a, mj.ACA(slots=s))))), A)
             for s in (None, 16)}
    extra = (grads[16] - grads[None]) / forward
    assert 0.5 < extra <= 1.5, (forward, grads)


@pytest.mark.slow
def test_reverse_over_reverse_past_the_slots():
    """The replay inside the sweep is itself reverse-differentiated (a bounded loop)."""
    def second(gradient):
        return jax.grad(lambda a: jnp.sum(jax.grad(loss, argnums=1)(Y0, a, TS, gradient)))(A)

    assert max_rel_err(second(mj.ACA(slots=6)), second(mj.Direct())) <= 1e-9


def test_slots_must_be_an_int_of_at_least_4():
    for bad in (3, True, 4.0, -1):
        with pytest.raises(ValueError, match="slots"):
            mj.ACA(slots=bad)
