"""Similarity maps for the zoo's newer families (MobileNetV2/V3, DenseNet, InceptionV3): where the
embedding is an affine map of the pooled feature map the maps sum back to the cosine; where a
non-affine layer follows the pool (MobileNetV3's pre-logits) the explainer says so and falls back
to occlusion instead of failing."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from facejax.convert.merge import assign_weights, flatten, model_weights, unflatten
from facejax.errors import ConfigError
from facejax.models import create_model
from facejax.models.heads import EmbeddingModel
from facejax.retrieval import explain as ex


def _explainer(model, size):
    return ex.Explainer.from_model(model, image_size=size, model_input_size=size,
                                   normalization="tf")


def _images(size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A pair that shares its left half (so the cosine is well away from 0) and differs on the
    right."""
    rng = np.random.default_rng(seed)
    q, r = rng.integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    r[:, : size // 2] = q[:, : size // 2]
    return q, r


class WiderAfterPool(nnx.Module):
    """A pooled conv map followed by a non-affine layer of another width (as MobileNetV3's
    pre-logits), and no `why_not_similarity` of its own: the shared shape check must find it."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(3, 8, (3, 3), strides=(2, 2), rngs=rngs)
        self.fc = nnx.Linear(8, 12, rngs=rngs)
        self.num_features = 12

    def feature_map(self, x, train=False):
        return nnx.relu(self.conv(x))

    def __call__(self, x, train=False):
        return nnx.hard_swish(self.fc(jnp.mean(self.feature_map(x), axis=(1, 2))))


@pytest.mark.parametrize("embed_dim", [0, 6])
def test_a_non_affine_layer_of_another_width_after_the_pool_gets_occlusion_with_a_reason(
        embed_dim):
    model = EmbeddingModel(WiderAfterPool(nnx.Rngs(0)), num_classes=3, embed_dim=embed_dim,
                           rngs=nnx.Rngs(1))
    explainer = _explainer(model, 16)
    assert explainer.methods == (ex.OCCLUSION,)
    assert "8 channels but its pooled features 12" in explainer.why_not_similarity
    with pytest.raises(ConfigError, match="use --method occlusion"):
        explainer.resolve("similarity")
    assert explainer.resolve("auto") == ex.OCCLUSION


@pytest.mark.slow
def test_the_occlusion_fallback_explains_the_pair():
    model = EmbeddingModel(WiderAfterPool(nnx.Rngs(0)), num_classes=3, rngs=nnx.Rngs(1))
    explainer = _explainer(model, 16)
    q, r = _images(16)
    with pytest.raises(ConfigError, match="use --method occlusion"):
        explainer.explain(q, r, "similarity")
    e = explainer.explain(q, r, "auto")
    assert e.method == ex.OCCLUSION and e.query_map.shape == e.result_map.shape == (16, 16)
    assert np.isfinite(e.query_map).all() and np.abs(e.query_map).max() > 0


@pytest.mark.parametrize("embed_dim", [0, 8])
def test_mobilenet_v3_with_its_pre_logits_layer_says_why_it_has_no_similarity_maps(embed_dim):
    # Abstract weights: the reason is structural, nothing is computed.
    model = nnx.eval_shape(lambda: create_model("mobilenet_v3_small", num_classes=3,
                                                embed_dim=embed_dim, rngs=nnx.Rngs(0)))
    explainer = _explainer(model, 64)
    assert explainer.methods == (ex.OCCLUSION,)
    assert "pre-logits" in explainer.why_not_similarity
    assert "top=False" in explainer.why_not_similarity
    assert explainer.resolve("auto") == ex.OCCLUSION
    with pytest.raises(ConfigError, match="pre-logits.*use --method occlusion"):
        explainer.resolve("similarity")


def _random_model(name: str, embed_dim: int, **kw):
    """Built abstractly and filled with random weights, BN statistics included (random init is
    slow on CPU): fan-in-scaled kernels, running variances in [0.5, 2]; a projection head's
    bias well away from zero so that its share of the maps matters."""
    model = nnx.eval_shape(lambda: create_model(name, num_classes=3, embed_dim=embed_dim,
                                                rngs=nnx.Rngs(0), **kw))
    rng, tree = np.random.default_rng(0), {}
    for path, v in flatten(model_weights(model)).items():
        if path.endswith("/var"):
            tree[path] = rng.uniform(0.5, 2.0, v.shape)
        elif path.endswith(("/mean", "/bias")):
            tree[path] = rng.normal(0, 0.5, v.shape)
        elif path.endswith("/scale"):
            tree[path] = rng.uniform(0.5, 1.5, v.shape)
        else:
            fan_in = int(np.prod(v.shape[:-1])) if len(v.shape) > 1 else 1
            tree[path] = rng.standard_normal(v.shape) * np.sqrt(2.0 / fan_in)
    assign_weights(model, unflatten({k: v.astype(np.float32) for k, v in tree.items()}))
    return model


@pytest.mark.slow
@pytest.mark.parametrize("name,kw,embed_dim,size", [
    ("mobilenet_v2_035", {}, 6, 64),
    ("mobilenet_v3_small", {"top": False}, 0, 64),
    ("mobilenet_v3_small", {"top": False}, 6, 64),
    ("densenet121", {}, 6, 64),
    ("inception_v3", {}, 0, 139),
])
def test_new_families_similarity_maps_sum_to_the_cosine(name, kw, embed_dim, size):
    model = _random_model(name, embed_dim, **kw)
    explainer = _explainer(model, size)
    assert explainer.methods == (ex.SIMILARITY, ex.OCCLUSION), explainer.why_not_similarity
    q, r = _images(size)
    e = explainer.explain(q, r, "similarity")
    emb = np.asarray(model.embed(jnp.asarray(np.stack([q, r]), jnp.float32) / 127.5 - 1))
    cosine = float(emb[0] @ emb[1])
    assert min(e.query_map.shape) >= 2 and min(e.result_map.shape) >= 2
    assert abs(e.score - cosine) < 1e-5
    assert abs(float(e.query_map.sum()) - cosine) < 1e-5
    assert abs(float(e.result_map.sum()) - cosine) < 1e-5
    # Not a uniform split: the maps say something the score alone does not.
    assert float(np.std(e.query_map)) > 1e-3 * abs(cosine) / e.query_map.size
