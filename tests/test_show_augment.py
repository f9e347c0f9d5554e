"""scripts/show_augment.py: the grid PNG, and a folder given as --out."""

import importlib.util
import os

import numpy as np
import pytest
from PIL import Image

from facejax.errors import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
    spec = importlib.util.spec_from_file_location(
        "_script_show_augment", os.path.join(ROOT, "scripts", "show_augment.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SMALL = ["--num", "2", "--rows", "1", "--config.data.image_size=16"]


@pytest.mark.slow
def test_out_file_and_folder(tmp_path, capsys):
    script = _script()
    out = tmp_path / "sub" / "grid.png"
    assert script.main(["--out", str(out)] + SMALL) == 0
    assert out.stat().st_size > 0
    # A folder (trailing slash or existing) gets augment.png, never a file named '.png'.
    for folder in (str(tmp_path / "new") + "/", str(tmp_path)):
        assert script.main(["--out", folder] + SMALL) == 0
        assert os.path.getsize(os.path.join(folder, script.DEFAULT_OUT)) > 0
    assert not (tmp_path / "new" / ".png").exists() and not (tmp_path / ".png").exists()
    assert f"wrote {os.path.join(str(tmp_path), 'augment.png')}" in capsys.readouterr().out


def test_bad_counts():
    with pytest.raises(DataError, match="--num and --rows"):
        _script().main(["--out", "x.png", "--num", "0"])


def _runs(mask) -> list[tuple[int, int]]:
    """[start, stop) of each stretch of True at least 10 long in a 1-D mask."""
    edges = np.flatnonzero(np.diff(np.r_[0, mask.astype(int), 0]))
    return [(a, b) for a, b in zip(edges[::2], edges[1::2]) if b - a >= 10]


@pytest.mark.slow
def test_grid_shows_the_images_in_columns_and_every_draw_in_rows(tmp_path):
    """Two flat-colour images (a flat image stays flat under the default flips, shifts and
    reflect-filled rotations): each colour fills one column, in the originals' row and in each
    draw's row."""
    folder = tmp_path / "images"
    folder.mkdir()
    colours = {"red": (220, 30, 30), "blue": (30, 40, 210)}
    for name, colour in colours.items():
        Image.new("RGB", (16, 16), colour).save(folder / f"{name}.png")
    out = tmp_path / "grid.png"
    assert _script().main(["--out", str(out), "--images", str(folder), "--num", "2",
                           "--rows", "2", "--config.data.image_size=16"]) == 0
    with Image.open(out) as im:
        pixels = np.asarray(im.convert("RGB")).astype(int)
    columns = []
    for colour in colours.values():
        mask = np.all(np.abs(pixels - colour) <= 3, axis=-1)
        rows, cols = _runs(mask.any(axis=1)), _runs(mask.any(axis=0))
        assert len(rows) == 3, "the originals' row and one row per draw"
        assert len(cols) == 1, "one image per column"
        columns.append(cols[0])
    (a0, a1), (b0, b1) = sorted(columns)
    assert a1 <= b0  # side by side, not on top of each other
