"""dlib DNN `.dat` files: a dlib-free reader, and the face ResNet's converter to `dlib_resnet`."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from facejax.convert.limits import check_declared
from facejax.convert.merge import unflatten
from facejax.errors import WeightsError
from facejax.models.dlib_resnet import EMBED_DIM, LEVELS, STEM_WIDTH

# ---- the format (dlib/serialize.h, dlib/dnn/{core,layers,input,loss,tensor}.h, dlib 19-20) ----
# Field types: 'int'/'uint' (dlib's compact integers), 'float'/'double' (a float_details pair
# of integers; the C type decides how the writer rounds), 'bool' (ASCII '1'/'0'), 'str',
# 'tensor' (resizable_tensor: version 2, n, k, nr, nc, raw little-endian float32 NCHW) and
# 'alias' (alias_tensor: version 1, n, k, nr, nc; a view into `params`).
_MULTIPLIERS = (("learning_rate_multiplier", "double"), ("weight_decay_multiplier", "double"),
                ("bias_learning_rate_multiplier", "double"),
                ("bias_weight_decay_multiplier", "double"))
_CON = (("params", "tensor"), ("num_filters", "int"), ("nr", "int"), ("nc", "int"),
        ("stride_y", "int"), ("stride_x", "int"), ("padding_y", "int"), ("padding_x", "int"),
        ("filters", "alias"), ("biases", "alias")) + _MULTIPLIERS
_POOL = (("nr", "int"), ("nc", "int"), ("stride_y", "int"), ("stride_x", "int"),
         ("padding_y", "int"), ("padding_x", "int"))
_AFFINE = (("params", "tensor"), ("gamma", "alias"), ("beta", "alias"), ("mode", "int"))
_FC = (("num_outputs", "uint"), ("num_inputs", "uint"), ("params", "tensor"),
       ("weights", "alias"), ("biases", "alias"), ("bias_mode", "int")) + _MULTIPLIERS
# A layer object's fields after its version string, by version string.
DETAILS: dict[str, tuple[tuple[str, str], ...]] = {
    "loss_metric_2": (("margin", "float"), ("distance_threshold", "float")),
    "input_rgb_image_sized": (("avg_red", "float"), ("avg_green", "float"),
                              ("avg_blue", "float"), ("nr", "uint"), ("nc", "uint")),
    "con_4": _CON,
    "con_5": _CON + (("use_bias", "bool"),),
    "affine_": _AFFINE,
    "affine_2": _AFFINE + (("disabled", "bool"),),
    # An affine slot also accepts a serialized bn_con (dlib converts it when loading).
    "bn_con2": (("params", "tensor"), ("gamma", "alias"), ("beta", "alias"),
                ("means", "tensor"), ("invstds", "tensor"), ("running_means", "tensor"),
                ("running_variances", "tensor"), ("num_updates", "uint"),
                ("running_stats_window_size", "uint")) + _MULTIPLIERS + (("eps", "double"),),
    "relu_": (),
    "add_prev_": (),
    "max_pool_2": _POOL,
    "avg_pool_2": _POOL,
    "fc_2": _FC,
    "fc_3": _FC + (("use_bias", "bool"),),
}
# Layer kind -> the version strings that may stand in its place.
KIND_VERSIONS = {
    "con": ("con_4", "con_5"), "affine": ("affine_", "affine_2", "bn_con2"), "relu": ("relu_",),
    "add_prev": ("add_prev_",), "max_pool": ("max_pool_2",), "avg_pool": ("avg_pool_2",),
    "fc": ("fc_2", "fc_3"),
}
# What an add_layer stores after its layer object, by wrapper version. Version 1/2 wrap a
# layer; 2/3 (the add_layer right above the input layer) also keep grad_final.
_FLAGS = (("this_layer_setup_called", "bool"), ("gradient_input_is_stale", "bool"),
          ("get_output_and_gradient_input_disabled", "bool"), ("x_grad", "tensor"),
          ("cached_output", "tensor"))
STATE = {
    (False, 1): _FLAGS,
    (False, 2): _FLAGS + (("params_grad", "tensor"),),
    (True, 2): _FLAGS + (("grad_final", "tensor"),),
    (True, 3): _FLAGS + (("grad_final", "tensor"), ("sample_expansion_factor", "uint")),
}
LOSS_VERSION = 1          # add_loss_layer
TAG_VERSION = 1           # add_tag_layer and add_skip_layer
CONV_MODE, FC_NO_BIAS = 0, 1
DLIB_MEANS = (122.782, 117.001, 104.298)   # input_rgb_image's defaults = the 'dlib' preset
_MAX_NAME = 64


class Node(NamedTuple):
    """One wrapper of a dlib network type, listed from the output down.

    `kind` is 'tag', 'skip' or a KIND_VERSIONS key; `arg` is the tag/skip id, or the shape the
    layer must have: con (filters, kernel, stride), pools (window, stride; 0 = everything),
    fc (outputs, has_bias); `name` is our parameter path for layers with parameters.
    """

    kind: str
    arg: tuple = ()
    name: str = ""


def anet_nodes() -> list[Node]:
    """dlib's face-recognition `anet_type` (dnn_face_recognition_ex.cpp), output side first;
    node i is dlib's `layer<i+1>` (layer<0> is the loss)."""
    nodes = [Node("fc", (EMBED_DIM, False), "fc"), Node("avg_pool", (0, 1))]
    for lv in reversed(LEVELS):
        for j in range(lv.blocks, 0, -1):
            block, down = f"{lv.name}_block{j}", lv.down and j == 1
            nodes.append(Node("relu"))
            if down:  # add_prev2<avg_pool<2,2,2,2,skip1<tag2<block<...,tag1<SUBNET>>>>>>
                nodes += [Node("add_prev", (2,)), Node("avg_pool", (2, 2)), Node("skip", (1,)),
                          Node("tag", (2,))]
            else:     # add_prev1<block<...,tag1<SUBNET>>>
                nodes.append(Node("add_prev", (1,)))
            nodes += [Node("affine", (), f"{block}/affine2"),
                      Node("con", (lv.width, 3, 1), f"{block}/conv2"), Node("relu"),
                      Node("affine", (), f"{block}/affine1"),
                      Node("con", (lv.width, 3, 2 if down else 1), f"{block}/conv1"),
                      Node("tag", (1,))]
    nodes += [Node("max_pool", (3, 2)), Node("relu"), Node("affine", (), "stem_affine"),
              Node("con", (STEM_WIDTH, 7, 2), "stem_conv")]
    return nodes


