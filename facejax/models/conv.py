"""`nnx.Conv`'s convolution, rewritten where XLA:CPU's own kernels are slow.

In a train step on XLA:CPU (jax 0.10.2), the weight gradient of a 1x1, stride-1 convolution
computed as the plain matmul it is,

    dW[0, 0] = sum over (b, h, w) of x[b, h, w, :]^T g[b, h, w, :]

is 4-6x faster than XLA's own convolution-shaped gradient (`bench/conv_grad.py`), and made
ResNet50's and DenseNet121's whole train steps 1.22-1.27x faster (BENCHMARKS.md, "Conv weight
gradients and unpadded convs on XLA:CPU"). `conv_general_dilated` is a drop-in for
`lax.conv_general_dilated` that `use_cpu_conv_rewrites` gives every `nnx.Conv` of a model. For
those layers it changes only that gradient: the forward pass and the input gradient are XLA's
own (the same values as before), the weight gradient equals XLA's up to float summation order
(tests/test_conv_grad.py).

Unpadded ('VALID') stride-1 k x k convolutions (the scratch CNN's second conv of each block,
Inception's stem) run as the padded convolution cropped to the same window: XLA:CPU's padded
kernels were 2.4-3.0x faster forward and 1.3-1.7x forward + backward than its unpadded ones
(`bench/conv_grad.py`), for the same sums (values within 1e-5); the scratch CNN's train step
1.24-1.38x.

Everything else takes XLA's path: padded or even k x k kernels, strides, groups (depthwise),
dilation, other layouts, and every platform but the CPU. The platform is picked when lowered
(`lax.platform_dependent`), so a multi-platform export (retrieval/embed.py) carries both forms.

The same per-tap matmuls for k x k kernels were 0.75-1.4x XLA's alone and slower inside the
step (each tap's strided slice of the input is a copy: ResNet18's step 0.82-0.88x, twice the
memory), and one matmul over `conv_general_dilated_patches` was worse (0.64x), so k x k
kernels keep XLA's gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

_DN = ("NHWC", "HWIO", "NHWC")


def _ones(v) -> bool:
    return v is None or all(int(d) == 1 for d in v)


def _pads(padding, kernel_hw) -> tuple | None:
    """Explicit ((lo, hi), (lo, hi)) for an explicit or 'VALID' padding (stride 1), else None."""
    if isinstance(padding, str):
        if padding.upper() == "VALID" or (padding.upper() == "SAME" and kernel_hw == (1, 1)):
            return ((0, 0), (0, 0))
        return None
    try:
        return tuple((int(lo), int(hi)) for lo, hi in padding)
    except (TypeError, ValueError):
        return None


def _dense_nhwc_stride1(lhs, rhs, window_strides, lhs_dilation, rhs_dilation,
                        dimension_numbers, feature_group_count, batch_group_count,
                        preferred_element_type, kw) -> bool:
    """A plain 2-D NHWC/HWIO stride-1 convolution (no dilation, groups or output dtype or
    sharding of its own): what this module may rewrite on the CPU."""
    return (getattr(lhs, "ndim", 0) == 4
            and getattr(rhs, "ndim", 0) == 4 and _ones(window_strides)
            and _ones(lhs_dilation) and _ones(rhs_dilation)
            and feature_group_count == 1 and batch_group_count == 1
            and preferred_element_type is None and kw.get("out_sharding") is None
            and dimension_numbers is not None
            and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
            == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _DN))


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None,
                         **kw):
    """`lax.conv_general_dilated`; on the CPU a 1x1 stride-1 unpadded convolution gets a
    matmul weight gradient, and an unpadded stride-1 odd k x k one runs padded and cropped.

    The platform is chosen when the function is lowered (`lax.platform_dependent`), not by
    the backend that traced it: an embedder exported on a GPU box for cpu, cuda and tpu takes
    the CPU forms on a laptop, and one exported on a laptop runs XLA's own on a GPU."""
    def xla(lhs, rhs):
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, batch_group_count=batch_group_count,
            precision=precision, preferred_element_type=preferred_element_type, **kw)

    plain = _dense_nhwc_stride1(lhs, rhs, window_strides, lhs_dilation, rhs_dilation,
                                dimension_numbers, feature_group_count, batch_group_count,
                                preferred_element_type, kw)
    kernel_hw = tuple(rhs.shape[:2]) if plain else None
    pads = _pads(padding, kernel_hw) if plain else None
    if pads != ((0, 0), (0, 0)):
        return xla(lhs, rhs)
    if kernel_hw == (1, 1):
        def cpu(lhs, rhs):
            return _conv1x1(lhs, rhs, precision)
    elif kernel_hw[0] % 2 == 1 and kernel_hw[1] % 2 == 1:
        def cpu(lhs, rhs):
            # A padded ('SAME') convolution cropped to the unpadded one's window: the same
            # sums, on XLA:CPU 2.4-3.0x faster forward and 1.3-1.7x forward + backward.
            ph, pw = kernel_hw[0] // 2, kernel_hw[1] // 2
            y = lax.conv_general_dilated(lhs, rhs, (1, 1), ((ph, ph), (pw, pw)),
                                         dimension_numbers=_DN, precision=precision)
            return y[:, ph:y.shape[1] - ph, pw:y.shape[2] - pw, :]
    else:
        return xla(lhs, rhs)
    return lax.platform_dependent(lhs, rhs, cpu=cpu, default=xla)


def _plain_conv1x1(x, w, precision):
    return lax.conv_general_dilated(x, w, (1, 1), ((0, 0), (0, 0)), dimension_numbers=_DN,
                                    precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv1x1(x, w, precision):
    return _plain_conv1x1(x, w, precision)


def _conv1x1_fwd(x, w, precision):
    return _plain_conv1x1(x, w, precision), (x, w)


def _conv1x1_bwd(precision, res, g):
    x, w = res
    dx, = jax.linear_transpose(lambda x_: _plain_conv1x1(x_, w, precision), x)(g)
    dw = jnp.einsum("bhwc,bhwf->cf", x, g, precision=precision,
                    preferred_element_type=jnp.float32)
    return dx, dw.reshape(w.shape).astype(w.dtype)


_conv1x1.defvjp(_conv1x1_fwd, _conv1x1_bwd)


def use_cpu_conv_rewrites(model: nnx.Module) -> nnx.Module:
    """Gives every `nnx.Conv` in `model` this module's `conv_general_dilated` (in place);
    returns `model`. Parameters and their tree are unchanged; forward values too, up to float
    order for the unpadded k x k layers."""
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Conv) and node.conv_general_dilated is lax.conv_general_dilated:
            node.conv_general_dilated = conv_general_dilated
    return model
