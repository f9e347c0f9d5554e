"""One XLA host device per CPU core for training, with the batch split over the 'data' mesh.

XLA:CPU runs one train step's ops with an intra-op thread pool but keeps fewer than two cores
busy on this machine's 2 cores; N host devices (`jax_num_cpu_devices`, the config form of
`--xla_force_host_platform_device_count`) give each core its own shard of the batch, which the
train loop already splits over the 'data' mesh (BENCHMARKS.md "CPU training: host devices").

`cpu_training_devices` picks the count; `use_host_devices` applies it before the first jax
backend starts. It is the training half of the CPU preset (`facejax.cpu_preset` is the
inference half), so `FACEJAX_CPU_PRESET=0` turns it off too. Nothing happens when the user
chose already (XLA_FLAGS' device-count flag or JAX_NUM_CPU_DEVICES, which
`JAX_NUM_CPU_DEVICES=1` also uses to turn this off), when the job is multi-process, or when
the backend has started. Results match the one-device step
up to float summation order (tests/test_multidevice.py: 8 devices vs 1).
"""

from __future__ import annotations

import os

from facejax import compat, cpu_preset

# Multi-process jobs lay out their own devices (facejax.cluster).
_DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES")


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_training_devices(batch_size: int, cores: int | None = None) -> int:
    """Host devices for a CPU training run: one per core, at most the batch size, and a divisor
    of `batch_size` (the train loop needs the global batch to split evenly); 1 when nothing
    larger fits."""
    cores = usable_cores() if cores is None else int(cores)
    batch_size = int(batch_size)
    for n in range(min(cores, batch_size), 1, -1):
        if batch_size % n == 0:
            return n
    return 1


def user_chose(environ=None) -> bool:
    """Whether the environment already sets the host device count or is a multi-process job."""
    environ = os.environ if environ is None else environ
    return (cpu_preset.user_chose_devices(environ)
            or any(environ.get(k) for k in _DISTRIBUTED_ENV))


def use_host_devices(batch_size: int, environ=None) -> int:
    """Sets `jax_num_cpu_devices` for a training run unless the user chose; returns the count
    set (0 when left alone). Call before anything touches a jax backend."""
    import jax

    if not cpu_preset.enabled(environ) or user_chose(environ) or compat.jax_backends_started():
        return 0
    n = cpu_training_devices(batch_size)
    if n > 1:
        jax.config.update("jax_num_cpu_devices", n)
    return n if n > 1 else 0