@dataclasses.dataclass
class Details:
    """A layer object: its version string and its fields (DETAILS[version] order)."""

    version: str
    fields: dict[str, Any]


@dataclasses.dataclass
class DatLayer:
    """One add_layer: dlib's `layer<index>`, its node, wrapper version, layer and state."""

    index: int
    node: Node
    version: int
    details: Details
    state: dict[str, Any]


@dataclasses.dataclass
class DatNet:
    """A parsed network: `headers` are the wrapper versions top-down (tags and skips
    included); `layers` the add_layers bottom-up, in stream order."""

    loss: Details
    input: Details
    headers: list[int]
    layers: list[DatLayer]


# ---- reading ---------------------------------------------------------------------------------

class _Stream:
    def __init__(self, data: bytes, name: str):
        self.data, self.name, self.pos = data, name, 0

    def error(self, what: str, why: str) -> WeightsError:
        return WeightsError(f"{self.name}: {why} at byte {self.pos} (reading {what}); it is not "
                            "a dlib face-recognition network file, or it is damaged")

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise WeightsError(f"{self.name} is truncated: {what} needs {n} bytes at byte "
                               f"{self.pos}, the file has {len(self.data)}")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def int(self, what: str, signed: bool = True) -> int:
        head = self.take(1, what)[0]
        size, negative = head & 0x0F, bool(head & 0x80)
        if head & 0x70 or size > 8 or (negative and not signed):
            self.pos -= 1
            raise self.error(what, f"bad integer control byte 0x{head:02x}")
        value = int.from_bytes(self.take(size, what), "little")
        return -value if negative else value

    def float(self, what: str) -> float:
        mantissa, exponent = self.int(what), self.int(what)
        if not -(1 << 15) <= exponent < 1 << 15:  # float_details' exponent is an int16
            raise self.error(what, f"float exponent {exponent} out of range")
        if exponent >= 32000:  # float_details' is_inf / is_ninf / is_nan
            return {32000: math.inf, 32001: -math.inf}.get(exponent, math.nan)
        try:
            return math.ldexp(float(mantissa), exponent)
        except OverflowError:  # C's ldexp, which dlib uses, gives +-inf
            return math.copysign(math.inf, mantissa)

    def bool(self, what: str) -> bool:
        ch = self.take(1, what)
        if ch not in (b"0", b"1"):
            self.pos -= 1
            raise self.error(what, f"expected a bool ('0'/'1'), found byte 0x{ch[0]:02x}")
        return ch == b"1"

    def str(self, what: str) -> str:
        n = self.int(what, signed=False)
        if n > _MAX_NAME:
            raise self.error(what, f"a {n}-byte name")
        raw = self.take(n, what)
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise self.error(what, f"non-text name {raw!r}") from None

    def _dims(self, what: str, version: int) -> tuple[int, int, int, int]:
        got = self.int(what)
        if got != version:
            raise self.error(what, f"tensor version {got}, expected {version}")
        dims = tuple(self.int(what) for _ in range(4))
        if min(dims) < 0:
            raise self.error(what, f"negative tensor shape {dims}")
        return dims

    def alias(self, what: str) -> tuple[int, int, int, int]:
        return self._dims(what, 1)

    def tensor(self, what: str) -> np.ndarray:
        dims = self._dims(what, 2)
        count = math.prod(dims)
        if count * 4 > len(self.data) - self.pos:
            raise WeightsError(f"{self.name} is truncated: {what} holds a {dims} tensor "
                               f"({count * 4} bytes) at byte {self.pos}, only "
                               f"{len(self.data) - self.pos} bytes are left")
        raw = self.take(count * 4, what)
        return np.frombuffer(raw, "<f4").astype(np.float32).reshape(dims)

    def fields(self, schema, what: str) -> dict[str, Any]:
        read = {"int": self.int, "uint": lambda w: self.int(w, signed=False),
                "float": self.float, "double": self.float, "bool": self.bool, "str": self.str,
                "tensor": self.tensor, "alias": self.alias}
        return {name: read[kind](f"{what} {name}") for name, kind in schema}

    def details(self, allowed: Sequence[str], what: str) -> Details:
        start = self.pos
        version = self.str(what)
        if version not in allowed:
            self.pos = start
            raise self.error(what, f"found {version!r} where {' or '.join(allowed)} belongs")
        return Details(version, self.fields(DETAILS[version], f"{what} ({version})"))


