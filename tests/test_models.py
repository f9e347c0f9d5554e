"""Every registered model builds and has the contract's outputs; counts match the references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from facejax.convert.merge import WEIGHT_FILTER, model_weights
from facejax.convert.weights import CONVERTERS
from facejax.data.augment import NORMALIZATIONS
from facejax.errors import ConfigError
from facejax.models import create_model, get_preset, get_spec, list_models
from facejax.models.vgg import adaptive_avg_matrix


def abstract(name, **kw):
    """The model's structure without running its (slow, compile-bound) random initialisers."""
    kw.setdefault("num_classes", 7)
    return nnx.eval_shape(lambda: create_model(name, rngs=nnx.Rngs(0), **kw))


_BUILT = {}


def built(name, source=""):
    """Abstract 1000-class model, cached per structure: tracing the init of a deep net costs
    seconds (nnx re-checks every rng-counter update against the whole trace so far)."""
    key = (name, tuple(sorted(get_preset(name, source).arch_kw.items())))
    if key not in _BUILT:
        _BUILT[key] = abstract(name, num_classes=1000, source=source)
    return _BUILT[key]


def count(model, kind=nnx.Param) -> int:
    return sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, kind)))


def test_registry_has_every_family():
    expected = {"scratch_cnn", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                "resnet50v2", "resnet101v2", "resnet152v2", "vgg16", "vgg19",
                *(f"efficientnet_lite{i}" for i in range(5))}
    assert expected <= set(list_models())


@pytest.mark.slow
@pytest.mark.parametrize("name", list_models())
def test_every_model_builds_with_contract_shapes(name):
    model = built(name)
    size = get_preset(name).input_size
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    logits, feats, emb = nnx.eval_shape(lambda m, x: (m(x), m.features(x), m.embed(x)),
                                        model, x)
    f = model.backbone.num_features
    assert logits.shape == (2, 1000) and feats.shape == (2, f) and emb.shape == (2, f)
    assert logits.dtype == feats.dtype == emb.dtype == jnp.float32
    # Stable explicit names: the head and the backbone are always there by name (the
    # raw-pixel baseline's backbone has no weights).
    named = {"head"} if name == "raw_pixels" else {"backbone", "head"}
    assert named <= set(model_weights(model))


def test_projection_cosine_head_and_bfloat16_shapes():
    model = abstract("resnet18", embed_dim=16, head="cosine", dtype=jnp.bfloat16)
    x = jax.ShapeDtypeStruct((3, 64, 64, 3), jnp.float32)
    logits, feats, emb = nnx.eval_shape(
        lambda m, x: (m(x, train=True), m.features(x), m.embed(x, train=True)), model, x)
    assert (logits.shape, feats.shape, emb.shape) == ((3, 7), (3, 512), (3, 16))
    assert logits.dtype == emb.dtype == jnp.float32
    assert set(model_weights(model)["embedding"]["proj"]) == {"kernel", "bias"}
    assert model_weights(model)["backbone"]["stem_conv"]["kernel"].dtype == jnp.float32


# Torchvision counts parameters only (its BN running stats are buffers).
TORCHVISION_COUNTS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
                      "resnet101": 44_549_160, "resnet152": 60_192_808,
                      "vgg16": 138_357_544, "vgg19": 143_667_240}
# Keras count_params() includes the BN moving mean/variance (non-trainable weights).
# (Keras-layout ResNet101/152, 44,707,176 and 60,419,944, differ from ResNet50 only in depth;
# building them abstractly costs ~10 s, so they are left out.)
KERAS_COUNTS = {"resnet50": 25_636_712, "resnet50v2": 25_613_800, "resnet101v2": 44_675_560,
                "resnet152v2": 60_380_648, "vgg16": 138_357_544, "vgg19": 143_667_240}
# Tracing a 101- or 152-layer build takes seconds: those counts run in the full suite only.
DEEP = ("resnet101", "resnet152", "resnet101v2", "resnet152v2")


def _counted(counts):
    return [pytest.param(n, marks=pytest.mark.slow) if n in DEEP else n for n in sorted(counts)]


@pytest.mark.parametrize("name", _counted(TORCHVISION_COUNTS))
def test_param_counts_torchvision_convention(name):
    assert count(built(name, "torchvision")) == TORCHVISION_COUNTS[name]


@pytest.mark.parametrize("name", _counted(KERAS_COUNTS))
def test_param_counts_keras_convention(name):
    assert count(built(name, "keras"), WEIGHT_FILTER) == KERAS_COUNTS[name]


def test_keras_and_torchvision_resnet_layouts_differ_as_documented():
    tv, ks = built("resnet50", "torchvision"), built("resnet50", "keras")
    assert "bias" not in model_weights(tv)["backbone"]["stage2_block1"]["conv1"]
    assert "bias" in model_weights(ks)["backbone"]["stage2_block1"]["conv1"]
    assert tv.backbone.stem_bn.epsilon == 1e-5 and ks.backbone.stem_bn.epsilon == 1.001e-5
    # v1.5 strides the 3x3 conv; Keras v1 the first 1x1.
    assert tv.backbone.stage2_block1.conv2.strides == (2, 2)
    assert tv.backbone.stage2_block1.conv1.strides == (1, 1)
    assert ks.backbone.stage2_block1.conv1.strides == (2, 2)
    v2 = built("resnet50v2").backbone  # stride on the LAST block of stages 1-3
    assert v2.stage1_block3.conv2.strides == (2, 2) and v2.stage1_block1.conv2.strides == (1, 1)
    assert v2.stage4_block3.conv2.strides == (1, 1)


