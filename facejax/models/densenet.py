"""DenseNet-121/169 (Huang et al.), in Keras applications and torchvision layouts.

Both layouts build the same graph: 7x7/2 stem (BN, ReLU, 3x3/2 max pool), dense blocks whose
layers are BN-ReLU-1x1 (4k) -> BN-ReLU-3x3 (k) with the output concatenated onto the input, and
BN-ReLU-1x1 (half the channels)-2x2 average-pool transitions; a final BN + ReLU + global
average. Only BatchNorm's eps/momentum differ (`LAYOUTS`). The max pool follows a ReLU, so
Keras' ZeroPadding2D(1) and torch's -inf padding give the same result.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from facejax.errors import ConfigError
from facejax.models.registry import ModelSpec
from facejax.models.resnet import conv, keras_presets, torchvision_preset, zero_pad

BLOCKS = {121: (6, 12, 24, 16), 169: (6, 12, 32, 32)}
GROWTH = 32
LAYOUTS = {"keras": {"epsilon": 1.001e-5, "momentum": 0.99},
           "torchvision": {"epsilon": 1e-5, "momentum": 0.9}}


class DenseLayer(nnx.Module):
    """BN-ReLU-conv1x1(4k)-BN-ReLU-conv3x3(k); returns only the k new channels."""

    def __init__(self, cin: int, bn: dict, *, dtype, rngs):
        self.bn1 = nnx.BatchNorm(cin, **bn, dtype=dtype, rngs=rngs)
        self.conv1 = conv(cin, 4 * GROWTH, 1, 1, 0, False, dtype=dtype, rngs=rngs)
        self.bn2 = nnx.BatchNorm(4 * GROWTH, **bn, dtype=dtype, rngs=rngs)
        self.conv2 = conv(4 * GROWTH, GROWTH, 3, 1, 1, False, dtype=dtype, rngs=rngs)

    def __call__(self, x, train: bool):
        ra = not train
        y = self.conv1(nnx.relu(self.bn1(x, use_running_average=ra)))
        return self.conv2(nnx.relu(self.bn2(y, use_running_average=ra)))


class Transition(nnx.Module):
    def __init__(self, cin: int, bn: dict, *, dtype, rngs):
        self.bn = nnx.BatchNorm(cin, **bn, dtype=dtype, rngs=rngs)
        self.conv = conv(cin, cin // 2, 1, 1, 0, False, dtype=dtype, rngs=rngs)

    def __call__(self, x, train: bool):
        x = self.conv(nnx.relu(self.bn(x, use_running_average=not train)))
        return nnx.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")


class DenseNet(nnx.Module):
    """`__call__(x [B,H,W,3], train) -> [B, num_features]` (1024 for 121, 1664 for 169).

    Submodules: `stem_conv`/`stem_bn`, `block{b}_layer{l}` (b 1-4, l from 1),
    `transition{t}` (t 1-3), `final_bn` (Keras conv{b+1}_block{l}, pool{t+1}, bn; torchvision
    denseblock{b}.denselayer{l}, transition{t}, norm5).
    """

    def __init__(self, depth: int = 121, layout: str = "keras", *, dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        if depth not in BLOCKS:
            raise ConfigError(f"DenseNet depth must be one of {sorted(BLOCKS)}, got {depth}")
        if layout not in LAYOUTS:
            raise ConfigError(f"DenseNet layout must be one of {sorted(LAYOUTS)}, "
                              f"got {layout!r}")
        bn = LAYOUTS[layout]
        self.stem_conv = conv(3, 64, 7, 2, 3, False, dtype=dtype, rngs=rngs)
        self.stem_bn = nnx.BatchNorm(64, **bn, dtype=dtype, rngs=rngs)
        stages, cin = [], 64
        for b, n in enumerate(BLOCKS[depth], start=1):
            names = []
            for j in range(1, n + 1):
                name = f"block{b}_layer{j}"
                setattr(self, name, DenseLayer(cin, bn, dtype=dtype, rngs=rngs))
                names.append(name)
                cin += GROWTH
            trans = ""
            if b < len(BLOCKS[depth]):
                trans = f"transition{b}"
                setattr(self, trans, Transition(cin, bn, dtype=dtype, rngs=rngs))
                cin //= 2
            stages.append((tuple(names), trans))
        self.stages = tuple(stages)
        self.final_bn = nnx.BatchNorm(cin, **bn, dtype=dtype, rngs=rngs)
        self.num_features = cin

    def feature_map(self, x: jax.Array, train: bool = False) -> jax.Array:
        ra = not train
        x = nnx.relu(self.stem_bn(self.stem_conv(x), use_running_average=ra))
        x = nnx.max_pool(zero_pad(x, 1), (3, 3), strides=(2, 2), padding="VALID")
        for names, trans in self.stages:
            # One concatenation per block: the layers' k-channel outputs are collected and each
            # layer sees the block input plus everything before it.
            feats = [x]
            for name in names:
                feats.append(getattr(self, name)(jnp.concatenate(feats, axis=-1), train))
            x = jnp.concatenate(feats, axis=-1)
            if trans:
                x = getattr(self, trans)(x, train)
        return nnx.relu(self.final_bn(x, use_running_average=ra))

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return jnp.mean(self.feature_map(x, train), axis=(1, 2))


_KERAS = "https://storage.googleapis.com/tensorflow/keras-applications/densenet/"
# keras.applications.densenet file_hash values (md5 of the top / notop files).
_KERAS_MD5 = {121: ("9d60b8095a5708f2dcce2bca79d332c7", "30ee3e1110167f948a6b9946edeeb738"),
              169: ("d699b8f76981ab1b30698df4c175e90b", "b8c4d4c20dd625c148057b9ff1c1176b")}
_TV_FILES = {121: "densenet121-a639ec97.pth", 169: "densenet169-b2777c0a.pth"}


def _spec(depth: int) -> ModelSpec:
    # keras.applications.densenet.preprocess_input uses mode='torch' (ImageNet mean/std).
    presets = keras_presets(_KERAS, f"densenet{depth}", _KERAS_MD5[depth], input_size=224,
                            normalization="torch", arch_kw={"layout": "keras"})
    presets["torchvision"] = torchvision_preset(_TV_FILES[depth],
                                                arch_kw={"layout": "torchvision"})
    return ModelSpec(backbone=DenseNet, presets=presets, arch_kw={"depth": depth},
                     description=f"DenseNet-{depth} (Keras or torchvision layout)")


MODELS = {f"densenet{d}": _spec(d) for d in BLOCKS}
