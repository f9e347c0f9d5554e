"""lukemelas-style EfficientNet-Lite state dict (`_conv_stem`, `_blocks.N`, `_fc`) -> our params."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import numpy as np

from facejax.convert.pth import load_pth
from facejax.errors import WeightsError

_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.")
_IGNORED = re.compile(r".*num_batches_tracked$")


class _Taker:
    """Pops keys from a state dict so that leftovers can be reported as unexpected."""

    def __init__(self, sd: Mapping[str, np.ndarray]):
        self.sd = {k: v for k, v in sd.items() if not _IGNORED.fullmatch(k)}
        self.left = set(self.sd)

    def __call__(self, key: str) -> np.ndarray:
        if key not in self.sd:
            raise WeightsError(f"EfficientNet-Lite state dict is missing {key!r}")
        self.left.discard(key)
        return np.asarray(self.sd[key], dtype=np.float32)

    def has(self, key: str) -> bool:
        return key in self.sd

    def conv(self, prefix: str) -> dict:
        # torch OIHW (depthwise: C,1,kh,kw) -> flax HWIO (depthwise: kh,kw,1,C)
        w = self(f"{prefix}.weight")
        if w.ndim != 4:
            raise WeightsError(f"{prefix}.weight has shape {w.shape}, expected a 4-d conv kernel")
        return {"kernel": w.transpose(2, 3, 1, 0)}

    def bn(self, prefix: str) -> dict:
        return {"scale": self(f"{prefix}.weight"), "bias": self(f"{prefix}.bias"),
                "mean": self(f"{prefix}.running_mean"), "var": self(f"{prefix}.running_var")}


def block_names(sd: Mapping[str, np.ndarray]) -> list[str]:
    """`stage{s}_block{j}` for each `_blocks.N`, N in order.

    The stage structure is read from the channels: in every Lite variant each stage's first block
    changes the channel count and the later blocks keep it (that is when they are residual).
    """
    count = 1 + max((int(m.group(1)) for k in sd if (m := _BLOCK_KEY.match(k))), default=-1)
    if count == 0:
        raise WeightsError("not an EfficientNet state dict: no '_blocks.N' keys")
    names, stage, j = [], 0, 0
    for n in range(count):
        p = f"_blocks.{n}."
        if p + "_project_conv.weight" not in sd or p + "_depthwise_conv.weight" not in sd:
            raise WeightsError(f"EfficientNet state dict block {n} lacks a depthwise/project conv")
        out_ch = sd[p + "_project_conv.weight"].shape[0]
        if p + "_expand_conv.weight" in sd:
            in_ch = sd[p + "_expand_conv.weight"].shape[1]
        else:
            in_ch = sd[p + "_depthwise_conv.weight"].shape[0]
        if n == 0 or in_ch != out_ch:
            stage, j = stage + 1, 0
        j += 1
        names.append(f"stage{stage}_block{j}")
    return names


def convert_state_dict(sd: Mapping[str, np.ndarray]) -> dict:
    """lukemelas/ml-illustrated EfficientNet-Lite keys -> {'backbone': ..., 'head': ...}.

    `head` (the `_fc` classifier) is present only when the file has one. Raises WeightsError for
    missing or unexpected keys (e.g. the squeeze-excite convs of a non-Lite EfficientNet).
    """
    take = _Taker(sd)
    names = block_names(take.sd)
    backbone = {"stem_conv": take.conv("_conv_stem"), "stem_bn": take.bn("_bn0")}
    for n, name in enumerate(names):
        p = f"_blocks.{n}."
        block = {}
        if take.has(p + "_expand_conv.weight"):
            block["expand_conv"] = take.conv(p + "_expand_conv")
            block["expand_bn"] = take.bn(p + "_bn0")
        block["dw_conv"] = take.conv(p + "_depthwise_conv")
        block["dw_bn"] = take.bn(p + "_bn1")
        block["project_conv"] = take.conv(p + "_project_conv")
        block["project_bn"] = take.bn(p + "_bn2")
        backbone[name] = block
    backbone["head_conv"] = take.conv("_conv_head")
    backbone["head_bn"] = take.bn("_bn1")
    out = {"backbone": backbone}
    if take.has("_fc.weight"):
        out["head"] = {"kernel": take("_fc.weight").T.copy(), "bias": take("_fc.bias")}
    if take.left:
        shown = ", ".join(sorted(take.left)[:10])
        raise WeightsError(f"unexpected keys in the EfficientNet-Lite state dict "
                           f"({len(take.left)}): {shown} (squeeze-excite or a non-Lite model?)")
    return out


def convert_file(path: str | os.PathLike) -> dict:
    """Reads a lukemelas-style EfficientNet-Lite `.pth` (no torch needed) and converts it."""
    return convert_state_dict(load_pth(path))
