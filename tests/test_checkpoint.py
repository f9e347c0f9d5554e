"""Run checkpoints: exact round trip, best + latest retention, half-written steps, mismatches."""

import json
import os

import jax
import numpy as np
import pytest

from facejax.config import load_config, to_json
from facejax.errors import CheckpointError
from facejax.train import checkpoint as ckpt_lib
from facejax.train import state as state_lib

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                    "tiny.py")


@pytest.fixture(scope="module")
def tiny_state():
    config = load_config(TINY)
    model = state_lib.build_model(config, 3)
    state, _, _, _ = state_lib.create_train_state(config, model, steps_per_epoch=2,
                                                  total_steps=4)
    return config, state


def _perturbed(state, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: np.asarray(x) + rng.normal(size=np.shape(x)).astype(x.dtype)
                        if np.issubdtype(np.asarray(x).dtype, np.floating) else np.asarray(x),
                        state)


def _equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.asarray(x).tobytes() == np.asarray(y).tobytes()
                                      for x, y in zip(la, lb))


@pytest.mark.slow
def test_round_trip_and_best_plus_latest_retention(tmp_path, tiny_state):
    _, state = tiny_state
    ckpt = ckpt_lib.RunCheckpoints(str(tmp_path), "val_accuracy")
    saved = {}
    for step, acc in ((2, 0.5), (4, 0.7), (6, 0.6), (7, None)):
        s = _perturbed(state, step).replace(step=np.int32(step))
        saved[step] = s
        ckpt.save(step, s, meta={"progress": {"epoch": step // 2}},
                  data_state={"step": step, "seed": 0},
                  metrics=None if acc is None else {"val_accuracy": acc})
    ckpt.wait()
    # Latest (7, mid-epoch, no metric) for resume and best (4) for export; the rest is gone.
    assert sorted(ckpt.all_steps()) == [4, 7]
    assert ckpt.latest_step() == 7 and ckpt.best_step() == 4
    abstract = ckpt_lib.abstract_like(state)
    restored, meta, data_state = ckpt.restore(4, abstract)
    assert _equal(restored, saved[4])
    assert meta == {"progress": {"epoch": 2}} and data_state == {"step": 4, "seed": 0}
    ckpt.close()


@pytest.mark.slow
def test_half_written_checkpoint_is_never_picked_up(tmp_path, tiny_state):
    _, state = tiny_state
    ckpt = ckpt_lib.RunCheckpoints(str(tmp_path), "val_accuracy")
    ckpt.save(3, state, meta={}, data_state={}, metrics={"val_accuracy": 0.1})
    ckpt.wait()
    ckpt.close()
    # What a SIGKILL during a save leaves: orbax's temporary folder, never renamed.
    tmp = os.path.join(str(tmp_path), "checkpoints", "9.orbax-checkpoint-tmp-1234567")
    os.makedirs(os.path.join(tmp, "model"))
    with open(os.path.join(tmp, "model", "garbage"), "wb") as f:
        f.write(b"\x00" * 10)
    reopened = ckpt_lib.RunCheckpoints(str(tmp_path), "val_accuracy")
    assert reopened.latest_step() == 3 and reopened.all_steps() == [3]
    reopened.close()


@pytest.mark.slow
def test_restoring_into_other_shapes_is_a_checkpoint_error(tmp_path, tiny_state):
    config, state = tiny_state
    ckpt = ckpt_lib.RunCheckpoints(str(tmp_path), "val_accuracy")
    ckpt.save(1, state, meta={}, data_state={})
    ckpt.wait()
    ckpt.close()
    ckpt = ckpt_lib.RunCheckpoints(str(tmp_path), "val_accuracy")  # as a new run would
    other_model = state_lib.build_model(config, 5)  # five classes: another head shape
    other, _, _, _ = state_lib.create_train_state(config, other_model, steps_per_epoch=2,
                                                  total_steps=4)
    with pytest.raises(CheckpointError, match=r"params/head/kernel: checkpoint \(128, 3\), "
                                              r"model \(128, 5\)"):
        ckpt.restore(1, ckpt_lib.abstract_like(other))
    ckpt.close()


def test_config_mismatches_are_refused_with_the_field_named():
    config = load_config(TINY)
    saved = json.loads(to_json(config))
    meta = {"model": "scratch_cnn", "num_classes": 3, "config": saved}
    ckpt_lib.check_compatible(meta, saved, 3, "ckpt")
    with pytest.raises(CheckpointError, match="model 'scratch_cnn'.*'resnet18'"):
        ckpt_lib.check_compatible(meta, json.loads(to_json(load_config(
            TINY, ["model.name=resnet18"]))), 3, "ckpt")
    with pytest.raises(CheckpointError, match="3 classes"):
        ckpt_lib.check_compatible(meta, saved, 4, "ckpt")
    with pytest.raises(CheckpointError, match="model.embed_dim: checkpoint 0, now 8"):
        ckpt_lib.check_compatible(meta, json.loads(to_json(load_config(
            TINY, ["model.embed_dim=8"]))), 3, "ckpt")
    # Longer training or a moved data folder is a legitimate resume.
    ckpt_lib.check_compatible(meta, json.loads(to_json(load_config(
        TINY, ["train.epochs=9", "data.root=/elsewhere"]))), 3, "ckpt")


def test_restore_model_needs_a_training_workdir(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        ckpt_lib.restore_model(str(tmp_path))


@pytest.mark.parametrize("monitor,values,best", [
    ("val_loss", (0.9, 0.5, 0.5, 0.7), 4),      # lower is better; a tie keeps the earlier step
    ("val_top1", (0.2, 0.6, 0.6, 0.1), 4),
])
@pytest.mark.slow
def test_best_step_follows_the_monitor_direction(tmp_path, tiny_state, monitor, values, best):
    _, state = tiny_state
    ckpt = ckpt_lib.RunCheckpoints(str(tmp_path), monitor)
    for i, v in enumerate(values, start=1):
        ckpt.save(2 * i, state, meta={}, data_state={}, metrics={monitor: v})
    ckpt.wait()
    assert ckpt.best_step() == best and ckpt.latest_step() == 8
    assert sorted(ckpt.all_steps()) == [best, 8]
    ckpt.close()


@pytest.mark.slow
def test_every_step_carries_checksums_that_catch_a_changed_byte(tmp_path, tiny_state):
    """orbax 0.12 checksums no array data; each step gets a SHA256SUMS of its items' files,
    written before orbax renames the step into place, and checked before any read."""
    _, state = tiny_state
    ckpt = ckpt_lib.RunCheckpoints(str(tmp_path), "val_accuracy")
    for step in (1, 2):
        ckpt.save(step, state, meta={}, data_state={}, metrics={"val_accuracy": step / 10})
    ckpt.wait()
    ckpt.close()
    step_dir = os.path.join(str(tmp_path), "checkpoints", "2")
    with open(os.path.join(step_dir, ckpt_lib.CHECKSUMS_NAME)) as f:
        listed = [line.split("  ", 1)[1] for line in f.read().splitlines()]
    for item in ("model", "train", "meta", "data"):
        on_disk = [os.path.relpath(os.path.join(root, name), step_dir)
                   for root, _, names in os.walk(os.path.join(step_dir, item)) for name in names]
        assert on_disk and sorted(on_disk) == sorted(p for p in listed if p.startswith(item))
    assert ckpt_lib.verify_checksums(step_dir) == ""
    arrays = max((os.path.join(step_dir, p) for p in listed if p.startswith("model/")),
                 key=os.path.getsize)
    with open(arrays, "r+b") as f:
        f.seek(os.path.getsize(arrays) // 2)
        f.write(b"\xff" * 8)
    assert "does not match the checksum" in ckpt_lib.verify_checksums(step_dir)
    reopened = ckpt_lib.RunCheckpoints(str(tmp_path), "val_accuracy", read_only=True)
    with pytest.raises(CheckpointError, match=rf"cannot restore checkpoint {step_dir}: it is "
                                              rf"damaged \(model/.* does not match the checksum"):
        reopened.read_meta(2)
    reopened.close()
    os.remove(arrays)
    assert "cannot be read" in ckpt_lib.verify_checksums(step_dir)
    with open(os.path.join(step_dir, ckpt_lib.CHECKSUMS_NAME), "w") as f:
        f.write("not a checksum line\n")
    assert "is not '<sha256>  <file>'" in ckpt_lib.verify_checksums(step_dir)


@pytest.mark.slow
def test_restoring_nan_arrays_names_the_step_and_the_arrays(tmp_path, tiny_state):
    """Intact files holding NaN/inf (saved from a model that had gone bad): the resume names
    the checkpoint instead of training on and blaming the learning rate."""
    _, state = tiny_state
    bad = state.replace(opt_state=jax.tree.map(
        lambda x: np.full(np.shape(x), np.inf, x.dtype)
        if np.issubdtype(np.asarray(x).dtype, np.floating) else x, state.opt_state))
    ckpt = ckpt_lib.RunCheckpoints(str(tmp_path), "val_accuracy")
    ckpt.save(5, bad, meta={}, data_state={})
    ckpt.wait()
    step_dir = os.path.join(str(tmp_path), "checkpoints", "5")
    with pytest.raises(CheckpointError, match=rf"cannot restore checkpoint {step_dir}: it holds "
                                              r"NaN or infinite values \(opt_state/"):
        ckpt.restore(5, ckpt_lib.abstract_like(state))
    ckpt.close()
    assert ckpt_lib.nonfinite_leaves({"a": np.ones(2), "b": {"c": np.array([0.0, np.nan])},
                                      "n": np.arange(3)}) == ["b/c"]
