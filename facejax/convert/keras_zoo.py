"""Keras applications layer names of MobileNetV2/V3, DenseNet and InceptionV3 -> our modules.

`keras_h5.convert_layers` asks `family(layers)` first; these families' names would otherwise
collide with ResNet's (DenseNet's `conv2_block1_1_conv`). Kernels are HWIO already; a
DepthwiseConv2D kernel (k, k, C, 1) becomes flax's grouped (k, k, 1, C), and a 1x1 Conv2D that
acts as a dense layer on pooled features (MobileNetV3's conv_2 and logits) becomes (in, out).

InceptionV3 names its layers automatically (`conv2d_17`, `batch_normalization_17`), and the
numbers depend on what the saving session had built before; the i-th conv and the i-th
BatchNorm in creation order (the number's order) are the i-th `conv_bn` unit of
`facejax.models.inception.keras_order()`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np

from facejax.convert.merge import unflatten
from facejax.errors import WeightsError

_BN = ("scale", "bias", "mean", "var")
_DENSE = ("kernel", "bias")


def _block(m: re.Match) -> str:
    return f"backbone/block{int(m['i'] or 0)}"


# Matched case-insensitively on `_normalise`d names: Keras 3 writes `conv_bn`, `logits`;
# tf.keras 2 (the downloadable MobileNetV3 files) wrote `Conv/BatchNorm`, `Logits`,
# `expanded_conv_1/expand/BatchNorm`, `expanded_conv/squeeze_excite/Conv_1`.
_Rules = list[tuple[re.Pattern, Callable[[re.Match], str]]]
_MOBILENET: _Rules = [(re.compile(p, re.I), f) for p, f in [
    (r"conv1|conv", lambda m: "backbone/stem_conv"),
    (r"bn_conv1|conv_bn", lambda m: "backbone/stem_bn"),
    (r"conv_1", lambda m: "backbone/head_conv"),
    (r"conv_1_bn", lambda m: "backbone/head_bn"),
    (r"conv_2", lambda m: "backbone/pre_logits"),
    (r"predictions|logits", lambda m: "head"),
    (r"(?:block_|expanded_conv_)(?P<i>\d+)?_?(?P<op>expand|depthwise|project)(?P<bn>_bn)?",
     lambda m: f"{_block(m)}/{'dw' if m['op'].lower() == 'depthwise' else m['op'].lower()}_"
               f"{'bn' if m['bn'] else 'conv'}"),
    (r"expanded_conv_(?P<i>\d+)?_?squeeze_excite_conv(?P<one>_1)?",
     lambda m: f"{_block(m)}/se/{'expand' if m['one'] else 'reduce'}"),
]]

_DENSENET: _Rules = [
    (re.compile(r"conv1_(conv|bn)"), lambda m: f"backbone/stem_{m[1]}"),
    (re.compile(r"conv(\d)_block(\d+)_0_bn"),
     lambda m: f"backbone/block{int(m[1]) - 1}_layer{m[2]}/bn1"),
    (re.compile(r"conv(\d)_block(\d+)_1_(conv|bn)"),
     lambda m: f"backbone/block{int(m[1]) - 1}_layer{m[2]}/{m[3]}{1 if m[3] == 'conv' else 2}"),
    (re.compile(r"conv(\d)_block(\d+)_2_conv"),
     lambda m: f"backbone/block{int(m[1]) - 1}_layer{m[2]}/conv2"),
    (re.compile(r"pool(\d)_(conv|bn)"), lambda m: f"backbone/transition{int(m[1]) - 1}/{m[2]}"),
    (re.compile(r"bn"), lambda m: "backbone/final_bn"),
    (re.compile(r"predictions"), lambda m: "head"),
]

_AUTO = re.compile(r"(conv2d|batch_normalization)(?:_(\d+))?")


def _normalise(name: str) -> str:
    """tf.keras 2 names (`conv1/bn`, `Conv/BatchNorm`) -> the Keras 3 spelling's shape."""
    return name.replace("/BatchNorm", "_bn").replace("/", "_")


