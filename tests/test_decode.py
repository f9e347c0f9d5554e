"""decode_image on the generated bad-input corpus: good files decode right, bad ones say why."""

import os

import numpy as np
import pytest
from conftest import CORPUS_BAD, CORPUS_GOOD, CORPUS_MAX_PIXELS, write_corpus
from PIL import Image

from facejax.data import decode
from facejax.data.decode import BadImage, decode_image, fit_array
from facejax.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    directory = tmp_path_factory.mktemp("corpus")
    write_corpus(directory)
    return str(directory)


def _decode(corpus, name, size=8, mode="crop"):
    return decode_image(os.path.join(corpus, name), size, mode, max_pixels=CORPUS_MAX_PIXELS)


@pytest.mark.parametrize("name", sorted(n for n, c in CORPUS_GOOD.items() if c is not None))
def test_good_files_decode_to_their_colour(corpus, name):
    out = _decode(corpus, name)
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    tolerance = 8 if name.lower().endswith((".jpg", ".jpeg")) else 1
    np.testing.assert_allclose(out.reshape(-1, 3).mean(0), CORPUS_GOOD[name], atol=tolerance)
    assert np.ptp(out.reshape(-1, 3).astype(int), axis=0).max() <= 2 * tolerance


@pytest.mark.parametrize("name", sorted(CORPUS_BAD))
def test_bad_files_raise_bad_image_with_reason(corpus, name):
    with pytest.raises(BadImage) as info:
        _decode(corpus, name)
    assert info.value.reason == CORPUS_BAD[name]
    assert isinstance(info.value, DataError)


def test_rgba_transparency_is_composited_on_black(corpus):
    out = _decode(corpus, "rgba.png", size=10, mode="pad")  # 12x10 -> 10x8, rows 1..8
    content = out[1:9]
    np.testing.assert_array_equal(content[:, :4], np.broadcast_to([255, 0, 0], (8, 4, 3)))
    np.testing.assert_array_equal(content[:, 6:], 0)  # stored white, but fully transparent


def test_exif_orientation_is_applied(corpus):
    # Stored 40x20 with red left, blue right; orientation 6 displays it portrait 20x40 with
    # red on top. Padded to 40x40 the content fills columns 10..29.
    out = _decode(corpus, "exif_rotated.jpg", size=40, mode="pad").astype(int)
    assert out[:, :9].max() == 0 and out[:, 31:].max() == 0
    top, bottom = out[2:17, 12:28].reshape(-1, 3).mean(0), out[23:38, 12:28].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[2] < 50, top
    assert bottom[2] > 200 and bottom[0] < 50, bottom


def test_without_exif_the_same_image_stays_landscape(tmp_path):
    land = np.zeros((20, 40, 3), np.uint8)
    land[:, :20] = (255, 0, 0)
    land[:, 20:] = (0, 0, 255)
    Image.fromarray(land).save(tmp_path / "plain.png")
    out = decode_image(str(tmp_path / "plain.png"), 40, "pad")
    assert out[:10].max() == 0 and out[30:].max() == 0
    np.testing.assert_array_equal(out[15, 5], [255, 0, 0])
    np.testing.assert_array_equal(out[15, 35], [0, 0, 255])


def test_crop_keeps_the_center_and_pad_keeps_everything(tmp_path):
    a = np.zeros((20, 60, 3), np.uint8)  # 60 wide: left and right thirds green, middle white
    a[:, :20] = (0, 255, 0)
    a[:, 20:40] = 255
    a[:, 40:] = (0, 255, 0)
    Image.fromarray(a).save(tmp_path / "wide.png")
    crop = decode_image(str(tmp_path / "wide.png"), 10, "crop")
    # Only the white middle third survives the crop (edge columns blend: antialiased resize).
    assert crop[:, 1:9].min() >= 250 and crop[:, [0, 9], 0].max() < 250
    pad = decode_image(str(tmp_path / "wide.png"), 30, "pad")  # 60x20 -> 30x10 in rows 10..19
    assert pad[:10].max() == 0 and pad[20:].max() == 0
    np.testing.assert_array_equal(pad[15, 2], [0, 255, 0])
    np.testing.assert_array_equal(pad[15, 15], [255, 255, 255])


