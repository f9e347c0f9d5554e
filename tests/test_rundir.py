"""facejax.rundir: one owner of the run folder (layout, config.json, migration) and the import
direction it makes possible."""

import ast
import json
import pathlib

import pytest

from facejax import config_schema, rundir
from facejax.config import to_json
from facejax.errors import CheckpointError
from facejax.train import checkpoint as ckpt_lib

ROOT = pathlib.Path(__file__).parents[1]


def _old_config_json(folder: pathlib.Path) -> dict:
    """A config.json as an older facejax wrote it: settings added since are missing."""
    saved = json.loads(to_json(config_schema.base()))
    for section, name in [("data", "test_fraction"), ("data", "face_crop"),
                          ("data", "max_cache_gb"), ("model", "bn_momentum"),
                          ("index", "scann_init"), ("eval", "exact_max_pairs")]:
        del saved[section][name]
    saved["data"]["allow_changed_data"] = True  # a resumed run may have saved it
    saved["train"]["retired_setting"] = 7  # a setting this version no longer has
    folder.mkdir(parents=True, exist_ok=True)
    (folder / rundir.CONFIG_JSON).write_text(json.dumps(saved))
    return saved


def test_an_old_config_json_is_read_on_todays_schema(tmp_path):
    _old_config_json(tmp_path / "run")
    config = rundir.read_run_config(str(tmp_path / "run"))
    schema = config_schema.base()
    # What the missing settings meant then, where that differs from today's default ...
    assert config.data.test_fraction == 0.0 and schema.data.test_fraction > 0
    assert config.data.max_cache_gb == 0.0 and schema.data.max_cache_gb > 0
    # ... else today's default; the one-command settings are never inherited.
    assert tuple(config.data.face_crop) == () and config.model.bn_momentum == 0.0
    assert config.index.scann_init == "random"
    assert config.eval.exact_max_pairs == schema.eval.exact_max_pairs
    assert config.data.allow_changed_data is False
    assert config.train.retired_setting == 7
    assert set(config.keys()) == set(schema.keys())
    for section in schema.keys():
        if isinstance(schema[section], type(schema)):
            assert set(schema[section].keys()) <= set(config[section].keys()), section


def test_an_old_checkpoint_config_is_compared_on_todays_schema(tmp_path):
    saved = _old_config_json(tmp_path / "run")
    current = rundir.read_run_config(str(tmp_path / "run")).to_dict()
    meta = dict(model=current["model"]["name"], num_classes=3, config=saved)
    ckpt_lib.check_compatible(meta, current, 3, "ckpt")  # the same run: accepted
    current["data"]["test_fraction"] = 0.2  # the old run had no test side: another split
    with pytest.raises(CheckpointError, match="data.test_fraction: checkpoint 0.0, now 0.2"):
        ckpt_lib.check_compatible(meta, current, 3, "ckpt")


def _renamed_config_json(folder: pathlib.Path) -> dict:
    """A config.json from before train.logit_scale and index.embed_batch_size were renamed."""
    saved = json.loads(to_json(config_schema.base()))
    del saved["train"]["logit_scale"], saved["index"]["embed_batch_size"]
    saved["train"]["margin_scale"], saved["index"]["batch_size"] = 16.0, 64  # not the defaults
    folder.mkdir(parents=True, exist_ok=True)
    (folder / rundir.CONFIG_JSON).write_text(json.dumps(saved))
    return saved


def test_an_old_config_json_with_renamed_settings_loads_under_the_new_names(tmp_path):
    _renamed_config_json(tmp_path / "run")
    config = rundir.read_run_config(str(tmp_path / "run"))  # index.batch_size counts as given
    assert config.train.logit_scale == 16.0 and config.index.embed_batch_size == 64
    assert "margin_scale" not in config.train and "batch_size" not in config.index


