"""One of each: one atomic writer, one mesh helper, one reader of run-JSON files, and the
training forward pass through the model's own __call__."""

import ast
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import matplotlib.figure
import numpy as np
import pytest
from flax import nnx

from facejax import rundir
from facejax.atomic import atomic_path
from facejax.errors import CheckpointError
from facejax.models import create_model
from facejax.retrieval import embed, index
from facejax.retrieval import report as report_lib
from facejax.train import checkpoint as ckpt_lib
from facejax.train import plots, step

FACEJAX = pathlib.Path(__file__).parents[1] / "facejax"


def _calls(name_of_call, module=None):
    """{(file relative to facejax/, name)} of the calls of those names (`module.name` only,
    when `module` is given)."""
    found = set()
    for path in sorted(FACEJAX.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                owner = getattr(getattr(f, "value", None), "id", None)
                if name in name_of_call and (module is None or owner == module):
                    found.add((path.relative_to(FACEJAX).as_posix(), name))
    return found


def test_temp_and_rename_lives_in_facejax_atomic():
    renames = {c for c in _calls({"replace", "rename"}, "os") if c[0] != "atomic.py"}
    # Not whole-file writes: a resumable download's .part file (kept across runs on purpose),
    # the cache's entry folders (pid-named, so a dead build's are found and deleted) and
    # LFW's unpacked archive folder.
    allowed = {("download.py", "replace"), ("convert/weights.py", "replace"),
               ("data/cache.py", "rename"), ("data/lfw.py", "replace")}
    assert renames <= allowed, sorted(renames - allowed)


def test_one_mesh_helper():
    built = _calls({"Mesh", "NamedSharding", "PartitionSpec", "P"})
    assert {p for p, _ in built} == {"sharding.py"}, sorted(built)


def _fail_mid_write(monkeypatch):
    def savefig(self, fname, *args, **kwargs):
        with open(fname, "wb") as f:
            f.write(b"half a png")
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)


def test_a_failed_plot_leaves_the_old_one_and_no_temp_file(tmp_path, monkeypatch):
    history = [dict(epoch=1, train_loss=1.0, val_loss=1.2, train_accuracy=0.5,
                    val_accuracy=0.4, val_top1=0.4, val_top5=0.8)]
    plots.plot_history(history, str(tmp_path))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    _fail_mid_write(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        plots.plot_history(history, str(tmp_path))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_failed_grid_leaves_no_temp_file(tmp_path, monkeypatch):
    image = np.zeros((8, 8, 3), np.uint8)
    rows = [dict(image=image, caption="q", results=[dict(image=image, caption="r",
                                                         correct=True)])]
    _fail_mid_write(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        report_lib.draw_grid(rows, str(tmp_path / "grid.png"))
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_replaces_only_on_success(tmp_path):
    target = tmp_path / "a.npy"
    with atomic_path(str(target), ".npy") as tmp:
        assert tmp.endswith(".npy") and os.path.dirname(tmp) == str(tmp_path)
        np.save(tmp, np.arange(3))
    with pytest.raises(ValueError), atomic_path(str(target), ".npy") as tmp:
        np.save(tmp, np.arange(5))
        raise ValueError("interrupted")
    assert np.load(target).tolist() == [0, 1, 2] and os.listdir(tmp_path) == ["a.npy"]


def _garbage(folder: pathlib.Path, name: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("{cut short")
    return str(folder / name)


@pytest.mark.parametrize("which", ["config.json", "classes.json", "embedder.json",
                                   "manifest.json"])
def test_every_run_json_file_is_refused_the_same_way(tmp_path, which):
    run = tmp_path / "run"
    if which == "config.json":
        path = _garbage(run, which)
        read = lambda: rundir.read_run_config(str(run))  # noqa: E731
    elif which == "classes.json":
        config = json.loads(json.dumps(rundir.migrate({}).to_dict(), default=list))
        run.mkdir()
        (run / rundir.CONFIG_JSON).write_text(json.dumps(config))
        path = _garbage(run, which)
        read = lambda: ckpt_lib.load_run_config(str(run))  # noqa: E731
    elif which == "embedder.json":
        path = _garbage(run / rundir.EMBEDDER_DIR, which)
        read = lambda: embed.read_embedder_meta(str(run / rundir.EMBEDDER_DIR))  # noqa: E731
    else:
        path = _garbage(run / rundir.INDEX_DIR, which)
        read = lambda: index.read_manifest(str(run / rundir.INDEX_DIR))  # noqa: E731
    with pytest.raises(CheckpointError, match="cannot read") as e:
        read()
    assert path in str(e.value)


def _model():
    return create_model("scratch_cnn", num_classes=3, rngs=nnx.Rngs(0), dropout=0.5,
                        input_size=24)


def _old_forward(model, x, *, train, backbone_train):
    """step.forward as it was written out before it reused the model's __call__."""
    if backbone_train == train:
        return model(x, train=train)
    z = model.embedding(model.backbone(x, train=backbone_train))
    if model.dropout is not None:
        z = model.dropout(z, deterministic=not train)
    return model.head(z).astype(jnp.float32)


@pytest.mark.slow
@pytest.mark.parametrize("train, backbone_train", [(True, True), (True, False),
                                                    (False, False)])
def test_forward_is_the_models_call(train, backbone_train):
    x = jnp.asarray(np.random.default_rng(0).random((4, 24, 24, 3)), jnp.float32)
    outs, stats = [], []
    for fn in (step.forward, _old_forward):
        model = _model()
        step._reseed(model, jax.random.key(1))
        outs.append(np.asarray(fn(model, x, train=train, backbone_train=backbone_train)))
        stats.append(jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))))
    np.testing.assert_array_equal(outs[0], outs[1])
    for a, b in zip(*stats):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_frozen_batchnorm_keeps_its_statistics():
    x = jnp.asarray(np.random.default_rng(0).random((4, 24, 24, 3)), jnp.float32)
    model = _model()
    before = jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))
    model(x, train=True, backbone_train=False)
    after = jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))
    assert before and all(np.array_equal(a, b) for a, b in zip(before, after))
    model(x, train=True)
    moved = jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))
    assert not all(np.array_equal(a, b) for a, b in zip(before, moved))
