"""ResNet 18-152 in two checkpoint layouts: torchvision (v1.5) and Keras applications (v1)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from facejax.errors import ConfigError
from facejax.models.registry import ModelSpec, Preset

# depth -> (block kind, blocks per stage); one table covers basic and bottleneck variants.
DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
WIDTHS = (64, 128, 256, 512)

# What differs between the two checkpoint families. flax momentum = 1 - torch momentum.
# torchvision v1.5 strides the 3x3 conv of a bottleneck; Keras v1 strides the first 1x1 conv.
LAYOUTS = {
    "torchvision": {"epsilon": 1e-5, "momentum": 0.9, "conv_bias": False,
                    "stride_first_1x1": False},
    "keras": {"epsilon": 1.001e-5, "momentum": 0.99, "conv_bias": True,
              "stride_first_1x1": True},
}

# torchvision's kaiming_normal_(mode='fan_out', nonlinearity='relu').
CONV_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def pad2d(p: int):
    """Explicit symmetric spatial padding for nnx.Conv / pooling (never 'SAME')."""
    return ((p, p), (p, p))


def conv(cin: int, cout: int, k: int, stride: int, pad: int, bias: bool, *, dtype: Any,
         rngs: nnx.Rngs) -> nnx.Conv:
    return nnx.Conv(cin, cout, (k, k), strides=(stride, stride), padding=pad2d(pad),
                    use_bias=bias, dtype=dtype, kernel_init=CONV_INIT, rngs=rngs)


def batch_norm(n: int, layout: dict, *, dtype: Any, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(n, momentum=layout["momentum"], epsilon=layout["epsilon"],
                         dtype=dtype, rngs=rngs)


def zero_pad(x: jax.Array, p: int) -> jax.Array:
    """Keras ZeroPadding2D(p) on NHWC."""
    return jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))


class BasicBlock(nnx.Module):
    """Two 3x3 convs; the stride is on the first (same in both layouts)."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int, layout: dict, *, dtype, rngs):
        bias = layout["conv_bias"]
        self.conv1 = conv(cin, width, 3, stride, 1, bias, dtype=dtype, rngs=rngs)
        self.bn1 = batch_norm(width, layout, dtype=dtype, rngs=rngs)
        self.conv2 = conv(width, width, 3, 1, 1, bias, dtype=dtype, rngs=rngs)
        self.bn2 = batch_norm(width, layout, dtype=dtype, rngs=rngs)
        self.has_downsample = stride != 1 or cin != width
        if self.has_downsample:
            self.downsample_conv = conv(cin, width, 1, stride, 0, bias, dtype=dtype, rngs=rngs)
            self.downsample_bn = batch_norm(width, layout, dtype=dtype, rngs=rngs)

    def __call__(self, x, train: bool):
        ra = not train
        y = nnx.relu(self.bn1(self.conv1(x), use_running_average=ra))
        y = self.bn2(self.conv2(y), use_running_average=ra)
        if self.has_downsample:
            x = self.downsample_bn(self.downsample_conv(x), use_running_average=ra)
        return nnx.relu(x + y)


