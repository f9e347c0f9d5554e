"""The CPU inference preset: XLA:CPU settings that measured faster for the embedding path
(bench/cpu_options.py, BENCHMARKS.md), applied by the inference entry points (serve,
build_index, search, eval_*) before jax initialises its backends.

- `FACEJAX_CPU_PRESET=0` (or off, false, no) turns it off; unset or 1 (on, true, yes) is on.
- A flag already in the user's `XLA_FLAGS` wins: the preset only appends the flags that the user
  did not set, so `XLA_FLAGS=--xla_force_host_platform_device_count=1` (or jax's
  JAX_NUM_CPU_DEVICES) keeps one device.
- The flags only touch XLA:CPU; on a GPU or TPU the embedding runs as before.
- Applied after the backends exist, XLA would ignore the flags: then nothing is changed (an
  INFO log line says so; stdout stays clean for --json output).
"""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping

from facejax import compat
from facejax.errors import ConfigError

log = logging.getLogger(__name__)

ENV = "FACEJAX_CPU_PRESET"
_ON = ("", "1", "on", "true", "yes")
_OFF = ("0", "off", "false", "no")
_DEVICES = "xla_force_host_platform_device_count"


def user_chose_devices(environ: MutableMapping[str, str] | None = None) -> bool:
    """Whether the environment already sets the host device count (XLA_FLAGS' device-count
    flag or jax's JAX_NUM_CPU_DEVICES): then neither half of the preset (inference here,
    training in `facejax.train.host_devices`) sets one."""
    environ = os.environ if environ is None else environ
    return _DEVICES in environ.get("XLA_FLAGS", "") or "JAX_NUM_CPU_DEVICES" in environ


def preset_flags(cpus: int | None = None) -> tuple[str, ...]:
    """What won in bench/cpu_options.py and bench/embed_throughput.py on the 2-core Xeon
    (BENCHMARKS.md, "CPU speed push"): two host devices with the batch split over them.
    XLA:CPU runs a CNN's convolutions one at a time (93% of ResNet18's time,
    bench/cpu_profile.py), so one device keeps only ~1.4 of 2 cores busy; two keep ~2 busy
    (ResNet18 batch 32 on a quiet machine: 1.35x, 0.69x -> 0.88x torch channels_last).
    Eigen's thread pool stays on: turning it off (one thread per device) measured level here
    and would leave the cores beyond two idle on a bigger machine. float32 only: bf16 stays an
    opt-in (scripts/export.py --compute_dtype bfloat16)."""
    cpus = (os.cpu_count() or 1) if cpus is None else cpus
    if cpus < 2:
        return ()
    return (f"--{_DEVICES}=2",)


def flag_name(token: str) -> str:
    """'--xla_foo=1' -> 'xla_foo' (also for '--xla_foo' and '-xla_foo=1')."""
    return token.lstrip("-").split("=", 1)[0]


def merge_flags(user: str, preset: tuple[str, ...]) -> str:
    """`user`'s XLA_FLAGS with each preset flag appended unless the user set that flag."""
    taken = {flag_name(t) for t in user.split()}
    added = [f for f in preset if flag_name(f) not in taken]
    return " ".join(([user.strip()] if user.strip() else []) + added)


def enabled(environ: MutableMapping[str, str] | None = None) -> bool:
    """Whether $FACEJAX_CPU_PRESET asks for the preset (raises ConfigError for other values)."""
    environ = os.environ if environ is None else environ
    value = environ.get(ENV, "").strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    raise ConfigError(f"{ENV}={environ[ENV]!r} is not understood: set it to 0 to turn the CPU "
                      f"preset off, or 1 (or leave it unset) to use it")


def apply(environ: MutableMapping[str, str] | None = None,
          preset: tuple[str, ...] | None = None) -> list[str]:
    """Adds the preset's flags (default `preset_flags()`) to `environ['XLA_FLAGS']`; returns
    the flags it added."""
    environ = os.environ if environ is None else environ
    preset = preset_flags() if preset is None else preset
    if user_chose_devices(environ):
        preset = tuple(f for f in preset if flag_name(f) != _DEVICES)
    if not enabled(environ) or not preset:
        return []
    user = environ.get("XLA_FLAGS", "")
    merged = merge_flags(user, preset)
    added = merged[len(user.strip()):].split()
    if not added:
        return []
    if compat.jax_backends_started():
        # A script's main() called in a process that already ran jax (tests, notebooks).
        log.info("the CPU preset was not applied (jax had already started); set "
                 "XLA_FLAGS='%s' yourself to use it", " ".join(added))
        return []
    environ["XLA_FLAGS"] = merged
    log.info("CPU preset: XLA_FLAGS += %s", " ".join(added))
    return added