def test_presets_per_weight_source():
    assert get_preset("resnet50").normalization == "torch"  # default source: torchvision
    assert get_preset("resnet50", "keras").normalization == "caffe"
    assert get_preset("resnet50", "keras").arch_kw["layout"] == "keras"
    assert get_preset("resnet50v2").normalization == "tf"
    assert get_preset("vgg16", "keras").normalization == "caffe"
    assert get_preset("vgg16", "keras_notop").arch_kw["classifier"] is False
    p = get_preset("resnet18")
    assert p.filename == "resnet18-f37072fd.pth" and p.sha256_prefix == "f37072fd"
    assert p.url.endswith(p.filename) and p.converter == "torchvision" and p.num_classes == 1000
    k = get_preset("resnet50v2", "keras_notop")
    assert k.filename == "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5"
    assert k.md5 == "fac2f116257151a9d068a22e544a4917" and k.num_classes == 0
    for name in list_models():
        for source, preset in get_spec(name).presets.items():
            assert preset.input_size > 0 and preset.normalization in NORMALIZATIONS, (name, source)
            assert not preset.converter or preset.converter in CONVERTERS, (name, source)


def test_create_model_rejects_bad_config():
    with pytest.raises(ConfigError, match="unknown model 'resnet51'"):
        create_model("resnet51", num_classes=3, rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="head"):
        abstract("resnet18", head="arcface")
    with pytest.raises(ConfigError, match="num_classes"):
        abstract("resnet18", num_classes=0)
    with pytest.raises(ConfigError, match="no weights source 'keras'"):
        abstract("resnet18", source="keras")
    with pytest.raises(ConfigError, match="bad architecture arguments"):
        abstract("resnet18", widths=3)
    with pytest.raises(ConfigError, match="layout"):
        abstract("resnet18", layout="caffe")


@pytest.fixture(scope="module")
def resnet18():
    # A real create_model (initialisers and all), with every head option on. The rbg PRNG
    # compiles its samplers much faster on CPU than threefry (~2 s per kernel shape here).
    return create_model("resnet18", num_classes=5, embed_dim=8, head="cosine", dropout=0.5,
                        rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))


@nnx.jit(static_argnames="train")
def outputs(model, x, train=False):
    logits, emb = model.logits_and_embedding(x, train=train)
    return model(x, train=train), model.features(x, train=train), model.embed(x, train=train), \
        logits, emb


def batch_stats(model):
    return jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))


@pytest.mark.slow
def test_real_init_forward_heads(resnet18):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 32, 32, 3)), jnp.float32)
    bn = model_weights(resnet18)["backbone"]["stem_bn"]
    np.testing.assert_array_equal(bn["mean"], 0.0)
    np.testing.assert_array_equal(bn["var"], 1.0)
    cos, feats, emb, cos2, emb2 = outputs(resnet18, x)
    assert cos.shape == (4, 5) and feats.shape == (4, 512) and emb.shape == (4, 8)
    assert bool(jnp.all(jnp.abs(cos) <= 1.0 + 1e-6))  # cosine head
    proj = model_weights(resnet18)["embedding"]["proj"]
    z = np.asarray(feats) @ np.asarray(proj["kernel"]) + np.asarray(proj["bias"])
    np.testing.assert_allclose(emb, z / np.linalg.norm(z, axis=-1, keepdims=True),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(cos2, cos, rtol=1e-5, atol=1e-6)  # logits_and_embedding agrees
    np.testing.assert_allclose(emb2, emb, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(outputs(resnet18, x)[0], cos)  # no dropout at eval


@pytest.mark.slow
def test_batchnorm_and_dropout_train_vs_eval(resnet18):
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 32, 32, 3)), jnp.float32)
    stats0 = batch_stats(resnet18)
    eval_out = outputs(resnet18, x)[0]
    jax.tree.map(np.testing.assert_array_equal, stats0, batch_stats(resnet18))  # untouched
    train_a = outputs(resnet18, x, train=True)
    moved = jax.tree.map(lambda a, b: not np.allclose(a, b), stats0, batch_stats(resnet18))
    assert all(jax.tree.leaves(moved))  # every BN layer updated its running statistics
    assert not np.allclose(train_a[1], outputs(resnet18, x)[1])  # batch != running stats
    assert not np.allclose(train_a[0], eval_out)
    # Train-mode BN uses the batch's statistics both times: only dropout makes these differ.
    train_b = outputs(resnet18, x, train=True)
    np.testing.assert_allclose(train_b[1], train_a[1], rtol=1e-5, atol=1e-6)
    assert not np.allclose(train_b[0], train_a[0])


def test_vgg_adaptive_pool_bins_follow_torch():
    np.testing.assert_array_equal(adaptive_avg_matrix(7, 7), np.eye(7))
    # torch bins for 5 -> 3: [0, 2), [1, 4), [3, 5)
    expected = np.array([[.5, .5, 0, 0, 0], [0, 1 / 3, 1 / 3, 1 / 3, 0], [0, 0, 0, .5, .5]])
    np.testing.assert_allclose(adaptive_avg_matrix(5, 3), expected, rtol=1e-6)
    # 2 -> 7 replicates each input cell (the 64 px VGG case).
    assert adaptive_avg_matrix(2, 7).sum(axis=1).tolist() == [1.0] * 7
    notop = built("vgg16", "keras_notop")
    assert notop.backbone.num_features == 512 and "fc1" not in model_weights(notop)["backbone"]
