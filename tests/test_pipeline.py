"""grain train iterator (order, resume, sharding, workers) and padded eval batches."""

import json
import os
import pathlib
import subprocess
import sys

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from facejax.data import pipeline
from facejax.errors import CheckpointError, ConfigError, DataError

N, M, BATCH = 120, 87, 16  # 87 training images -> 5 full batches of 16, 7 dropped per epoch


def _data():
    # images[i] is filled with i, so every yielded image says which cache row it came from.
    images = np.broadcast_to(np.arange(N, dtype=np.uint8)[:, None, None, None], (N, 4, 4, 3)).copy()
    indices = np.random.default_rng(0).permutation(N)[:M].astype(np.int64)
    labels = np.arange(M, dtype=np.int32) + 1000  # unique: label - 1000 is the subset position
    return images, indices, labels


def _iterator(seed=0, **kw):
    images, indices, labels = _data()
    return pipeline.TrainIterator(images, indices, labels, batch_size=BATCH, seed=seed, **kw)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


def test_batches_have_the_right_shapes_and_content():
    _images, indices, _labels = _data()
    it = _iterator()
    assert it.steps_per_epoch == M // BATCH == 5
    batch = next(it)
    assert batch["image"].shape == (BATCH, 4, 4, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (BATCH,) and batch["label"].dtype == np.int32
    # Each label's subset position points at the cache row whose image was returned.
    rows = indices[batch["label"] - 1000]
    np.testing.assert_array_equal(batch["image"][:, 0, 0, 0], rows)


def test_each_example_once_per_epoch_and_epochs_reshuffle():
    it = _iterator()
    epochs = [np.concatenate([b["label"] for b in _take(it, it.steps_per_epoch)]) for _ in range(3)]
    for labels in epochs:
        assert len(labels) == len(set(labels.tolist())) == 5 * BATCH  # no repeats, 7 dropped
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[1], epochs[2])
    assert it.epoch == 3 and it.step == 15


def test_order_is_deterministic_per_seed():
    _assert_same(_take(_iterator(seed=5), 7), _take(_iterator(seed=5), 7))
    a, b = _take(_iterator(seed=5), 1), _take(_iterator(seed=6), 1)
    assert not np.array_equal(a[0]["label"], b[0]["label"])


def test_resume_mid_epoch_gives_identical_batches():
    it = _iterator(seed=1)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # must survive JSON
    expected = _take(it, 6)  # crosses the epoch boundary at step 5
    resumed = _iterator(seed=1)
    resumed.set_state(state)
    assert resumed.step == 3
    _assert_same(_take(resumed, 6), expected)


def test_state_from_other_data_is_refused():
    it = _iterator(seed=1)
    next(it)
    with pytest.raises(CheckpointError, match="seed"):
        _iterator(seed=2).set_state(it.get_state())
    with pytest.raises(CheckpointError, match="unrecognised"):
        _iterator().set_state({"step": 3})


def test_orbax_checkpoint_round_trip(tmp_path):
    it = _iterator(seed=4)
    _take(it, 2)
    manager = ocp.CheckpointManager(tmp_path)
    manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    expected = _take(it, 3)
    resumed = _iterator(seed=4)
    manager.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    _assert_same(_take(resumed, 3), expected)


def test_process_shards_tile_the_global_batch():
    whole = _take(_iterator(seed=2), 3)
    parts = [_take(_iterator(seed=2, process_index=i, process_count=2), 3) for i in range(2)]
    for step in range(3):
        for key in ("image", "label"):
            joined = np.concatenate([parts[0][step][key], parts[1][step][key]])
            np.testing.assert_array_equal(joined, whole[step][key])


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(tmp_path):
    # A memory-mapped cache, as prepare_data returns: workers reopen it by path.
    images, indices, labels = _data()
    np.save(tmp_path / "cache.npy", images)
    mapped = np.load(tmp_path / "cache.npy", mmap_mode="r")
    reference = _take(_iterator(seed=9), 4)
    it = pipeline.TrainIterator(mapped, indices, labels, batch_size=BATCH, seed=9, workers=1)
    try:
        got = _take(it, 2)
        state = it.get_state()
        got += _take(it, 2)
    finally:
        it.close()
    _assert_same(got, reference)
    resumed = _iterator(seed=9)  # a state saved with workers resumes without them
    resumed.set_state(state)
    _assert_same(_take(resumed, 2), reference[2:])


def test_bad_inputs_raise_clear_errors():
    images, indices, labels = _data()
    with pytest.raises(DataError, match="must match"):
        pipeline.TrainIterator(images, indices, labels[:-1], batch_size=8, seed=0)
    with pytest.raises(DataError, match="out of range"):
        pipeline.TrainIterator(images, indices + N, labels, batch_size=8, seed=0)
    with pytest.raises(DataError, match="fewer than one batch"):
        pipeline.TrainIterator(images, indices, labels, batch_size=128, seed=0)
    with pytest.raises(DataError, match="uint8"):
        pipeline.TrainIterator(images.astype(np.float32), indices, labels, batch_size=8, seed=0)
    with pytest.raises(ConfigError, match="multiple of the process count"):
        pipeline.TrainIterator(images, indices, labels, batch_size=9, seed=0, process_count=2,
                               process_index=0)


def test_eval_batches_pad_with_a_mask():
    import jax

    images, _, _ = _data()
    order = np.array([7, 3, 100, 0, 55, 9, 1])
    n_dev = jax.device_count()
    size = -(-3 // n_dev) * n_dev
    batches = list(pipeline.eval_batches(images, order, 3))
    assert all(b["image"].shape == (size, 4, 4, 3) for b in batches)
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.sum() == len(order) and len(mask) == size * len(batches)
    got = np.concatenate([b["image"] for b in batches])[mask]
    np.testing.assert_array_equal(got, images[order])
    assert not np.concatenate([b["image"] for b in batches])[~mask].any()  # zero padding


@pytest.mark.slow
def test_sharded_batches_on_eight_fake_devices():
    script = pathlib.Path(__file__).with_name("_multidevice_pipeline.py")
    root = pathlib.Path(__file__).parents[1]
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, str(script)], check=False, capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr


@pytest.mark.slow
def test_restore_into_an_iterator_with_workers_then_close(tmp_path):
    """set_state swaps the running pipeline (worker processes included) for one opened at the
    saved step, through grain's public calls; close() then stops it, and a closed iterator
    neither advances nor restores."""
    import multiprocessing

    images, indices, labels = _data()
    np.save(tmp_path / "cache.npy", images)
    mapped = np.load(tmp_path / "cache.npy", mmap_mode="r")
    reference = _take(_iterator(seed=3), 5)
    saved = _iterator(seed=3)
    _take(saved, 3)
    resumed = pipeline.TrainIterator(mapped, indices, labels, batch_size=BATCH, seed=3,
                                     workers=1)
    before = set(multiprocessing.active_children())
    try:
        next(resumed)  # its first pipeline is running (and is replaced below)
        resumed.set_state(saved.get_state())
        resumed.start_prefetch()
        assert resumed.step == 3
        _assert_same(_take(resumed, 2), reference[3:])
    finally:
        resumed.close()
    resumed.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        next(resumed)
    with pytest.raises(ValueError, match="closed"):
        resumed.set_state(saved.get_state())
    assert set(multiprocessing.active_children()) <= before
