"""VGG 16/19 from one configuration table, with the optional fc1/fc2 classifier trunk."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from facejax.errors import ConfigError
from facejax.models.registry import ModelSpec
from facejax.models.resnet import keras_presets, pad2d, torchvision_preset

# Channels per 3x3 conv, 'M' = 2x2/2 max-pool (timm's table). Blocks end at each 'M'.
CFGS = {
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
              512, 512, 512, "M", 512, 512, 512, "M"),
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
              512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
}
POOLED = 7  # torchvision AdaptiveAvgPool2d((7, 7)) before the classifier; Keras needs 224 px


def conv_names(cfg) -> list[str]:
    """Our conv names in order: block{b}_conv{k} (the Keras layer names)."""
    names, b, k = [], 1, 0
    for v in cfg:
        if v == "M":
            b, k = b + 1, 0
        else:
            k += 1
            names.append(f"block{b}_conv{k}")
    return names


def adaptive_avg_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[out, in] averaging weights of torch's adaptive_avg_pool along one axis.

    Bin i covers [floor(i*in/out), ceil((i+1)*in/out)). When in == out this is the identity,
    so a 224 px input passes through unchanged (bit-exact), and smaller inputs still work.
    """
    m = np.zeros((size_out, size_in), np.float32)
    for i in range(size_out):
        lo, hi = (i * size_in) // size_out, -((-(i + 1) * size_in) // size_out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


def adaptive_avg_pool(x: jax.Array, size: int) -> jax.Array:
    h, w = x.shape[1], x.shape[2]
    if (h, w) == (size, size):
        return x
    mh = jnp.asarray(adaptive_avg_matrix(h, size), x.dtype)
    mw = jnp.asarray(adaptive_avg_matrix(w, size), x.dtype)
    return jnp.einsum("ih,jw,bhwc->bijc", mh, mw, x)


class VGG(nnx.Module):
    """VGG backbone. `__call__(x, train) -> [B, num_features]`.

    With `classifier=True` (torchvision, Keras include_top): conv stack -> adaptive avg pool to
    7x7 -> NHWC flatten -> fc1 -> ReLU -> fc2 -> ReLU, so features are 4096-d and the model's
    `head` plays torchvision `classifier.6` / Keras `predictions`. With `classifier=False`
    (Keras notop files): features are the global average of the last pooled conv map (512-d).
    `fc_dropout` is the dropout after fc1 and fc2 (torchvision trains with 0.5).
    """

    def __init__(self, cfg: str = "vgg16", classifier: bool = True, fc_dropout: float = 0.0, *,
                 dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if cfg not in CFGS:
            raise ConfigError(f"VGG cfg must be one of {sorted(CFGS)}, got {cfg!r}")
        layers, cin, names = [], 3, iter(conv_names(CFGS[cfg]))
        for v in CFGS[cfg]:
            if v == "M":
                layers.append("M")
                continue
            name = next(names)
            setattr(self, name, nnx.Conv(cin, v, (3, 3), padding=pad2d(1), dtype=dtype,
                                         rngs=rngs))
            layers.append(name)
            cin = v
        self.layers = tuple(layers)
        self.classifier = classifier
        if classifier:
            self.fc1 = nnx.Linear(cin * POOLED * POOLED, 4096, dtype=dtype, rngs=rngs)
            self.fc2 = nnx.Linear(4096, 4096, dtype=dtype, rngs=rngs)
            self.fc_dropout = nnx.Dropout(fc_dropout, rngs=rngs) if fc_dropout > 0 else None
            self.num_features = 4096
        else:
            self.num_features = cin

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = self.feature_map(x, train)
        if not self.classifier:
            return jnp.mean(x, axis=(1, 2))
        x = adaptive_avg_pool(x, POOLED).reshape(x.shape[0], -1)
        for fc in (self.fc1, self.fc2):
            x = nnx.relu(fc(x))
            if self.fc_dropout is not None:
                x = self.fc_dropout(x, deterministic=not train)
        return x

    def feature_map(self, x: jax.Array, train: bool = False) -> jax.Array:
        """[B,H,W,3] -> [B,h,w,F]: the last conv block's map (the embedding is its global mean
        only without the classifier; with it, fc1/fc2 follow)."""
        for layer in self.layers:
            if layer == "M":
                x = nnx.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
            else:
                x = nnx.relu(getattr(self, layer)(x))
        return x


_KERAS = "https://storage.googleapis.com/tensorflow/keras-applications/"
_TV_FILES = {"vgg16": "vgg16-397923af.pth", "vgg19": "vgg19-dcbb9e9d.pth"}
# md5 file_hash of the top / notop files, from keras.applications.vgg16 / vgg19.
_KERAS_MD5 = {"vgg16": ("64373286793e3c8b2b4e3219cbf3544b", "6d6bbae143d832006294945121d1f1fc"),
              "vgg19": ("cbe5617147190e668d6c5d5026f83318", "253f8cb515780f3b799900260a226db6")}


def _spec(cfg: str) -> ModelSpec:
    presets = {"torchvision": torchvision_preset(_TV_FILES[cfg])}
    # keras.applications.vgg16/vgg19.preprocess_input use mode='caffe'.
    keras = keras_presets(f"{_KERAS}{cfg}/", cfg, _KERAS_MD5[cfg], input_size=224,
                          normalization="caffe")
    presets["keras"] = keras["keras"]
    presets["keras_notop"] = dataclasses.replace(keras["keras_notop"],
                                                 arch_kw={"classifier": False})
    return ModelSpec(backbone=VGG, presets=presets, arch_kw={"cfg": cfg},
                     description=f"{cfg.upper()} (optional fc1/fc2 classifier)")


MODELS = {cfg: _spec(cfg) for cfg in CFGS}