def family(layers: dict[str, list[np.ndarray]]) -> str:
    """'mobilenet', 'densenet', 'inception' or '' (not one of these) from the layer names."""
    names = {_normalise(n) for n in layers}
    if {n.lower() for n in names} & {"bn_conv1", "conv_bn"}:
        return "mobilenet"
    if any(re.fullmatch(r"pool\d_conv", n) for n in names):
        return "densenet"
    if any(_AUTO.fullmatch(n) for n in names):
        return "inception"
    return ""


def _store(out: dict, name: str, path: str, arrays: list[np.ndarray]) -> None:
    is_bn = re.search(r"(_bn|/bn\d?)$", path) is not None
    leaves = _BN if is_bn else _DENSE
    if is_bn and len(arrays) == 3:  # Keras BatchNormalization(scale=False): no gamma
        leaves = _BN[1:]
    elif len(arrays) > len(leaves) or (is_bn and len(arrays) != 4):
        raise WeightsError(f"Keras layer {name!r} has {len(arrays)} weights; "
                           f"expected {' + '.join(leaves)}")
    for leaf, a in zip(leaves, arrays):
        if leaf == "kernel" and a.ndim == 4 and a.shape[-1] == 1 and "/dw_conv" in path:
            a = a.transpose(0, 1, 3, 2)  # DepthwiseConv2D (k, k, C, 1) -> (k, k, 1, C)
        if leaf == "kernel" and a.ndim == 4 and (path == "head" or path.endswith("pre_logits")):
            a = a.reshape(a.shape[-2], a.shape[-1])  # 1x1 conv on pooled features == dense
        out[f"{path}/{leaf}"] = a


def _by_rules(layers, rules, family_name: str) -> dict[str, Any]:
    out, unknown = {}, []
    for name, arrays in layers.items():
        hit = next(((m, f) for p, f in rules if (m := p.fullmatch(name))), None)
        if hit is None:
            unknown.append(name)
            continue
        _store(out, name, hit[1](hit[0]), arrays)
    if unknown:
        raise WeightsError(f"unrecognised Keras layers for a {family_name} file: "
                           + ", ".join(sorted(unknown)[:10]))
    return unflatten(out)


def _inception(layers) -> dict[str, Any]:
    from facejax.models.inception import keras_order

    convs, bns, out, unknown = [], [], {}, []
    for name, arrays in layers.items():
        m = _AUTO.fullmatch(name)
        if m:
            (convs if m[1] == "conv2d" else bns).append((int(m[2] or 0), name, arrays))
        elif name == "predictions":
            _store(out, name, "head", arrays)
        else:
            unknown.append(name)
    if unknown:
        raise WeightsError("unrecognised Keras layers for an InceptionV3 file: "
                           + ", ".join(sorted(unknown)[:10]))
    units = keras_order()
    if len(convs) != len(units) or len(bns) != len(units):
        raise WeightsError(f"an InceptionV3 file has {len(units)} conv and BatchNorm layers; "
                           f"this one has {len(convs)} and {len(bns)}")
    for unit, (_, cname, carr), (_, bname, barr) in zip(units, sorted(convs), sorted(bns)):
        _store(out, cname, f"backbone/{unit}/conv", carr)
        _store(out, bname, f"backbone/{unit}/bn", barr)
    return unflatten(out)


def convert(layers: dict[str, list[np.ndarray]], family_name: str) -> dict[str, Any]:
    """{keras layer: [arrays]} of a `family()` file -> our nested parameter dict."""
    layers = {_normalise(k): v for k, v in layers.items()}
    if family_name == "mobilenet":
        return _by_rules(layers, _MOBILENET, "MobileNet")
    if family_name == "densenet":
        return _by_rules(layers, _DENSENET, "DenseNet")
    return _inception(layers)
