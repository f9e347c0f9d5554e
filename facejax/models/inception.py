"""InceptionV3 (Szegedy et al., 2016), in Keras applications and torchvision layouts.

The graph is one table (`MIXED`): every Mixed block is a list of branches whose outputs are
concatenated in order; a branch is a sequence of conv-BN-ReLU units, optionally after a pool,
and may end in a split (parallel 1x3 / 3x1 units, concatenated). Module names are torchvision's
(`Conv2d_1a_3x3`, `Mixed_5b/branch5x5_1`), and `keras_order()` lists the units in the order
Keras creates its auto-named `conv2d_N` layers. Layout differences (`LAYOUTS`): Keras' BN has no
scale (gamma) and the 3x3 average pools of the branches leave the padding out of the average
(TF 'SAME'); torchvision's BN has a scale and its pools count the zero padding.
Valid padding: the stem's 3x3 convs and every stride-2 unit are unpadded, so sizes shrink
(299 -> 8x8 at the end); the smallest legal input is 75 px.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from facejax.errors import ConfigError
from facejax.models.registry import ModelSpec, Preset
from facejax.models.resnet import CONV_INIT, torchvision_preset

LAYOUTS = {"keras": {"bn_scale": False, "momentum": 0.99, "pool_counts_pad": False},
           "torchvision": {"bn_scale": True, "momentum": 0.9, "pool_counts_pad": True}}
BN_EPS = 1e-3
MIN_SIZE = 75


def u(name: str, cout: int, k=1, stride: int = 1, valid: bool = False):
    """A conv-BN-ReLU unit: (name, out channels, (kh, kw), stride, padded)."""
    k = (k, k) if isinstance(k, int) else k
    return (name, cout, k, stride, not (valid or stride > 1))


def _a(pool: int):
    return [[u("branch1x1", 64)],
            [u("branch5x5_1", 48), u("branch5x5_2", 64, 5)],
            [u("branch3x3dbl_1", 64), u("branch3x3dbl_2", 96, 3), u("branch3x3dbl_3", 96, 3)],
            ["avg", u("branch_pool", pool)]]


def _b():
    return [[u("branch3x3", 384, 3, 2)],
            [u("branch3x3dbl_1", 64), u("branch3x3dbl_2", 96, 3),
             u("branch3x3dbl_3", 96, 3, 2)],
            ["max"]]


def _c(c7: int):
    return [[u("branch1x1", 192)],
            [u("branch7x7_1", c7), u("branch7x7_2", c7, (1, 7)), u("branch7x7_3", 192, (7, 1))],
            [u("branch7x7dbl_1", c7), u("branch7x7dbl_2", c7, (7, 1)),
             u("branch7x7dbl_3", c7, (1, 7)), u("branch7x7dbl_4", c7, (7, 1)),
             u("branch7x7dbl_5", 192, (1, 7))],
            ["avg", u("branch_pool", 192)]]


def _d():
    return [[u("branch3x3_1", 192), u("branch3x3_2", 320, 3, 2)],
            [u("branch7x7x3_1", 192), u("branch7x7x3_2", 192, (1, 7)),
             u("branch7x7x3_3", 192, (7, 1)), u("branch7x7x3_4", 192, 3, 2)],
            ["max"]]


def _e():
    return [[u("branch1x1", 320)],
            [u("branch3x3_1", 384), [u("branch3x3_2a", 384, (1, 3)),
                                     u("branch3x3_2b", 384, (3, 1))]],
            [u("branch3x3dbl_1", 448), u("branch3x3dbl_2", 384, 3),
             [u("branch3x3dbl_3a", 384, (1, 3)), u("branch3x3dbl_3b", 384, (3, 1))]],
            ["avg", u("branch_pool", 192)]]


STEM = [u("Conv2d_1a_3x3", 32, 3, 2), u("Conv2d_2a_3x3", 32, 3, valid=True),
        u("Conv2d_2b_3x3", 64, 3), "max", u("Conv2d_3b_1x1", 80),
        u("Conv2d_4a_3x3", 192, 3, valid=True), "max"]
MIXED = [("Mixed_5b", _a(32)), ("Mixed_5c", _a(64)), ("Mixed_5d", _a(64)), ("Mixed_6a", _b()),
         ("Mixed_6b", _c(128)), ("Mixed_6c", _c(160)), ("Mixed_6d", _c(160)),
         ("Mixed_6e", _c(192)), ("Mixed_7a", _d()), ("Mixed_7b", _e()), ("Mixed_7c", _e())]


def _units(steps):
    for s in steps:
        if isinstance(s, list):
            yield from s
        elif isinstance(s, tuple):
            yield s


def keras_order() -> list[str]:
    """Unit paths in the order Keras' inception_v3 creates its conv2d/batch_normalization."""
    out = [s[0] for s in STEM if isinstance(s, tuple)]
    for block, branches in MIXED:
        out += [f"{block}/{unit[0]}" for br in branches for unit in _units(br)]
    return out


