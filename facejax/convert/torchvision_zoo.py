"""torchvision MobileNetV2/V3, DenseNet and Inception v3 state dicts -> our nested parameters.

`torchvision.convert_state_dict` asks `family(sd)` first. Conv kernels go OIHW -> HWIO (a
depthwise (C, 1, k, k) becomes flax's grouped (k, k, 1, C) by the same transpose), Linear
(out, in) -> (in, out).

- MobileNet: `features.0` is the stem, the last `features.N` the head conv, the ones between are
  blocks (`block{i-1}`); inside a block the convs, in order, are [expand,] depthwise, project,
  each followed by its BatchNorm, and V3's `fc1`/`fc2` are the squeeze-excite convs.
  `classifier.0`/`classifier.3` (V3) are `pre_logits`/`head`, `classifier.1` (V2) is `head`.
- DenseNet: both key styles are read, `denselayer1.norm1` and the published files' older
  `denselayer1.norm.1` (which torchvision renames on load).
- Inception v3: module names are torchvision's; `AuxLogits.*` (a training-only side classifier
  that our model does not build) is skipped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from facejax.convert.merge import unflatten
from facejax.errors import WeightsError

_LEAF = re.compile(r"(?P<mod>.+)\.(?P<leaf>weight|bias|running_mean|running_var|"
                   r"num_batches_tracked)")


def family(sd: Mapping[str, Any]) -> str:
    """'mobilenet', 'densenet', 'inception' or ''."""
    if any(k.startswith("features.denseblock1.") for k in sd):
        return "densenet"
    if any(k.startswith("Mixed_5b.") for k in sd):
        return "inception"
    if any(re.match(r"features\.1\.(conv|block)\.", k) for k in sd):
        return "mobilenet"
    return ""


def _put_all(out: dict, unknown: list, path: str, kind: str, leaves: dict) -> None:
    from facejax.convert.torchvision import _put

    for leaf, (key, v) in leaves.items():
        if not _put(out, path, kind, leaf, np.asarray(v)):
            unknown.append(key)


def _modules(sd: Mapping[str, Any]) -> dict[str, dict[str, tuple[str, Any]]]:
    """{module key: {leaf: (full key, value)}} in first-seen order."""
    mods: dict[str, dict[str, tuple[str, Any]]] = {}
    for key, v in sd.items():
        m = _LEAF.fullmatch(key)
        mods.setdefault(m["mod"] if m else key, {})[m["leaf"] if m else ""] = (key, v)
    return mods


def _kind(leaves: dict) -> str:
    if "running_mean" in leaves:
        return "bn"
    w = leaves.get("weight")
    return "conv" if w is not None and np.ndim(w[1]) == 4 else "linear"


def _sort_key(mod: str):
    return [int(p) if p.isdigit() else -1 for p in mod.split(".")]


def _mobilenet(sd) -> dict[str, Any]:
    mods = _modules(sd)
    feats = [int(m[1]) for k in mods if (m := re.match(r"features\.(\d+)\.", k))]
    last = max(feats, default=0)
    out, unknown, blocks = {}, [], {}
    for mod, leaves in mods.items():
        if m := re.fullmatch(r"features\.(\d+)\.([01])", mod):
            i = int(m[1])
            if i in (0, last):
                part = "stem" if i == 0 else "head"
                kind = "conv" if m[2] == "0" else "bn"
                _put_all(out, unknown, f"backbone/{part}_{kind}", kind, leaves)
                continue
        if m := re.fullmatch(r"features\.(\d+)\.(?:conv|block)\.(.+)", mod):
            blocks.setdefault(int(m[1]) - 1, []).append((m[2], leaves))
        elif m := re.fullmatch(r"classifier\.(\d)", mod):
            v3 = any(k.startswith("classifier.3.") for k in sd)
            path = {"0": "backbone/pre_logits", "3": "head"} if v3 else {"1": "head"}
            if m[1] in path:
                _put_all(out, unknown, path[m[1]], "linear", leaves)
            else:
                unknown += [k for k, _ in leaves.values()]
        else:
            unknown += [k for k, _ in leaves.values()]
    for i, subs in blocks.items():
        _mobilenet_block(out, unknown, f"backbone/block{i}", subs)
    _no_unknown(unknown, "MobileNet")
    return unflatten(out)


def _mobilenet_block(out, unknown, path, subs) -> None:
    """A block's sub-modules ('0.0', '0.1', '2', 'fc1', '2.fc1', ...) -> our names."""
    convs, bns = [], []
    for sub, leaves in sorted(subs, key=lambda s: _sort_key(s[0])):
        se = re.search(r"fc([12])$", sub)
        if se:
            role = "reduce" if se[1] == "1" else "expand"
            _put_all(out, unknown, f"{path}/se/{role}", "conv", leaves)
        else:
            (bns if _kind(leaves) == "bn" else convs).append(leaves)
    roles = ("expand", "dw", "project")[3 - len(convs):] if 2 <= len(convs) <= 3 else ()
    if len(roles) != len(convs) or len(bns) != len(convs):
        raise WeightsError(f"{path}: {len(convs)} convs and {len(bns)} BatchNorms; a MobileNet "
                           f"block has 2 or 3 of each")
    for role, c, b in zip(roles, convs, bns):
        _put_all(out, unknown, f"{path}/{role}_conv", "conv", c)
        _put_all(out, unknown, f"{path}/{role}_bn", "bn", b)