def _describe(index: int, node: Node) -> str:
    label = node.name or node.kind + (f"{node.arg[0]}" if node.kind in ("tag", "skip") else "")
    return f"layer<{index}> {node.kind} ({label})"


def _expect(s: _Stream, what: str, checks: Sequence[tuple[str, Any, Any]]) -> None:
    wrong = [f"{field} {got} (expected {want})" for field, got, want in checks if got != want]
    if wrong:
        raise WeightsError(f"{s.name}: {what} has {', '.join(wrong)}: a different network "
                           "than dlib's face-recognition ResNet")


def _check_layer(s: _Stream, what: str, node: Node, d: Details) -> None:
    """Architecture checks (what dlib's own deserialize checks against its template), plus the
    internal consistency of the parameter tensors."""
    f = d.fields
    if node.kind == "con":
        filters, k, stride = node.arg
        pad = k // 2 if stride == 1 else 0
        _expect(s, what, [("num_filters", f["num_filters"], filters), ("nr", f["nr"], k),
                          ("nc", f["nc"], k), ("stride_y", f["stride_y"], stride),
                          ("stride_x", f["stride_x"], stride), ("padding_y", f["padding_y"], pad),
                          ("padding_x", f["padding_x"], pad)])
        shape = f["filters"]
        use_bias = f.get("use_bias", True)
        _expect(s, what, [("filters shape", shape[:1] + shape[2:], (filters, k, k)),
                          ("params size", f["params"].size,
                           math.prod(shape) + (filters if use_bias else 0))])
    elif node.kind in ("max_pool", "avg_pool"):
        window, stride = node.arg
        _expect(s, what, [("nr", f["nr"], window), ("nc", f["nc"], window),
                          ("stride_y", f["stride_y"], stride), ("stride_x", f["stride_x"], stride),
                          ("padding_y", f["padding_y"], 0), ("padding_x", f["padding_x"], 0)])
    elif node.kind == "fc":
        outputs, has_bias = node.arg
        bias = has_bias and f.get("use_bias", True)
        _expect(s, what, [("num_outputs", f["num_outputs"], outputs),
                          ("bias_mode", f["bias_mode"], 0 if has_bias else FC_NO_BIAS),
                          ("params shape", f["params"].shape,
                           (f["num_inputs"] + bias, outputs, 1, 1))])
    elif node.kind == "affine" and d.version != "bn_con2":
        disabled = f.get("disabled", False)
        _expect(s, what, [("mode", f["mode"], CONV_MODE)])
        if not disabled:
            _expect(s, what, [("params size", f["params"].size, 2 * math.prod(f["gamma"]))])