def test_image_already_at_size_is_unchanged(tmp_path):
    a = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "exact.png")
    np.testing.assert_array_equal(decode_image(str(tmp_path / "exact.png"), 16), a)


def test_pixel_limit_is_checked_from_the_header(corpus, monkeypatch):
    # Decoding must not start: make any pixel load fail loudly.
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded a huge image"))
    with pytest.raises(BadImage, match="too large"):
        _decode(corpus, "huge.png")


def test_pil_decompression_bomb_error_becomes_too_large(corpus, monkeypatch):
    # With PIL's own limit far below ours we lift it to max_pixels; above 2x that PIL itself
    # refuses inside Image.open, which must still read as "too large".
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(BadImage) as info:
        decode_image(os.path.join(corpus, "huge.png"), 8, max_pixels=1000)
    assert info.value.reason == "too large" and "decompression" in info.value.detail.lower()
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_missing_file_and_folder_are_unreadable(tmp_path):
    for path in (tmp_path / "nope.jpg", tmp_path):
        with pytest.raises(BadImage) as info:
            decode_image(str(path), 8)
        assert info.value.reason == "unreadable"


def test_decode_bytes_matches_decode_image(corpus):
    with open(os.path.join(corpus, "rgb.webp"), "rb") as f:
        data = f.read()
    np.testing.assert_array_equal(decode.decode_bytes(data, 8), _decode(corpus, "rgb.webp"))
    with pytest.raises(BadImage, match="empty file"):
        decode.decode_bytes(b"", 8)
    with pytest.raises(BadImage, match="not an image"):
        decode.decode_bytes(b"hello", 8)


def test_bad_settings_are_data_errors(corpus):
    with pytest.raises(DataError, match="resize mode"):
        _decode(corpus, "rgb.jpg", mode="stretch")


@pytest.mark.parametrize("array, expected", [
    (np.full((28, 28), 77, np.uint8), (77, 77, 77)),
    (np.full((5, 7, 1), 9, np.uint8), (9, 9, 9)),
    (np.full((4, 4, 3), (1, 2, 3), np.uint8), (1, 2, 3)),
    (np.full((4, 4, 4), (100, 0, 0, 255), np.uint8), (100, 0, 0)),
    (np.full((4, 4), 51400, np.uint16), (200, 200, 200)),
    (np.full((4, 4), 0.5, np.float32), (128, 128, 128)),
])
def test_fit_array_converts_any_layout(array, expected):
    out = fit_array(array, 6)
    assert out.shape == (6, 6, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.broadcast_to(expected, (6, 6, 3)))


def test_fit_array_rejects_odd_shapes():
    with pytest.raises(BadImage, match="unsupported array"):
        fit_array(np.zeros((4, 4, 2), np.uint8), 6)


def test_big_jpeg_reduced_decoding_matches_full_decoding(tmp_path):
    # Large JPEGs are decoded at a reduced DCT scale (draft); the result must still match a
    # full decode + resize, and EXIF rotation must still apply on top of it.
    y, x = np.mgrid[0:400, 0:800]
    a = np.stack([x * 255 // 800, y * 255 // 400, (x + y) * 255 // 1200], -1).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(tmp_path / "big.jpg", quality=95, exif=exif.tobytes())
    out = decode_image(str(tmp_path / "big.jpg"), 40, "crop").astype(int)
    upright = Image.open(tmp_path / "big.jpg").convert("RGB").transpose(Image.Transpose.ROTATE_270)
    ref = np.asarray(upright.resize((40, 80), Image.BILINEAR).crop((0, 20, 40, 60))).astype(int)
    assert np.abs(out - ref).mean() < 3


def test_a_size_above_the_bound_is_refused_before_a_canvas_is_allocated(corpus):
    # data.image_size=100000 made a 30 GB canvas; the embedder's input_size reaches here too.
    with pytest.raises(ConfigError, match=r"data\.image_size=5000 is above its upper bound"):
        _decode(corpus, "rgb.jpg", size=5000)
    with pytest.raises(ConfigError, match="upper bound"):
        fit_array(np.zeros((4, 4), np.uint8), 5000)
