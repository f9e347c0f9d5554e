"""MobileNetV2 (any alpha) and MobileNetV3 Small/Large: Keras applications and torchvision layouts.

One inverted-residual block serves both versions; a table row per block says what it has.
What differs between the two checkpoint families (`LAYOUTS`):
- padding: Keras convolves stride-2 layers after `ZeroPadding2D(correct_pad)` ('valid') and its
  stem with padding='same'; both are TF 'SAME' (the odd pixel at the bottom/right), which is
  lax's 'SAME'. torchvision pads k//2 on every side.
- BatchNorm: Keras eps 1e-3 / momentum 0.999; torchvision V2 eps 1e-5 / momentum 0.1 (flax 0.9),
  V3 eps 1e-3 / momentum 0.01 (flax 0.99).
MobileNetV3's head is conv_1 (BN, hard-swish) -> global average -> `pre_logits` (1x1 conv ==
dense, bias, hard-swish) -> classifier; `features` are the `pre_logits` output (1024/1280), as
torchvision's `classifier[0]` and Keras' `conv_2`. A Keras no-top file has no `conv_2`, so its
preset sets `top=False`: the features are then the pooled conv_1 map (576/960).
Keras MobileNetV3 has its preprocessing built in (Rescaling(1/127.5, -1) on 0-255 input); ours
is the preset's normalisation ('tf', [-1, 1]), which is the same map from [0, 1] pixels.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from facejax.errors import ConfigError
from facejax.models.depthwise import DepthwiseConv, check_impl
from facejax.models.registry import ModelSpec, Preset
from facejax.models.resnet import CONV_INIT, torchvision_preset

LAYOUTS = {
    "keras": {"v2": (1e-3, 0.999), "v3": (1e-3, 0.999), "same": True},
    "torchvision": {"v2": (1e-5, 0.9), "v3": (1e-3, 0.99), "same": False},
}

# V2 (Sandler et al., Table 2): expansion t, output channels c, repeats n, first stride s.
V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
             (6, 160, 3, 2), (6, 320, 1, 1))
# V3, one row per block, as keras.applications.mobilenet_v3's stack_fn: kernel, expansion (of
# the block's input channels), output channels, squeeze-excite, activation, stride.
_HS, _RE = "hard_swish", "relu"
V3_SMALL = ((3, 1, 16, True, _RE, 2), (3, 72 / 16, 24, False, _RE, 2),
            (3, 88 / 24, 24, False, _RE, 1), (5, 4, 40, True, _HS, 2), (5, 6, 40, True, _HS, 1),
            (5, 6, 40, True, _HS, 1), (5, 3, 48, True, _HS, 1), (5, 3, 48, True, _HS, 1),
            (5, 6, 96, True, _HS, 2), (5, 6, 96, True, _HS, 1), (5, 6, 96, True, _HS, 1))
V3_LARGE = ((3, 1, 16, False, _RE, 1), (3, 4, 24, False, _RE, 2), (3, 3, 24, False, _RE, 1),
            (5, 3, 40, True, _RE, 2), (5, 3, 40, True, _RE, 1), (5, 3, 40, True, _RE, 1),
            (3, 6, 80, False, _HS, 2), (3, 2.5, 80, False, _HS, 1), (3, 2.3, 80, False, _HS, 1),
            (3, 2.3, 80, False, _HS, 1), (3, 6, 112, True, _HS, 1), (3, 6, 112, True, _HS, 1),
            (5, 6, 160, True, _HS, 2), (5, 6, 160, True, _HS, 1), (5, 6, 160, True, _HS, 1))
# version -> (V3 block rows, pre-logits width); V2 is `V2_STAGES`.
VERSIONS = {"v2": None, "v3_small": (V3_SMALL, 1024), "v3_large": (V3_LARGE, 1280)}
ACTIVATIONS = {"relu": jax.nn.relu, "relu6": jax.nn.relu6, "hard_swish": jax.nn.hard_swish}


def make_divisible(v: float, divisor: int = 8) -> int:
    """Keras/TF-slim channel rounding: nearest multiple of 8, never more than 10% down."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


class BlockPlan(NamedTuple):
    cin: int
    mid: int
    cout: int
    kernel: int
    stride: int
    se: bool
    act: str


def plan_v2(alpha: float) -> tuple[int, list[BlockPlan], int]:
    """(stem channels, blocks, head channels) of Keras `MobileNetV2(alpha)`."""
    stem = make_divisible(32 * alpha)
    blocks, cin = [], stem
    for t, c, n, s in V2_STAGES:
        cout = make_divisible(int(c * alpha))
        for j in range(n):
            blocks.append(BlockPlan(cin, cin * t, cout, 3, s if j == 0 else 1, False, "relu6"))
            cin = cout
    head = make_divisible(1280 * alpha) if alpha > 1.0 else 1280
    return stem, blocks, head