def read_dat(src: str | os.PathLike | bytes, nodes: Sequence[Node] | None = None) -> DatNet:
    """Parses a dlib `loss<...<input>>` network file without dlib.

    A dlib file does not describe its own topology (that is the C++ network type): `nodes`
    (default `anet_nodes()`, the face-recognition ResNet) says which wrappers to expect.
    Raises WeightsError naming the layer and byte for truncated, corrupt, compressed or
    other-architecture files.
    """
    nodes = list(anet_nodes() if nodes is None else nodes)
    if not nodes or nodes[-1].kind in ("tag", "skip"):
        raise ValueError("nodes must end with the layer right above the input layer")
    if isinstance(src, (bytes, bytearray, memoryview)):
        data, name = bytes(src), "dlib network data"
    else:
        name = os.fspath(src)
        try:
            # Read whole, so bounded first; every size the file declares is then checked
            # against the bytes left before it is read (`_Stream.tensor`).
            check_declared(name, "the file", os.path.getsize(name), os.path.getsize(name))
            with open(name, "rb") as fh:
                data = fh.read()
        except OSError as e:
            raise WeightsError(f"cannot read dlib weights {name}: {e}") from e
    if data[:3] == b"BZh":
        raise WeightsError(f"{name} is bz2-compressed (as dlib.net ships it): decompress it first, "
                           "e.g. `bunzip2 -k <file>.dat.bz2`")
    s = _Stream(data, name)
    version = s.int("the loss layer version")
    if version != LOSS_VERSION:
        raise s.error("the loss layer version", f"version {version}, expected {LOSS_VERSION}")
    loss = s.details(("loss_metric_2",), "layer<0> loss")
    headers = []
    for i, node in enumerate(nodes):
        bottom = i == len(nodes) - 1
        allowed = ((TAG_VERSION,) if node.kind in ("tag", "skip")
                   else (2, 3) if bottom else (1, 2))
        what = f"the wrapper version of {_describe(i + 1, node)}"
        start = s.pos
        v = s.int(what)
        if v not in allowed:
            s.pos = start
            raise s.error(what, f"found {v}, expected {' or '.join(map(str, allowed))} "
                          "(the layer stack differs from the face-recognition ResNet)")
        headers.append(v)
    inp = s.details(("input_rgb_image_sized",), f"layer<{len(nodes) + 1}> input")
    layers = []
    for i in range(len(nodes) - 1, -1, -1):
        node = nodes[i]
        if node.kind in ("tag", "skip"):
            continue  # tags and skips store nothing below their header
        what = _describe(i + 1, node)
        details = s.details(KIND_VERSIONS[node.kind], what)
        _check_layer(s, what, node, details)
        bottom = i == len(nodes) - 1
        state = s.fields(STATE[(bottom, headers[i])], f"{what} state")
        layers.append(DatLayer(i + 1, node, headers[i], details, state))
    if s.pos != len(data):
        raise s.error("the end of the network", f"{len(data) - s.pos} unexpected trailing bytes")
    return DatNet(loss, inp, headers, layers)


