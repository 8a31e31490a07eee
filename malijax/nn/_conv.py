"""`ConvField`: a convolutional vector field for image states, fast inside solver loops.

**Why not `eqx.nn.Conv2d` directly.** XLA's CPU backend runs a convolution whose layout
is not its canonical one (input NHWC, kernel HWIO) with a slow generic loop nest when the
convolution sits inside a loop body (`lax.scan`, `lax.while_loop`: every solver here);
outside a loop it first converts the layout. Equinox's convolutions are channel-first
(NCHW, OIHW), and the convolutions that autodiff derives for their VJPs (the filter
gradient contracts over the batch) are non-canonical in any layout (jax-ml/jax#12868).
Measured on the digits ODE-Net's 8×8, 32-channel, batch-100 convolution: 8.6 ms inside a
`lax.scan` against 0.7 ms outside; the same convolution in NHWC/HWIO, transposes
included, 0.7 ms in both. Through 4 RK4 steps the gradient takes 30-37× longer inside a
scan than unrolled (`benchmarks/conv.py`).

**What `ConvField` does instead** (`conv2d_same`, `method="nhwc"`, the default): the
forward convolution and the input gradient of its hand-written VJP (a convolution with the
kernel transposed and flipped) in XLA's canonical NHWC/HWIO layout, and the filter
gradient as `k²` matrix products of the output cotangent with shifted slices of the
padded input, channel-last: as fast inside loops as outside, and only `x` and the kernel
are kept for the backward pass. Being a `jax.custom_vjp`, it has no forward mode (`jax.jvp`,
`ForwardMode`); `method="slices"` (each convolution as `k²` shifted slices stacked and
one matrix product: any transformation, about 2× slower, residuals 9× the input) and
`method="xla"` (XLA's convolution in Equinox's layout with JAX's autodiff: the choice
outside loops and, untested here, on GPUs) do.
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp


METHODS = ("nhwc", "slices", "xla")
_NHWC = ("NHWC", "HWIO", "NHWC")


def _conv_nhwc(x, kernel, padding="SAME"):
    """XLA's convolution in its canonical layout: `x` `(N, H, W, C)`, `kernel` `(kh, kw, C, O)`."""
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=_NHWC)


def _to_nhwc(x):
    return jnp.transpose(x, (0, 2, 3, 1))


def _from_nhwc(x):
    return jnp.transpose(x, (0, 3, 1, 2))


def _conv_same_from_nhwc(x_nhwc, weight):
    """`x_nhwc` ⋆ `weight` `(O, C, k, k)`, "SAME", returned channel-first `(N, O, H, W)`."""
    return _from_nhwc(_conv_nhwc(x_nhwc, jnp.transpose(weight, (2, 3, 1, 0))))


@jax.custom_vjp
def _conv_same_nchw(x, weight):
    """`x` `(N, C, H, W)` ⋆ `weight` `(O, C, k, k)`, "SAME", computed in NHWC/HWIO."""
    return _conv_same_from_nhwc(_to_nhwc(x), weight)


def _conv_same_nchw_fwd(x, weight):
    x_nhwc = _to_nhwc(x)  # kept channel-last for the filter gradient
    return _conv_same_from_nhwc(x_nhwc, weight), (x_nhwc, weight)


def _conv_same_nchw_bwd(residuals, g):
    r"""With `out[b,o,i,j] = Σ_{c,u,v} W[o,c,u,v] x̃[b,c,i+u,j+v]` (`x̃` zero-padded by
    `p = k // 2`): `∂x = ∂out ⋆ W̃` with `W̃[c,o,u,v] = W[o,c,k-1-u,k-1-v]` ("SAME"
    again, an NHWC convolution), and `∂W[o,c,u,v] = Σ_{b,i,j} ∂out[b,o,i,j]
    x̃[b,c,i+u,j+v]`: for each of the `k²` shifts `(u, v)` one matrix product
    `(B H W, O)ᵀ (B H W, C)` in channel-last layout (measured 2.4× faster than that
    contraction as one "VALID" convolution at 8×8, 3× at 32×32)."""
    x_nhwc, weight = residuals
    out_channels, in_channels, k, _ = weight.shape
    p, (n, h, w) = k // 2, x_nhwc.shape[:3]
    g_nhwc = _to_nhwc(g)
    flipped = jnp.transpose(weight[:, :, ::-1, ::-1], (2, 3, 0, 1))  # (k, k, O, C): HWIO
    dx = _from_nhwc(_conv_nhwc(g_nhwc, flipped))
    x_pad = jnp.pad(x_nhwc, [(0, 0), (p, p), (p, p), (0, 0)])
    g_rows = g_nhwc.reshape(n * h * w, out_channels)
    dw = jnp.stack([g_rows.T @ x_pad[:, u:u + h, v:v + w, :].reshape(n * h * w, in_channels)
                    for u in range(k) for v in range(k)], axis=-1)
    return dx, dw.reshape(weight.shape).astype(weight.dtype)


_conv_same_nchw.defvjp(_conv_same_nchw_fwd, _conv_same_nchw_bwd)


def conv2d_same(x, weight, bias, method="nhwc"):
    """A stride-1 "SAME" cross-correlation, as `eqx.nn.Conv2d(..., padding="SAME")`.

    `x`: `(..., C, H, W)`; `weight`: `(O, C, k, k)` with `k` odd; `bias`: `(O, 1, 1)` or
    None. `method` (see the module docstring): `"nhwc"`, XLA's convolution in its
    canonical layout with a hand-written VJP (one more such convolution and `k²`
    channel-last matrix products; fast inside loops on CPU; no forward mode);
    `"slices"`, `out[o] = W_o · [x_pad shifted by (di, dj)]_{c, di, dj}`, the `k²`
    shifts of the padded input stacked and one matrix product (every transformation);
    `"xla"`, `lax.conv_general_dilated` in this layout with JAX's autodiff (slow inside
    loops on CPU)."""
    out_channels, in_channels, k, k2 = weight.shape
    if k != k2 or k % 2 == 0:
        raise ValueError(f"conv2d_same wants an odd square kernel, got {k}x{k2}.")
    if x.shape[-3] != in_channels:
        raise ValueError(f"expected {in_channels} channels in the state's axis -3, got "
                         f"shape {x.shape}.")
    lead, (h, w) = x.shape[:-3], x.shape[-2:]
    if method in ("nhwc", "xla"):
        flat = x.reshape((-1, in_channels, h, w))
        if method == "nhwc":
            out = _conv_same_nchw(flat, weight)
        else:
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
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
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
    computed differs (`method`, `conv2d_same`): `"nhwc"` (default) is fast inside the
    solvers' loops on CPU but has no forward mode (`ForwardMode`, `jax.jvp`), for which
    take `"slices"`; `"xla"` is XLA's convolution as Equinox calls it.

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
                 activation=jax.nn.relu, time_dependent=False, method="nhwc", key,
                 dtype=None):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}.")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (a 'SAME' convolution), got {kernel_size}.")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
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
