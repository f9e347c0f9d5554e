"""Parity: torchvision ResNet/VGG with random weights and BN stats == our converted models."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import LazyModule
from flax import nnx

try:
    import safetensors.torch
    import torch
    torchvision = LazyModule("torchvision")  # imported by the first test that uses it
except ImportError as e:  # CI installs [parity]; a missing extra must fail, not skip
    raise ImportError(f"parity tests need the [parity] extra (pip install -e '.[parity]'): {e}")

from facejax.convert import torchvision as tv_convert
from facejax.convert.merge import load_weights
from facejax.errors import WeightsError
from facejax.models import create_model

pytestmark = pytest.mark.parity
TOL = 1e-4


def rel_err(a, b) -> float:
    """max|a - b| / max|b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def reference(name: str, seed: int = 0) -> torch.nn.Module:
    """A torchvision model with random weights AND random BatchNorm running statistics."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
                m.running_mean.normal_(0.0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
            elif isinstance(m, torch.nn.Linear):
                m.bias.uniform_(-0.1, 0.1)
    return model


def torch_outputs(model, x_nhwc: np.ndarray, train: bool = False):
    """(logits, pooled features) of a torchvision model; features = the classifier's input."""
    head = model.fc if hasattr(model, "fc") else model.classifier[6]
    seen = {}
    hook = head.register_forward_hook(lambda mod, inp, out: seen.update(f=inp[0]))
    model.train(train)
    with torch.no_grad():
        logits = model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy()))
    hook.remove()
    model.eval()
    return logits.numpy(), seen["f"].numpy()


def ours(name: str, tree) -> nnx.Module:
    # Built abstractly (no random init) and filled entirely from the converted weights.
    model = nnx.eval_shape(lambda: create_model(name, num_classes=1000, rngs=nnx.Rngs(0)))
    return load_weights(model, tree)


@nnx.jit(static_argnames="train")
def forward(model, x, train=False):
    return model(x, train=train), model.features(x, train=train)


def check_parity(model, ref, x, train=False):
    logits, feats = torch_outputs(ref, x, train)
    ours_logits, ours_feats = forward(model, jnp.asarray(x), train=train)
    assert ours_logits.shape == logits.shape and ours_feats.shape == feats.shape
    assert rel_err(ours_logits, logits) <= TOL
    assert rel_err(ours_feats, feats) <= TOL


def save(sd, path, fmt):
    if fmt == "safetensors":
        safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, str(path), _use_new_zipfile_serialization=(fmt == "zip"))


@pytest.fixture(scope="module")
def resnet18_ref():
    return reference("resnet18")


@pytest.mark.parametrize("fmt,suffix", [("zip", ".pth"), ("legacy", ".pth"),
                                        ("safetensors", ".safetensors")])
@pytest.mark.slow
def test_resnet18_parity_all_formats(resnet18_ref, tmp_path, fmt, suffix):
    path = tmp_path / f"resnet18{suffix}"
    save(resnet18_ref.state_dict(), path, fmt)
    model = ours("resnet18", tv_convert.convert_file(path))
    x = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype(np.float32)
    check_parity(model, resnet18_ref, x)


@pytest.mark.slow
def test_resnet18_train_mode_batch_statistics(resnet18_ref):
    # Training-mode BN normalises with the batch's own statistics in both frameworks.
    model = ours("resnet18", tv_convert.convert_state_dict(
        {k: v.numpy() for k, v in resnet18_ref.state_dict().items()}))
    x = np.random.default_rng(2).normal(size=(4, 64, 64, 3)).astype(np.float32)
    check_parity(model, resnet18_ref, x, train=True)


@pytest.mark.slow
def test_resnet50_parity(tmp_path):
    ref = reference("resnet50", seed=1)
    path = tmp_path / "resnet50.safetensors"
    save(ref.state_dict(), path, "safetensors")
    model = ours("resnet50", tv_convert.convert_file(path))
    x = np.random.default_rng(3).normal(size=(2, 64, 64, 3)).astype(np.float32)
    check_parity(model, ref, x)


@pytest.mark.slow
def test_vgg16_parity_small_input_adaptive_pool(tmp_path):
    # 64 px leaves a 2x2 map that torchvision's AdaptiveAvgPool2d(7) blows up to 7x7: this
    # checks our adaptive pooling and the fc1 NCHW -> NHWC permutation at once.
    ref = reference("vgg16", seed=2)
    path = tmp_path / "vgg16.pth"
    save(ref.state_dict(), path, "zip")
    model = ours("vgg16", tv_convert.convert_file(path))
    x = np.random.default_rng(4).normal(size=(2, 64, 64, 3)).astype(np.float32)
    check_parity(model, ref, x)


@pytest.mark.parametrize("name,expected", [("resnet18", 11_689_512), ("resnet50", 25_557_032),
                                           ("vgg16", 138_357_544)])
@pytest.mark.slow
def test_param_counts_match_torchvision(name, expected):
    # torch counts parameters only (BN weight/bias, not running stats): compare Params.
    ref = sum(p.numel() for p in getattr(torchvision.models, name)(weights=None).parameters())
    model = nnx.eval_shape(lambda: create_model(name, num_classes=1000, rngs=nnx.Rngs(0)))
    count = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert ref == expected
    assert count == expected


@pytest.mark.slow  # builds a torchvision resnet18
def test_converter_rejects_foreign_state_dict():
    with pytest.raises(WeightsError, match="not a torchvision ResNet or VGG"):
        tv_convert.convert_state_dict({"encoder.weight": np.zeros((2, 2), np.float32)})
    # vgg*_bn interleaves BatchNorm layers, so its conv indices match no VGG16/19 table.
    bn_vgg = {"features.0.weight": np.zeros((64, 3, 3, 3), np.float32),
              "features.1.running_mean": np.zeros((64,), np.float32)}
    with pytest.raises(WeightsError, match="VGG16/VGG19"):
        tv_convert.convert_state_dict(bn_vgg)
    sd = {k: v.numpy() for k, v in torchvision.models.resnet18().state_dict().items()}
    sd["layer1.0.se.weight"] = np.zeros((1,), np.float32)
    with pytest.raises(WeightsError, match="layer1.0.se.weight"):
        tv_convert.convert_state_dict(sd)


def test_load_state_dict_errors(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        tv_convert.convert_file(tmp_path / "missing.pth")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(WeightsError, match="cannot read"):
        tv_convert.convert_file(bad)


@pytest.mark.slow
def test_resnet_weights_into_keras_layout_fail_loudly():
    # torchvision ResNet has no conv biases; the Keras layout does -> a loud merge error.
    tree = tv_convert.convert_state_dict(
        {k: v.numpy() for k, v in torchvision.models.resnet50().state_dict().items()})
    model = nnx.eval_shape(
        lambda: create_model("resnet50", num_classes=1000, rngs=nnx.Rngs(0), source="keras"))
    with pytest.raises(WeightsError,
                       match=r"missing from the weights \(53\): backbone/stage1_block1/conv1/bias"):
        load_weights(model, tree)
