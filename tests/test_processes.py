"""Processes around a run: one process at a time in a workdir (a lock the kernel releases
with its holder), and no data worker left behind when training is killed."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from test_train_loop import TINY, overrides, tiny_idx

from facejax import runlock
from facejax.errors import FacejaxError
from facejax.train import checkpoint as ckpt_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT)


def _train_cmd(workdir: str, idx_dir: str, *extra: str) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--config", TINY,
            "--workdir", workdir] + [f"--config.{o}" for o in overrides(idx_dir) + list(extra)]


def _wait_for(predicate, what: str, proc: subprocess.Popen | None = None, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what}")


def _holder_pid(path: str) -> int | None:
    try:
        with open(path) as f:
            return json.load(f)["pid"]
    except (OSError, ValueError, KeyError):
        return None


# ---------------------------------------------------------------------------- /proc helpers

def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) of a live process, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def _descendants(pid: int) -> list[int]:
    parents = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := _stat(int(name))) is not None:
            parents[int(name)] = st[1]
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] not in "ZX"  # a zombie is dead, only not yet reaped


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# ---------------------------------------------------------------------------- tests

@pytest.mark.slow
def test_a_second_train_in_one_workdir_stops_naming_the_first_and_a_killed_one_blocks_nothing(
        tmp_path):
    """Two identical train commands used to share the workdir (an orbax traceback, duplicate
    epochs in metrics.jsonl, a config.json that no longer matched). The second now stops with
    one line naming the first's pid; after a kill -9 of the first, the command resumes."""
    idx_dir = tiny_idx(tmp_path / "idx")
    workdir = str(tmp_path / "run")
    lock = runlock.workdir_lock_path(workdir)
    first = subprocess.Popen(_train_cmd(workdir, idx_dir, "train.epochs=1000"), env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: _holder_pid(lock) == first.pid, "the first run's lock", first)
        second = subprocess.run(_train_cmd(workdir, idx_dir, "train.epochs=1000"), env=ENV,
                                capture_output=True, text=True, timeout=300, check=False)
        assert second.returncode == 2, second.stderr[-3000:]
        assert second.stderr.startswith(f"error: {workdir} is in use by train (pid {first.pid},")
        assert len(second.stderr.strip().splitlines()) == 1, second.stderr[-3000:]
        assert first.poll() is None  # the first one was not disturbed
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert _holder_pid(lock) == first.pid  # the dead holder's file is still there...
    third = subprocess.run(_train_cmd(workdir, idx_dir, "train.epochs=1"), env=ENV,
                           capture_output=True, text=True, timeout=300, check=False)
    assert third.returncode == 0, third.stderr[-3000:]  # ...and blocks nothing
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        epochs = [json.loads(line)["epoch"] for line in f]
    assert epochs == sorted(set(epochs))


def test_export_refuses_a_workdir_that_training_holds(tmp_path):
    from facejax.train.export import export_workdir

    workdir = str(tmp_path)
    with runlock.hold_workdir_lock(workdir, "train"):
        with pytest.raises(runlock.Busy, match=rf"^{workdir} is in use by train \(pid "
                                               rf"{os.getpid()}, since "):
            export_workdir(workdir)
    assert not os.path.exists(os.path.join(workdir, "embedder"))


def test_hosts_of_one_job_share_a_workdir_a_second_job_does_not(tmp_path):
    """Multi-host: each process index locks its own file, so process 1 of a job does not
    block on process 0 of the same job; a second job's process 0 (or 1) does."""
    workdir = str(tmp_path)
    with runlock.hold_workdir_lock(workdir, "train", process_index=0), \
            runlock.hold_workdir_lock(workdir, "train", process_index=1):
        for index in (0, 1):
            with pytest.raises(runlock.Busy, match=f"pid {os.getpid()}"):
                with runlock.hold_workdir_lock(workdir, "train", process_index=index):
                    pass
    with runlock.hold_workdir_lock(workdir, "export"):  # released on leaving the block
        pass
    with pytest.raises(FacejaxError, match="does not exist"):
        with runlock.hold_workdir_lock(str(tmp_path / "missing"), "export"):
            pass


@pytest.mark.slow
def test_kill_9_of_training_leaves_no_data_worker_alive(tmp_path):
    """With data.workers=2, a kill -9 of the trainer used to leave both grain workers and the
    resource tracker running (~200 MB each, adopted by init). They now exit with it."""
    idx_dir = tiny_idx(tmp_path / "idx")
    proc = subprocess.Popen(_train_cmd(str(tmp_path / "run"), idx_dir, "data.workers=2",
                                       "train.epochs=1000"),
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kill_9_when_workers_run(proc, "two grain workers")


def _kill_9_when_workers_run(proc: subprocess.Popen, what: str) -> None:
    """Waits for two spawned workers of `proc`, kills it with -9, and asserts that every
    descendant exits within 30 s (killing and naming any that do not)."""
    family: list[int] = []

    def workers_up() -> bool:
        family[:] = _descendants(proc.pid)
        return sum("spawn_main" in _cmdline(p) for p in family) >= 2

    try:
        _wait_for(workers_up, what, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    try:
        _wait_for(lambda: not any(_alive(p) for p in family), "the workers to exit", timeout=30)
    except AssertionError:
        pass
    survivors = {p: _cmdline(p) for p in family if _alive(p)}
    for p in survivors:  # do not leave them behind either
        os.kill(p, signal.SIGKILL)
    assert not survivors, survivors


@pytest.mark.slow
def test_kill_9_of_a_cache_build_leaves_no_decode_worker_alive(tmp_path):
    """With data.decode_workers=2 the cache's decode pool outlived a kill -9 of its parent."""
    import numpy as np
    from PIL import Image

    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for c in range(4):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(500):  # noisy 256 px JPEGs: seconds of decoding for two workers
            pixels = rng.integers(0, 256, (256, 256, 3), np.uint8)
            Image.fromarray(pixels).save(root / f"c{c}" / f"{i}.jpg", quality=90)
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "prepare_data.py"), "--config", TINY,
           f"--config.data.root={root}", "--config.data.source=folder",
           f"--config.data.cache_dir={tmp_path / 'cache'}", "--config.data.decode_workers=2",
           "--config.data.image_size=224"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kill_9_when_workers_run(proc, "two decode workers")


@pytest.mark.slow
def test_the_processes_of_one_multi_host_job_share_the_workdir(tmp_path):
    """Each process locks its own index: two processes of one job (jax.distributed on the CPU)
    train, checkpoint (SHA256SUMS by process 0, covering both processes' files) and finish."""
    import socket

    idx_dir = tiny_idx(tmp_path / "idx")
    workdir = str(tmp_path / "run")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(_train_cmd(workdir, idx_dir, "train.epochs=1"),
                              env=dict(ENV, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                       JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    assert {_holder_pid(runlock.workdir_lock_path(workdir, i)) for i in range(2)} == \
        {p.pid for p in procs}
    step_dir = os.path.join(workdir, "checkpoints", "5")
    with open(os.path.join(step_dir, ckpt_lib.CHECKSUMS_NAME)) as f:
        assert "/ocdbt.process_1/" in f.read()
    assert ckpt_lib.verify_checksums(step_dir) == ""
