"""Explaining a match: similarity maps and occlusion sensitivity (facejax/retrieval/explain.py)."""

from __future__ import annotations

import importlib.util
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.stats import spearmanr

from conftest import make_run, write_image_folder
from PIL import Image

from facejax import cli
from facejax.config import apply_override
from facejax.errors import CheckpointError, ConfigError
from facejax.models.heads import EmbeddingModel
from facejax.retrieval import explain as ex

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CELL, GRID = 16, 3            # the shared-patch images: 3x3 cells of 16 px
SIZE = CELL * GRID


class PatchNet(nnx.Module):
    """One 16x16/16 convolution with many channels: a cell's feature is a random projection of
    its own pixels and of nothing else, so two cells' features are near-orthogonal unless the
    cells are equal."""

    def __init__(self, rngs: nnx.Rngs, channels: int = 1024):
        self.conv = nnx.Conv(3, channels, (CELL, CELL), strides=(CELL, CELL), padding="VALID",
                             use_bias=False, rngs=rngs)
        self.num_features = channels

    def feature_map(self, x, train=False):
        return self.conv(x)

    def __call__(self, x, train=False):
        return jnp.mean(self.feature_map(x), axis=(1, 2))


class TinyNet(nnx.Module):
    """Two convolutions, a pool and a bias-free linear map after it (as dlib's fc): `pool`
    'max' makes the embedding something that is not a mean of the map."""

    def __init__(self, rngs: nnx.Rngs, pool: str = "mean"):
        self.conv1 = nnx.Conv(3, 8, (3, 3), strides=(2, 2), rngs=rngs)
        self.conv2 = nnx.Conv(8, 16, (3, 3), rngs=rngs)
        self.fc = nnx.Linear(16, 12, use_bias=False, rngs=rngs)
        self.pool = pool
        self.num_features = 12

    def feature_map(self, x, train=False):
        return nnx.relu(self.conv2(nnx.relu(self.conv1(x))))

    def project(self, pooled):
        return self.fc(pooled)

    def __call__(self, x, train=False):
        f = self.feature_map(x)
        pooled = jnp.mean(f, axis=(1, 2)) if self.pool == "mean" else jnp.max(f, axis=(1, 2))
        return self.project(pooled)


def _model(backbone, embed_dim=0, seed=0):
    m = EmbeddingModel(backbone, num_classes=3, embed_dim=embed_dim, rngs=nnx.Rngs(seed))
    if embed_dim:  # a head bias that is far from zero, so its share of the maps matters
        m.embedding.proj.bias[...] = np.random.default_rng(seed).normal(
            0, 1, embed_dim).astype(np.float32)
    return m


def _explainer(model, size, normalization="tf"):
    return ex.Explainer.from_model(model, image_size=size, model_input_size=size,
                                   normalization=normalization)


