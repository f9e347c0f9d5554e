"""The run folder (`--workdir`): its layout, its `config.json`, and the folder itself.

One run = one folder, written by training and read by export, indexing, evaluation, search and
serving. Every module names the folder's parts through these constants, reads the run's
config through `read_run_config` (which brings a config.json written by an older facejax onto
today's schema, once, here), and checks or creates the folder through `check_workdir` /
`make_workdir`. It imports no sub-package, so any of them may import it.
"""

from __future__ import annotations

import copy
import json
import os

import ml_collections

from facejax.config import has_key
from facejax.errors import CheckpointError, ConfigError

# The layout (docs/CONTRACTS.md, "Workdir layout").
CONFIG_JSON = "config.json"  # the resolved config
CLASSES_JSON = "classes.json"  # the training class names
CHECKPOINT_DIR = "checkpoints"  # orbax: best + latest
METRICS_JSONL = "metrics.jsonl"  # one line per epoch
EVENTS_DIR = "events"  # TensorBoard
PLOTS_DIR = "plots"  # training curves
EMBEDDER_DIR = "embedder"  # jax.export artifact + its meta
INDEX_DIR = "index"  # the saved index + manifest.json
INDEX_WORK_DIR = "index_work"  # resumable embedding shards while an index is built
REPORT_DIR = "report"  # report.md/json/html and figures

# The run settings the retrieval steps read (prepare_data checks the rest of `data` itself):
# a config.json without one of these was not written by facejax.
RUN_KEYS = ("seed", "model.name", "data.source", "data.root", "data.image_size",
            "data.resize_mode", "data.max_pixels", "index.backend", "index.exact_max_items",
            "index.target_recall", "index.embed_batch_size", "eval.ks", "eval.num_figure_queries")
# Settings added after runs were first saved, whose absence in an older config.json means
# something other than today's default: a run without data.test_fraction trained with no test
# side (0 reproduces its train set, so evaluation never queries training images), one without
# data.max_cache_gb had the free disk as its only cache limit. Every other setting such a
# config.json lacks takes the schema's default (facejax/config_schema.py).
# data.exact_counts_below: hash thresholds for every class (the split such a run was made with).
OLD_MEANING = {"data.test_fraction": 0.0, "data.max_cache_gb": 0.0, "data.exact_counts_below": 0}
# Settings renamed since runs were first saved: old dotted key -> today's. `migrate` moves an old
# key's value to its new name (a config.json or a checkpoint's saved config), and an override or
# a config file that still names the old key gets a ConfigError naming the new one.
RENAMED = {"train.margin_scale": "train.logit_scale",
           "index.batch_size": "index.embed_batch_size"}
# Embedder meta keys (embedder.json, and the copy in an index's manifest.json) renamed since
# artifacts were first exported: old -> today's. input_size was the side of the uint8 cache
# images the artifact takes (model.input_size, the network's input, is another setting).
EMBEDDER_META_RENAMED = {"input_size": "cache_size"}
# Settings that hold for one command only: config.json's value (a resumed training run may
# have saved true) is never inherited; an override sets them again.
COMMAND_KEYS = {"data.allow_changed_data": False}


def read_json(path: str, missing: str = "", fix: str = "") -> object:
    """The JSON value in `path`, a file that facejax wrote into a run folder (config, classes,
    embedder meta, index manifest). CheckpointError when it is not there (`missing`, default
    "PATH is missing") or cannot be read or parsed ("cannot read PATH: why", then `; fix`)."""
    if not os.path.isfile(path):
        raise CheckpointError(missing or f"{path} is missing")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}" + (f"; {fix}" if fix else "")) from None


def read_run_config(workdir: str, required=RUN_KEYS) -> ml_collections.ConfigDict:
    """The resolved config that training saved as `workdir/config.json`, on today's schema.

    Raises CheckpointError if the file is missing, unreadable or lacks one of `required`
    (checked in the file as written, a RENAMED key under its old name included, before
    `migrate` fills in what it lacks).
    """
    path = os.path.join(workdir, CONFIG_JSON)
    raw = read_json(path, f"{path} is missing: is {workdir} a training workdir?")
    try:
        if not isinstance(raw, dict):
            raise ValueError(f"expected a JSON object, got {type(raw).__name__}")
        saved = ml_collections.ConfigDict(renamed(raw))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    missing = [key for key in dict.fromkeys(required) if not has_key(saved, key)]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}: it was not written by this "
                              f"version of facejax; add the missing settings or retrain")
    config = migrate(raw)
    for key, value in COMMAND_KEYS.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


def migrate(saved: dict) -> ml_collections.ConfigDict:
    """A config saved by any facejax version merged onto today's schema: each setting it lacks
    gets its old meaning (OLD_MEANING) or the schema's default; what it has is kept as saved
    (settings the schema no longer has included), a renamed setting under its new name
    (RENAMED)."""
    from facejax.config_schema import base

    saved = renamed(saved)
    schema = base()
    for key, value in OLD_MEANING.items():
        section, name = key.split(".")
        schema[section][name] = value
    model = saved.get("model")
    if isinstance(model, dict) and "embedding_pool" not in model \
            and model.get("name") == "scratch_cnn":
        # The scratch CNN's index stored its Flatten before model.embedding_pool existed.
        schema.model.embedding_pool = "flatten"
    return ml_collections.ConfigDict(_merge(schema.to_dict(), saved))


def renamed(saved: dict) -> dict:
    """A copy of a saved config (a JSON object) with each RENAMED key under its new name; where
    both are present (never written by facejax) the new one is kept."""
    out = {key: dict(value) if isinstance(value, dict) else value for key, value in saved.items()}
    for old, new in RENAMED.items():
        (section, old_name), (new_section, new_name) = old.split("."), new.split(".")
        if isinstance(out.get(section), dict) and old_name in out[section]:
            value = out[section].pop(old_name)
            if isinstance(out.get(new_section), dict):
                out[new_section].setdefault(new_name, value)
    return out


def migrate_embedder_meta(meta) -> dict:
    """A copy of an embedder's meta (or an index manifest's copy of it) with each
    EMBEDDER_META_RENAMED key under its new name; where both are present the new one is kept."""
    out = dict(meta)
    for old, new in EMBEDDER_META_RENAMED.items():
        if old in out:
            out.setdefault(new, out.pop(old))
    return out


def _merge(defaults: dict, saved: dict) -> dict:
    out = dict(defaults)
    for key, value in saved.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def check_workdir(workdir: str) -> str:
    """The absolute path of a run folder; ConfigError when a file is in the way."""
    path = os.path.abspath(workdir)
    probe = path
    while not os.path.exists(probe):  # ends at the root folder at the latest
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        what = "is a file" if probe == path else f"is inside {probe}, which is a file"
        raise ConfigError(f"--workdir {workdir} {what}; give a folder (it is created if "
                          "missing)")
    return path


def make_workdir(path: str) -> bool:
    """Creates the run folder (checked by `check_workdir`); True when it did not exist."""
    if os.path.isdir(path):
        return False
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the run folder {path}: {e}") from e
    return True


# Config paths that the trainer resolves, so later steps (build_index, eval) work from any
# current directory.
PATH_FIELDS = ("root", "cache_dir", "tfds_data_dir")


def with_absolute_paths(config):
    """A copy of `config` whose non-empty local data paths are absolute."""
    config = copy.deepcopy(config)
    for name in PATH_FIELDS:
        value = config.data[name]
        if isinstance(value, str) and value and "://" not in value:
            config.data[name] = os.path.abspath(os.path.expanduser(value))
    return config
