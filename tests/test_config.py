"""Config loading and `--config.a.b=value` overrides: typed, and unknown keys are errors."""

import os
import subprocess
import sys

import pytest

from facejax.config import apply_override, load_config, split_override_args
from facejax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.py")


def _write(tmp_path, body: str) -> str:
    path = tmp_path / "cfg.py"
    path.write_text(body)
    return str(path)


def test_overrides_are_typed():
    c = load_config(DEMO, ["train.learning_rate=0.5", "train.epochs=7", "augment.hflip=false",
                           "eval.ks=(1, 3)", "augment.rrc_scale=(0.25, 1)", "model.name=vgg16"])
    assert c.train.learning_rate == 0.5 and isinstance(c.train.learning_rate, float)
    assert c.train.epochs == 7
    assert c.augment.hflip is False
    assert tuple(c.eval.ks) == (1, 3)
    assert tuple(c.augment.rrc_scale) == (0.25, 1.0)
    assert all(isinstance(v, float) for v in c.augment.rrc_scale)
    assert c.model.name == "vgg16"
    # an int where a float is expected is fine; a float where an int is expected is not
    assert load_config(DEMO, ["train.learning_rate=1"]).train.learning_rate == 1.0


@pytest.mark.parametrize("override, message", [
    ("train.learnin_rate=0.1", "did you mean 'learning_rate'"),
    ("trian.epochs=3", "did you mean 'train'"),
    ("train.epochs=abc", "train.epochs expects int"),
    ("train.epochs=1.5", "train.epochs expects int"),
    ("augment.hflip=maybe", "expects true or false"),
    ("eval.ks=(0.5, 'a')", "sequence of int"),
    ("train=3", "group of settings"),
    ("train.epochs", "must look like a.b=value"),
])
def test_bad_overrides_are_clear_errors(override, message):
    c = load_config(DEMO)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        apply_override(c, override)


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.py"))
    with pytest.raises(ConfigError, match="no get_config"):
        load_config(_write(tmp_path, "x = 1\n"))
    with pytest.raises(ConfigError, match="ZeroDivisionError"):
        load_config(_write(tmp_path, "def get_config():\n    return 1 / 0\n"))
    with pytest.raises(ConfigError, match="must return an ml_collections.ConfigDict"):
        load_config(_write(tmp_path, "def get_config():\n    return None\n"))
    with pytest.raises(ConfigError, match="for argument 'foo'"):
        load_config(DEMO + ":foo")
    with pytest.raises(ConfigError, match="SyntaxError"):
        load_config(_write(tmp_path, "def get_config(:\n"))


@pytest.mark.parametrize("old, new", [("train.margin_scale", "train.logit_scale"),
                                      ("index.batch_size", "index.embed_batch_size")])
def test_a_renamed_setting_names_its_new_key(tmp_path, old, new):
    with pytest.raises(ConfigError, match=f"'{old}' was renamed '{new}': set {new} instead"):
        load_config(DEMO, [f"{old}=30"])
    section, name = old.split(".")
    body = ("from facejax.config_schema import base\n"
            f"def get_config():\n    c = base()\n    c.{section}.{name} = 30\n    return c\n")
    with pytest.raises(ConfigError, match=f"sets config key '{old}' was renamed '{new}'"):
        load_config(_write(tmp_path, body))
    assert load_config(DEMO, [f"{new}=30"])[section][new.split(".")[1]] == 30


def test_split_override_args():
    overrides, rest = split_override_args(
        ["--workdir", "w", "--config.train.epochs=3", "--config.seed", "4", "--x"])
    assert overrides == ["train.epochs=3", "seed=4"]
    assert rest == ["--workdir", "w", "--x"]
    with pytest.raises(ConfigError, match="needs a value"):
        split_override_args(["--config.seed"])


@pytest.mark.parametrize("args, message", [
    (["--config", "configs/demo.py", "--config.train.epoch=2"], "did you mean 'epochs'"),
    (["--config", "nope.py"], "config file not found"),
    (["--config", "configs/demo.py", "--config.train.margin_scale=30"],
     "'train.margin_scale' was renamed 'train.logit_scale': set train.logit_scale instead"),
])
def test_scripts_print_one_line_not_a_traceback(args, message, tmp_path):
    proc = subprocess.run([sys.executable, "scripts/train.py", "--workdir", str(tmp_path / "w"),
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert message in proc.stderr
