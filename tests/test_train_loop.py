"""train_and_evaluate end to end on a tiny idx dataset: outputs, resume, export, kill-and-resume."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import write_idx

from facejax.config import load_config
from facejax.data.augment import preprocess_eval
from facejax.train import checkpoint as ckpt_lib
from facejax.train import loop
from tests._tfevents import read_scalars

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
CLASSES, PER_CLASS = 4, 40


def tiny_idx(directory) -> str:
    """Fashion-MNIST-shaped idx files: class k is a bright horizontal band at row 6k, + noise."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(CLASSES), PER_CLASS)
    rng.shuffle(labels)
    images = rng.integers(0, 60, (len(labels), 28, 28)).astype(np.uint8)
    for i, k in enumerate(labels):
        images[i, 4 + 6 * k:8 + 6 * k] = 220
    write_idx(directory, images, labels)
    return str(directory)


def read(path) -> str:
    with open(path) as f:
        return f.read()


def overrides(idx_dir):
    # checkpoint_every_steps makes mid-epoch checkpoints: the kill test needs one to appear.
    return [f"data.root={idx_dir}", "train.checkpoint_every_steps=3"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One uninterrupted 2-epoch run (the reference the other tests compare against)."""
    base = tmp_path_factory.mktemp("loop")
    idx_dir = tiny_idx(base / "idx")
    workdir = str(base / "run")
    config = load_config(TINY, overrides(idx_dir))
    summary = loop.train_and_evaluate(config, workdir)
    return idx_dir, workdir, summary


def final_params(workdir):
    ckpt = ckpt_lib.RunCheckpoints(workdir, "val_accuracy", read_only=True)
    step = ckpt.latest_step()
    meta = ckpt.read_meta(step)
    config = load_config(TINY, overrides("x"))
    from facejax.train import state as state_lib
    model = state_lib.build_model(config, meta["num_classes"])
    _, params, stats, _ = state_lib.split_model(model)
    arrays = ckpt.restore_model_arrays(step, {"params": ckpt_lib.abstract_like(params),
                                              "batch_stats": ckpt_lib.abstract_like(stats)})
    ckpt.close()
    return step, arrays


@pytest.mark.slow
def test_run_writes_metrics_plots_events_and_a_summary(finished_run):
    from facejax.data.prepare import prepare_data

    idx_dir, workdir, summary = finished_run
    train_images = len(prepare_data(load_config(TINY, overrides(idx_dir)).data).train)
    steps_per_epoch = train_images // 16
    assert summary["epochs_run"] == 2 and summary["steps"] == 2 * steps_per_epoch
    assert summary["best_epoch"] in (1, 2) and 0.0 <= summary["best_value"] <= 1.0
    assert os.path.isdir(summary["best_checkpoint"])
    records = [json.loads(line) for line in
               read(os.path.join(workdir, "metrics.jsonl")).splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_top1",
                "val_top5", "val_map_r", "learning_rate"):
        assert all(np.isfinite(r[key]) for r in records), key
    assert records[1]["learning_rate"] == pytest.approx(1e-3 * 0.9)  # per-epoch decay
    # The band pattern is learnable: retrieval and classification beat chance by far.
    assert records[-1]["val_top1"] > 0.6
    for name in ("loss.png", "accuracy.png"):
        with open(os.path.join(workdir, "plots", name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    scalars = read_scalars(glob.glob(os.path.join(workdir, "events", "events.out.tfevents.*"))[0])
    tags = {tag for _, tag, _ in scalars}
    assert {"epoch/val_accuracy", "epoch/val_top1", "train/loss_running"} <= tags
    classes = json.loads(read(os.path.join(workdir, "classes.json")))
    assert classes == [str(k) for k in range(CLASSES)]
    assert json.loads(read(os.path.join(workdir, "config.json")))["train"]["batch_size"] == 16


@pytest.mark.slow
def test_rerunning_a_finished_run_resumes_and_does_nothing(finished_run):
    idx_dir, workdir, summary = finished_run
    before = final_params(workdir)
    again = loop.train_and_evaluate(load_config(TINY, overrides(idx_dir)), workdir)
    assert again["steps"] == summary["steps"] and again["epochs_run"] == 2
    after = final_params(workdir)
    assert before[0] == after[0]
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[1]),
                                                    jax.tree.leaves(after[1])))
    lines = read(os.path.join(workdir, "metrics.jsonl")).splitlines()
    assert len(lines) == 2


@pytest.mark.slow
def test_resume_refuses_another_model_config(finished_run):
    idx_dir, workdir, _ = finished_run
    config = load_config(TINY, overrides(idx_dir) + ["model.embed_dim=8"])
    with pytest.raises(ckpt_lib.CheckpointError, match="model.embed_dim"):
        loop.train_and_evaluate(config, workdir)


@pytest.mark.slow
def test_export_matches_the_model(finished_run):
    from facejax.retrieval.embed import load_embedder
    from facejax.train.export import export_workdir

    _, workdir, _ = finished_run
    out = export_workdir(workdir)
    embedder = load_embedder(out)
    assert embedder.meta["cache_size"] == 24 and embedder.meta["model"] == "scratch_cnn"
    model, _ = ckpt_lib.restore_model(workdir)
    images = np.random.default_rng(0).integers(0, 256, (3, 24, 24, 3), dtype=np.uint8)
    want = np.asarray(model.embed(preprocess_eval(images, 24, "unit")))
    np.testing.assert_allclose(embedder(images), want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_bfloat16_export_matches_the_bf16_model_and_stays_near_float32(finished_run, tmp_path):
    import jax.numpy as jnp

    from facejax.errors import ConfigError
    from facejax.retrieval.embed import load_embedder
    from facejax.train.export import export_workdir

    _, reference, _ = finished_run
    workdir = str(tmp_path / "run")
    shutil.copytree(reference, workdir)  # the shared run keeps its float32 embedder
    embedder = load_embedder(export_workdir(workdir, compute_dtype="bfloat16"))
    assert embedder.meta["compute_dtype"] == "bfloat16"
    images = np.random.default_rng(0).integers(0, 256, (4, 24, 24, 3), dtype=np.uint8)
    got = embedder(images)
    assert got.dtype == np.float32
    bf16_model, _ = ckpt_lib.restore_model(workdir, dtype=jnp.bfloat16)
    want = np.asarray(bf16_model.embed(preprocess_eval(images, 24, "unit")))
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2)
    f32_model, _ = ckpt_lib.restore_model(workdir)
    f32 = np.asarray(f32_model.embed(preprocess_eval(images, 24, "unit")))
    assert not np.array_equal(got, f32)  # it really ran in bf16
    cosine = np.sum(got * f32, 1) / np.linalg.norm(got, axis=1) / np.linalg.norm(f32, axis=1)
    assert cosine.min() > 0.99, cosine
    with pytest.raises(ConfigError, match="compute_dtype must be one of"):
        export_workdir(workdir, compute_dtype="float16")


@pytest.mark.slow
def test_sigkill_partway_then_same_command_finishes_bit_identical(finished_run, tmp_path):
    idx_dir, reference, _ = finished_run
    workdir = str(tmp_path / "killed")
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--config", TINY,
           "--workdir", workdir] + [f"--config.{o}" for o in overrides(idx_dir)]
    # One device, as the in-process reference: scripts/train.py would split a CPU batch over
    # one host device per core, which changes float summation order (not the maths).
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_NUM_CPU_DEVICES="1")
    ckpt_dir = os.path.join(workdir, "checkpoints")
    log_path = tmp_path / "killed.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    # Kill as soon as a second checkpoint starts being written: orbax's temporary folder for
    # step 6 (or, if that write was too quick to see, step 6 itself) while step 3 is final.
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        names = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
        if any(n.split(".")[0].isdigit() and int(n.split(".")[0]) >= 6 for n in names):
            break
        time.sleep(0.01)
    assert proc.poll() is None, "training ended before it could be killed:\n" + \
        read(log_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = os.listdir(ckpt_dir)
    finished = sorted(int(n) for n in left if n.isdigit())
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    # The resume starts from the newest *finished* step; a temporary folder is never used.
    assert f"resuming from step {finished[-1]} " in out.stdout, (left, out.stdout)
    step_ref, ref = final_params(reference)
    step_got, got = final_params(workdir)
    assert step_got == step_ref
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


@pytest.mark.slow
def test_resuming_from_a_damaged_checkpoint_is_one_error(finished_run, tmp_path, monkeypatch):
    import shutil

    idx_dir, reference, _ = finished_run
    workdir = str(tmp_path / "damaged")
    shutil.copytree(reference, workdir)
    latest = max(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
    # Without its checksums (written before facejax kept them), the damage reaches orbax.
    os.remove(os.path.join(workdir, "checkpoints", str(latest), ckpt_lib.CHECKSUMS_NAME))
    data_dir = os.path.join(workdir, "checkpoints", str(latest), "model", "ocdbt.process_0", "d")
    for name in os.listdir(data_dir):  # orbax raises a bare Exception for these
        with open(os.path.join(data_dir, name), "r+b") as f:
            f.truncate(10)
    closed = []
    real_close = ckpt_lib.RunCheckpoints.close
    monkeypatch.setattr(ckpt_lib.RunCheckpoints, "close",
                        lambda self: closed.append(1) or real_close(self))
    config = load_config(TINY, overrides(idx_dir) + ["train.epochs=3"])
    with pytest.raises(ckpt_lib.CheckpointError,
                       match=rf"checkpoints/{latest}: it is damaged.*Delete that folder"):
        loop.train_and_evaluate(config, workdir)
    assert closed == [1]  # an open manager's threads print tracebacks at exit


@pytest.mark.slow
def test_resuming_from_a_checkpoint_with_flipped_bytes_names_it(finished_run, tmp_path):
    """8 flipped bytes in the weights used to restore as wrong (or NaN) weights, and the NaN
    loss that followed blamed the learning rate: the resume now stops at the checkpoint."""
    idx_dir, reference, _ = finished_run
    workdir = str(tmp_path / "flipped")
    shutil.copytree(reference, workdir)
    latest = max(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
    step_dir = os.path.join(workdir, "checkpoints", str(latest))
    files = [os.path.join(root, n) for root, _, names in os.walk(os.path.join(step_dir, "model"))
             for n in names]
    arrays = max(files, key=os.path.getsize)
    with open(arrays, "r+b") as f:
        f.seek(os.path.getsize(arrays) // 2)
        flipped = bytes(b ^ 0xFF for b in f.read(8))
        f.seek(os.path.getsize(arrays) // 2)
        f.write(flipped)
    config = load_config(TINY, overrides(idx_dir) + ["train.epochs=3"])
    with pytest.raises(ckpt_lib.CheckpointError, match=rf"cannot restore checkpoint {step_dir}: "
                                                       r"it is damaged \(model/.*checksum"):
        loop.train_and_evaluate(config, workdir)


def _nan_loss_from_step(monkeypatch, first_bad_step: int) -> None:
    """Makes every train step from `first_bad_step` on report a NaN loss (a run diverging
    there; the updates themselves stay finite)."""
    import jax.numpy as jnp

    real = loop.jit_train_step

    def diverging(*args, **kw):
        step_fn = real(*args, **kw)

        def step(state, batch, key):
            bad = int(state.step) >= first_bad_step  # (the step donates `state`)
            new_state, metrics = step_fn(state, batch, key)
            if bad:
                metrics = dict(metrics, loss=jnp.float32(jnp.nan))
            return new_state, metrics

        return step

    monkeypatch.setattr(loop, "jit_train_step", diverging)


@pytest.mark.slow
def test_after_a_nan_loss_the_advised_lower_learning_rate_resumes(finished_run, tmp_path,
                                                                  monkeypatch, capsys):
    """The advice used to be 'lower train.learning_rate and run the same command to resume',
    and that resume refused the changed learning rate. Followed literally, it now resumes."""
    from facejax.errors import TrainingError
    from facejax.train.export import export_workdir

    idx_dir, _, summary = finished_run
    spe = summary["steps"] // 2
    workdir = str(tmp_path / "run")
    # Checkpoints: every 3 steps and at epoch ends. The loss turns NaN at the 3rd step of
    # epoch 2, after the checkpoint of its 1st step (spe + 1).
    _nan_loss_from_step(monkeypatch, spe + 2)
    with pytest.raises(TrainingError) as err:
        loop.train_and_evaluate(load_config(TINY, overrides(idx_dir)), workdir)
    monkeypatch.undo()
    message = str(err.value)
    assert message.startswith("the training loss became nan at step 3 of epoch 2")
    assert (f"To resume from step {spe + 1}, the latest checkpoint, run the same command with "
            f"a lower --config.train.learning_rate (it is 0.001)") in message
    capsys.readouterr()
    again = loop.train_and_evaluate(
        load_config(TINY, overrides(idx_dir) + ["train.learning_rate=0.0001"]), workdir)
    assert f"resuming from step {spe + 1} " in capsys.readouterr().out
    assert again["epochs_run"] == 2 and again["steps"] == 2 * spe
    records = [json.loads(line) for line in read(os.path.join(workdir, "metrics.jsonl"))
               .splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[1]["learning_rate"] == pytest.approx(1e-4 * 0.9)  # the new rate, decayed
    assert json.loads(read(os.path.join(workdir, "config.json")))["train"][
        "learning_rate"] == 1e-4
    export_workdir(workdir)  # config.json and the checkpoints still agree


@pytest.mark.slow
def test_a_checkpoint_that_gave_the_nan_loss_is_named_for_deletion(finished_run, tmp_path,
                                                                   capsys):
    """A real divergence: with a checkpoint after every step, the latest one holds the blown-up
    parameters whose loss is NaN at any learning rate. The advice says to delete it first;
    followed literally, the run completes."""
    import re

    from facejax.errors import TrainingError

    idx_dir, _, summary = finished_run
    workdir = str(tmp_path / "run")
    every_step = ["train.checkpoint_every_steps=1", "train.log_every_steps=1",
                  "train.optimizer=sgd", "train.momentum=0.0"]
    with pytest.raises(TrainingError) as err:
        loop.train_and_evaluate(load_config(TINY, overrides(idx_dir) + every_step + [
            "train.learning_rate=1e30"]), workdir)
    message = str(err.value)
    found = re.search(r"delete (\S+), then run the same command with a lower "
                      r"--config\.train\.learning_rate \(it is 1e\+30\); it (resumes from step "
                      r"\d+|starts over)", message)
    assert found, message
    doomed = found.group(1)
    assert os.path.dirname(doomed) == os.path.join(workdir, "checkpoints")
    assert ckpt_lib.RunCheckpoints(workdir, "val_accuracy", read_only=True).latest_step() == \
        int(os.path.basename(doomed))
    shutil.rmtree(doomed)
    capsys.readouterr()
    again = loop.train_and_evaluate(load_config(TINY, overrides(idx_dir) + every_step + [
        "train.learning_rate=0.001"]), workdir)
    assert again["steps"] == summary["steps"] and np.isfinite(again["final"]["train_loss"])
    out = capsys.readouterr().out
    if found.group(2) == "starts over":
        assert "resuming from" not in out
    else:
        assert f"resuming from {found.group(2)[len('resumes from '):]} " in out


@pytest.mark.slow
def test_a_failed_start_leaves_no_folders(finished_run, tmp_path):
    from facejax.errors import ConfigError, WeightsError

    idx_dir, _, _ = finished_run
    workdir = tmp_path / "run"
    for bad, error in (("train.compute_dtype=float16", ConfigError),
                       (f"model.pretrained={tmp_path / 'missing.pth'}", WeightsError)):
        with pytest.raises(error, match="compute_dtype|no such file"):
            loop.train_and_evaluate(load_config(TINY, overrides(idx_dir) + [bad]), str(workdir))
        assert not workdir.exists()
    # This one fails after the checkpoint folder was opened: what it created is removed.
    junk = tmp_path / "weights.pth"
    junk.write_bytes(b"not weights")
    with pytest.raises(WeightsError, match="has no converter"):
        loop.train_and_evaluate(load_config(TINY, overrides(idx_dir) + [
            f"model.pretrained={junk}"]), str(workdir))
    assert not workdir.exists()


def test_data_paths_are_saved_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(TINY, ["data.root=faces", "data.cache_dir=~/cache"])
    resolved = loop.with_absolute_paths(config)
    assert resolved.data.root == str(tmp_path / "faces")
    assert resolved.data.cache_dir == os.path.expanduser("~/cache")
    assert resolved.data.tfds_data_dir == ""  # unset stays unset
    assert config.data.root == "faces"  # the caller's config is not changed


def test_early_stopping_bookkeeping():
    p = loop.Progress()
    assert loop._update_best(p, {"epoch": 1, "val_loss": 1.0}, "val_loss", 10)
    assert not loop._update_best(p, {"epoch": 2, "val_loss": 1.0}, "val_loss", 20)  # a tie
    assert not loop._update_best(p, {"epoch": 3, "val_loss": 1.5}, "val_loss", 30)
    assert p.bad_epochs == 2 and p.best_epoch == 1 and p.best_step == 10
    assert loop._update_best(p, {"epoch": 4, "val_loss": 0.5}, "val_loss", 40)
    assert p.bad_epochs == 0 and p.best_value == 0.5


def test_lr_find_suggestions_on_a_known_curve():
    from facejax.train.lr_find import suggestions

    lrs = np.geomspace(1e-6, 1.0, 60)
    # Flat, then falling fastest around 1e-3, then flat again and blowing up at the end.
    x = np.log10(lrs)
    losses = 2.0 - 1.5 / (1 + np.exp(-(x + 3) * 3)) + np.where(x > -0.5, (x + 0.5) * 8, 0)
    s = suggestions(lrs, losses)
    assert s["suggestion"] == s["steep"]
    assert 10 ** -3.3 < s["steep"] < 10 ** -2.7
    assert 1e-5 < s["valley"] < 10 ** -0.5
    # The loss falls until log10(lr) = -0.5 and rises after: its lowest point is the last grid
    # point below -0.5, lr = 10 ** (-6 + 54 * 6 / 59); the suggestion is a tenth of it.
    assert s["minimum"] == pytest.approx(10 ** (-6 + 54 * 6 / 59) / 10)
    # The last 5 points are dropped (fastai: usually the divergence), even when lowest.
    falling = suggestions(lrs, np.linspace(2.0, 0.1, 60))
    assert falling["minimum"] == pytest.approx(10 ** (-6 + 54 * 6 / 59) / 10)


@pytest.mark.slow
def test_lr_find_sweeps_and_writes_plot(finished_run, tmp_path):
    from facejax.train.lr_find import lr_find

    idx_dir, _, _ = finished_run
    config = load_config(TINY, overrides(idx_dir))
    result = lr_find(config, str(tmp_path), start_lr=1e-5, end_lr=10.0, num_steps=14)
    assert 2 <= len(result["lrs"]) <= 14
    assert result["lrs"][0] == pytest.approx(1e-5)
    assert np.all(np.diff(result["lrs"]) > 0)
    with open(tmp_path / "lr_find.png", "rb") as f:
        assert f.read(4) == b"\x89PNG"
    saved = json.loads(read(tmp_path / "lr_find.json"))
    assert saved["lrs"] == result["lrs"]


@pytest.mark.parametrize("name", sorted(
    os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
    if not p.endswith("common.py")))
def test_every_config_loads_and_documents_its_command(name):
    from facejax.errors import ConfigError
    from facejax.models import get_preset
    from facejax.train.losses import LossConfig
    from facejax.train.optim import make_schedule

    path = os.path.join(ROOT, "configs", f"{name}.py")
    config = load_config(path)
    source = read(path)
    assert f"scripts/train.py --config configs/{name}.py --workdir" in source.replace(
        "\\\n        ", "")
    get_preset(config.model.name, config.model.weights_source)
    LossConfig.from_config(config)
    make_schedule(config.train, 10, 10 * config.train.epochs)
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        load_config(path, ["train.epoch=3"])
    with pytest.raises(ConfigError, match="expects int"):
        load_config(path, ["train.batch_size=big"])


@pytest.mark.slow
def test_zero_epochs_scores_and_saves_the_initial_model(tmp_path):
    """train.epochs=0 (pretrained-feature baselines): no step is taken, the initial model is
    evaluated, saved as the best checkpoint and exported like a trained one."""
    from facejax.data.prepare import prepare_data
    from facejax.errors import ConfigError
    from facejax.train.export import export_workdir

    # Banded classes, a third of them relabelled at random: the initial model's val Top-1 is
    # neither 0 nor 1 (an untrained CNN already scores 1 on the bands), so its recomputation
    # below checks something.
    rng = np.random.default_rng(0)
    idx_dir = str(tmp_path / "idx")
    images = rng.integers(0, 60, (CLASSES * PER_CLASS, 28, 28)).astype(np.uint8)
    labels = np.arange(CLASSES * PER_CLASS) % CLASSES
    for i, k in enumerate(labels):
        images[i, 4 + 6 * k:8 + 6 * k] = 220
    relabel = rng.random(len(labels)) < 1 / 3
    labels[relabel] = rng.integers(0, CLASSES, relabel.sum())
    write_idx(idx_dir, images, labels)
    workdir = str(tmp_path / "run")
    config = load_config(TINY, overrides(idx_dir) + ["train.epochs=0"])
    summary = loop.train_and_evaluate(config, workdir)
    assert summary["epochs_run"] == 0 and summary["steps"] == 0
    assert summary["best_checkpoint"].endswith(os.path.join("checkpoints", "0"))
    history = [json.loads(line) for line in read(os.path.join(workdir, "metrics.jsonl")).split(
        "\n") if line]
    assert [r["epoch"] for r in history] == [0]
    # The record scores the saved initial model: its val Top-1, recomputed here by brute force
    # (each validation image's most similar training image is of its class?), matches.
    saved, _ = ckpt_lib.restore_model(workdir)
    data = prepare_data(config.data)
    images = np.asarray(data.images)

    def embed(rows):
        return np.asarray(saved.embed(preprocess_eval(images[rows], 24, "unit")))

    nearest = np.argmax(embed(data.val.indices) @ embed(data.train.indices).T, axis=1)
    top1 = np.mean(data.train.labels[nearest] == data.val.labels)
    assert 0.3 < top1 < 0.95
    assert history[0]["val_top1"] == pytest.approx(top1, abs=1e-6)
    assert os.path.isfile(os.path.join(export_workdir(workdir), "embedder.bin"))
    # Rerunning is a resume that has nothing left to do (no second record).
    loop.train_and_evaluate(load_config(TINY, overrides(idx_dir) + ["train.epochs=0"]), workdir)
    assert len(read(os.path.join(workdir, "metrics.jsonl")).strip().split("\n")) == 1
    with pytest.raises(ConfigError, match="train.epochs must be >= 0"):
        loop.validate_config(load_config(TINY, ["train.epochs=-1"]))


@pytest.mark.slow
def test_a_diverging_run_stops_with_one_error(tmp_path):
    """A non-finite loss stops training at once (TrainingError, one line from the scripts)
    instead of running on and saving NaN checkpoints over good ones."""
    from facejax.errors import TrainingError

    idx_dir = tiny_idx(tmp_path / "idx")
    workdir = str(tmp_path / "run")
    bad = load_config(TINY, overrides(idx_dir) + ["train.learning_rate=1e30",
                                                  "train.optimizer=sgd", "train.momentum=0.0",
                                                  "train.log_every_steps=1"])
    with pytest.raises(TrainingError, match="loss became"):
        loop.train_and_evaluate(bad, workdir)
    ckpts = os.path.join(workdir, "checkpoints")
    assert not os.path.isdir(ckpts) or not [d for d in os.listdir(ckpts) if d.isdigit()]


@pytest.mark.slow
def test_a_pretrained_start_that_no_epoch_beats_is_kept_and_said(tmp_path, monkeypatch, capsys):
    """From pretrained weights, epoch 0 (the starting model) is scored and a candidate for
    "best": when no epoch beats it, the best checkpoint stays the starting point and the run
    says so (a face config used to fine-tune dlib's model from val Top-1 1.00 down to 0.37)."""
    calls = []
    # Stand-in for loading real weights (the tiny CNN has no preset): the start is whatever
    # the model is; plain SGD at a learning rate of 1e-30 and frozen BN statistics then change
    # nothing measurable, so no epoch can beat epoch 0.
    monkeypatch.setattr(loop, "load_from_config", lambda model, cfg: calls.append(1) or True)
    idx_dir = tiny_idx(tmp_path / "idx")
    workdir = str(tmp_path / "run")
    config = load_config(TINY, overrides(idx_dir) + [
        "model.pretrained=imagenet", "train.learning_rate=1e-30", "train.optimizer=sgd",
        "train.momentum=0.0", "train.freeze_bn=true",
        "train.epochs=2", "model.dropout=0.0"])
    summary = loop.train_and_evaluate(config, workdir)
    assert calls == [1]
    history = [json.loads(line) for line in read(os.path.join(workdir, "metrics.jsonl")).split(
        "\n") if line]
    assert [r["epoch"] for r in history] == [0, 1, 2] and history[0]["best"]
    assert not history[1]["best"] and not history[2]["best"]
    assert summary["best_epoch"] == 0 and summary["kept_starting_point"]
    assert summary["best_checkpoint"].endswith(os.path.join("checkpoints", "0"))
    assert "training did not beat the starting point" in capsys.readouterr().out
    # A run from scratch has no epoch 0 to keep (its start is random).
    scratch = loop.train_and_evaluate(load_config(TINY, overrides(idx_dir) + ["train.epochs=1"]),
                                      str(tmp_path / "scratch"))
    assert not scratch["kept_starting_point"] and scratch["best_epoch"] == 1
