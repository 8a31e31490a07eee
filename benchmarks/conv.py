"""Convolutions inside solver loops: `mj.nn.ConvField` against `eqx.nn.Conv2d`.

The digits ODE-Net's block (issue: "Conv ODE-Nets"): a state of B = 100 images with 32
channels, 8×8 (`--sizes 8,32` adds 32×32, without the rows of XLA's convolutions in
Equinox's layout inside loops, which take minutes per call there),
f(y) = conv(relu(conv(y))), two 3×3
"SAME" convolutions 32 → 32, float32. The gradient of mean(y(1)²) with respect to the
block's parameters and y0, through 4 RK4 steps over [0, 1]:

- `plain JAX, unrolled`: the four RK4 steps written out in Python (no loop), the
  convolutions `eqx.nn.Conv2d` under `vmap` (XLA's convolution): the reference;
- `plain JAX, lax.scan`: the same steps as a `lax.scan` (XLA's CPU convolution VJPs
  slow down inside a loop body);
- the same two with `ConvField` (`method="nhwc"`, the default: XLA's convolutions in
  their canonical layout, with a hand-written VJP of two more), and the scan with
  `method="slices"` (shifted slices and one matrix product);
- malijax `odeint(..., solver=RK4(), num_steps=4)` with `Direct()`, `ACA()` and
  `MALI()` (on `Reversible(RK4())`, 8 evaluations per step) with `ConvField`, and
  `ACA()` with `method="slices"` and `method="xla"` (XLA's convolution in Equinox's
  layout, JAX's autodiff).

Times: one warm-up call per jitted gradient, then `--rounds` interleaved rounds (each
gradient once per round, `block_until_ready`); medians, and each row's median ratio to
the reference within rounds. Target: malijax's gradient ≤ 2× the unrolled plain-JAX one.

    # 8 min; writes benchmarks/results/conv.md
    .venv/bin/python benchmarks/conv.py --sizes 8,32 --rounds 5
"""

import argparse
import datetime
import os
import pathlib
import platform
import statistics
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp

import malijax as mj

OUT = pathlib.Path(__file__).parent / "results" / "conv.md"
BATCH, CHANNELS, STEPS = 100, 32, 4


def rk4_step(f, t, y, h):
    k1 = f(t, y)
    k2 = f(t + h / 2, y + h / 2 * k1)
    k3 = f(t + h / 2, y + h / 2 * k2)
    k4 = f(t + h, y + h * k3)
    return y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


def plain(field, y0, loop):
    """y(1) by 4 RK4 steps, written out (`loop=False`) or as a `lax.scan`."""
    f = lambda t, y: field(t, y, None)  # noqa: E731
    h = 1.0 / STEPS
    if not loop:
        y = y0
        for i in range(STEPS):
            y = rk4_step(f, i * h, y, h)
        return y

    def body(y, i):
        return rk4_step(f, i * h, y, h), None

    return jax.lax.scan(body, y0, jnp.arange(STEPS, dtype=y0.dtype))[0]


class EqxBlock(eqx.Module):
    """The same two convolutions as `eqx.nn.Conv2d` layers, vmapped over the batch."""

    convs: tuple

    def __call__(self, t, y, args):
        def one(x):
            return self.convs[1](jax.nn.relu(self.convs[0](x)))

        return jax.vmap(one)(y)