def _blob_images(size=32, seed=0):
    """Two images with structure (a bright disc on a gradient) plus different noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    out = []
    for cy, cx in ((0.3, 0.6), (0.6, 0.4)):
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < 0.04).astype(float)
        base = 60 + 100 * xx + 90 * disc
        img = base[..., None] * np.array([1.0, 0.8, 0.6]) + rng.normal(0, 20, (size, size, 3))
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


@pytest.mark.slow
def test_similarity_maps_sum_to_the_cosine_through_a_projection_head_with_bias():
    model = _model(TinyNet(nnx.Rngs(1)), embed_dim=6)
    explainer = _explainer(model, 32)
    assert explainer.methods == (ex.SIMILARITY, ex.OCCLUSION), explainer.why_not_similarity
    q, r = _blob_images()
    e = explainer.explain(q, r, "similarity")
    emb = np.asarray(model.embed(jnp.asarray(np.stack([q, r]), jnp.float32) / 127.5 - 1))
    cosine = float(emb[0] @ emb[1])
    assert e.query_map.shape == e.result_map.shape == (16, 16)
    assert abs(e.score - cosine) < 1e-5
    assert abs(float(e.query_map.sum()) - cosine) < 1e-5
    assert abs(float(e.result_map.sum()) - cosine) < 1e-5
    # Not a uniform split: the maps say something the score alone does not.
    assert float(np.std(e.query_map)) > 1e-3 * abs(cosine) / e.query_map.size


@pytest.mark.slow
def test_a_model_that_is_not_a_pooled_map_gets_occlusion_only():
    explainer = _explainer(_model(TinyNet(nnx.Rngs(1), pool="max"), embed_dim=6), 32)
    assert explainer.methods == (ex.OCCLUSION,)
    assert "not an affine map" in explainer.why_not_similarity
    q, r = _blob_images()
    with pytest.raises(ConfigError, match="use --method occlusion"):
        explainer.explain(q, r, "similarity")
    assert explainer.explain(q, r, "auto").method == ex.OCCLUSION


def _shared_patch_pair(seed=0):
    """Two noise images (zero-mean in the 'tf' scaling) that share exactly one cell, at
    different places: query cell (0, 2) is result cell (2, 1)."""
    rng = np.random.default_rng(seed)
    q, r = rng.integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    r[2 * CELL:3 * CELL, 1 * CELL:2 * CELL] = q[0:CELL, 2 * CELL:3 * CELL]
    return q, r


def _cell_of(m: np.ndarray) -> tuple[int, int]:
    y, x = np.unravel_index(int(np.argmax(m)), m.shape)
    scale = m.shape[0] // GRID
    return int(y) // scale, int(x) // scale


def test_both_methods_put_the_maximum_on_the_one_shared_patch():
    explainer = _explainer(_model(PatchNet(nnx.Rngs(0))), SIZE)
    q, r = _shared_patch_pair()
    sim = explainer.explain(q, r, "similarity")
    assert sim.query_map.shape == (GRID, GRID)
    assert _cell_of(sim.query_map) == (0, 2) and _cell_of(sim.result_map) == (2, 1)
    occ = explainer.explain(q, r, "occlusion", patch=CELL, stride=CELL)
    assert occ.query_map.shape == (SIZE, SIZE) and abs(occ.score - sim.score) < 1e-5
    assert _cell_of(occ.query_map) == (0, 2) and _cell_of(occ.result_map) == (2, 1)
    # Overlapping patches too: the peak pixel still lies in the shared cell.
    occ = explainer.explain(q, r, "occlusion", patch=CELL, stride=CELL // 2)
    assert _cell_of(occ.query_map) == (0, 2) and _cell_of(occ.result_map) == (2, 1)


def test_occlusion_works_from_an_embedding_function_alone():
    def mean_colour(images_u8):
        x = images_u8.astype(jnp.float32).mean(axis=(1, 2)) / 255.0 - 0.5
        return x

    explainer = ex.Explainer(mean_colour, None, input_size=SIZE)
    q, r = _shared_patch_pair()
    e = explainer.explain(q, r)
    assert e.method == ex.OCCLUSION and e.query_map.shape == (SIZE, SIZE)
    assert np.isfinite(e.query_map).all() and np.isfinite(e.result_map).all()


@pytest.mark.slow
@pytest.mark.parametrize("method", ex.METHODS)
def test_maps_change_when_the_weights_are_randomised(method):
    """Adebayo et al. (2018): a map that survives randomising the weights explains the image,
    not the model. Same pair, the model's weights re-drawn: the ranks must change."""
    q, r = _blob_images()
    maps = []
    for seed in (1, 2):
        explainer = _explainer(_model(TinyNet(nnx.Rngs(seed)), embed_dim=6, seed=seed), 32)
        e = explainer.explain(q, r, method, patch=8, stride=4)
        maps.append(np.concatenate([e.query_map.ravel(), e.result_map.ravel()]))
    rho = spearmanr(maps[0], maps[1]).statistic
    # Measured: 0.08 (similarity), 0.41 (occlusion: greying the disc changes any model's
    # embedding, so part of its map follows the image); the same weights give 1.0.
    assert rho < 0.6, rho
    # ... and the same weights give the same map (the test is not passing on noise).
    again = _explainer(_model(TinyNet(nnx.Rngs(1)), embed_dim=6, seed=1), 32).explain(
        q, r, method, patch=8, stride=4)
    assert spearmanr(maps[0], np.concatenate([again.query_map.ravel(),
                                              again.result_map.ravel()])).statistic > 0.999


def test_bad_requests_are_config_errors():
    explainer = _explainer(_model(PatchNet(nnx.Rngs(0), channels=8)), SIZE)
    q, r = _shared_patch_pair()
    with pytest.raises(ConfigError, match="method"):
        explainer.explain(q, r, "gradcam")
    with pytest.raises(ConfigError, match=r"uint8 \[48,48,3\]"):
        explainer.explain(q[:32], r)
    with pytest.raises(ConfigError, match="patch"):
        explainer.explain(q, r, "occlusion", patch=SIZE + 1)
    with pytest.raises(ConfigError, match="patch"):
        explainer.explain(q, r, "occlusion", patch=4, stride=-1)