class Bottleneck(nnx.Module):
    """1x1 -> 3x3 -> 1x1 (x4). The stride sits on the 3x3 (v1.5) or the first 1x1 (v1)."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int, layout: dict, *, dtype, rngs):
        bias = layout["conv_bias"]
        s1, s3 = (stride, 1) if layout["stride_first_1x1"] else (1, stride)
        cout = width * self.expansion
        self.conv1 = conv(cin, width, 1, s1, 0, bias, dtype=dtype, rngs=rngs)
        self.bn1 = batch_norm(width, layout, dtype=dtype, rngs=rngs)
        self.conv2 = conv(width, width, 3, s3, 1, bias, dtype=dtype, rngs=rngs)
        self.bn2 = batch_norm(width, layout, dtype=dtype, rngs=rngs)
        self.conv3 = conv(width, cout, 1, 1, 0, bias, dtype=dtype, rngs=rngs)
        self.bn3 = batch_norm(cout, layout, dtype=dtype, rngs=rngs)
        self.has_downsample = stride != 1 or cin != cout
        if self.has_downsample:
            self.downsample_conv = conv(cin, cout, 1, stride, 0, bias, dtype=dtype, rngs=rngs)
            self.downsample_bn = batch_norm(cout, layout, dtype=dtype, rngs=rngs)

    def __call__(self, x, train: bool):
        ra = not train
        y = nnx.relu(self.bn1(self.conv1(x), use_running_average=ra))
        y = nnx.relu(self.bn2(self.conv2(y), use_running_average=ra))
        y = self.bn3(self.conv3(y), use_running_average=ra)
        if self.has_downsample:
            x = self.downsample_bn(self.downsample_conv(x), use_running_average=ra)
        return nnx.relu(x + y)


class ResNet(nnx.Module):
    """ResNet backbone: `__call__(x [B,H,W,3], train) -> [B, num_features]` global-avg-pooled.

    Submodules: `stem_conv`, `stem_bn`, `stage{1..4}_block{j}` (each with conv1/bn1/...,
    `downsample_conv`/`downsample_bn`). The two layouts differ in stride placement, conv
    bias, BatchNorm eps/momentum and how the stem pads (see `__call__`).
    """

    def __init__(self, depth: int = 50, layout: str = "torchvision", *, dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        if depth not in DEPTHS:
            raise ConfigError(f"ResNet depth must be one of {sorted(DEPTHS)}, got {depth}")
        if layout not in LAYOUTS:
            raise ConfigError(f"ResNet layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
        kind, stages = DEPTHS[depth]
        block_cls = BasicBlock if kind == "basic" else Bottleneck
        lay = LAYOUTS[layout]
        self.layout = layout
        # Keras pads explicitly (ZeroPadding2D) and convolves 'valid'; torchvision pads in the
        # conv. Numerically the same for the conv, so both use padding 3 in the conv itself.
        self.stem_conv = conv(3, 64, 7, 2, 3, lay["conv_bias"], dtype=dtype, rngs=rngs)
        self.stem_bn = batch_norm(64, lay, dtype=dtype, rngs=rngs)
        names, cin = [], 64
        for i, (width, n) in enumerate(zip(WIDTHS, stages), start=1):
            for j in range(1, n + 1):
                stride = 2 if (j == 1 and i > 1) else 1
                name = f"stage{i}_block{j}"
                setattr(self, name, block_cls(cin, width, stride, lay, dtype=dtype, rngs=rngs))
                names.append(name)
                cin = width * block_cls.expansion
        self.block_names = tuple(names)
        self.num_features = cin

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return jnp.mean(self.feature_map(x, train), axis=(1, 2))

    def feature_map(self, x: jax.Array, train: bool = False) -> jax.Array:
        """[B,H,W,3] -> [B,h,w,F]: the last stage's map, before the global average pool."""
        x = nnx.relu(self.stem_bn(self.stem_conv(x), use_running_average=not train))
        if self.layout == "keras":
            # ZeroPadding2D(1) + MaxPooling2D(3, 2, 'valid'); after the ReLU zeros == -inf pads.
            x = nnx.max_pool(zero_pad(x, 1), (3, 3), strides=(2, 2), padding="VALID")
        else:  # torch MaxPool2d(3, 2, padding=1) pads with -inf
            x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=pad2d(1))
        for name in self.block_names:
            x = getattr(self, name)(x, train)
        return x


_TV = "https://download.pytorch.org/models/"
_KERAS = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
# torchvision IMAGENET1K_V1 files; the 8 hex digits in each name are the sha256 prefix.
_TV_FILES = {18: "resnet18-f37072fd.pth", 34: "resnet34-b627a593.pth",
             50: "resnet50-0676ba61.pth", 101: "resnet101-63fe2227.pth",
             152: "resnet152-394f9c45.pth"}
# keras.applications.resnet.WEIGHTS_HASHES (md5 of the top / notop files).
_KERAS_MD5 = {50: ("2cb95161c43110f7111970584f804107", "4d473c1dd8becc155b73f8504c6f6626"),
              101: ("f1aeb4b969a6efcfb50fad2f0c20cfc5", "88cf7a10940856eca736dc7b7e228a21"),
              152: ("100835be76be38e30d865e96f2aaae62", "ee4c566cf9a93f14d82f913c2dc6dd0c")}


def torchvision_preset(filename: str, **kw) -> Preset:
    return Preset(input_size=224, normalization="torch", converter="torchvision",
                  url=_TV + filename, filename=filename, sha256_prefix=filename[-12:-4],
                  num_classes=1000, **kw)


def keras_presets(base_url: str, stem: str, md5: tuple[str, str], **kw) -> dict[str, Preset]:
    """'keras' (with the ImageNet classifier) and 'keras_notop' presets of a Keras file pair."""
    out = {}
    for source, suffix, digest, classes in (("keras", "", md5[0], 1000),
                                            ("keras_notop", "_notop", md5[1], 0)):
        filename = f"{stem}_weights_tf_dim_ordering_tf_kernels{suffix}.h5"
        out[source] = Preset(converter="keras", url=base_url + filename, filename=filename,
                             md5=digest, num_classes=classes, **kw)
    return out


def _spec(depth: int) -> ModelSpec:
    presets = {"torchvision": torchvision_preset(_TV_FILES[depth])}
    if depth in _KERAS_MD5:
        presets.update(keras_presets(_KERAS, f"resnet{depth}", _KERAS_MD5[depth],
                                     input_size=224, normalization="caffe",
                                     arch_kw={"layout": "keras"}))
    return ModelSpec(backbone=ResNet, presets=presets, arch_kw={"depth": depth},
                     description=f"ResNet-{depth} (torchvision v1.5 or Keras v1 layout)")


MODELS = {f"resnet{d}": _spec(d) for d in DEPTHS}
