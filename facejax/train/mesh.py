"""Multi-process start-up (one process per host) and replicating host values over the mesh.

A multi-host job runs the same command on every host with three environment variables:

    JAX_COORDINATOR_ADDRESS=host0:1234  JAX_NUM_PROCESSES=2  JAX_PROCESS_ID=0|1

(or `FACEJAX_DISTRIBUTED=slurm|k8s|auto`: see facejax.cluster and deploy/). The 'data' mesh
then spans every device of every process and each process feeds its slice of each global batch.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from facejax.sharding import replicated


def initialize_distributed() -> bool:
    """Joins a multi-process job when the environment asks for one; returns True if it did.

    Must run before anything touches a jax backend (jax.devices(), an array). The variables
    each scheduler sets (SLURM, a Kubernetes Indexed Job, JAX_*) are read by facejax.cluster.
    """
    from facejax.cluster import initialize

    return initialize()


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
