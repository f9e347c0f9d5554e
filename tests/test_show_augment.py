"""scripts/show_augment.py: the grid PNG, and a folder given as --out."""

import importlib.util
import os

import pytest

from facejax.errors import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
    spec = importlib.util.spec_from_file_location(
        "_script_show_augment", os.path.join(ROOT, "scripts", "show_augment.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SMALL = ["--num", "2", "--rows", "1", "--config.data.image_size=16"]


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
