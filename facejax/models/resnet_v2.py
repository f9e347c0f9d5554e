"""ResNet V2 50/101/152 (pre-activation), exactly as keras.applications.resnet_v2 builds it."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from facejax.errors import ConfigError
from facejax.models.registry import ModelSpec
from facejax.models.resnet import conv, keras_presets, zero_pad

DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
WIDTHS = (64, 128, 256, 512)
# Keras BatchNormalization(epsilon=1.001e-5), default momentum 0.99.
LAYOUT = {"epsilon": 1.001e-5, "momentum": 0.99}


def batch_norm(n: int, *, dtype: Any, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(n, momentum=LAYOUT["momentum"], epsilon=LAYOUT["epsilon"],
                         dtype=dtype, rngs=rngs)


class PreactBottleneck(nnx.Module):
    """Keras `residual_block_v2`: BN-ReLU first, stride on the 3x3, bias on the 0/3 convs.

    The shortcut is a 1x1 conv of the pre-activation (first block of a stage only), else the
    input itself, subsampled by MaxPooling2D(1, stride) when the block strides.
    """

    def __init__(self, cin: int, width: int, stride: int, conv_shortcut: bool, *, dtype, rngs):
        cout = 4 * width
        self.stride = stride
        self.preact_bn = batch_norm(cin, dtype=dtype, rngs=rngs)
        self.conv1 = conv(cin, width, 1, 1, 0, False, dtype=dtype, rngs=rngs)
        self.bn1 = batch_norm(width, dtype=dtype, rngs=rngs)
        self.conv2 = conv(width, width, 3, stride, 1, False, dtype=dtype, rngs=rngs)
        self.bn2 = batch_norm(width, dtype=dtype, rngs=rngs)
        self.conv3 = conv(width, cout, 1, 1, 0, True, dtype=dtype, rngs=rngs)
        self.has_downsample = conv_shortcut
        if conv_shortcut:
            self.downsample_conv = conv(cin, cout, 1, stride, 0, True, dtype=dtype, rngs=rngs)

    def __call__(self, x, train: bool):
        ra = not train
        preact = nnx.relu(self.preact_bn(x, use_running_average=ra))
        if self.has_downsample:
            shortcut = self.downsample_conv(preact)
        else:
            shortcut = x[:, ::self.stride, ::self.stride] if self.stride > 1 else x
        # conv2 pads 1 on each side, as Keras' ZeroPadding2D(1) + 'valid' 3x3 conv.
        y = nnx.relu(self.bn1(self.conv1(preact), use_running_average=ra))
        y = nnx.relu(self.bn2(self.conv2(y), use_running_average=ra))
        return shortcut + self.conv3(y)


class ResNetV2(nnx.Module):
    """Pre-activation ResNet: `__call__(x, train) -> [B, 2048]` (post BN + ReLU, global avg).

    Submodules: `stem_conv` (7x7/2 with bias, no BN), `stage{i}_block{j}`, `post_bn`. As in
    Keras `stack_residual_blocks_v2`, the LAST block of stages 1-3 has stride 2 and stage 4
    does not downsample.
    """

    def __init__(self, depth: int = 50, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if depth not in DEPTHS:
            raise ConfigError(f"ResNetV2 depth must be one of {sorted(DEPTHS)}, got {depth}")
        self.stem_conv = conv(3, 64, 7, 2, 3, True, dtype=dtype, rngs=rngs)
        names, cin = [], 64
        for i, (width, n) in enumerate(zip(WIDTHS, DEPTHS[depth]), start=1):
            for j in range(1, n + 1):
                stride = 2 if (j == n and i < len(WIDTHS)) else 1
                name = f"stage{i}_block{j}"
                block = PreactBottleneck(cin, width, stride, conv_shortcut=(j == 1),
                                         dtype=dtype, rngs=rngs)
                setattr(self, name, block)
                names.append(name)
                cin = 4 * width
        self.block_names = tuple(names)
        self.post_bn = batch_norm(cin, dtype=dtype, rngs=rngs)
        self.num_features = cin

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return jnp.mean(self.feature_map(x, train), axis=(1, 2))

    def feature_map(self, x: jax.Array, train: bool = False) -> jax.Array:
        """[B,H,W,3] -> [B,h,w,F]: the post-activation map, before the global average pool."""
        x = self.stem_conv(x)
        # No ReLU before this pool, so Keras' zero padding is not -inf padding: keep it exact.
        x = nnx.max_pool(zero_pad(x, 1), (3, 3), strides=(2, 2), padding="VALID")
        for name in self.block_names:
            x = getattr(self, name)(x, train)
        return nnx.relu(self.post_bn(x, use_running_average=not train))


_KERAS = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
# keras.applications.resnet.WEIGHTS_HASHES (md5 of the top / notop files).
_KERAS_MD5 = {50: ("3ef43a0b657b3be2300d5770ece849e0", "fac2f116257151a9d068a22e544a4917"),
              101: ("6343647c601c52e1368623803854d971", "c0ed64b8031c3730f411d2eb4eea35b5"),
              152: ("a49b44d1979771252814e80f8ec446f9", "ed17cf2e0169df9d443503ef94b23b33")}


def _spec(depth: int) -> ModelSpec:
    # keras.applications.resnet_v2.preprocess_input uses mode='tf' (scale to [-1, 1]).
    presets = keras_presets(_KERAS, f"resnet{depth}v2", _KERAS_MD5[depth], input_size=224,
                            normalization="tf")
    return ModelSpec(backbone=ResNetV2, presets=presets, arch_kw={"depth": depth},
                     description=f"ResNet-{depth} V2 (Keras pre-activation layout)")


MODELS = {f"resnet{d}v2": _spec(d) for d in DEPTHS}
