"""data.face_crop: a box of the square image (black outside it) in decode, cache and prepare."""

import json
import math
import os

import ml_collections
import numpy as np
import pytest
from conftest import load_common_configs
from PIL import Image

from facejax.config import apply_override
from facejax.data import decode
from facejax.data.cache import cache_listing
from facejax.data.prepare import prepare_data
from facejax.data.sources import scan_folder
from facejax.errors import ConfigError

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def quadrants(side=40):
    """Top-left red, top-right green, bottom-left blue, bottom-right white."""
    a = np.zeros((side, side, 3), np.uint8)
    h = side // 2
    a[:h, :h], a[:h, h:], a[h:, :h], a[h:, h:] = RED, GREEN, BLUE, WHITE
    return a


def save(array, path):
    Image.fromarray(array).save(path)
    return str(path)


def test_box_inside_the_image(tmp_path):
    path = save(quadrants(), tmp_path / "q.png")
    out = decode.decode_image(path, 16, face_crop=(0.0, 0.5, 0.5, 1.0))  # the top-right quarter
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    # Like resizing the whole image and then cropping, the filter sees the real neighbours
    # just beyond the box (red on the left, white below): only the border pixels blend.
    assert (out[:-1, 1:] == GREEN).all() and not (out[:, 0] == GREEN).all()
    # Bottom half, left three quarters: blue then white, split at 2/3 of the output width.
    out = decode.decode_image(path, 12, face_crop=(0.5, 0.0, 1.0, 0.75))
    assert (out[1:, :6] == BLUE).all() and (out[1:, 10:] == WHITE).all()


def test_box_outside_the_image_is_black(tmp_path):
    path = save(np.full((20, 20, 3), 255, np.uint8), tmp_path / "white.png")
    out = decode.decode_image(path, 20, face_crop=(-0.5, -0.5, 0.5, 0.5))
    assert (out[:9, :] == 0).all() and (out[:, :9] == 0).all()  # above and left: padding
    assert (out[11:, 11:] == 255).all()                           # the image's top-left quarter
    assert (decode.decode_image(path, 8, face_crop=(1.5, 1.5, 2.0, 2.0)) == 0).all()


def test_crop_mode_square_comes_first(tmp_path):
    # A 60x20 landscape: red | green | blue thirds. The crop square is the green middle, so a
    # box left of it is black, not red: the box is in fractions of the square.
    a = np.zeros((20, 60, 3), np.uint8)
    a[:, :20], a[:, 20:40], a[:, 40:] = RED, GREEN, BLUE
    path = save(a, tmp_path / "land.png")
    assert (decode.decode_image(path, 10, "crop", face_crop=(0, 0, 1, 1)) == GREEN).all()
    left = decode.decode_image(path, 10, "crop", face_crop=(0, -1, 1, 0))
    assert (left[:, :8] == 0).all()
    # Pad mode: the square is 60x60 with black bands; its middle third is the image.
    padded = decode.decode_image(path, 12, "pad", face_crop=(1 / 3, 0, 2 / 3, 1))
    assert (padded[:, :3] == RED).all() and (padded[:, 5:7] == GREEN).all()
    top = decode.decode_image(path, 12, "pad", face_crop=(0, 0, 1 / 3, 1))
    assert (top[:-1] == 0).all()  # the last row blends with the image's first


def test_whole_box_matches_no_box(tmp_path):
    rng = np.random.default_rng(0)
    square = save(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8), tmp_path / "s.png")
    np.testing.assert_array_equal(decode.decode_image(square, 150, face_crop=(0, 0, 1, 1)),
                                  decode.decode_image(square, 150))
    smooth = np.asarray(Image.fromarray(
        rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)).resize((90, 60), Image.BILINEAR))
    land = save(smooth, tmp_path / "l.png")
    a = decode.decode_image(land, 32, "crop", face_crop=(0, 0, 1, 1)).astype(int)
    assert np.abs(a - decode.decode_image(land, 32, "crop")).mean() < 0.5
    # Pad: the no-box path rounds the band to whole pixels (21 of 21.33 rows), so only the
    # bands and the inside agree, not the blended rows between them.
    solid = save(np.full((60, 90, 3), 200, np.uint8), tmp_path / "solid.png")
    a = decode.decode_image(solid, 32, "pad", face_crop=(0, 0, 1, 1))
    b = decode.decode_image(solid, 32, "pad")
    np.testing.assert_array_equal(a[:5], b[:5])
    np.testing.assert_array_equal(a[6:26], b[6:26])
    np.testing.assert_array_equal(a[27:], b[27:])


def test_small_box_is_cut_at_full_resolution(tmp_path):
    rng = np.random.default_rng(1)
    big = rng.integers(0, 256, (400, 400, 3), dtype=np.uint8)
    out = decode.decode_image(save(big, tmp_path / "big.png"), 100,
                              face_crop=(0.25, 0.25, 0.75, 0.75))
    want = Image.fromarray(big).resize((100, 100), Image.BILINEAR, box=(100, 100, 300, 300))
    np.testing.assert_array_equal(out, np.asarray(want))
    # JPEG decodes at reduced scale only as far as the box still gets 100 pixels across.
    smooth = np.asarray(Image.fromarray(big[:50, :50]).resize((800, 800), Image.BICUBIC))
    Image.fromarray(smooth).save(tmp_path / "big.jpg", quality=95)
    out = decode.decode_image(str(tmp_path / "big.jpg"), 100,
                              face_crop=(0.25, 0.25, 0.75, 0.75)).astype(int)
    want = np.asarray(Image.fromarray(smooth).resize((100, 100), Image.BILINEAR,
                                                      box=(200, 200, 600, 600))).astype(int)
    assert np.abs(out - want).mean() < 4


