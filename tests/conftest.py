import gc

import jax
import jax.random as jr
import pytest

# Exactness is asserted in float64; strict promotion catches silent float32 -> float64
# mixing inside the library (a float64 time must never promote a float32 state).
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def getkey():
    keys = iter(jr.split(jr.PRNGKey(0), 1000))
    return lambda: next(keys)


# The heaviest files first (seconds on 2 quiet cores, serially: 340, 240, 95, 75, 75, 60):
# `--dist loadfile` hands each of the two workers whole files in this order, so they
# finish together instead of one starting a long file as the other runs out of work.
_HEAVIEST_FIRST = ["test_gradients.py", "test_notebooks.py", "test_nn.py", "test_defaults.py",
                   "test_sharding.py", "test_batching.py", "test_odeint.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(_HEAVIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file


@pytest.fixture(autouse=True, scope="module")
def _free_compilations_after_each_file():
    """Each compiled XLA:CPU executable holds memory maps until it is freed, and a
    worker runs many files: without this, one worker passed Linux's 65,530 maps
    (`vm.max_map_count`) near the end of the suite and XLA aborted in a compile.
    Compilations are shared within a file, rarely across files."""
    yield
    jax.clear_caches()
    gc.collect()
