"""Parity: torchvision MobileNetV2/V3, DenseNet, Inception v3 (random weights and BN statistics)
== our converted models; parameter counts equal torchvision's."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import LazyModule
from flax import nnx

try:
    import torch
    torchvision = LazyModule("torchvision")  # imported by the first test that uses it
except ImportError as e:  # CI installs [parity]; a missing extra must fail, not skip
    raise ImportError(f"parity tests need the [parity] extra (pip install -e '.[parity]'): {e}")

from facejax.convert import torchvision as tv_convert
from facejax.convert.merge import load_weights
from facejax.errors import WeightsError
from facejax.models import create_model

pytestmark = [pytest.mark.parity, pytest.mark.slow]
TOL = 1e-4


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def reference(name: str, seed: int, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None, **kw).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
                m.running_mean.normal_(0.0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
            elif isinstance(m, torch.nn.Linear | torch.nn.Conv2d) and m.bias is not None:
                m.bias.uniform_(-0.1, 0.1)
    return model


def ours(name: str, tree) -> nnx.Module:
    model = nnx.eval_shape(lambda: create_model(name, num_classes=1000, rngs=nnx.Rngs(0),
                                                source="torchvision"))
    return load_weights(model, tree)


@nnx.jit
def forward(model, x):
    return model(x), model.features(x)


def check(tv_name: str, name: str, size: int, head, *, seed: int, tmp_path, batch=2,
          state_dict=None, **kw):
    ref = reference(tv_name, seed, **kw)
    path = tmp_path / f"{name}.pth"
    torch.save(state_dict(ref) if state_dict else ref.state_dict(), str(path))
    x = np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)
    seen = {}
    hook = head(ref).register_forward_hook(lambda mod, inp, out: seen.update(f=inp[0]))
    with torch.no_grad():
        logits = ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    hook.remove()
    model = ours(name, tv_convert.convert_file(path))
    got_logits, got_feats = forward(model, jnp.asarray(x))
    assert rel_err(got_logits, logits) <= TOL
    assert rel_err(got_feats, seen["f"].numpy()) <= TOL
    count = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert count == sum(p.numel() for p in ref.parameters())
    return count


def test_mobilenet_v2_parity(tmp_path):
    # torchvision pads stride-2 convs symmetrically (Keras: TF 'SAME'); 64 px tells them apart.
    count = check("mobilenet_v2", "mobilenet_v2", 64, lambda m: m.classifier[1], seed=0,
                  tmp_path=tmp_path)
    assert count == 3_504_872


def test_mobilenet_v3_small_parity(tmp_path):
    count = check("mobilenet_v3_small", "mobilenet_v3_small", 64, lambda m: m.classifier[3],
                  seed=1, tmp_path=tmp_path)
    assert count == 2_542_856


def test_mobilenet_v3_large_parity(tmp_path):
    check("mobilenet_v3_large", "mobilenet_v3_large", 67, lambda m: m.classifier[3], seed=2,
          tmp_path=tmp_path)


def _old_densenet_keys(model):
    # The published densenet*.pth files use `denselayer1.norm.1`, renamed by torchvision on load.
    return {k.replace(".norm1.", ".norm.1.").replace(".conv1.", ".conv.1.")
            .replace(".norm2.", ".norm.2.").replace(".conv2.", ".conv.2."): v
            for k, v in model.state_dict().items()}


def test_densenet121_parity_old_key_style(tmp_path):
    count = check("densenet121", "densenet121", 64, lambda m: m.classifier, seed=3,
                  tmp_path=tmp_path, batch=1, state_dict=_old_densenet_keys)
    assert count == 7_978_856


def test_densenet169_parity(tmp_path):
    check("densenet169", "densenet169", 40, lambda m: m.classifier, seed=4, tmp_path=tmp_path,
          batch=1)


def test_inception_v3_parity_aux_logits_skipped(tmp_path):
    # The file keeps AuxLogits.* (training-only); the count compares with aux_logits=False.
    ref_aux = reference("inception_v3", 5, aux_logits=True, init_weights=False)
    tree = tv_convert.convert_state_dict({k: v.numpy() for k, v in ref_aux.state_dict().items()})
    assert "AuxLogits" not in tree["backbone"]
    count = check("inception_v3", "inception_v3", 79, lambda m: m.fc, seed=5, tmp_path=tmp_path,
                  batch=1, aux_logits=False, init_weights=False)
    assert count == 23_834_568


def test_zoo_torchvision_errors():
    sd = {k: v.numpy() for k, v in torchvision.models.mobilenet_v2().state_dict().items()}
    sd["features.3.conv.9.weight"] = np.zeros((4, 4, 1, 1), np.float32)
    with pytest.raises(WeightsError, match="block2: 4 convs"):
        tv_convert.convert_state_dict(sd)
    with pytest.raises(WeightsError, match="unrecognised keys for a torchvision DenseNet"):
        tv_convert.convert_state_dict({"features.denseblock1.denselayer1.norm1.running_mean":
                                       np.zeros(3), "features.extra.weight": np.zeros(3)})