def test_bytes_and_arrays_take_the_box_too(tmp_path):
    q = quadrants()
    path = save(q, tmp_path / "q.png")
    box = (0.5, 0.5, 1.0, 1.0)
    with open(path, "rb") as f:
        assert (decode.decode_bytes(f.read(), 8, face_crop=box)[1:, 1:] == WHITE).all()
    assert (decode.fit_array(q, 8, face_crop=box)[1:, 1:] == WHITE).all()
    assert (decode.fit_array(q[..., 0], 8, face_crop=(0, 0, 0.5, 0.5))[:-1, :-1] == 255).all()


@pytest.mark.parametrize("box", [
    (0, 0, 1), (0, 0, 1, 1, 1), ("a", 0, 1, 1), (True, 0, 1, 1), (0, 0, math.nan, 1),
    (0, 0, 1, math.inf), (0.5, 0, 0.5, 1), (0, 1, 1, 0.5), (-3, 0, 1, 1), (0, 0, 1, 10),
    "0,0,1,1", 5,
])
def test_bad_boxes_are_config_errors(tmp_path, box):
    with pytest.raises(ConfigError, match="face_crop"):
        decode.check_face_crop(box)
    # Checked before the file is even opened.
    with pytest.raises(ConfigError, match="face_crop"):
        decode.decode_image(str(tmp_path / "missing.png"), 8, face_crop=box)


def test_good_boxes_normalise_to_float_tuples():
    assert decode.check_face_crop(()) == () and decode.check_face_crop(None) == ()
    assert decode.check_face_crop([]) == ()
    assert decode.check_face_crop([0, 0, 1, 1]) == (0.0, 0.0, 1.0, 1.0)
    assert decode.check_face_crop(np.array([0.2, -0.1, 1.1, 2.0])) == (0.2, -0.1, 1.1, 2.0)


def test_override_parses_into_the_empty_default():
    cfg = load_common_configs().base()
    apply_override(cfg, "data.face_crop=(0.21, 0.075, 1.07, 0.937)")
    assert cfg.data.face_crop == (0.21, 0.075, 1.07, 0.937)
    apply_override(cfg, "data.face_crop=0,0,1,1")  # a bare tuple works too (ints are fine)
    assert decode.check_face_crop(cfg.data.face_crop) == (0.0, 0.0, 1.0, 1.0)
    apply_override(cfg, "data.face_crop=()")
    assert cfg.data.face_crop == ()


def test_cache_keys_and_names_differ_per_box(image_folder, tmp_path, capsys):
    root, _ = image_folder({"a": 2, "b": 2}, size=(20, 20))
    listing = scan_folder(root)
    kw = dict(image_size=8, cache_dir=str(tmp_path / "cache"), workers=1)
    whole = cache_listing(listing, **kw)
    box1 = cache_listing(listing, face_crop=(0, 0, 0.5, 0.5), **kw)
    box2 = cache_listing(listing, face_crop=(-0.5, -0.5, 0.5, 0.5), **kw)
    names = [os.path.basename(e.directory) for e in (whole, box1, box2)]
    assert len(set(names)) == 3 and "box" not in names[0]
    assert "-box0_0_0.5_0.5-" in names[1] and "-box-0.5_-0.5_0.5_0.5-" in names[2]
    keys = {json.load(open(os.path.join(e.directory, "manifest.json")))["key"]
            for e in (whole, box1, box2)}
    assert len(keys) == 3
    manifest = json.load(open(os.path.join(box2.directory, "manifest.json")))
    assert manifest["face_crop"] == [-0.5, -0.5, 0.5, 0.5]
    assert (np.asarray(box2.images)[:, :3, :3] == 0).all()  # the padded corner
    again = cache_listing(listing, face_crop=[0, 0, 0.5, 0.5], **kw)  # list == tuple
    assert again.reused and again.directory == box1.directory
    with pytest.raises(ConfigError, match="face_crop"):
        cache_listing(listing, face_crop=(0, 0, 0, 0), **kw)


def test_prepare_data_passes_the_box(image_folder, data_config, capsys):
    root, _ = image_folder({"a": 4, "b": 4}, size=(20, 20))
    data_config.root = root
    data_config.face_crop = (1.5, 1.5, 2.0, 2.0)
    assert (np.asarray(prepare_data(data_config).images) == 0).all()
    # Checked before scanning: a bad box fails even for a folder that does not exist.
    data_config.root = str(os.path.join(root, "missing"))
    data_config.face_crop = (0, 0, 1)
    with pytest.raises(ConfigError, match="face_crop"):
        prepare_data(data_config)
    # A run config written before the field existed decodes whole images.
    old = data_config.to_dict()
    del old["face_crop"]
    old["root"] = root
    assert np.asarray(prepare_data(ml_collections.ConfigDict(old)).images).any()
