"""A batch sharded over 8 simulated CPU devices runs `odeint` and its gradient as one SPMD
program, for every strategy, with the single-device results.

The devices exist only if XLA_FLAGS is set before JAX starts, so the checks run in a
subprocess (`_sharded_run.py`) and the other tests keep one device."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import reported_error

# The first three by default; the other three (each compiled in the subprocess) with -m slow.
STRATEGIES = ["Direct", "ACA", "MALI"]
SLOW_STRATEGIES = ["ANODE", "SymplecticAdjoint", "Adjoint"]


@pytest.fixture(scope="module")
def sharded(request):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    script = Path(__file__).with_name("_sharded_run.py")
    slow_deselected = "not slow" in (request.config.getoption("markexpr") or "")
    labels = STRATEGIES if slow_deselected else STRATEGIES + SLOW_STRATEGIES
    proc = subprocess.run([sys.executable, str(script), *labels], env=env, capture_output=True,
                          text=True, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT"):])


@pytest.mark.parametrize(
    "strategy", STRATEGIES + [pytest.param(s, marks=pytest.mark.slow) for s in SLOW_STRATEGIES]
)
def test_sharded_equals_single_device(sharded, strategy):
    assert sharded["devices"] == 8
    r = sharded[strategy]
    # float64; only the order of the loss's reduction differs between the two runs.
    assert r["value"] < 1e-13 and r["grad"] < 1e-13 and r["loss"] < 1e-13, r
    # The output and the gradient w.r.t. the sharded batch keep the batch sharding.
    assert r["ys_spec"] == "P('batch',)" and r["grad_y0_spec"] == "P('batch',)", r
    assert r["ys_single_devices"] == 1


def test_sharded_failure_raises_instead_of_hanging(sharded):
    assert sharded["error"] is not None and "non-finite" in sharded["error"]


def test_data_parallel_example_trains(sharded):
    ex = sharded["example"]
    assert ex["last_loss"] < 0.5 * ex["first_loss"], ex
    assert ex["spec"] == "P('batch',)"


def test_sharded_mali_reconstruction_warning(sharded):
    # Every device reports the batch's worst element (the same message from each).
    r = sharded["reconstruction"]
    assert r["messages"] and all(1e-5 < reported_error(m) < 1e-2 for m in r["messages"]), r
    assert len(set(r["messages"])) == 1 and r["spec"] == "P('batch',)", r