# ----------------------------------------------------------------------------- the run level

def _script():
    spec = importlib.util.spec_from_file_location(
        "_script_explain", os.path.join(ROOT, "scripts", "explain.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run with an exported embedder and an index but no checkpoint (conftest.make_run)."""
    from facejax.retrieval import workdir as wd

    tmp = tmp_path_factory.mktemp("explain")
    root = str(tmp / "images")
    write_image_folder(root, {f"p{c}": 4 for c in "abc"}, size=(20, 16))
    work = make_run(tmp, root)
    wd.build_workdir_index(work, wd.read_run_config(work), progress=False)
    return work, root


def test_script_explains_a_pair_and_a_top_k_from_the_embedder_alone(run, tmp_path, capsys):
    work, root = run
    main = _script().main
    q, r = os.path.join(root, "pa", "pa_000.png"), os.path.join(root, "pa", "pa_001.png")
    out = str(tmp_path / "pair.png")
    assert main(["--workdir", work, "--query", q, "--result", r, "--out", out]) == 0
    text = capsys.readouterr().out
    assert "no similarity maps: the run's checkpoint cannot be used" in text
    assert "occlusion maps: " + out in text and Image.open(out).size[0] > 100
    out = str(tmp_path / "top.png")
    assert main(["--workdir", work, "--query", q, "--k", "3", "--out", out]) == 0
    assert capsys.readouterr().out.count("cosine") == 3 and os.path.isfile(out)


@pytest.mark.parametrize("case", ["missing", "not_an_image", "both", "neither", "similarity",
                                  "folder_out", "k_too_big"])
def test_script_bad_input_is_one_line(run, tmp_path, capsys, case):
    work, root = run
    q = os.path.join(root, "pa", "pa_000.png")
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"<html>not a picture</html>")
    args = {"missing": ["--query", str(tmp_path / "nope.jpg"), "--result", q],
            "not_an_image": ["--query", str(junk), "--result", q],
            "both": ["--query", q, "--result", q, "--k", "2"],
            "neither": ["--query", q],
            "similarity": ["--query", q, "--result", q, "--method", "similarity"],
            "folder_out": ["--query", q, "--result", q, "--out", str(tmp_path) + "/"],
            "k_too_big": ["--query", q, "--k", "1000"]}[case]
    with pytest.raises(SystemExit) as exit_info:
        cli.run(_script().main, ["--workdir", work, *args, "--out", str(tmp_path / "x.png")]
                if case != "folder_out" else ["--workdir", work, *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not os.path.exists(tmp_path / "x.png")


def test_report_draws_the_explained_figure_only_when_asked(run):
    from facejax.retrieval import report
    from facejax.retrieval import workdir as wd

    work, _ = run
    out = os.path.join(work, "report")
    wd.evaluate_workdir(work, wd.read_run_config(work), progress=False)  # default: unchanged
    assert not os.path.exists(os.path.join(out, report.FIGURE_EXPLAINED))
    assert "explained" not in open(os.path.join(out, "report.md")).read()
    cfg = wd.read_run_config(work)
    apply_override(cfg, "eval.explain_figure=auto")
    wd.evaluate_workdir(work, cfg, progress=False)
    assert os.path.isfile(os.path.join(out, report.FIGURE_EXPLAINED))
    for name in ("report.md", "report.html"):
        assert report.FIGURE_EXPLAINED in open(os.path.join(out, name)).read()
    apply_override(cfg, "eval.explain_figure=gradcam")
    with pytest.raises(ConfigError, match="method must be one of"):
        wd.evaluate_workdir(work, cfg, progress=False)


@pytest.mark.slow
def test_a_checkpoint_that_no_longer_matches_the_export_is_refused(run, monkeypatch):
    """Training that went on after the export: the maps would explain another model."""
    import facejax.train.checkpoint as ckpt

    work, _ = run
    other = _model(TinyNet(nnx.Rngs(3)))

    class Cfg:
        class model:
            name = "tiny"

    monkeypatch.setattr(ckpt, "restore_model", lambda workdir, which: (other, Cfg))
    with pytest.raises(CheckpointError, match="no longer gives the exported embedder's embeddings"):
        ex.load_explainer(work)
