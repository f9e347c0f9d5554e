"""Upper bounds on size-like settings, and checks of planned allocations against the machine.

A setting such as `data.image_size=100000` is a typo, not a plan: without a bound it is found
by the kernel's OOM killer minutes later. Each size-like setting has a hard upper bound here
(far above any real use), and allocations that scale with several settings (a batch, a cache
entry) are compared with the memory or disk this machine has before anything is allocated.
Every refusal names the setting to change.
"""

from __future__ import annotations

import numbers
import os
import shutil

from facejax.errors import ConfigError, DataError

# Largest side of the square uint8 cache and of the model's input: 2048 px is ~7x the largest
# preset (EfficientNet-Lite4, 300 px); one 2048 px image is 12.6 MB.
MAX_IMAGE_SIDE = 2048
# Hard upper bounds (inclusive), by dotted config key. Lower bounds stay where they were checked.
SIZE_LIMITS = {
    "data.image_size": MAX_IMAGE_SIDE,
    "model.input_size": MAX_IMAGE_SIDE,
    "train.batch_size": 65_536,
    "index.embed_batch_size": 65_536,
    "data.max_pixels": 1_000_000_000,   # one decoded RGBA image of this size is 4 GB
    "data.decode_workers": 256,         # each is a Python process; 0 picks one per core
    "data.workers": 256,
    "eval.ks": 10_000,                  # each k (mAP@R already retrieves at most 1,000)
    "eval.num_figure_queries": 100,     # rows of one figure
    "train.eval_gallery_max": 100_000_000,
    "index.exact_max_items": 1_000_000_000,
}
# Free space a cache entry leaves on its disk, so that writing it never fills the disk.
DISK_RESERVE_BYTES = 1 << 30


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:,.1f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:,.1f} MB"


def check_size(setting: str, value) -> None:
    """ConfigError unless `value` (a number, or a sequence of numbers for eval.ks) is at most
    the bound SIZE_LIMITS gives `setting` (unbounded settings pass)."""
    limit = SIZE_LIMITS.get(setting)
    if limit is None:
        return
    items = list(value) if isinstance(value, (tuple, list)) else [value]
    for v in items:
        if isinstance(v, numbers.Real) and not isinstance(v, bool) and v > limit:
            raise ConfigError(f"{setting}={value!r} is above its upper bound of {limit:,}: "
                              f"a value that large cannot be meant (it would need more memory "
                              f"or disk than a machine has); lower {setting}")


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_available() -> int | None:
    """What the container's memory limit leaves (cgroup v2, else v1); None without a limit."""
    for limit_path, usage_path in (
            ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
            ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
             "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit = _read_int(limit_path)
        if limit is not None and limit < 1 << 60:  # v1 reports "no limit" as ~2**63
            return max(0, limit - (_read_int(usage_path) or 0))
    return None


def available_memory() -> int | None:
    """Bytes this process can still allocate: /proc/meminfo's MemAvailable (or sysconf),
    lowered to the cgroup's limit in a container; None where neither can be read."""
    found = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
    return min(found) if found else None


def check_memory(nbytes: float, what: str, fix: str, *, error=ConfigError) -> None:
    """Raises `error` when `what` needs more than the available memory; `fix` says what to do
    (e.g. 'lower data.image_size')."""
    have = available_memory()
    if have is not None and nbytes > have:
        raise error(f"{what} needs about {_gb(nbytes)} of memory, but this machine has "
                    f"{_gb(have)} available: {fix}")


def free_disk(path: str) -> int | None:
    """Free bytes on the disk holding `path` (its nearest existing parent); None if unknown."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def check_disk(nbytes: float, path: str, setting: str, what: str) -> None:
    """DataError when writing `nbytes` under `path` would leave less than DISK_RESERVE_BYTES."""
    free = free_disk(path)
    if free is not None and nbytes + DISK_RESERVE_BYTES > free:
        raise DataError(f"{what} needs {_gb(nbytes)} of disk, but {path} has {_gb(free)} free "
                        f"(and {_gb(DISK_RESERVE_BYTES)} is kept free): lower {setting}, or "
                        f"point data.cache_dir (or $FACEJAX_CACHE) at a bigger disk")
