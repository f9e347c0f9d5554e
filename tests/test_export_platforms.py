"""An embedder is exported for cpu, cuda and tpu at once (retrieval/embed.py), so the CPU's own
convolution forms (models/conv.py: unpadded k x k run padded and cropped; models/depthwise.py:
depthwise as shifted multiply-adds) are picked per platform when lowered, not by the backend
that traced the export: an artifact exported on a GPU box runs them on a laptop."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from facejax.models import create_model
from facejax.retrieval import embed


def cpu_convolutions(embedder_dir: str, size: int) -> list[str]:
    """The convolution instructions of the exported module as compiled for this CPU."""
    with open(f"{embedder_dir}/embedder.bin", "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in exported.in_avals[:-1]]
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.uint8)
    text = jax.jit(exported.call).lower(args, x).compile().as_text()
    return [line for line in text.splitlines() if " convolution(" in line]


def unpadded_kxk(convs: list[str]) -> list[str]:
    return [c for c in convs if "pad=" not in c
            and re.search(r"size=(\d+)x(\d+)", c).groups() != ("1", "1")]


@pytest.mark.parametrize("name, size, traced_on", [
    ("scratch_cnn", 128, "gpu"),
    pytest.param("scratch_cnn", 128, "cpu", marks=pytest.mark.slow),
    pytest.param("mobilenet_v2", 32, "gpu", marks=pytest.mark.slow),
    pytest.param("mobilenet_v2", 32, "cpu", marks=pytest.mark.slow)])
def test_an_export_runs_the_cpu_forms_on_the_cpu_whichever_backend_traced_it(
        name, size, traced_on, tmp_path, monkeypatch):
    model = create_model(name, num_classes=3, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    out = str(tmp_path / "embedder")
    x = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)

    def fn(p, images):
        return nnx.merge(graphdef, p).embed(images.astype(jnp.float32) / 255.0)

    with monkeypatch.context() as m:
        if traced_on != "cpu":  # what an export on a GPU box traces with
            m.setattr(jax, "default_backend", lambda: traced_on)
        meta = embed.export_embedder(fn, state, dict(model=name, cache_size=size,
                                                     resize_mode="resize",
                                                     normalization="none"), out)
    assert meta["platforms"] == ["cpu", "cuda", "tpu"]
    convs = cpu_convolutions(out, size)
    assert convs
    assert [c for c in convs if "feature_group_count" in c] == []  # depthwise: shifted form
    assert unpadded_kxk(convs) == []  # unpadded 3x3: padded and cropped
    if name == "scratch_cnn":
        assert len(convs) == 6  # its 3 blocks' 2 convs each, all of them padded
    # The artifact's embeddings are the model's.
    np.testing.assert_allclose(embed.load_embedder(out)(x), jax.jit(fn)(state, x),
                               rtol=1e-4, atol=1e-5)