def cases(size):
    key = jax.random.key(0)
    fields = {method: mj.nn.ConvField(CHANNELS, CHANNELS, key=key, method=method)
              for method in ("nhwc", "slices", "xla")}
    eqx_block = EqxBlock(fields["nhwc"].convs)
    y0 = jax.random.normal(jax.random.key(1), (BATCH, CHANNELS, size, size), jnp.float32)
    ts = jnp.array([0.0, 1.0], jnp.float32)

    def grad_of(solve, field):
        """`(jitted gradient of mean(y(1)²) w.r.t. (params, y0), params)`."""
        params, static = eqx.partition(field, eqx.is_array)

        def loss(params, y0):
            return jnp.mean(solve(eqx.combine(params, static), y0) ** 2)

        return jax.jit(jax.grad(loss, argnums=(0, 1))), params

    def mj_solve(solver, gradient):
        return lambda field, y0: mj.odeint(field, y0, ts, solver=solver, gradient=gradient,
                                           num_steps=STEPS)[-1]

    def unrolled(f, y):
        return plain(f, y, False)

    def scanned(f, y):
        return plain(f, y, True)

    # XLA's convolutions in Equinox's layout inside loops take seconds per call at 8×8
    # (minutes at 32×32): those rows only at 8×8.
    slow_rows = size <= 8
    rows = {"plain JAX, unrolled, eqx.nn.Conv2d": grad_of(unrolled, eqx_block)}
    if slow_rows:
        rows["plain JAX, lax.scan, eqx.nn.Conv2d"] = grad_of(scanned, eqx_block)
    rows["plain JAX, unrolled, ConvField"] = grad_of(unrolled, fields["nhwc"])
    rows["plain JAX, lax.scan, ConvField"] = grad_of(scanned, fields["nhwc"])
    rows["plain JAX, lax.scan, ConvField(method='slices')"] = grad_of(scanned, fields["slices"])
    for name, solver, gradient in (("Direct", mj.RK4(), mj.Direct()),
                                   ("ACA", mj.RK4(), mj.ACA()),
                                   ("MALI", mj.Reversible(mj.RK4()), mj.MALI())):
        rows[f"malijax {name}, ConvField"] = grad_of(mj_solve(solver, gradient), fields["nhwc"])
    aca = mj_solve(mj.RK4(), mj.ACA())
    rows["malijax ACA, ConvField(method='slices')"] = grad_of(aca, fields["slices"])
    if slow_rows:
        rows["malijax ACA, ConvField(method='xla')"] = grad_of(aca, fields["xla"])
    return rows, y0


def measure(size, rounds):
    rows, y0 = cases(size)
    reference = next(iter(rows))
    out, compiled, execs = {}, {}, {}
    for label, (fn, params) in rows.items():
        start = time.perf_counter()
        execs[label] = fn.lower(params, y0).compile()
        compiled[label] = time.perf_counter() - start
        out[label] = []
        print(f"  {size}x{size} {label}: compiled in {compiled[label]:.1f} s", flush=True)
    # the warm-up calls, whose gradients are compared
    grads = {label: jax.block_until_ready(execs[label](rows[label][1], y0)) for label in rows}
    for _ in range(rounds):
        for label, (_, params) in rows.items():
            start = time.perf_counter()
            jax.block_until_ready(execs[label](params, y0))
            out[label].append(time.perf_counter() - start)
    ref_leaves = jax.tree.leaves(grads[reference])
    table = []
    for label in rows:
        ratio = statistics.median(a / b for a, b in zip(out[label], out[reference]))
        diff = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                   for a, b in zip(jax.tree.leaves(grads[label]), ref_leaves))
        table.append((label, 1e3 * statistics.median(out[label]), ratio, compiled[label], diff))
    return table


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="8", help="image sizes, comma-separated")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default=str(OUT))
    opts = parser.parse_args()
    load0, start = os.getloadavg(), time.perf_counter()
    sections = []
    for size in (int(s) for s in opts.sizes.split(",")):
        table = measure(size, opts.rounds)
        lines = [f"## {size}×{size}: B = {BATCH}, {CHANNELS} channels, 4 RK4 steps", "",
                 "| gradient through 4 RK4 steps | ms (median) | × unrolled eqx | compile s | "
                 "max rel. diff of the gradient |",
                 "|---|---|---|---|---|"]
        for label, ms, ratio, comp, diff in table:
            lines.append(f"| {label} | {ms:.1f} | {ratio:.2f} | {comp:.1f} | {diff:.1e} |")
        sections.append("\n".join(lines))
        print("\n".join(lines), flush=True)
    load1 = os.getloadavg()
    head = [
        "# Convolutions inside solver loops: `mj.nn.ConvField` against `eqx.nn.Conv2d`", "",
        f"Produced by `{' '.join(['.venv/bin/python benchmarks/conv.py'] + sys.argv[1:])}`"
        f" on {datetime.date.today()} in {(time.perf_counter() - start) / 60:.1f} min; jax "
        f"{jax.__version__}, equinox {eqx.__version__}, backend {jax.default_backend()}, "
        f"{os.cpu_count()} CPUs ({platform.machine()}), float32; load average "
        f"{load0[0]:.2f} at the start, {load1[0]:.2f} at the end. Gradient of mean(y(1)²) "
        "w.r.t. the two convolutions and y0; medians of "
        f"{opts.rounds} interleaved rounds; ratios are per-round medians. The gradients "
        "agree to float32 rounding (last column, against the first row).",
    ]
    text = "\n".join(head) + "\n\n" + "\n\n".join(sections) + "\n"
    pathlib.Path(opts.out).write_text(text)
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
