"""Dependencies are used through their public APIs; what is not is in facejax/compat.py, and
these tests fail loudly when an upgrade changes what it relies on."""

import inspect
import os
import re
import subprocess
import sys
from importlib.metadata import version

import numpy as np
import pytest

from facejax import compat

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "facejax")

# Reach-ins into private parts of dependencies that facejax once made (issue 13), and hand-made
# replacements of a library: none may come back outside compat.py.
BANNED = {
    "scann_pybind": "ScaNN's native module: use scann.scann_ops_pybind's builder/load_searcher",
    "ScannNumpy": "ScaNN's native searcher: use scann.scann_ops_pybind",
    "._parents": "grain's iterator internals: use get_state/set_state and public datasets",
    "._ctx": "grain's iterator internals",
    "_maybe_await_cleanup_tmp_directory": "orbax's private CheckpointManager method",
    "0x82F63B78": "a hand-written CRC-32C: tensorboardX writes the event files",
    "jax._src": "jax's private modules: compat.jax_backends_started is the one use",
}


def _sources():
    repo = os.path.dirname(PACKAGE)
    for top in ("facejax", "scripts", "bench"):
        for root, _, files in os.walk(os.path.join(repo, top)):
            for name in files:
                if name.endswith(".py") and name != "compat.py":
                    path = os.path.join(root, name)
                    with open(path) as f:
                        yield os.path.relpath(path, repo), f.read()


def test_no_private_reach_ins_outside_compat():
    """In the package, its scripts and the benchmarks."""
    found = [f"{rel}: {needle} ({why})" for rel, text in _sources()
             for needle, why in BANNED.items() if needle in text]
    assert found == []


def test_orbax_noise_installs_nothing_at_import():
    """The orbax log filters and hook are scoped to the calls that need them."""
    import facejax.train.checkpoint as ckpt_lib

    source = inspect.getsource(ckpt_lib)
    assert not re.search(r"^orbax_noise\.\w+\(\)", source, re.M), \
        "an orbax_noise call at import time installs a process-wide filter"


def test_scann_is_the_tested_minor_version():
    assert version("scann").startswith("1.4."), (
        f"scann {version('scann')}: facejax/compat.py relies on scann 1.4's ScannSearcher "
        "wrapper (its `searcher` attribute, load_searcher's docid pickle); check it and "
        "tests/test_compat.py against the new release")


def test_scann_wrapper_structure_that_compat_relies_on(tmp_path):
    from scann.scann_ops.py import scann_ops_pybind

    x = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # each item is its own nearest neighbour
    docids = [str(i) for i in range(300)]
    with_ids = scann_ops_pybind.builder(x, 10, "dot_product").score_brute_force().build(
        docids=docids)
    assert hasattr(with_ids, "searcher"), "ScannSearcher no longer exposes `searcher`"
    view = compat.scann_positions_view(with_ids)
    idx, dist = view.search_batched(x[:3], final_num_neighbors=2)
    assert isinstance(idx, np.ndarray) and idx.dtype.kind in "iu" and idx.shape == (3, 2)
    np.testing.assert_array_equal(idx[:, 0], [0, 1, 2])
    # An update through the docid wrapper is seen by the view: one native searcher.
    with_ids.delete(["0"])
    assert view.search_batched(x[:1], final_num_neighbors=1)[0][0, 0] != 0
    # serialize without docids writes no pickle; load_searcher reads the one it would unpickle.
    view.serialize(str(tmp_path), relative_path=True)
    assert compat.SCANN_DOCIDS_PICKLE not in os.listdir(tmp_path)
    assert compat.SCANN_DOCIDS_PICKLE in inspect.getsource(scann_ops_pybind.load_searcher)
    loaded = compat.scann_with_docids(
        scann_ops_pybind.load_searcher(str(tmp_path), assets_backcompat_shim=False),
        list(with_ids.docids))
    assert loaded.docids == with_ids.docids and loaded.size() == 299


@pytest.mark.parametrize("package, prefix", [("grain", "0.2."), ("orbax-checkpoint", "0.12."),
                                             ("tensorboardX", "2.")])
def test_public_apis_used_are_of_the_tested_versions(package, prefix):
    """The public calls used (grain's DatasetIterator protocol and MapDataset slicing, orbax's
    utils.tmp_checkpoints, tensorboardX's SummaryWriter) were checked against these."""
    assert version(package).startswith(prefix), (
        f"{package} {version(package)}: facejax was checked against {prefix}x; run "
        "tests/test_pipeline.py, test_checkpoint.py and test_events.py against it")


def test_jax_backends_started_tells_before_from_after():
    """In a fresh interpreter: False before jax runs anything, True after; the CPU presets
    rely on it to leave a started jax alone."""
    code = ("import jax; from facejax import compat; a = compat.jax_backends_started(); "
            "jax.numpy.zeros(1).block_until_ready(); print(a, compat.jax_backends_started())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu",
                                               PYTHONPATH=os.path.dirname(PACKAGE)))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "True"]