class ConvBN(nnx.Module):
    """Conv (no bias) -> BatchNorm(eps 1e-3) -> ReLU."""

    def __init__(self, cin: int, spec, lay: dict, *, dtype, rngs):
        _, cout, k, stride, padded = spec
        pad = tuple((kk // 2, kk // 2) for kk in k) if padded else "VALID"
        self.conv = nnx.Conv(cin, cout, k, strides=(stride, stride), padding=pad,
                             use_bias=False, kernel_init=CONV_INIT, dtype=dtype, rngs=rngs)
        self.bn = nnx.BatchNorm(cout, epsilon=BN_EPS, momentum=lay["momentum"],
                                use_scale=lay["bn_scale"], dtype=dtype, rngs=rngs)

    def __call__(self, x, train: bool):
        return nnx.relu(self.bn(self.conv(x), use_running_average=not train))


def _avg3(x, counts_pad: bool):
    return nnx.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                        count_include_pad=counts_pad)


def _max3(x):
    return nnx.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class Mixed(nnx.Module):
    """One Inception block: branches from `MIXED`, concatenated on channels."""

    def __init__(self, cin: int, branches, lay: dict, *, dtype, rngs):
        self.branches = branches
        self.counts_pad = lay["pool_counts_pad"]
        cout = 0
        for br in branches:
            c = cin
            for step in br:
                parallel = step if isinstance(step, list) else [step] if isinstance(step, tuple) \
                    else []
                for spec in parallel:
                    setattr(self, spec[0], ConvBN(c, spec, lay, dtype=dtype, rngs=rngs))
                if parallel:
                    c = sum(s[1] for s in parallel)
            cout += c
        self.out_channels = cout

    def __call__(self, x, train: bool):
        outs = []
        for br in self.branches:
            y = x
            for step in br:
                if step == "avg":
                    y = _avg3(y, self.counts_pad)
                elif step == "max":
                    y = _max3(y)
                elif isinstance(step, list):
                    y = jnp.concatenate([getattr(self, s[0])(y, train) for s in step], axis=-1)
                else:
                    y = getattr(self, step[0])(y, train)
            outs.append(y)
        return jnp.concatenate(outs, axis=-1)


class InceptionV3(nnx.Module):
    """`__call__(x [B,H,W,3], train) -> [B, 2048]`; H, W >= 75.

    torchvision's auxiliary classifier (`AuxLogits`, training only) is not built; its weights
    are skipped by the converter.
    """

    def __init__(self, layout: str = "keras", *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if layout not in LAYOUTS:
            raise ConfigError(f"InceptionV3 layout must be one of {sorted(LAYOUTS)}, "
                              f"got {layout!r}")
        lay = LAYOUTS[layout]
        c = 3
        for step in STEM:
            if isinstance(step, tuple):
                setattr(self, step[0], ConvBN(c, step, lay, dtype=dtype, rngs=rngs))
                c = step[1]
        for name, branches in MIXED:
            block = Mixed(c, branches, lay, dtype=dtype, rngs=rngs)
            setattr(self, name, block)
            c = block.out_channels
        self.num_features = c

    def feature_map(self, x: jax.Array, train: bool = False) -> jax.Array:
        if min(x.shape[1:3]) < MIN_SIZE:
            raise ConfigError(f"InceptionV3 needs inputs of at least {MIN_SIZE} px "
                              f"(valid padding), got {x.shape[1]}x{x.shape[2]}")
        for step in STEM:
            x = _max3(x) if step == "max" else getattr(self, step[0])(x, train)
        for name, _ in MIXED:
            x = getattr(self, name)(x, train)
        return x

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return jnp.mean(self.feature_map(x, train), axis=(1, 2))


_KERAS = "https://storage.googleapis.com/tensorflow/keras-applications/inception_v3/"
# keras.applications.inception_v3 file_hash values (md5 of the top / notop files).
_KERAS_MD5 = ("9a0d58056eeedaa3f26cb7ebd46da564", "bcbd6486424b2319ff4ef7d526e38f63")


def _keras_presets() -> dict[str, Preset]:
    out = {}
    for source, suffix, digest, classes in (("keras", "", _KERAS_MD5[0], 1000),
                                            ("keras_notop", "_notop", _KERAS_MD5[1], 0)):
        filename = f"inception_v3_weights_tf_dim_ordering_tf_kernels{suffix}.h5"
        # keras.applications.inception_v3.preprocess_input uses mode='tf' ([-1, 1]).
        out[source] = Preset(input_size=299, normalization="tf", converter="keras",
                             url=_KERAS + filename, filename=filename, md5=digest,
                             num_classes=classes, arch_kw={"layout": "keras"})
    return out


# torchvision's pretrained Inception v3 sets transform_input=True, which maps torch-normalised
# input to (x - 0.5) / 0.5: exactly the 'tf' normalisation, so that is what we feed it.
_TV = torchvision_preset("inception_v3_google-0cc3c7bd.pth", arch_kw={"layout": "torchvision"})
MODELS = {"inception_v3": ModelSpec(
    backbone=InceptionV3,
    presets={**_keras_presets(),
             "torchvision": dataclasses.replace(_TV, input_size=299, normalization="tf")},
    description="Inception v3, 299 px (Keras or torchvision layout)")}
