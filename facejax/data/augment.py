"""On-device, batched image augmentation (one affine warp per image), resizing and normalization."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from facejax.errors import ConfigError, DataError

FILL_MODES = ("constant", "nearest", "reflect")

class _Norm(NamedTuple):
    scale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    bgr: bool


# Each preset is (x01 * scale - mean) / std, in RGB unless it flips to BGR first.
# Mirrors keras.applications.imagenet_utils (caffe, tf), torchvision (torch), TF-Lite models and
# dlib's input_rgb_image_sized (dlib/dnn/input.h: (pixel - avg) / 256 per RGB channel).
_PRESETS = {
    "unit": _Norm(1.0, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), False),
    "caffe": _Norm(255.0, (103.939, 116.779, 123.68), (1.0, 1.0, 1.0), True),
    "torch": _Norm(1.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), False),
    "tf": _Norm(2.0, (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), False),
    "lite": _Norm(255.0, (127.0, 127.0, 127.0), (128.0, 128.0, 128.0), False),
    "dlib": _Norm(255.0, (122.782, 117.001, 104.298), (256.0, 256.0, 256.0), False),
}
NORMALIZATIONS = tuple(_PRESETS)

# Random-resized-crop aspect-ratio range, as in torchvision's RandomResizedCrop.
_RRC_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))


def validate_augment(cfg) -> None:
    """Raises ConfigError for augment settings that cannot work."""
    for name in ("rotation_deg", "shear_deg", "zoom", "translate", "brightness", "contrast"):
        if float(cfg[name]) < 0:
            raise ConfigError(f"augment.{name} must be >= 0, got {cfg[name]}")
    if float(cfg.zoom) >= 1:
        raise ConfigError(f"augment.zoom must be < 1 (scales are [1 - zoom, 1 + zoom]), "
                          f"got {cfg.zoom}")
    if cfg.fill_mode not in FILL_MODES:
        raise ConfigError(f"augment.fill_mode must be one of {FILL_MODES}, got {cfg.fill_mode!r}")
    if not 0.0 <= float(cfg.fill_value) <= 1.0:
        raise ConfigError(f"augment.fill_value is in [0, 1] units (0.5 = mid gray), "
                          f"got {cfg.fill_value}")
    scale = tuple(cfg.rrc_scale)
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ConfigError(f"augment.rrc_scale must be (lo, hi) with 0 < lo <= hi <= 1, got {scale}")


def _has_geometry(cfg) -> bool:
    return bool(cfg.rotation_deg or cfg.shear_deg or cfg.zoom or cfg.translate
                or cfg.random_resized_crop)


def _check_images(images) -> None:
    if images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(f"expected images [B,H,W,3], got shape {tuple(images.shape)}")
    if images.dtype != jnp.uint8:
        raise DataError(f"expected uint8 images, got {images.dtype}")


def _uniform(key, bound: float, lo: float | None = None):
    """U(-bound, bound) (or U(lo, bound)); exactly the constant when the range is empty."""
    lo = -bound if lo is None else lo
    if lo == bound:
        return jnp.float32(bound)
    return jax.random.uniform(key, (), jnp.float32, lo, bound)


def sample_affine(key, cfg, height: int, width: int):
    """Samples one image's inverse map: source = A @ (dest - center) + center + b.

    Coordinates are (row, col). A positive angle rotates the content counter-clockwise as
    displayed (+90 degrees equals `np.rot90(image)`). Zoom > 1 samples a wider area (zooms out),
    as Keras' ImageDataGenerator does. Translation is a fraction of the side.
    """
    k_rot, k_shear, k_zy, k_zx, k_ty, k_tx, k_flip, k_rrc = jax.random.split(key, 8)
    theta = jnp.deg2rad(_uniform(k_rot, float(cfg.rotation_deg)))
    shear = jnp.deg2rad(_uniform(k_shear, float(cfg.shear_deg)))
    zoom = float(cfg.zoom)
    zy, zx = _uniform(k_zy, 1 + zoom, 1 - zoom), _uniform(k_zx, 1 + zoom, 1 - zoom)
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    rotate = jnp.array([[cos, sin], [-sin, cos]])
    shear_m = jnp.array([[1.0, -jnp.sin(shear)], [0.0, jnp.cos(shear)]])
    flip = jax.random.bernoulli(k_flip) if cfg.hflip else jnp.bool_(False)
    scale = jnp.stack([zy, zx * jnp.where(flip, -1.0, 1.0)])
    a = rotate @ shear_m * scale[None, :]  # == rotate @ shear @ diag(zy, ±zx)
    t = float(cfg.translate)
    b = jnp.stack([_uniform(k_ty, t) * height, _uniform(k_tx, t) * width])
    if cfg.random_resized_crop:
        # The crop is applied to the source first: it scales and shifts the whole warp.
        crop, offset = _sample_crop(k_rrc, tuple(cfg.rrc_scale), height, width)
        a = crop[:, None] * a
        b = crop * b + offset
    return a, b


def _sample_crop(key, scale, height: int, width: int):
    k_area, k_ratio, k_pos = jax.random.split(key, 3)
    area = jax.random.uniform(k_area, (), jnp.float32, scale[0], scale[1])
    ratio = jnp.exp(jax.random.uniform(k_ratio, (), jnp.float32, *_RRC_LOG_RATIO))
    crop_h = jnp.minimum(jnp.sqrt(area / ratio), 1.0)  # fractions of the side
    crop_w = jnp.minimum(jnp.sqrt(area * ratio), 1.0)
    crop = jnp.stack([crop_h, crop_w])
    room = (1.0 - crop) / 2 * jnp.array([height - 1, width - 1], jnp.float32)
    offset = jax.random.uniform(k_pos, (2,), jnp.float32, -1.0, 1.0) * room
    return crop, offset


def _fix_index(idx, size: int, fill_mode: str):
    if fill_mode == "reflect":
        # Half-sample symmetric (d c b a | a b c d | d c b a), as Keras/scipy 'reflect'.
        idx = jnp.mod(idx, 2 * size)
        return jnp.where(idx >= size, 2 * size - 1 - idx, idx)
    return jnp.clip(idx, 0, size - 1)


def affine_warp(images_u8, a, b, fill_mode: str = "reflect", fill_value: float = 0.0):
    """Bilinearly samples `images_u8 [B,H,W,3]` at source = a @ (dest - c) + c + b per image.

    `a [B,2,2]`, `b [B,2]` in (row, col) pixels; `c` is the image center. Returns float32 in
    [0, 1]. `fill_value` (in [0, 1]) is used for `fill_mode='constant'` outside the image.
    """
    if fill_mode not in FILL_MODES:
        raise ConfigError(f"fill_mode must be one of {FILL_MODES}, got {fill_mode!r}")
    n, h, w, c = images_u8.shape
    cy, cx = (h - 1) / 2, (w - 1) / 2
    rows = jnp.arange(h, dtype=jnp.float32)[:, None] - cy
    cols = jnp.arange(w, dtype=jnp.float32)[None, :] - cx
    a = a[:, :, :, None, None]
    src_r = a[:, 0, 0] * rows + a[:, 0, 1] * cols + (b[:, 0, None, None] + cy)
    src_c = a[:, 1, 0] * rows + a[:, 1, 1] * cols + (b[:, 1, None, None] + cx)
    r0f, c0f = jnp.floor(src_r), jnp.floor(src_c)
    fr, fc = (src_r - r0f)[..., None], (src_c - c0f)[..., None]
    r0, c0 = r0f.astype(jnp.int32), c0f.astype(jnp.int32)
    # One gather of float32 pixel rows per corner over [B*H*W, 3]: on XLA:CPU this measured ~2x
    # faster than jax.scipy.ndimage.map_coordinates and ~4x faster than gathering uint8 rows.
    flat = images_u8.reshape(n * h * w, c).astype(jnp.float32)
    base = (jnp.arange(n, dtype=jnp.int32) * (h * w))[:, None, None]
    out = jnp.zeros((n, h, w, c), jnp.float32)
    for dr, dc, weight in ((0, 0, (1 - fr) * (1 - fc)), (0, 1, (1 - fr) * fc),
                           (1, 0, fr * (1 - fc)), (1, 1, fr * fc)):
        ri, ci = r0 + dr, c0 + dc
        pix = flat[base + _fix_index(ri, h, fill_mode) * w + _fix_index(ci, w, fill_mode)]
        if fill_mode == "constant":
            inside = ((ri >= 0) & (ri < h) & (ci >= 0) & (ci < w))[..., None]
            pix = jnp.where(inside, pix, fill_value * 255.0)
        out = out + weight * pix
    return out * (1.0 / 255.0)


def _jitter(key, x, brightness: float, contrast: float):
    """Per-image brightness shift and contrast scale (about the per-channel mean), clipped."""
    n = x.shape[0]
    k_b, k_c = jax.random.split(key)
    if contrast:
        factor = jax.random.uniform(k_c, (n, 1, 1, 1), jnp.float32, 1 - contrast, 1 + contrast)
        mean = x.mean(axis=(1, 2), keepdims=True)
        x = (x - mean) * factor + mean
    if brightness:
        x = x + jax.random.uniform(k_b, (n, 1, 1, 1), jnp.float32, -brightness, brightness)
    return jnp.clip(x, 0.0, 1.0)


def augment_batch(key, images_u8, cfg):
    """Augments `images_u8 [B,H,W,3]` with `cfg` (config.augment) -> float32 [B,H,W,3] in [0, 1].

    Rotation, shear, zoom, translation, flip and random-resized-crop form one affine matrix per
    image, applied in one bilinear pass. Image i's randomness comes from `split(key, B)[i]`.
    """
    validate_augment(cfg)
    _check_images(images_u8)
    n, h, w, _ = images_u8.shape
    k_geo, k_jit = jax.random.split(key)
    keys = jax.random.split(k_geo, n)
    if _has_geometry(cfg):
        a, b = jax.vmap(lambda k: sample_affine(k, cfg, h, w))(keys)
        x = affine_warp(images_u8, a, b, cfg.fill_mode, float(cfg.fill_value))
    else:
        # No warp needed: skip the resampling pass (exact identity when flip is off too).
        x = images_u8.astype(jnp.float32) * (1.0 / 255.0)
        if cfg.hflip:
            flip = jax.vmap(jax.random.bernoulli)(keys)
            x = jnp.where(flip[:, None, None, None], x[:, :, ::-1], x)
    if cfg.brightness or cfg.contrast:
        x = _jitter(k_jit, x, float(cfg.brightness), float(cfg.contrast))
    return x


def resize(x, size: int):
    """Bilinear resize of `x [B,H,W,C]` to `[B,size,size,C]` (antialiased when shrinking)."""
    if x.shape[1] == size and x.shape[2] == size:
        return x
    if size <= 0:
        raise ConfigError(f"resize size must be positive, got {size}")
    return jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), "bilinear", antialias=True)


def normalize(x01, preset: str):
    """Maps [0, 1] RGB images to a model family's input convention (see NORMALIZATIONS)."""
    if preset not in _PRESETS:
        raise ConfigError(f"unknown normalization {preset!r}; choose one of {NORMALIZATIONS}")
    p = _PRESETS[preset]
    if p.bgr:
        x01 = x01[..., ::-1]
    mean = np.asarray(p.mean, np.float32)
    inv_std = 1.0 / np.asarray(p.std, np.float32)
    return (x01 * np.float32(p.scale) - mean) * inv_std


def preprocess_eval(images_u8, size: int, preset: str):
    """uint8 cache images -> resized, normalized float32 model input (no randomness)."""
    _check_images(images_u8)
    x = images_u8.astype(jnp.float32) * (1.0 / 255.0)
    return normalize(resize(x, size), preset)


def preprocess_train(key, images_u8, cfg_augment, size: int, preset: str):
    """uint8 cache images -> augmented, resized, normalized float32 model input."""
    return normalize(resize(augment_batch(key, images_u8, cfg_augment), size), preset)