_DENSENET = [
    (re.compile(r"features\.conv0"), lambda m: "backbone/stem_conv"),
    (re.compile(r"features\.norm0"), lambda m: "backbone/stem_bn"),
    (re.compile(r"features\.denseblock(\d)\.denselayer(\d+)\.(norm|conv)\.?([12])"),
     lambda m: f"backbone/block{m[1]}_layer{m[2]}/{'bn' if m[3] == 'norm' else 'conv'}{m[4]}"),
    (re.compile(r"features\.transition(\d)\.(norm|conv)"),
     lambda m: f"backbone/transition{m[1]}/{'bn' if m[2] == 'norm' else 'conv'}"),
    (re.compile(r"features\.norm5"), lambda m: "backbone/final_bn"),
    (re.compile(r"classifier"), lambda m: "head"),
]
_INCEPTION = [
    (re.compile(r"(Conv2d_\w+)\.(conv|bn)"), lambda m: f"backbone/{m[1]}/{m[2]}"),
    (re.compile(r"(Mixed_\w+)\.(\w+)\.(conv|bn)"), lambda m: f"backbone/{m[1]}/{m[2]}/{m[3]}"),
    (re.compile(r"fc"), lambda m: "head"),
]


def _by_rules(sd, rules, name: str, skip: str = "") -> dict[str, Any]:
    out, unknown = {}, []
    for mod, leaves in _modules(sd).items():
        if skip and mod.startswith(skip):
            continue
        hit = next(((m, f) for p, f in rules if (m := p.fullmatch(mod))), None)
        if hit is None:
            unknown += [k for k, _ in leaves.values()]
            continue
        _put_all(out, unknown, hit[1](hit[0]), _kind(leaves), leaves)
    _no_unknown(unknown, name)
    return unflatten(out)


def _no_unknown(unknown: list[str], name: str) -> None:
    if unknown:
        more = f" ... and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raise WeightsError(f"unrecognised keys for a torchvision {name} state dict: "
                           f"{', '.join(unknown[:10])}{more}")


def convert(sd: Mapping[str, Any], family_name: str) -> dict[str, Any]:
    if family_name == "mobilenet":
        return _mobilenet(sd)
    if family_name == "densenet":
        return _by_rules(sd, _DENSENET, "DenseNet")
    return _by_rules(sd, _INCEPTION, "Inception v3", skip="AuxLogits.")
