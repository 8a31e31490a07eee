"""`ConvField`: a convolutional vector field for image states, fast inside solver loops.

**Why not `eqx.nn.Conv2d` directly.** XLA's CPU backend runs a convolution's VJP several
times slower inside a loop body (`lax.scan`, `lax.while_loop`: every solver here) than
outside one: measured on an 8×8, 32-channel, batch-100 block, input VJP 35 ms against
5.4 ms, filter VJP 57 ms against 8.7 ms, while the forward convolution is not slowed.
A 3×3 "SAME" convolution is also `k²` shifted slices of the zero-padded input stacked
along the channels and one matrix product with the reshaped filter (im2col); its VJP is
slices, pads and two matrix products, which XLA runs at full speed anywhere.
`benchmarks/conv.py` measures both forms in and out of loops.
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp


def conv2d_same(x, weight, bias, method="slices"):
    """A stride-1 "SAME" cross-correlation, as `eqx.nn.Conv2d(..., padding="SAME")`.

    `x`: `(..., C, H, W)`; `weight`: `(O, C, k, k)` with `k` odd; `bias`: `(O, 1, 1)` or
    None. `method="slices"`: `out[o] = W_o · [x_pad shifted by (di, dj)]_{c, di, dj}`, the
    `k²` shifts of the padded input stacked and one matrix product; `"xla"`:
    `lax.conv_general_dilated` (XLA's convolution: the faster form on GPUs and outside
    loops)."""
    out_channels, in_channels, k, k2 = weight.shape
    if k != k2 or k % 2 == 0:
        raise ValueError(f"conv2d_same wants an odd square kernel, got {k}x{k2}.")
    if x.shape[-3] != in_channels:
        raise ValueError(f"expected {in_channels} channels in the state's axis -3, got "
                         f"shape {x.shape}.")
    lead, (h, w) = x.shape[:-3], x.shape[-2:]
    if method == "xla":
        flat = x.reshape((-1, in_channels, h, w))
        out = jax.lax.conv_general_dilated(flat, weight, (1, 1), "SAME")
        out = out.reshape(lead + (out_channels, h, w))
    elif method == "slices":
        p = k // 2
        pad = [(0, 0)] * (x.ndim - 2) + [(p, p), (p, p)]
        xp = jnp.pad(x, pad)
        shifts = [xp[..., di:di + h, dj:dj + w] for di in range(k) for dj in range(k)]
        # (..., C, k², H, W) -> (..., C k², H W): the filter's (C, kh, kw) order.
        patches = jnp.stack(shifts, axis=-3).reshape(lead + (in_channels * k * k, h * w))
        out = jnp.einsum("ok,...kp->...op", weight.reshape(out_channels, -1), patches)
        out = out.reshape(lead + (out_channels, h, w))
    else:
        raise ValueError(f"method must be 'slices' or 'xla', got {method!r}.")
    return out if bias is None else out + bias.reshape((1,) * len(lead) + bias.shape)


class ConvField(eqx.Module):
    r"""`f(t, y)` for an image state `y` of shape `(channels, H, W)` (or with leading
    batch axes, `(B, channels, H, W)`): `depth` 3×3 "SAME" convolutions,
    `channels → hidden_channels → … → channels`, with `activation` between them,

        f(t, y) = conv_d(σ(conv_{d-1}(… σ(conv_1(y)) …))),

    the ODE block of the ODE-Net papers (Chen et al. 2018; Zhuang et al. 2020, 2021).
    With `time_dependent=True` every convolution also sees `t` as one more constant
    input channel (torchdiffeq's `ConcatConv2d`). Parameters are `eqx.nn.Conv2d` layers
    (`self.convs`), so the numbers equal that stack's; only how each convolution is
    computed differs (`method`, `conv2d_same`): `"slices"` (default) is fast inside
    the solvers' loops on CPU, `"xla"` is XLA's convolution.

    ```python
    field = mj.nn.ConvField(32, 32, key=jax.random.key(0))
    y = mj.odeint(field, jnp.ones((100, 32, 8, 8)), jnp.array([0.0, 1.0]))
    ```
    """

    convs: tuple[eqx.nn.Conv2d, ...]
    activation: Callable = eqx.field(static=True)
    time_dependent: bool = eqx.field(static=True)
    method: str = eqx.field(static=True)

    def __init__(self, channels, hidden_channels, *, depth=2, kernel_size=3,
                 activation=jax.nn.relu, time_dependent=False, method="slices", key,
                 dtype=None):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}.")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (a 'SAME' convolution), got {kernel_size}.")
        if method not in ("slices", "xla"):
            raise ValueError(f"method must be 'slices' or 'xla', got {method!r}.")
        sizes = [channels] + [hidden_channels] * (depth - 1) + [channels]
        keys = jax.random.split(key, depth)
        extra = int(time_dependent)
        self.convs = tuple(
            eqx.nn.Conv2d(c_in + extra, c_out, kernel_size, padding="SAME", key=k, dtype=dtype)
            for c_in, c_out, k in zip(sizes[:-1], sizes[1:], keys)
        )
        self.activation = activation
        self.time_dependent = time_dependent
        self.method = method

    def __call__(self, t, y, args):
        del args
        for i, conv in enumerate(self.convs):
            if i > 0:
                y = self.activation(y)
            x = y
            if self.time_dependent:
                shape = y.shape[:-3] + (1,) + y.shape[-2:]
                t_channel = jnp.broadcast_to(jnp.asarray(t, y.dtype), shape)
                x = jnp.concatenate([y, t_channel], axis=-3)
            y = conv2d_same(x, conv.weight, conv.bias, self.method)
        return y
