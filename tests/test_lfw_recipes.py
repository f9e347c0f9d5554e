"""configs/lfw.py means the same experiment on every machine: whether a weights file is
installed changes nothing in the config; a missing file is an error naming the fix, and random
initialisation is a recipe of its own."""

import os

import pytest
from flax import nnx

from facejax.config import load_config, to_json
from facejax.convert.weights import load_from_config
from facejax.errors import ConfigError, WeightsError
from facejax.models import get_preset
from facejax.train import state as state_lib

LFW = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                   "lfw.py")


@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    """Empty weight caches and no network: no machine-wide file can be found."""
    for var in ("HOME", "FACEJAX_WEIGHTS", "KERAS_HOME", "TORCH_HOME", "XDG_CACHE_HOME"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("FACEJAX_OFFLINE", "1")
    return tmp_path


def test_an_installed_weights_file_changes_nothing(no_weights):
    without = to_json(load_config(f"{LFW}:resnet18,best,closed_set"))
    mine = no_weights / "facejax_weights"
    mine.mkdir()
    (mine / get_preset("resnet18").filename).write_bytes(b"not checked by the config")
    assert to_json(load_config(f"{LFW}:resnet18,best,closed_set")) == without
    cfg = load_config(f"{LFW}:resnet18,best,closed_set")
    assert cfg.model.pretrained == "imagenet" and cfg.train.head_init == "imprint"


def test_a_missing_weights_file_is_an_error_naming_the_fix(no_weights):
    cfg = load_config(f"{LFW}:resnet18,seed,closed_set", ["model.input_size=32"])
    # The model's structure only: the file is looked for before any weight is touched, and
    # running resnet18's random initialisers costs seconds of compiling.
    model = nnx.eval_shape(lambda: state_lib.build_model(cfg, 3))
    with pytest.raises(WeightsError, match="FACEJAX_OFFLINE is set; download .* and put"):
        load_from_config(model, cfg.model)


def test_random_initialisation_is_an_explicit_recipe(no_weights):
    seed = load_config(f"{LFW}:resnet18,seed-random,closed_set")
    assert seed.model.pretrained == "" and seed.train.finetune == "all"
    best = load_config(f"{LFW}:dlib_resnet,best-random,open_set")
    assert best.model.pretrained == "" and best.train.head_init == "random"
    assert best.train.epochs == 20 and best.model.embed_dim == 0 and best.model.head == "cosine"
    assert load_config(f"{LFW}:scratch_cnn,best,open_set").model.pretrained == ""
    with pytest.raises(ConfigError, match="best-random"):  # the error lists the recipes
        load_config(f"{LFW}:resnet18,random,closed_set")
