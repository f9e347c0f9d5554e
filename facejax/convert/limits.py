"""Bounds every weights reader checks before it allocates what an (untrusted) file declares.

A weights file states sizes that the reader then allocates: tensor shapes, zip members'
uncompressed sizes, HDF5 dataset shapes. A few bytes can declare gigabytes (a stride-0 view of a
one-element storage, a deflate bomb, an HDF5 dataset whose chunks were never written), so the
readers compare what is declared with what the file stores for it, and with the largest model
we support, before reading anything.
"""

from __future__ import annotations

from facejax.errors import WeightsError

# The most a weights file may declare in all: the largest supported model, VGG19, is 0.55 GB
# in float32 (143.7M parameters), so this leaves room for wrapped checkpoints and float64.
MAX_WEIGHTS_BYTES = 4 << 30
# Declared bytes per stored byte. Trained float weights do not compress (deflate: ~1.07x);
# only zeros do, and a 1 GiB zero tensor is not a weight.
MAX_EXPANSION = 20
# Below this, any ratio is accepted (zero-initialised biases, small expanded views, ...).
SMALL_BYTES = 16 << 20


def size_text(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    value, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"


def check_declared(path: str, what: str, declared: int, stored: int) -> None:
    """Raises WeightsError when `what` in `path` declares more than MAX_WEIGHTS_BYTES, or more
    than MAX_EXPANSION times (and over SMALL_BYTES) the bytes the file stores for it."""
    if declared > MAX_WEIGHTS_BYTES:
        raise WeightsError(
            f"{path}: {what} declares {size_text(declared)}, more than the "
            f"{size_text(MAX_WEIGHTS_BYTES)} any supported model needs: the file is damaged "
            "or not a weights file; refusing it before allocating that memory")
    if declared > SMALL_BYTES and declared > MAX_EXPANSION * stored:
        ratio = f"{declared / stored:.0f}x" if stored else "nothing stored"
        raise WeightsError(
            f"{path}: {what} declares {size_text(declared)} from {size_text(stored)} stored in "
            f"the file ({ratio}; weights compress ~1.1x): a compression bomb or unwritten "
            "data, not weights; refusing it before allocating that memory")


class ByteBudget:
    """Running totals of declared and stored bytes over one file's items: each item and the
    sum so far must pass `check_declared` (many small items cannot add up to a bomb)."""

    def __init__(self, path: str):
        self.path, self.declared, self.stored = path, 0, 0

    def add(self, what: str, declared: int, stored: int) -> None:
        check_declared(self.path, what, int(declared), int(stored))
        self.declared += int(declared)
        self.stored += int(stored)
        check_declared(self.path, "its data in total", self.declared, self.stored)


__all__ = ["MAX_EXPANSION", "MAX_WEIGHTS_BYTES", "SMALL_BYTES", "ByteBudget", "check_declared",
           "size_text"]
