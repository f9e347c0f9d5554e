"""configs/lfw.py (a quality-report cell as a config), the raw-pixel baseline, bench/quality.py."""

import json
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import write_image_folder
from flax import nnx

from facejax.config import load_config
from facejax.errors import ConfigError
from facejax.models import create_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LFW = os.path.join(ROOT, "configs", "lfw.py")
sys.path.insert(0, os.path.join(ROOT, "bench"))
import quality  # noqa: E402


def cfg(arg):
    return load_config(f"{LFW}:{arg}")


def test_lfw_config_recipes_and_protocols():
    seed = cfg("scratch_cnn,seed,closed_set,2")
    assert (seed.seed, seed.data.split_seed) == (2, 2)
    assert seed.train.loss == "softmax" and seed.train.optimizer == "adam"
    assert seed.train.schedule == "step" and seed.train.finetune == "all"  # random init
    assert seed.data.min_images_per_class == 5 and seed.data.test_fraction > 0
    best = cfg("resnet18,best,open_set")
    assert best.train.loss == "arcface" and best.model.head == "cosine"
    assert best.model.embed_dim == 128 and best.data.protocol == "open_set"
    assert best.data.min_images_per_class == 2 and best.model.input_size == 112
    assert cfg("resnet18,features,closed_set").train.epochs == 0
    assert cfg("raw_pixels,best,closed_set").train.epochs == 0  # nothing to train
    assert cfg("resnet18,best-softmax,closed_set").train.loss == "softmax"
    dlib_softmax = cfg("dlib_resnet,best-softmax,open_set")
    assert dlib_softmax.train.head_init == "random" and dlib_softmax.model.head == "linear"
    assert cfg("dlib_resnet,best,open_set").train.head_init == "imprint"
    assert cfg("resnet18,best-64px,closed_set").model.input_size == 64
    assert cfg("resnet18,best-frozen,closed_set").train.finetune == "frozen_backbone"
    noaug = cfg("resnet18,best-noaug,closed_set").augment
    assert not noaug.hflip and noaug.rotation_deg == 0
    for bad in ("resnet18,nope,closed_set", "resnet18,best,both", "resnet18"):
        with pytest.raises(ConfigError, match="get_config"):
            cfg(bad)


def test_lfw_config_is_the_same_whether_or_not_the_file_is_installed(tmp_path, monkeypatch):
    """The preset's file is made present (in $FACEJAX_WEIGHTS, searched first) or hidden
    (nothing else searched): the config does not change (training then finds the file or says
    where to put it); starting from random weights is the explicit `-random` recipe."""
    from facejax.convert import weights
    from facejax.models import get_preset

    filename = get_preset("efficientnet_lite0").filename
    monkeypatch.setenv("FACEJAX_WEIGHTS", str(tmp_path))
    (tmp_path / filename).write_bytes(b"present")
    lite = cfg("efficientnet_lite0,seed,closed_set")
    assert lite.model.pretrained == "imagenet" and lite.train.finetune == "last_n"
    assert cfg("efficientnet_lite0,best,closed_set").train.head_init == "imprint"
    monkeypatch.setattr(weights, "candidates", lambda preset: [("tmp", tmp_path / "absent")])
    assert cfg("efficientnet_lite0,seed,closed_set").to_dict() == lite.to_dict()
    scratch = cfg("efficientnet_lite0,seed-random,closed_set")
    assert scratch.model.pretrained == "" and scratch.train.finetune == "all"
    assert cfg("efficientnet_lite0,best-random,closed_set").train.head_init == "random"


@pytest.mark.slow
def test_raw_pixels_features_ignore_brightness():
    model = create_model("raw_pixels", num_classes=2, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).random((2, 48, 48, 3)), jnp.float32)
    f = model.features(x)
    assert f.shape == (2, 32 * 32 * 3) and model.backbone.num_features == 3072
    np.testing.assert_allclose(np.asarray(f), np.asarray(model.features(x + 0.1)), atol=1e-5)
    assert not nnx.state(model.backbone, nnx.Param)  # no parameters


def test_plan_and_tables():
    class A:
        models = recipes = protocols = seeds = ""
        quick = True
    cells = quality.plan(A)
    assert ("closed_set" in {c[2] for c in cells}) and {c[3] for c in cells} == {0}
    A.quick, A.models, A.recipes = False, "raw_pixels,resnet18", "features,best"
    cells = quality.plan(A)
    assert ("raw_pixels", "best") not in {(m, r) for m, r, _, _ in cells}
    assert {c[3] for c in cells} == {0, 1, 2}
    A.models = "resnet19"
    with pytest.raises(ConfigError, match="unknown model"):
        quality.plan(A)
    metrics = {k: 0.5 for k in quality.COLUMNS}
    rows = [dict(model="resnet18", recipe="best", protocol="closed_set", seed=s, epochs_run=9,
                 pretrained="random init", metrics=dict(metrics, top1=t), train_time_s=10.0,
                 train_images_per_s=20.0, peak_rss_mb=100.0) for s, t in ((0, 0.4), (1, 0.6))]
    md = quality.table(rows, "closed_set")
    assert "| resnet18 | random init | best | 0,1 | 0.500 ± 0.141 | 0.500 ± 0.000 |" in md
    assert quality.table(rows, "open_set").count("\n") == 1  # header only
    capped = [dict(r, max_epochs=3) for r in rows]
    assert "| best (3 ep. max) |" in quality.table(rows + capped, "closed_set")


@pytest.mark.slow
def test_one_cell_end_to_end(tmp_path, monkeypatch):
    """raw_pixels features on a tiny 6-identity folder: train(0 epochs) -> export -> index ->
    evaluate -> cell.json, then the tables; a second run reuses the cell."""
    root = tmp_path / "lfw"
    write_image_folder(root, {f"person{i}": 6 for i in range(6)}, size=(20, 20))
    monkeypatch.setenv("FACEJAX_LFW", str(root))
    monkeypatch.setenv("FACEJAX_CACHE", str(tmp_path / "cache"))
    out = str(tmp_path / "q")
    cell = quality.run_cell(out, "raw_pixels", "features", "closed_set", 0, pairs="",
                            overrides=("train.batch_size=8",))
    assert cell["metrics"]["top1"] == 1.0  # one flat colour per identity
    assert cell["num_identities"] == 6 and cell["pretrained"] == "none"
    saved = os.path.join(quality.cell_dir(out, "raw_pixels", "features", "closed_set", 0),
                         "cell.json")
    assert json.load(open(saved))["metrics"] == cell["metrics"]
    md = str(tmp_path / "Q.md")
    assert quality.main(["--out", out, "--md", md, "--models", "raw_pixels", "--recipes",
                         "features", "--protocols", "closed_set", "--seeds", "0"]) == 0
    assert "| raw_pixels | none | features | 0 | 1.000 |" in open(md).read()
    assert quality.cell_dir(out, "m", "best", "open_set", 1, 5).endswith(
        os.path.join("open_set", "m-best-e5", "seed1"))