def plan_v3(rows, alpha: float) -> tuple[int, list[BlockPlan], int]:
    """(stem channels, blocks, head conv channels) of Keras `MobileNetV3*(alpha)`."""
    blocks, cin = [], 16
    for k, e, c, se, act, s in rows:
        cout = make_divisible(c * alpha)
        blocks.append(BlockPlan(cin, make_divisible(cin * e), cout, k, s, se, act))
        cin = cout
    return 16, blocks, make_divisible(cin * 6)


def _pad(k: int, same: bool):
    return "SAME" if same else ((k // 2, k // 2), (k // 2, k // 2))


def _conv(cin, cout, k=1, stride=1, *, same=True, bias=False, dtype, rngs):
    return nnx.Conv(cin, cout, (k, k), strides=(stride, stride), padding=_pad(k, same),
                    use_bias=bias, kernel_init=CONV_INIT, dtype=dtype, rngs=rngs)


class SqueezeExcite(nnx.Module):
    """Global average -> 1x1 reduce (ReLU) -> 1x1 expand -> hard-sigmoid gate."""

    def __init__(self, ch: int, *, dtype, rngs):
        squeeze = make_divisible(ch * 0.25)
        self.reduce = _conv(ch, squeeze, bias=True, dtype=dtype, rngs=rngs)
        self.expand = _conv(squeeze, ch, bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        return x * jax.nn.hard_sigmoid(self.expand(jax.nn.relu(self.reduce(s))))


class InvertedResidual(nnx.Module):
    """[1x1 expand] -> depthwise kxk -> [squeeze-excite] -> 1x1 project (+ residual)."""

    def __init__(self, p: BlockPlan, bn: dict, same: bool, depthwise: str, *, dtype, rngs):
        self.act = ACTIVATIONS[p.act]
        self.has_expand = p.mid != p.cin
        if self.has_expand:
            self.expand_conv = _conv(p.cin, p.mid, dtype=dtype, rngs=rngs)
            self.expand_bn = nnx.BatchNorm(p.mid, **bn, dtype=dtype, rngs=rngs)
        self.dw_conv = DepthwiseConv(p.mid, p.kernel, p.stride, same, depthwise, dtype=dtype,
                                     rngs=rngs, kernel_init=CONV_INIT)
        self.dw_bn = nnx.BatchNorm(p.mid, **bn, dtype=dtype, rngs=rngs)
        self.se = SqueezeExcite(p.mid, dtype=dtype, rngs=rngs) if p.se else None
        self.project_conv = _conv(p.mid, p.cout, dtype=dtype, rngs=rngs)
        self.project_bn = nnx.BatchNorm(p.cout, **bn, dtype=dtype, rngs=rngs)
        self.residual = p.stride == 1 and p.cin == p.cout

    def __call__(self, x, train: bool):
        ra = not train
        h = x
        if self.has_expand:
            h = self.act(self.expand_bn(self.expand_conv(h), use_running_average=ra))
        h = self.act(self.dw_bn(self.dw_conv(h), use_running_average=ra))
        if self.se is not None:
            h = self.se(h)
        h = self.project_bn(self.project_conv(h), use_running_average=ra)
        return x + h if self.residual else h


class MobileNet(nnx.Module):
    """MobileNetV2 / V3: `__call__(x [B,H,W,3], train) -> [B, num_features]`.

    Submodules: `stem_conv`/`stem_bn`, `block{i}` (i from 0, `InvertedResidual`), `head_conv`/
    `head_bn` (Keras Conv_1/conv_1), and for V3 with `top` the `pre_logits` Linear.
    """

    def __init__(self, version: str = "v2", alpha: float = 1.0, layout: str = "keras",
                 top: bool = True, depthwise: str = "auto", *, dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        if version not in VERSIONS:
            raise ConfigError(f"MobileNet version must be one of {sorted(VERSIONS)}, "
                              f"got {version!r}")
        if layout not in LAYOUTS:
            raise ConfigError(f"MobileNet layout must be one of {sorted(LAYOUTS)}, "
                              f"got {layout!r}")
        check_impl(depthwise, "MobileNet")
        if not 0 < float(alpha) <= 4:
            raise ConfigError(f"MobileNet alpha must be in (0, 4], got {alpha}")
        lay = LAYOUTS[layout]
        eps, momentum = lay["v2" if version == "v2" else "v3"]
        bn = {"epsilon": eps, "momentum": momentum}
        same = lay["same"]
        if version == "v2":
            stem, plan, head = plan_v2(alpha)
            self.act = jax.nn.relu6
            last = 0
        else:
            rows, last = VERSIONS[version]
            stem, plan, head = plan_v3(rows, alpha)
            self.act = jax.nn.hard_swish
            last = make_divisible(last * alpha) if alpha > 1.0 else last
        self.stem_conv = _conv(3, stem, 3, 2, same=same, dtype=dtype, rngs=rngs)
        self.stem_bn = nnx.BatchNorm(stem, **bn, dtype=dtype, rngs=rngs)
        self.block_names = tuple(f"block{i}" for i in range(len(plan)))
        for name, p in zip(self.block_names, plan):
            setattr(self, name, InvertedResidual(p, bn, same, depthwise, dtype=dtype, rngs=rngs))
        self.head_conv = _conv(plan[-1].cout, head, dtype=dtype, rngs=rngs)
        self.head_bn = nnx.BatchNorm(head, **bn, dtype=dtype, rngs=rngs)
        self.pre_logits = (nnx.Linear(head, last, dtype=dtype, rngs=rngs)
                           if last and top else None)
        self.num_features = last if self.pre_logits is not None else head
        # Read by retrieval.explain: similarity maps need an embedding affine in the pooled map.
        self.why_not_similarity = (
            "MobileNetV3's pre-logits layer (a Linear and hard-swish after the pool) is not "
            "affine, so its features do not split over the feature map; with top=False (the "
            "Keras no-top layout) they do" if self.pre_logits is not None else "")

    def feature_map(self, x: jax.Array, train: bool = False) -> jax.Array:
        """[B,H,W,3] -> [B,H/32,W/32,C] (the activated head conv)."""
        ra = not train
        x = self.act(self.stem_bn(self.stem_conv(x), use_running_average=ra))
        for name in self.block_names:
            x = getattr(self, name)(x, train)
        return self.act(self.head_bn(self.head_conv(x), use_running_average=ra))

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = jnp.mean(self.feature_map(x, train), axis=(1, 2))
        return x if self.pre_logits is None else self.act(self.pre_logits(x))


_KERAS_V2 = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"
_KERAS_V3 = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v3/"
# keras.applications.mobilenet_v3.WEIGHTS_HASHES (md5 of the top / no-top files). Keras
# publishes no digest for the MobileNetV2 files: the sha256 is recorded on first download.
_V3_MD5 = {"small": ("8768d4c2e7dee89b9d02b2d03d65d862", "d3e8ec802a04aa4fc771ee12a9a9b836"),
           "large": ("59e551e166be033d707958cf9e29a6a7", "07fb09a5933dd0c8eaafa16978110389")}
_TV_FILES = {"mobilenet_v2": "mobilenet_v2-b0353104.pth",
             "mobilenet_v3_small": "mobilenet_v3_small-047dcff4.pth",
             "mobilenet_v3_large": "mobilenet_v3_large-8738ca79.pth"}


def _keras_v2_presets(alpha: float) -> dict[str, Preset]:
    out = {}
    for source, suffix, classes in (("keras", "", 1000), ("keras_notop", "_no_top", 0)):
        filename = f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{alpha}_224{suffix}.h5"
        out[source] = Preset(input_size=224, normalization="tf", converter="keras",
                             url=_KERAS_V2 + filename, filename=filename, num_classes=classes,
                             arch_kw={"layout": "keras"})
    return out


def _keras_v3_presets(size: str) -> dict[str, Preset]:
    out = {}
    for source, suffix, digest, classes, top in (("keras", "", _V3_MD5[size][0], 1000, True),
                                                 ("keras_notop", "_no_top_v2", _V3_MD5[size][1],
                                                  0, False)):
        filename = f"weights_mobilenet_v3_{size}_224_1.0_float{suffix}.h5"
        out[source] = Preset(input_size=224, normalization="tf", converter="keras",
                             url=_KERAS_V3 + filename, filename=filename, md5=digest,
                             num_classes=classes, arch_kw={"layout": "keras", "top": top})
    return out


def _spec(name: str) -> ModelSpec:
    if name.startswith("mobilenet_v2"):
        alpha = 0.35 if name.endswith("_035") else 1.0
        presets = _keras_v2_presets(alpha)
        if alpha == 1.0:
            presets["torchvision"] = torchvision_preset(_TV_FILES[name],
                                                        arch_kw={"layout": "torchvision"})
        return ModelSpec(backbone=MobileNet, presets=presets,
                         arch_kw={"version": "v2", "alpha": alpha},
                         description=f"MobileNetV2 alpha {alpha} (Keras or torchvision layout)")
    size = name.rsplit("_", 1)[1]
    presets = {**_keras_v3_presets(size),
               "torchvision": torchvision_preset(_TV_FILES[name],
                                                 arch_kw={"layout": "torchvision"})}
    return ModelSpec(backbone=MobileNet, presets=presets, arch_kw={"version": f"v3_{size}"},
                     description=f"MobileNetV3-{size.title()} (Keras or torchvision layout)")


MODELS = {n: _spec(n) for n in ("mobilenet_v2", "mobilenet_v2_035", "mobilenet_v3_small",
                                "mobilenet_v3_large")}