# ---- conversion ------------------------------------------------------------------------------

def _con(f: dict) -> dict[str, np.ndarray]:
    nf, k, nr, nc = f["filters"]
    n = nf * k * nr * nc
    flat = f["params"].reshape(-1)
    bias = flat[n:n + nf] if f.get("use_bias", True) else np.zeros(nf, np.float32)
    # dlib filters are (num_filters, k, nr, nc) = OIHW; flax wants HWIO.
    return {"kernel": flat[:n].reshape(nf, k, nr, nc).transpose(2, 3, 1, 0), "bias": bias}


def _affine(d: Details) -> dict[str, np.ndarray]:
    f = d.fields
    if d.version == "bn_con2":
        # Exactly what dlib's affine_(const bn_&) constructor computes on load.
        k = math.prod(f["gamma"])
        flat = f["params"].reshape(-1)
        gamma, beta = flat[:k], flat[k:2 * k]
        g = gamma / np.sqrt(f["running_variances"].reshape(-1) + np.float32(f["eps"]))
        return {"scale": g, "bias": beta - g * f["running_means"].reshape(-1)}
    k = math.prod(f["gamma"])
    if f.get("disabled", False):  # fused into the conv below it: the identity
        return {"scale": np.ones(k, np.float32), "bias": np.zeros(k, np.float32)}
    flat = f["params"].reshape(-1)
    return {"scale": flat[:k], "bias": flat[k:2 * k]}


def _fc(f: dict) -> dict[str, np.ndarray]:
    n_in, n_out = f["num_inputs"], f["num_outputs"]
    # dlib computes output = input @ W with W (num_inputs, num_outputs): flax's layout already.
    return {"kernel": f["params"].reshape(-1)[:n_in * n_out].reshape(n_in, n_out)}


def convert_net(net: DatNet) -> dict[str, Any]:
    """A parsed face-ResNet -> {'backbone': ...} matching `create_model('dlib_resnet')`."""
    means = tuple(net.input.fields[c] for c in ("avg_red", "avg_green", "avg_blue"))
    if not np.allclose(means, DLIB_MEANS, atol=1e-3):
        raise WeightsError(f"the network normalises its input with channel means {means}, not "
                           f"dlib's {DLIB_MEANS}: the 'dlib' normalisation would feed it wrong "
                           "inputs")
    out = {}
    for layer in net.layers:
        kind, f = layer.node.kind, layer.details.fields
        if kind == "con":
            arrays = _con(f)
        elif kind == "affine":
            arrays = _affine(layer.details)
        elif kind == "fc":
            arrays = _fc(f)
        else:
            continue
        for leaf, v in arrays.items():
            out[f"{layer.node.name}/{leaf}"] = np.ascontiguousarray(v, dtype=np.float32)
    return {"backbone": unflatten(out)}


def convert_file(path: str | os.PathLike) -> dict[str, Any]:
    """dlib_face_recognition_resnet_model_v1.dat (or a file of the same network) -> our params."""
    return convert_net(read_dat(path))


__all__ = ["DETAILS", "KIND_VERSIONS", "STATE", "DatLayer", "DatNet", "Details", "Node",
           "anet_nodes", "convert_file", "convert_net", "read_dat"]
