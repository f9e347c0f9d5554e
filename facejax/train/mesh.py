"""Multi-process start-up (one process per host) and replicating host values over the mesh.

A multi-host job runs the same command on every host with three environment variables:

    JAX_COORDINATOR_ADDRESS=host0:1234  JAX_NUM_PROCESSES=2  JAX_PROCESS_ID=0|1

(or `FACEJAX_DISTRIBUTED=auto` on clusters `jax.distributed.initialize()` detects by itself:
Cloud TPU, SLURM, Open MPI, Kubernetes). The 'data' mesh then spans every device of every
process and each process feeds its slice of each global batch.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh

from facejax.errors import ConfigError
from facejax.sharding import replicated

_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize_distributed() -> bool:
    """Joins a multi-process job when the environment asks for one; returns True if it did.

    Must run before anything touches a jax backend (jax.devices(), an array).
    """
    if os.environ.get("FACEJAX_DISTRIBUTED") == "auto":
        jax.distributed.initialize()
        return True
    present = [k for k in _ENV if os.environ.get(k)]
    if not present:
        return False
    if len(present) != len(_ENV):
        missing = sorted(set(_ENV) - set(present))
        raise ConfigError(f"multi-process run: set all of {', '.join(_ENV)} (missing "
                          f"{', '.join(missing)})")
    try:
        num, pid = int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"])
    except ValueError as e:
        raise ConfigError(f"JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers: {e}") from e
    if not 0 <= pid < num:
        raise ConfigError(f"JAX_PROCESS_ID={pid} must be in [0, JAX_NUM_PROCESSES={num})")
    jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"], num, pid)
    return True


def is_primary() -> bool:
    """Process 0 writes files (logs, plots, config); every process takes part in checkpoints."""
    return jax.process_index() == 0


def replicate(tree, mesh: Mesh):
    """Host or single-device values -> arrays replicated over `mesh`, across processes too
    (every process must pass the same values)."""
    sharding = replicated(mesh)

    def put(x):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(put, tree)
