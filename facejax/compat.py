"""The few places where facejax relies on a dependency's structure beyond its documented calls.

Everything else uses public APIs. What is here is pinned by tests/test_compat.py, which fails
on an upgrade that changes it (and names this module), instead of letting a search or a load
go wrong quietly.

ScaNN (1.4.2): `scann.scann_ops_pybind.ScannSearcher` is the public wrapper; its `searcher`
attribute is the native searcher it wraps. With docids, every search result is turned into a
Python list of docid strings (~20% of a 1,000-query search at 100k x 128); upsert and delete
need them. So the index keeps two public wrappers around one native searcher: one with docids
for updates, one without, which answers positions as arrays. `load_searcher` unpickles
`scann_docids.pkl` if a folder holds one: facejax never writes it, and refuses a folder with
one.

jax (0.10): there is no public "have the backends started?" call. XLA reads its CPU flags
(`XLA_FLAGS`, `jax_num_cpu_devices`) once, when the first backend starts, so the CPU presets
(`facejax.cpu_preset`, `facejax.train.host_devices`) must know whether that has happened:
`jax_backends_started` asks `jax._src.xla_bridge.backends_are_initialized`, the check that
jax's own `jax_num_cpu_devices` validator uses.
"""

from __future__ import annotations

SCANN_DOCIDS_PICKLE = "scann_docids.pkl"  # what scann's load_searcher would unpickle


def scann_with_docids(searcher, docids: list[str]):
    """A public ScaNN wrapper around `searcher`'s native searcher, with `docids`."""
    from scann.scann_ops.py.scann_ops_pybind import ScannSearcher

    return ScannSearcher(searcher.searcher, docids=docids)


def scann_positions_view(searcher):
    """A public ScaNN wrapper around the same native searcher without docids: its searches
    return ScaNN's positions (numpy arrays), and `serialize` writes no docid pickle."""
    from scann.scann_ops.py.scann_ops_pybind import ScannSearcher

    return ScannSearcher(searcher.searcher)


def jax_backends_started() -> bool:
    """Whether jax has started its backends (after which XLA ignores new CPU flags). False
    when jax is not imported yet; True (change nothing) if this jax lacks the call."""
    import sys

    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # another jax: assume the worst
        return True
