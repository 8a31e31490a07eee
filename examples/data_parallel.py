"""Train a `NeuralODE` data-parallel over every local device, as one SPMD program.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/data_parallel.py

(the flag simulates 8 devices on a CPU; on a multi-GPU machine drop it). The batch of
trajectories is split over the devices along its first axis with a `NamedSharding`;
the model and optimiser state are replicated. `jax.jit` then compiles one program in
which each device integrates its own examples (each with its own adaptive steps under
`vmap`) and the gradients are summed across devices by XLA's all-reduce: nothing here
is specific to malijax beyond `odeint` keeping the batch sharded.
"""

import argparse
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

sys.path.insert(0, str(Path(__file__).parent))
from train_neural_ode import STRATEGIES, spiral_data  # noqa: E402

import malijax as mj  # noqa: E402


def train(gradient="mali", steps=200, *, batch_per_device=8, learning_rate=3e-3, seed=0,
          num_steps=4, verbose=True):
    """Returns `{"losses", "model", "predictions"}`; `predictions` keep the batch sharding."""
    devices = np.array(jax.devices())
    mesh = Mesh(devices, ("batch",))
    batch = NamedSharding(mesh, PartitionSpec("batch"))
    replicated = NamedSharding(mesh, PartitionSpec())

    data_key, model_key = jr.split(jr.key(seed))
    ts, y0s, ys = spiral_data(data_key, batch_per_device * devices.size, 16, 4.0)
    y0s, ys = jax.device_put((y0s, ys), batch)
    ts = jax.device_put(ts, replicated)

    grad_strategy, solver = STRATEGIES[gradient]
    model = mj.nn.NeuralODE(
        mj.nn.MLPField(2, 32, 2, key=model_key, time_dependent=False, dtype=ys.dtype),
        solver=solver, gradient=grad_strategy, num_steps=num_steps,
    )
    optimizer = optax.adam(learning_rate)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    model, opt_state = eqx.filter_shard((model, opt_state), replicated)

    def predict(model, y0s):
        return jax.vmap(lambda y0: model(y0, ts))(y0s)

    @eqx.filter_jit
    def step(model, opt_state, y0s, ys):
        def loss_fn(model):
            return jnp.mean((predict(model, y0s) - ys) ** 2)

        loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
        updates, opt_state = optimizer.update(grads, opt_state, model)
        model = eqx.apply_updates(model, updates)
        return eqx.filter_shard((model, opt_state), replicated) + (loss,)

    losses = []
    for i in range(steps):
        model, opt_state, loss = step(model, opt_state, y0s, ys)
        losses.append(float(loss))
        if verbose and (i % max(steps // 10, 1) == 0 or i == steps - 1):
            print(f"step {i:5d}  loss {losses[-1]:.4e}", flush=True)
    predictions = eqx.filter_jit(predict)(model, y0s)
    return {"losses": losses, "model": model, "predictions": predictions}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gradient", choices=sorted(STRATEGIES), default="mali")
    parser.add_argument("--steps", type=int, default=200)
    a = parser.parse_args()
    print(f"{jax.device_count()} devices: {jax.devices()}")
    out = train(a.gradient, a.steps)
    print(f"loss {out['losses'][0]:.4e} -> {out['losses'][-1]:.4e}; "
          f"predictions sharded as {out['predictions'].sharding.spec}")


if __name__ == "__main__":
    main()
