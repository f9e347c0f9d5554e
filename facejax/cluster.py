"""Which multi-process job this process belongs to, read from the scheduler's environment.

One place turns a scheduler's variables into `jax.distributed.initialize(coordinator,
num_processes, process_id)`. `FACEJAX_DISTRIBUTED` names the scheduler (the specs in deploy/
set it):

- unset: `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` when they are set
  (all three), else a single process.
- `slurm` (deploy/slurm/train.sbatch, under `srun`): process id `SLURM_PROCID`, count
  `SLURM_NTASKS`; the coordinator is `JAX_COORDINATOR_ADDRESS`, else the first host of
  `SLURM_STEP_NODELIST` (or `SLURM_JOB_NODELIST`) at `JAX_COORDINATOR_PORT`, else at jax's own
  port for the job (`SLURM_JOB_ID % 4096 + 61440`).
- `k8s` (deploy/k8s/train-job.yaml, an Indexed Job): process id `JOB_COMPLETION_INDEX`, count
  `JAX_NUM_PROCESSES`, coordinator `JAX_COORDINATOR_ADDRESS` (pod 0's name under the headless
  Service, e.g. `facejax-train-0.facejax-train:1234`).
- `auto`: `jax.distributed.initialize()` finds the cluster itself (Cloud TPU VMs, GKE TPU).

Every process keeps all its local devices (jax's own SLURM detection would give each process
one device: one process per node is the default here, one per GPU works with
`--gpus-per-task=1`). A 1-process job starts no coordinator. Inconsistent variables are one
ConfigError line naming them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

from facejax.errors import ConfigError

MODE_VAR = "FACEJAX_DISTRIBUTED"
MODES = ("slurm", "k8s", "auto")
_JAX_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


@dataclasses.dataclass(frozen=True)
class Cluster:
    """One process's place in a job; `coordinator` is 'host:port' ('' when `source` is auto)."""
    source: str  # 'env' | 'slurm' | 'k8s' | 'auto'
    coordinator: str = ""
    num_processes: int = 0
    process_id: int = 0


def resolve(environ: Mapping[str, str]) -> Cluster | None:
    """The job `environ` describes, or None for a single process. Raises ConfigError (one
    line) when the variables are missing, malformed or disagree."""
    mode = environ.get(MODE_VAR, "").strip().lower()
    if mode == "auto":
        return Cluster("auto")
    if mode == "slurm":
        return _slurm(environ)
    if mode in ("k8s", "kubernetes"):
        return _k8s(environ)
    if mode:
        raise ConfigError(f"{MODE_VAR}={environ[MODE_VAR]!r} is not one of {', '.join(MODES)} "
                          f"(or unset, with {', '.join(_JAX_VARS)})")
    present = [k for k in _JAX_VARS if environ.get(k)]
    if not present:
        return None
    if len(present) != len(_JAX_VARS):
        missing = sorted(set(_JAX_VARS) - set(present))
        raise ConfigError(f"multi-process run: set all of {', '.join(_JAX_VARS)} (missing "
                          f"{', '.join(missing)})")
    num = _int(environ, "JAX_NUM_PROCESSES")
    return _checked("env", _address(environ["JAX_COORDINATOR_ADDRESS"]), num,
                    _int(environ, "JAX_PROCESS_ID"), "JAX_PROCESS_ID", "JAX_NUM_PROCESSES")