def test_an_old_checkpoint_config_with_renamed_settings_resumes(tmp_path):
    saved = _renamed_config_json(tmp_path / "run")
    current = rundir.read_run_config(str(tmp_path / "run")).to_dict()
    meta = dict(model=current["model"]["name"], num_classes=3, config=saved)
    ckpt_lib.check_compatible(meta, current, 3, "ckpt")  # the same run: accepted
    current["train"]["logit_scale"] = 30.0  # the checkpoint trained at 16: another run
    with pytest.raises(CheckpointError, match="train.logit_scale: checkpoint 16.0, now 30.0"):
        ckpt_lib.check_compatible(meta, current, 3, "ckpt")


def test_a_config_json_without_the_embedding_batch_is_refused(tmp_path):
    saved = _renamed_config_json(tmp_path / "run")
    del saved["index"]["batch_size"]
    (tmp_path / "run" / rundir.CONFIG_JSON).write_text(json.dumps(saved))
    with pytest.raises(CheckpointError, match="lacks index.embed_batch_size"):
        rundir.read_run_config(str(tmp_path / "run"))


def test_required_settings_are_checked_as_written(tmp_path):
    saved = _old_config_json(tmp_path / "run")
    del saved["train"]  # the schema would fill it in: the file must still be refused
    (tmp_path / "run" / rundir.CONFIG_JSON).write_text(json.dumps(saved))
    rundir.read_run_config(str(tmp_path / "run"))  # retrieval reads no train setting
    with pytest.raises(CheckpointError, match="lacks train.monitor: it was not written"):
        rundir.read_run_config(str(tmp_path / "run"), rundir.RUN_KEYS + ckpt_lib.RESTORE_KEYS)


@pytest.mark.parametrize("content, match", [(None, "is missing: is .* a training workdir"),
                                            ("{cut", "cannot read"),
                                            ("[1]", "expected a JSON object")])
def test_unreadable_config_json_names_the_file(tmp_path, content, match):
    if content is not None:
        (tmp_path / rundir.CONFIG_JSON).write_text(content)
    with pytest.raises(CheckpointError, match=match) as e:
        rundir.read_run_config(str(tmp_path))
    assert str(tmp_path / rundir.CONFIG_JSON) in str(e.value)


def test_configs_find_the_schema_without_path_tricks():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_common", ROOT / "configs" / "common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    assert common.base is config_schema.base  # users' configs importing it keep working
    for path in sorted((ROOT / "configs").glob("*.py")):
        text = path.read_text()
        assert "sys.path" not in text and "importlib" not in text, path.name


def _imports(path: pathlib.Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


def test_train_imports_retrieval_only_to_export_and_evaluate():
    allowed = {"export.py": {"facejax.retrieval.embed"},  # export_embedder
               "loop.py": {"facejax.retrieval.index", "facejax.retrieval.metrics"}}  # per-epoch
    for path in sorted((ROOT / "facejax" / "train").glob("*.py")):
        used = {m.rsplit(".", 1)[0] if m.count(".") > 2 else m for m in _imports(path)
                if m.startswith("facejax.retrieval")}
        used = {m for m in used if m != "facejax.retrieval"}
        assert used <= allowed.get(path.name, set()), (path.name, used)


def _joined_names(path: pathlib.Path):
    """(line, string) of each string constant joined into a path (os.path.join, Path / ...)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "join":
            parts = node.args
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            parts = [node.right]
        else:
            continue
        for part in parts:
            if isinstance(part, ast.Constant) and isinstance(part.value, str):
                yield part.lineno, part.value


def test_the_layout_is_named_once():
    """No module but rundir spells a run folder's parts in a path."""
    names = {rundir.CONFIG_JSON, rundir.CLASSES_JSON, rundir.CHECKPOINT_DIR,
             rundir.METRICS_JSONL, rundir.EVENTS_DIR, rundir.PLOTS_DIR, rundir.EMBEDDER_DIR,
             rundir.INDEX_DIR, rundir.INDEX_WORK_DIR, rundir.REPORT_DIR}
    elsewhere = {("convert/weights.py", "checkpoints")}  # torch hub's cache folder
    for path in sorted((ROOT / "facejax").rglob("*.py")):
        rel = path.relative_to(ROOT / "facejax").as_posix()
        for line, value in _joined_names(path):
            assert value not in names or (rel, value) in elsewhere, \
                f"facejax/{rel}:{line} spells {value!r}: use facejax.rundir"
