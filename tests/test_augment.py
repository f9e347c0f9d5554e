"""Invariants of the on-device augmentation, resizing and normalization presets."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from facejax.data import augment
from facejax.errors import ConfigError, DataError

# configs/ is not a package on the test path; load the schema file directly.
_spec = importlib.util.spec_from_file_location(
    "_configs_common", pathlib.Path(__file__).parents[1] / "configs" / "common.py")
_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_common)
augment_config = _common.augment


def _augment(key, images, cfg):
    # Jitted: one compile is much faster than op-by-op eager dispatch of the whole warp.
    return jax.jit(lambda k, x: augment.augment_batch(k, x, cfg))(key, images)


def _warp(images, a, b, fill_mode="reflect", fill_value=0.0):
    fn = jax.jit(lambda x, a, b: augment.affine_warp(x, a, b, fill_mode, fill_value))
    return fn(images, a, b)


def _cfg(**kw):
    cfg = augment_config()
    for k in ("rotation_deg", "shear_deg", "zoom", "translate", "brightness", "contrast"):
        cfg[k] = 0.0
    cfg.hflip = False
    cfg.random_resized_crop = False
    cfg.update(kw)
    return cfg


def _images(n=4, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _to_u8(x01):
    return np.asarray(jnp.round(x01 * 255.0)).astype(np.uint8)


def _rot90_matrix(n):
    a = np.tile(np.array([[0.0, 1.0], [-1.0, 0.0]], np.float32), (n, 1, 1))  # +90 degrees
    return jnp.asarray(a), jnp.zeros((n, 2), jnp.float32)


@pytest.mark.slow
@pytest.mark.parametrize("fill_mode", augment.FILL_MODES)
def test_zero_parameters_are_identity(fill_mode):
    imgs = _images()
    out = _augment(jax.random.key(0), imgs, _cfg(fill_mode=fill_mode))
    np.testing.assert_allclose(np.asarray(out), imgs / 255.0, atol=1e-6)
    # The same through the warp itself (identity matrix), so the resampler is exact too.
    eye = jnp.tile(jnp.eye(2), (4, 1, 1))
    warped = _warp(imgs, eye, jnp.zeros((4, 2)), fill_mode)
    np.testing.assert_allclose(np.asarray(warped), imgs / 255.0, atol=1e-6)


@pytest.mark.slow
def test_flip_twice_is_identity():
    imgs = _images(8)
    key = jax.random.key(3)
    once = _augment(key, imgs, _cfg(hflip=True))
    twice = _augment(key, _to_u8(once), _cfg(hflip=True))
    np.testing.assert_array_equal(_to_u8(twice), imgs)
    flipped = (_to_u8(once) != imgs).any(axis=(1, 2, 3))
    assert 0 < flipped.sum() < 8  # some images flipped, some not
    np.testing.assert_array_equal(_to_u8(once)[flipped], imgs[flipped][:, :, ::-1])
    # Through the affine path: a mirror matrix applied twice.
    mirror = jnp.tile(jnp.diag(jnp.array([1.0, -1.0])), (8, 1, 1))
    zero = jnp.zeros((8, 2))
    back = _warp(_to_u8(_warp(imgs, mirror, zero)), mirror, zero)
    np.testing.assert_array_equal(_to_u8(back), imgs)


def test_rotation_by_90_matches_rot90():
    imgs = _images(2, 15)
    a, b = _rot90_matrix(2)
    out = _to_u8(_warp(imgs, a, b, "constant"))
    # Positive angles rotate counter-clockwise as displayed, like np.rot90(image).
    np.testing.assert_array_equal(out, np.rot90(imgs, axes=(1, 2)))


@pytest.mark.slow
def test_shapes_dtypes_and_range():
    imgs = _images(3, 20)
    cfg = augment_config()
    cfg.update({"random_resized_crop": True, "brightness": 0.3, "contrast": 0.3, "shear_deg": 10.0})
    train_fn = jax.jit(lambda k, x: augment.preprocess_train(k, x, cfg, 12, "unit"))
    train = train_fn(jax.random.key(0), imgs)  # bilinear resampling keeps [0, 1]
    assert train.shape == (3, 12, 12, 3) and train.dtype == jnp.float32
    assert float(train.min()) >= 0.0 and float(train.max()) <= 1.0
    ev = jax.jit(lambda x: augment.preprocess_eval(x, 32, "caffe"))(imgs)
    assert ev.shape == (3, 32, 32, 3) and ev.dtype == jnp.float32


@pytest.mark.slow
def test_seed_determinism_and_variation():
    imgs = _images(4, 24)
    cfg = augment_config()
    cfg.update({"brightness": 0.2, "contrast": 0.2})
    fn = jax.jit(lambda k, x: augment.augment_batch(k, x, cfg))
    a, b, c = (np.asarray(fn(jax.random.key(s), imgs)) for s in (7, 7, 8))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).mean() > 1e-3
    # Per-image randomness: identical inputs get different warps within one batch.
    out = np.asarray(fn(jax.random.key(7), np.repeat(imgs[:1], 4, axis=0)))
    assert np.abs(out[0] - out[1]).mean() > 1e-3


@pytest.mark.slow
def test_fill_modes_after_big_rotation():
    imgs = np.full((1, 32, 32, 3), 200, np.uint8)
    theta = np.deg2rad(45.0)
    cos, sin = np.cos(theta), np.sin(theta)
    a = jnp.asarray([[[cos, sin], [-sin, cos]]], jnp.float32)
    b = jnp.zeros((1, 2))
    const = np.asarray(_warp(imgs, a, b, "constant", 0.25))
    np.testing.assert_allclose(const[0, 0, 0], 0.25, atol=1e-6)  # corner sampled outside
    np.testing.assert_allclose(const[0, 16, 16], 200 / 255, atol=1e-6)  # center untouched
    for mode in ("nearest", "reflect"):
        out = np.asarray(_warp(imgs, a, b, mode, 0.25))
        np.testing.assert_allclose(out, 200 / 255, atol=1e-5)  # never the fill value
    # Reflect mirrors, nearest repeats the edge: shift a ramp left by 3 pixels.
    ramp = np.tile(np.arange(8, dtype=np.uint8)[None, :, None] * 10, (8, 1, 3))[None]
    shift = jnp.asarray([[0.0, 3.0]])
    eye = jnp.eye(2)[None]
    row = _to_u8(_warp(ramp, eye, shift, "reflect"))[0, 0, :, 0]
    np.testing.assert_array_equal(row, [30, 40, 50, 60, 70, 70, 60, 50])
    row = _to_u8(_warp(ramp, eye, shift, "nearest"))[0, 0, :, 0]
    np.testing.assert_array_equal(row, [30, 40, 50, 60, 70, 70, 70, 70])


@pytest.mark.slow
def test_works_under_jit():
    imgs = _images(2, 16)
    cfg = augment_config()
    fn = jax.jit(lambda k, x: augment.preprocess_train(k, x, cfg, 16, "tf"))
    eager = augment.preprocess_train(jax.random.key(1), imgs, cfg, 16, "tf")
    jitted = fn(jax.random.key(1), imgs)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), atol=1e-5)


def test_normalize_presets_match_hand_computation():
    x = np.random.default_rng(0).random((2, 3, 3, 3)).astype(np.float32)
    norm = lambda p: np.asarray(augment.normalize(jnp.asarray(x), p))
    np.testing.assert_allclose(norm("unit"), x, atol=1e-6)
    caffe = x[..., ::-1] * 255 - np.array([103.939, 116.779, 123.68])
    np.testing.assert_allclose(norm("caffe"), caffe, atol=1e-3)
    torch = (x - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(norm("torch"), torch, atol=1e-5)
    np.testing.assert_allclose(norm("tf"), x * 2 - 1, atol=1e-6)
    np.testing.assert_allclose(norm("lite"), (x * 255 - 127) / 128, atol=1e-5)
    with pytest.raises(ConfigError, match="unknown normalization"):
        augment.normalize(jnp.asarray(x), "imagenet")


def test_resize_and_eval_preprocessing():
    flat = np.full((1, 8, 8, 3), 51, np.uint8)
    out = augment.preprocess_eval(flat, 4, "unit")  # antialiased downscale keeps a flat image flat
    np.testing.assert_allclose(np.asarray(out), 0.2, atol=1e-6)
    same = augment.preprocess_eval(_images(1, 8), 8, "unit")
    np.testing.assert_allclose(np.asarray(same), _images(1, 8) / 255.0, atol=1e-6)


def test_bad_config_and_inputs_raise_clear_errors():
    imgs = _images(1, 8)
    key = jax.random.key(0)
    with pytest.raises(ConfigError, match="fill_mode"):
        _augment(key, imgs, _cfg(fill_mode="wrap"))
    with pytest.raises(ConfigError, match="fill_value"):
        _augment(key, imgs, _cfg(fill_value=128.0))
    with pytest.raises(ConfigError, match="rrc_scale"):
        _augment(key, imgs, _cfg(random_resized_crop=True, rrc_scale=(0.9, 0.1)))
    with pytest.raises(ConfigError, match="rotation_deg"):
        _augment(key, imgs, _cfg(rotation_deg=-5.0))
    with pytest.raises(DataError, match="uint8"):
        _augment(key, imgs.astype(np.float32), _cfg())
    with pytest.raises(DataError, match=r"\[B,H,W,3\]"):
        augment.preprocess_eval(imgs[0], 8, "unit")


@pytest.mark.slow
def test_show_augment_writes_a_grid(tmp_path):
    path = pathlib.Path(__file__).parents[1] / "scripts" / "show_augment.py"
    spec = importlib.util.spec_from_file_location("_show_augment", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "grid.png"
    assert script.main(["--out", str(out), "--num", "2", "--rows", "1",
                        "--config.data.image_size=24"]) == 0
    from PIL import Image
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 100
        pixels = np.asarray(im.convert("RGB")).astype(int)
    # No data configured: the originals' row shows the synthetic pattern twice. Each panel is
    # found by its red top-left corner and its black frame, and read back pixel by pixel.
    pattern = script.synthetic_pattern(24).astype(int)
    red = np.all(pixels == pattern[0, 0], axis=-1)
    top = np.flatnonzero(red.any(axis=1))[0]
    corner_rows = red[top:top + 3].any(axis=0)
    lefts = np.flatnonzero(np.diff(np.r_[0, corner_rows.astype(int)]) == 1)
    assert len(lefts) == 2, "the two originals side by side"
    for left in lefts:
        width = np.flatnonzero(np.all(pixels[top + 1, left:] == 0, axis=-1))[0]  # the frame
        scale = width / 24
        assert scale > 2, "drawn at a legible size"
        centres = ((np.arange(24) + 0.5) * scale).astype(int)
        shown = pixels[top + centres[:, None], left + centres[None, :]]
        assert np.mean(np.all(np.abs(shown - pattern) <= 2, axis=-1)) > 0.97
