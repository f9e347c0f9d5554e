"""Bad input to training, export, the LR finder and weight conversion: one clear error each."""

import json
import logging
import os
import shutil
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from facejax.config import load_config, to_json
from facejax.errors import CheckpointError, ConfigError, WeightsError
from facejax.train import checkpoint as ckpt_lib
from facejax.train import orbax_noise
from facejax.train import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
STEP = 2


def write_run(workdir: str, poison: str = "") -> str:
    """A workdir as training leaves it (config, classes, one best checkpoint), made directly;
    `poison` names a parameter written as NaN."""
    config = load_config(TINY, ["data.root=/nowhere"])  # restoring never reads the data
    config_dict = json.loads(to_json(config))
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(to_json(config))
    with open(os.path.join(workdir, "classes.json"), "w") as f:
        json.dump(["a", "b", "c"], f)
    model = state_lib.build_model(config, 3)
    state, _, _, _ = state_lib.create_train_state(config, model, steps_per_epoch=2,
                                                  total_steps=4)
    if poison:
        def poisoned(path, x):
            name = jax.tree_util.keystr(path, simple=True, separator="/")
            return x * np.nan if name == poison else x

        state = state.replace(params=jax.tree_util.tree_map_with_path(
            poisoned, {"params": state.params})["params"])
    ckpt = ckpt_lib.RunCheckpoints(workdir, config.train.monitor)
    ckpt.save(STEP, state, meta={"model": "scratch_cnn", "num_classes": 3,
                                 "config": config_dict},
              data_state={}, metrics={"val_accuracy": 0.5})
    ckpt.wait()
    ckpt.close()
    return workdir


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> str:
    return write_run(str(tmp_path_factory.mktemp("run")))


def damage(src: str, dst, how: str) -> str:
    """A copy of run `src` whose checkpoint arrays are truncated or whose manifest is garbage,
    without its checksums (as a checkpoint from before facejax kept them): the damage reaches
    orbax itself, whose errors must still come out as one line."""
    dst = str(dst)
    shutil.copytree(src, dst)
    model_dir = os.path.join(dst, "checkpoints", str(STEP), "model")
    os.remove(os.path.join(dst, "checkpoints", str(STEP), ckpt_lib.CHECKSUMS_NAME))
    if how == "truncated":
        data_dir = os.path.join(model_dir, "ocdbt.process_0", "d")
        for name in os.listdir(data_dir):
            with open(os.path.join(data_dir, name), "r+b") as f:
                f.truncate(10)
    else:
        with open(os.path.join(model_dir, "manifest.ocdbt"), "wb") as f:
            f.write(b"garbage\n")
    return dst


def export_cli(workdir: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "export.py"),
                           "--workdir", workdir], capture_output=True, text=True, timeout=240,
                          env=dict(os.environ, PYTHONPATH=ROOT), check=False)


@pytest.fixture
def closes(monkeypatch) -> list:
    """Records every RunCheckpoints.close() (a manager left open prints thread tracebacks)."""
    calls = []
    real = ckpt_lib.RunCheckpoints.close
    monkeypatch.setattr(ckpt_lib.RunCheckpoints, "close",
                        lambda self: calls.append(self.directory) or real(self))
    return calls


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncated", "manifest"])
def test_restoring_a_damaged_checkpoint_names_it_and_closes_the_manager(saved_run, tmp_path,
                                                                         closes, how):
    workdir = damage(saved_run, tmp_path / "run", how)
    step_dir = os.path.join(workdir, "checkpoints", str(STEP))
    with pytest.raises(CheckpointError, match="damaged") as err:
        ckpt_lib.restore_model(workdir)
    assert step_dir in str(err.value) and "Delete that folder" in str(err.value)
    assert len(str(err.value)) < 800  # tensorstore's kilobytes of spec are not repeated
    assert closes == [os.path.join(workdir, "checkpoints")]


