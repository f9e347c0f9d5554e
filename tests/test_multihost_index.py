"""build_index.py as a 2-process jax.distributed job: each process embeds its own shards,
process 0 builds the index; the result equals a 1-process build, and a job killed mid-way
resumes without embedding its finished shards again."""

import json
import os
import re
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import make_run, write_image_folder

from facejax.retrieval import multihost
from facejax.retrieval import workdir as wd
from facejax.retrieval.index import load_index

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "build_index.py")
CLASSES = {f"person_{c}": 6 for c in "abcdef"}
SHARD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "JAX_", "FACEJAX_", "JOB_COMPLETION"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, **extra)
    env.pop("XLA_FLAGS", None)
    return env


def _job(workdir, port, fault_process=None):
    """build_index.py as the 2 pods of an Indexed Job would run it."""
    procs = []
    for i in range(2):
        extra = {multihost.FAULT_EXIT_AFTER_SHARDS: "1"} if i == fault_process else {}
        env = _env(FACEJAX_DISTRIBUTED="k8s", JOB_COMPLETION_INDEX=str(i),
                   JAX_NUM_PROCESSES="2", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", **extra)
        procs.append(subprocess.Popen(
            [sys.executable, SCRIPT, "--workdir", workdir, "--shard_size", str(SHARD)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def _embedded(out: str) -> set[int]:
    return {int(m) for m in re.findall(r"embedding shard (\d+)/\d+", out)}


def _valid_shards(work: str) -> set[int]:
    done = set()
    for name in os.listdir(work):
        m = re.fullmatch(r"shard_(\d+)\.npy", name)
        if m:
            try:
                np.load(os.path.join(work, name))
            except (OSError, ValueError):
                continue
            done.add(int(m.group(1)) + 1)
    return done


@pytest.mark.slow
def test_two_processes_build_the_index_of_one_and_resume_after_a_kill(tmp_path):
    root = str(tmp_path / "images")
    write_image_folder(root, CLASSES, size=(20, 16))
    single = make_run(tmp_path / "one", root)
    multi = make_run(tmp_path / "two", root)

    # The job, killed mid-way: process 1 dies after its first shard, then the scheduler
    # tears the job down (process 0 is killed too).
    procs = _job(multi, _free_port(), fault_process=1)
    out1 = procs[1].communicate(timeout=300)[0]
    assert procs[1].returncode == 3, out1[-3000:]
    procs[0].send_signal(signal.SIGKILL)
    procs[0].communicate(timeout=60)
    work = os.path.join(multi, wd.WORK_DIR)
    finished = _valid_shards(work)
    total = json.load(open(os.path.join(work, "work.json")))["count"]
    n_shards = -(-total // SHARD)
    assert 1 <= len(finished) < n_shards and not os.path.exists(os.path.join(multi, "index"))

    # The same job again: only the missing shards are embedded, each by one process.
    procs = _job(multi, _free_port())
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n----\n".join(o[-3000:] for o in outs)
    again = [_embedded(o) for o in outs]
    assert not again[0] & again[1]
    assert again[0] | again[1] == set(range(1, n_shards + 1)) - finished
    assert all(s % 2 == 1 for s in again[0]) and all(s % 2 == 0 for s in again[1])
    assert not os.path.exists(work)

    # One process over the same gallery: the same index.
    proc = subprocess.run([sys.executable, SCRIPT, "--workdir", single, "--no_progress",
                           "--shard_size", str(SHARD)], env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    a = load_index(os.path.join(multi, "index"))
    b = load_index(os.path.join(single, "index"))
    assert a.size == b.size == total
    assert list(a.paths) == list(b.paths) and np.array_equal(a.ids, b.ids)
    assert np.array_equal(a.labels, b.labels)
    np.testing.assert_allclose(a.embeddings, b.embeddings, rtol=1e-5, atol=1e-6)
    assert a.info["embedded_by_processes"] == 2 and b.info["embedded_by_processes"] == 1
    # Every process printed the saved index.
    assert all(f"index: {total} items" in o for o in outs)
