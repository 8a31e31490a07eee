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