@pytest.mark.slow
def test_export_of_a_damaged_checkpoint_prints_one_line(saved_run, tmp_path):
    """The script's whole stderr: no traceback from orbax's abandoned reads or threads."""
    workdir = damage(saved_run, tmp_path / "run", "truncated")
    out = export_cli(workdir)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot restore checkpoint"), \
        out.stderr[-3000:]
    assert not os.path.exists(os.path.join(workdir, "embedder"))


@pytest.mark.slow
def test_a_flipped_byte_in_a_checkpoint_stops_restore_and_export(saved_run, tmp_path):
    """8 bytes flipped inside the weights used to restore (and export) as wrong or NaN
    weights without a word; the step's checksums now name the checkpoint and the file."""
    workdir = str(tmp_path / "run")
    shutil.copytree(saved_run, workdir)
    step_dir = os.path.join(workdir, "checkpoints", str(STEP))
    files = [os.path.join(root, n) for root, _, names in os.walk(os.path.join(step_dir, "model"))
             for n in names]
    arrays = max(files, key=os.path.getsize)  # the weights' data file
    with open(arrays, "r+b") as f:
        f.seek(os.path.getsize(arrays) // 2)
        flipped = bytes(b ^ 0xFF for b in f.read(8))
        f.seek(os.path.getsize(arrays) // 2)
        f.write(flipped)
    rel = os.path.relpath(arrays, step_dir)
    with pytest.raises(CheckpointError, match="does not match the checksum") as err:
        ckpt_lib.restore_model(workdir)
    assert step_dir in str(err.value) and rel in str(err.value)
    out = export_cli(workdir)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip() == f"error: {err.value}", out.stderr[-3000:]
    assert not os.path.exists(os.path.join(workdir, "embedder"))


@pytest.mark.slow
def test_nan_weights_in_intact_files_stop_restore_and_export(tmp_path):
    """Files that match their checksums but hold NaN weights: refused, naming the checkpoint
    and the array, instead of exporting an embedder that returns NaN."""
    workdir = write_run(str(tmp_path / "run"), poison="params/head/kernel")
    step_dir = os.path.join(workdir, "checkpoints", str(STEP))
    assert ckpt_lib.verify_checksums(step_dir) == ""
    with pytest.raises(CheckpointError, match=r"NaN or infinite values \(params/head/kernel\)"):
        ckpt_lib.restore_model(workdir)
    out = export_cli(workdir)
    assert out.returncode == 2, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and step_dir in lines[0] and "params/head/kernel" in lines[0], \
        out.stderr[-3000:]
    assert not os.path.exists(os.path.join(workdir, "embedder"))


@pytest.mark.parametrize("msg, dropped", [
    # As seen in CI: a collected read of a damaged checkpoint, no orbax frame in the message.
    ("Task exception was never retrieved\nfuture: <Task finished name='Task-747' "
     "coro=<_wrap_awaitable() done> exception=ValueError('DATA_LOSS: Error opening \"zarr\" "
     "driver [tensorstore_spec=...]')>", True),
    ("Task exception was never retrieved\nfuture: <Task coro=<orbax read()>>", True),
    # Also seen in a full test run: a plain Future of the same read.
    ("Future exception was never retrieved\nfuture: <Future finished exception=ValueError("
     "'DATA_LOSS: Error opening \"zarr\" driver: ... \"recheck_cached_data\":false}')>",
     True),
    ("Future exception was never retrieved\nfuture: <Future exception=KeyError('x')>", False),
    ("Task exception was never retrieved\nfuture: <Task coro=<my_own_job()>>", False),
    ("Executing <Task ...> took 0.2 seconds (tensorstore)", False),
])
def test_failed_restore_filter_drops_only_abandoned_checkpoint_reads(msg, dropped):
    from facejax.train.orbax_noise import _QuietAbandonedReads

    record = logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, None, None)
    assert _QuietAbandonedReads().filter(record) is not dropped


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncated", "manifest"])
def test_a_failed_restore_quiets_only_orbax_reads_and_a_good_one_nothing(saved_run, tmp_path,
                                                                          how):
    """The quieting of orbax's abandoned reads is scoped: a successful restore leaves the
    process's unraisable hook and loggers as they were. A failed one leaves filters that drop
    only orbax's abandoned reads (they finish at an unknown later time); other reports pass."""
    asyncio_log, absl_log = logging.getLogger("asyncio"), logging.getLogger("absl")
    hook_before, asyncio_before = sys.unraisablehook, list(asyncio_log.filters)
    absl_before = list(absl_log.filters)
    # A clean process state (earlier tests in this process may have failed restores).
    sys.unraisablehook = hook = sys.__unraisablehook__
    asyncio_log.filters[:] = [f for f in asyncio_before
                              if not isinstance(f, orbax_noise._QuietAbandonedReads)]
    filters = [list(asyncio_log.filters), absl_before]
    try:
        ckpt_lib.restore_model(saved_run)
        assert sys.unraisablehook is hook
        assert [list(asyncio_log.filters), list(absl_log.filters)] == filters
        workdir = damage(saved_run, tmp_path / "run", how)
        with pytest.raises(CheckpointError, match="damaged"):
            ckpt_lib.restore_model(workdir)
        added = [f for f in asyncio_log.filters if f not in filters[0]]
        assert [type(f) for f in added] == [orbax_noise._QuietAbandonedReads]
        assert absl_log.filters == filters[1]
        # The hook left behind drops only what abandoned reads raise; the rest reaches the
        # previous hook.
        assert sys.unraisablehook is not hook
        seen = []
        drop = orbax_noise._drop_abandoned_reads(seen.append)
        drop(types.SimpleNamespace(exc_value=ValueError("other"), object=None))
        drop(types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"), object=None))
        assert [str(u.exc_value) for u in seen] == ["other"]
    finally:
        # The process is left as a failed restore leaves it, quiet for the reads that restore
        # abandoned: they can end after this test, and a default hook put back here printed
        # one's traceback ("Event loop is closed") into a CI run's output.
        absl_log.filters[:] = absl_before
        asyncio_log.filters[:] = [f for f in asyncio_before
                                  if not isinstance(f, orbax_noise._QuietAbandonedReads)]
        asyncio_log.addFilter(orbax_noise._QuietAbandonedReads())
        sys.unraisablehook = (hook_before if getattr(hook_before, "drops_abandoned_reads", False)
                              else orbax_noise._drop_abandoned_reads(hook_before))


@pytest.mark.slow
def test_importing_and_using_checkpoints_installs_no_global_log_filter(tmp_path):
    """orbax's expected notes are filtered around the calls that log them, not by a filter
    installed for the whole process when facejax.train.checkpoint is imported."""
    code = (
        "import logging, sys\n"
        "from facejax.train import checkpoint as c\n"
        "assert logging.getLogger('absl').filters == [], 'at import'\n"
        f"c.RunCheckpoints({str(tmp_path)!r}).close()\n"
        "assert logging.getLogger('absl').filters == [], 'after use'\n"
        "print('clean')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=240, env=dict(os.environ, PYTHONPATH=ROOT), check=False)
    assert out.returncode == 0 and out.stdout.strip() == "clean", out.stderr[-3000:]


@pytest.mark.slow
def test_half_written_steps_are_gone_when_the_manager_opens(saved_run, tmp_path):
    """A step a killed run left half-written is deleted before RunCheckpoints returns (no
    background cleanup for close() to wait on); a read-only open (export) leaves it."""
    workdir = str(tmp_path / "run")
    shutil.copytree(saved_run, workdir)
    half = os.path.join(workdir, "checkpoints", "7.orbax-checkpoint-tmp-1234567")
    os.makedirs(os.path.join(half, "model"))
    ckpt_lib.RunCheckpoints(workdir, "val_accuracy", read_only=True).close()
    assert os.path.isdir(half)
    ckpt = ckpt_lib.RunCheckpoints(workdir, "val_accuracy")
    assert not os.path.exists(half)
    assert ckpt.latest_step() == STEP
    ckpt.close()


@pytest.mark.slow
def test_restoring_a_healthy_run_logs_no_orbax_warnings(saved_run, caplog):
    with caplog.at_level(logging.INFO):
        model, config = ckpt_lib.restore_model(saved_run)
    assert config.model.name == "scratch_cnn"
    noisy = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert noisy == []


@pytest.mark.slow
def test_unparseable_run_files(saved_run, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(saved_run, workdir)
    with open(os.path.join(workdir, "classes.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(CheckpointError, match="classes.json"):
        ckpt_lib.restore_model(workdir)
    with open(os.path.join(workdir, "classes.json"), "w") as f:
        json.dump({"a": 1}, f)
    with pytest.raises(CheckpointError, match="non-empty list"):
        ckpt_lib.restore_model(workdir)
    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    del config["train"]
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(CheckpointError, match="lacks train.monitor"):
        ckpt_lib.restore_model(workdir)


@pytest.mark.slow
def test_a_file_where_a_run_folder_belongs(tmp_path):
    from facejax.train.loop import train_and_evaluate
    from facejax.train.lr_find import lr_find

    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    config = load_config(TINY, ["data.root=/nowhere"])
    with pytest.raises(ConfigError, match="notes.txt is a file"):
        train_and_evaluate(config, str(a_file))
    with pytest.raises(ConfigError, match="is inside .*notes.txt, which is a file"):
        lr_find(config, str(a_file / "lr"))


def test_convert_weights_refuses_a_file_output_and_negative_classes(tmp_path):
    from facejax.convert.weights import convert_to_checkpoint

    a_file = tmp_path / "out"
    a_file.write_text("x")
    missing_input = tmp_path / "never_read.pth"  # the checks come before the conversion
    with pytest.raises(ConfigError, match="is a file"):
        convert_to_checkpoint("resnet18", "", missing_input, a_file)
    with pytest.raises(ConfigError, match="num_classes must be >= 0"):
        convert_to_checkpoint("resnet18", "", missing_input, tmp_path / "new", -5)
    assert not (tmp_path / "new").exists()


def _converted(directory, **meta):
    from facejax.convert.weights import save_converted

    base = {"model": "resnet50", "source": "keras_notop", "normalization": "caffe",
            "input_size": 224, "num_classes": 0}
    return save_converted(directory, {"stem_conv": {"kernel": np.zeros((1,), np.float32)}},
                          {**base, **meta})


def test_converted_weights_for_another_preprocessing_are_refused(tmp_path):
    from facejax.convert.weights import load_pretrained

    out = _converted(tmp_path / "w")
    # Caffe-BGR weights under the torchvision preset would be fed torch-normalised RGB.
    with pytest.raises(WeightsError, match=r"source 'keras_notop'.*'torchvision'.*"
                                           r"normalization 'caffe' vs the run's 'torch'.*"
                                           r"--config.model.weights_source=keras_notop"):
        load_pretrained(None, "resnet50", "torchvision", path=out)
    with pytest.raises(WeightsError, match="for 'resnet50', not 'resnet18'"):
        load_pretrained(None, "resnet18", "", path=out)
    other = _converted(tmp_path / "v", source="torchvision", normalization="torch",
                       input_size=160)
    with pytest.raises(WeightsError, match="input size 160 vs the run's 224"):
        load_pretrained(None, "resnet50", "torchvision", path=other)


def test_converted_weights_without_their_metadata_are_refused(tmp_path):
    from facejax.convert.weights import META_FILE, load_converted

    out = _converted(tmp_path / "w")
    (out / META_FILE).write_text(json.dumps({"model": "resnet50"}))
    with pytest.raises(WeightsError, match="lacks source, normalization, input_size"):
        load_converted(out)
