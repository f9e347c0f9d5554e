"""First-run traps (issue 18, items 2, 3 and 9): what a new user meets on a small folder."""

import json
import os

import pytest
from conftest import write_image_folder

from facejax.config import load_config
from facejax.errors import DataError
from facejax.train import loop
from facejax.train.batch import fitting_batch_size

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")


def small_folder(tmp_path, per_class: int = 50, classes: int = 4) -> str:
    root = str(tmp_path / "images")
    write_image_folder(root, {f"c{k}": per_class for k in range(classes)}, size=(20, 20))
    return root


def small_overrides(tmp_path, root: str, *extra: str) -> list[str]:
    """A 24 px scratch CNN run on `root`, decoded in-process into a per-test cache."""
    return [f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}",
            "data.decode_workers=1", "data.image_size=24", "model.input_size=24",
            "train.compute_dtype=float32", *extra]


# --- item 3: a batch larger than the training set -------------------------------------------

def test_fitting_batch_size_is_the_largest_power_of_two_that_fits():
    assert fitting_batch_size(128, 127) == 64
    assert fitting_batch_size(128, 128) == 128
    assert fitting_batch_size(128, 1000) == 128
    assert fitting_batch_size(64, 5) == 4
    assert fitting_batch_size(128, 1) == 1
    assert fitting_batch_size(128, 100, num_devices=4) == 64
    assert fitting_batch_size(128, 100, num_devices=3) == 99  # no power of two divides by 3
    with pytest.raises(DataError, match="fewer than the 4 devices"):
        fitting_batch_size(128, 3, num_devices=4)


@pytest.mark.parametrize("epochs", [0, 1])
def test_default_batch_fits_a_200_image_folder(tmp_path, capsys, epochs):
    """configs/scratch_cnn.py (batch 128) on 200 images: ~120 training images. The run lowers
    the batch to a power of two that fits and says so, with and without training."""
    root = small_folder(tmp_path)
    cfg = load_config(os.path.join(CONFIGS, "scratch_cnn.py"), small_overrides(
        tmp_path, root, f"train.epochs={epochs}", "train.max_steps_per_epoch=1"))
    assert cfg.train.batch_size == 128
    workdir = str(tmp_path / "run")
    loop.train_and_evaluate(cfg, workdir)
    with open(os.path.join(workdir, "config.json")) as f:
        saved = json.load(f)
    out = capsys.readouterr().out
    assert "fewer than one batch of 128: using train.batch_size=64" in out
    assert saved["train"]["batch_size"] == 64
    assert cfg.train.batch_size == 128  # the caller's config is not changed
