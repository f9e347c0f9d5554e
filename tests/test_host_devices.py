"""Host devices for CPU training: the count divides the batch, and the user's choice wins."""

import os
import subprocess
import sys

import pytest

from facejax.train.host_devices import cpu_training_devices, user_chose

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("batch, cores, want", [
    (32, 2, 2), (128, 2, 2), (33, 2, 1), (7, 2, 1), (1, 2, 1), (2, 16, 2), (12, 8, 6),
    (30, 4, 3), (64, 1, 1)])
def test_count_divides_the_batch_and_fits_the_cores(batch, cores, want):
    # An odd batch (33) must not get 2 devices: the train loop would refuse it with a
    # ConfigError ("must be a multiple of the device count") where one device trains it.
    assert cpu_training_devices(batch, cores) == want


def test_user_choice_and_multi_process_are_left_alone():
    assert not user_chose({})
    assert user_chose({"XLA_FLAGS": "--xla_force_host_platform_device_count=3"})
    assert user_chose({"JAX_NUM_CPU_DEVICES": "1"})
    assert user_chose({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    assert not user_chose({"XLA_FLAGS": "--xla_cpu_enable_fast_math=false"})


_PROBE = """
import os, sys
sys.path.insert(0, {root!r})
import jax
from facejax.train.host_devices import use_host_devices, usable_cores
set_to = use_host_devices(int(sys.argv[1]))
print(set_to, jax.device_count(), usable_cores())
"""


def _probe(batch, **env):
    full = dict(os.environ, JAX_PLATFORMS="cpu", **env)
    for key in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES"):
        if key not in env:
            full.pop(key, None)
    out = subprocess.run([sys.executable, "-c", _PROBE.format(root=ROOT), str(batch)],
                         env=full, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return [int(v) for v in out.stdout.split()]


@pytest.mark.slow
def test_applies_before_the_backend_and_respects_xla_flags():
    set_to, devices, cores = _probe(32)
    assert devices == cpu_training_devices(32, cores) and set_to in (0, devices)
    # A prime batch keeps one device (below 31 cores), so training it cannot fail on the split.
    set_to, devices, cores = _probe(31)
    assert devices == cpu_training_devices(31, cores) and (devices == 1 or cores >= 31)
    # The user's own flag wins, even a count that is not the one we would pick.
    assert _probe(32, XLA_FLAGS="--xla_force_host_platform_device_count=3")[:2] == [0, 3]
    assert _probe(32, JAX_NUM_CPU_DEVICES="1")[:2] == [0, 1]
    # The CPU preset's switch turns the training half off too.
    assert _probe(32, FACEJAX_CPU_PRESET="0")[:2] == [0, 1]


def test_one_image_on_two_host_devices_says_how_to_use_one():
    # scripts/train.py now splits CPU training over one host device per core: a one-image
    # training split, which one device trained, must say how to go back to one device.
    from facejax.errors import DataError
    from facejax.train.batch import fitting_batch_size

    with pytest.raises(DataError, match="JAX_NUM_CPU_DEVICES=1"):
        fitting_batch_size(64, 1, 2)