def _slurm(environ: Mapping[str, str]) -> Cluster:
    missing = [k for k in ("SLURM_PROCID", "SLURM_NTASKS") if not environ.get(k)]
    if missing:
        raise ConfigError(f"{MODE_VAR}=slurm but {', '.join(missing)} is not set: run the "
                          f"command under srun inside the job (deploy/slurm/train.sbatch)")
    num, pid = _int(environ, "SLURM_NTASKS"), _int(environ, "SLURM_PROCID")
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        addr = _address(environ["JAX_COORDINATOR_ADDRESS"])
    else:
        nodes = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
        if not nodes:
            raise ConfigError(f"{MODE_VAR}=slurm: neither SLURM_STEP_NODELIST nor "
                              f"SLURM_JOB_NODELIST is set, so the coordinator host is unknown; "
                              f"set JAX_COORDINATOR_ADDRESS=host:port")
        if environ.get("JAX_COORDINATOR_PORT"):
            port = str(_int(environ, "JAX_COORDINATOR_PORT"))
        elif environ.get("SLURM_JOB_ID"):
            port = str(_int(environ, "SLURM_JOB_ID") % 4096 + 61440)  # jax's own choice
        else:
            raise ConfigError(f"{MODE_VAR}=slurm: set JAX_COORDINATOR_PORT (SLURM_JOB_ID, "
                              f"which would choose a port, is not set either)")
        addr = _address(f"{first_host(nodes)}:{port}")
    return _checked("slurm", addr, num, pid, "SLURM_PROCID", "SLURM_NTASKS")


def _k8s(environ: Mapping[str, str]) -> Cluster:
    missing = [k for k in ("JOB_COMPLETION_INDEX", "JAX_NUM_PROCESSES", "JAX_COORDINATOR_ADDRESS")
               if not environ.get(k)]
    if missing:
        raise ConfigError(f"{MODE_VAR}=k8s but {', '.join(missing)} is not set: run it as an "
                          f"Indexed Job (completionMode: Indexed) with the env of "
                          f"deploy/k8s/train-job.yaml")
    pid = _int(environ, "JOB_COMPLETION_INDEX")
    if environ.get("JAX_PROCESS_ID") and _int(environ, "JAX_PROCESS_ID") != pid:
        raise ConfigError(f"JAX_PROCESS_ID={environ['JAX_PROCESS_ID']} disagrees with "
                          f"JOB_COMPLETION_INDEX={pid}: unset JAX_PROCESS_ID")
    return _checked("k8s", _address(environ["JAX_COORDINATOR_ADDRESS"]),
                    _int(environ, "JAX_NUM_PROCESSES"), pid, "JOB_COMPLETION_INDEX",
                    "JAX_NUM_PROCESSES")


def _checked(source: str, addr: str, num: int, pid: int, pid_var: str, num_var: str) -> Cluster:
    if num < 1:
        raise ConfigError(f"{num_var}={num} must be at least 1")
    if not 0 <= pid < num:
        raise ConfigError(f"{pid_var}={pid} must be in [0, {num_var}={num})")
    return Cluster(source, addr, num, pid)


def _int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise ConfigError(f"{name}={environ[name]!r} must be a whole number") from None


def _address(addr: str) -> str:
    host, sep, port = addr.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"coordinator address {addr!r} must be host:port (port 1-65535)")
    return f"{host}:{int(port)}"


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[003-010,12],cpu1' -> 'gpu003'."""
    nodelist = nodelist.strip()
    cut = next((i for i, ch in enumerate(nodelist) if ch in ",["), len(nodelist))
    if cut == len(nodelist) or nodelist[cut] == ",":
        host = nodelist[:cut]
    else:
        rest = nodelist[cut + 1:]
        end = next((i for i, ch in enumerate(rest) if ch in ",-]"), len(rest))
        host = nodelist[:cut] + rest[:end]
    if not host:
        raise ConfigError(f"cannot read a host from the SLURM node list {nodelist!r}")
    return host


def initialize(environ: Mapping[str, str] | None = None) -> bool:
    """Joins the job the environment describes; True if this process is one of several.

    Must run before anything touches a jax backend (jax.devices(), an array).
    """
    spec = resolve(os.environ if environ is None else environ)
    if spec is None or (spec.source != "auto" and spec.num_processes == 1):
        return False
    import jax

    if spec.source == "auto":
        jax.distributed.initialize()
        return True
    print(f"joining a {spec.num_processes}-process job as process {spec.process_id} "
          f"(coordinator {spec.coordinator}, from {spec.source})", flush=True)
    jax.distributed.initialize(spec.coordinator, spec.num_processes, spec.process_id)
    return True
