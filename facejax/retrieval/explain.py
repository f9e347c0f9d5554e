"""Why do two images match? Two heatmaps per pair, one over each image.

**Similarity maps** (Stylianou et al., "Visualizing Deep Similarity Networks", WACV 2019) for
models whose embedding is an affine map of a global average pool: z = A·mean_i f(i) + b, where
f(i) is the last conv map at location i (ResNet, ResNetV2, VGG without its fc layers,
EfficientNet, MobileNetV2, MobileNetV3 with top=False, DenseNet and InceptionV3, whose final
BN + ReLU are in the map, dlib's ResNet, whose fc follows the pool, and any of them with an
`embed_dim` projection head; not MobileNetV3 with its pre-logits Linear + hard-swish). An
affine map commutes with the mean, so z = mean_i h(i) with the *local embedding*
h(i) = A·f(i) + b, and the cosine of a pair splits exactly:

    cos(q, r) = <z_q, z_r> / (|z_q||z_r|) = sum_i <h_q(i), z_r> / (N_q |z_q||z_r|)
                                          = sum_j <z_q, h_r(j)> / (N_r |z_q||z_r|)

The query's map is the first sum's terms, the result's map the second's: each sums to the
cosine. The head's bias b is part of every h(i), so its share <b, z_r>/(N_q|z_q||z_r|) is spread
uniformly over the locations; the head's matrix is pushed through to each location. What is
exact: the sums (to float rounding; tests check 1e-5). What is not: a location's receptive field
covers far more than its cell, and the map (e.g. 7x7, or 5x5 for dlib at 150 px) is stretched
over the whole image for display, which ignores the border that unpadded convolutions lose.
The L2 normalisation is one global factor, so it does not change the split.

**Occlusion sensitivity**, the model-agnostic reference: each patch of one image in turn is set to
the image's mean pixel and the drop of the pair's cosine is recorded; a pixel's value is the mean
drop of the patches that cover it. All occluded copies are built and embedded on the device, a
fixed-size chunk per jitted call (one compilation). It needs only an embedding function, so it
also works from an exported embedder (`Explainer.from_embedder`), e.g. for the scratch CNN.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from facejax.atomic import atomic_path
from facejax.errors import CheckpointError, ConfigError, FacejaxError

SIMILARITY, OCCLUSION = "similarity", "occlusion"
METHODS = (SIMILARITY, OCCLUSION)
_CHUNK = 32          # occluded copies per jitted call
_POOL_RTOL = 1e-4    # mean of local embeddings vs the model's embedding
_AGREE_MIN = 0.99    # cosine between the checkpoint's and the exported embedder's embedding


@dataclasses.dataclass
class Explanation:
    """One pair: `score` is the model's cosine; the maps are [h, w] (similarity: a feature-map
    cell each, summing to `score`) or [S, S] (occlusion: the drop of the cosine per pixel)."""

    method: str
    score: float
    query_map: np.ndarray
    result_map: np.ndarray


def check_method(method: str) -> str:
    if method not in METHODS + ("auto",):
        raise ConfigError(f"method must be one of {METHODS + ('auto',)}, got {method!r}")
    return method


# ----------------------------------------------------------------------------- the maths

def similarity_maps(local_q: jax.Array, local_r: jax.Array) -> tuple[jax.Array, ...]:
    """(cosine, query map [h,w], result map [h',w']) from local embeddings [h,w,D], [h',w',D]
    whose spatial means are the two embeddings. Each map sums to the cosine."""
    local_q, local_r = local_q.astype(jnp.float32), local_r.astype(jnp.float32)
    zq, zr = local_q.mean(axis=(0, 1)), local_r.mean(axis=(0, 1))
    denom = jnp.maximum(jnp.linalg.norm(zq) * jnp.linalg.norm(zr), 1e-12)
    nq, nr = local_q.shape[0] * local_q.shape[1], local_r.shape[0] * local_r.shape[1]
    mq = jnp.einsum("hwd,d->hw", local_q, zr) / (nq * denom)
    mr = jnp.einsum("hwd,d->hw", local_r, zq) / (nr * denom)
    return jnp.dot(zq, zr) / denom, mq, mr


def _cosines(a: jax.Array, b: jax.Array) -> jax.Array:
    """Cosine of each row of a [n,D] with b [D]."""
    na = jnp.maximum(jnp.linalg.norm(a, axis=-1), 1e-12)
    return a @ b / (na * jnp.maximum(jnp.linalg.norm(b), 1e-12))


def patch_corners(size: int, patch: int, stride: int) -> np.ndarray:
    """Top-left corners [n, 2] of a patch grid that covers a size x size image (the last row and
    column are moved in to end at the edge)."""
    if not 1 <= patch <= size or stride < 1:
        raise ConfigError(f"occlusion patch must be in 1..{size} px and its stride >= 1; got "
                          f"patch {patch}, stride {stride}")
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return np.array([(y, x) for y in starts for x in starts], np.int32)


def default_patch(size: int) -> tuple[int, int]:
    """(patch, stride): a sixth of the image, half-overlapping (144 copies at 150 px)."""
    patch = max(1, round(size / 6))
    return patch, max(1, patch // 2)


def _occlude(image: jax.Array, corners: jax.Array, patch: int) -> jax.Array:
    """[n,S,S,3] copies of image [S,S,3] with one patch each set to the image's mean pixel."""
    size = image.shape[0]
    fill = jnp.round(image.astype(jnp.float32).mean(axis=(0, 1))).astype(image.dtype)
    idx = jnp.arange(size)
    ys = (idx[None, :] >= corners[:, :1]) & (idx[None, :] < corners[:, :1] + patch)
    xs = (idx[None, :] >= corners[:, 1:]) & (idx[None, :] < corners[:, 1:] + patch)
    mask = ys[:, :, None] & xs[:, None, :]
    return jnp.where(mask[..., None], fill, image[None])


def _spread(drops: np.ndarray, corners: np.ndarray, patch: int, size: int) -> np.ndarray:
    """Per-pixel mean of the drops of the patches covering it -> [S, S]."""
    total = np.zeros((size, size), np.float64)
    count = np.zeros((size, size), np.float64)
    for d, (y, x) in zip(drops, corners):
        total[y:y + patch, x:x + patch] += d
        count[y:y + patch, x:x + patch] += 1
    return (total / np.maximum(count, 1)).astype(np.float32)


# ----------------------------------------------------------------------------- the explainer

def _why_no_pooled_map(backbone, size: int) -> str:
    """Why `backbone` cannot give local embeddings ('' when it may; the numbers are checked
    later): no `feature_map`; its own `why_not_similarity` (e.g. MobileNetV3's non-affine
    pre-logits layer); or a feature map (through `project`) whose width is not the pooled
    features', i.e. some other layer follows the pool. Shapes only (`jax.eval_shape`)."""
    if not hasattr(backbone, "feature_map"):
        return "its backbone has no feature map before a global average pool"
    if getattr(backbone, "why_not_similarity", ""):
        return backbone.why_not_similarity
    from flax import nnx

    graphdef, state = nnx.split(backbone)
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)

    def local(state, x):
        m = nnx.merge(graphdef, state)
        f = m.feature_map(x, train=False)
        return f if getattr(m, "project", None) is None else m.project(f)

    width = jax.eval_shape(local, state, x).shape[-1]
    pooled = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x, train=False), state, x)
    if width != pooled.shape[-1]:
        return (f"its feature map has {width} channels but its pooled features "
                f"{pooled.shape[-1]}: a layer other than an affine `project` follows the pool")
    return ""


class Explainer:
    """Explains pairs of cache-format uint8 images [S,S,3] for one model.

    `embed_fn(images_u8[B,S,S,3]) -> [B,D]` and `local_fn(images_u8) -> [B,h,w,D]` (local
    embeddings whose spatial mean is the embedding before L2; None: occlusion only) must be
    jittable. `why_not_similarity` says why there is no `local_fn`.
    """

    def __init__(self, embed_fn: Callable, local_fn: Callable | None, *, input_size: int,
                 name: str = "", why_not_similarity: str = ""):
        self.input_size = int(input_size)
        self.name = name
        self.why_not_similarity = why_not_similarity
        self._embed = jax.jit(embed_fn)
        self._local = None if local_fn is None else jax.jit(local_fn)
        self._sim = jax.jit(similarity_maps)
        self._occluded = jax.jit(lambda image, corners, patch: embed_fn(
            _occlude(image, corners, patch)), static_argnums=2)

    @property
    def methods(self) -> tuple[str, ...]:
        return METHODS if self._local is not None else (OCCLUSION,)

    def resolve(self, method: str) -> str:
        """'auto' -> similarity where the model allows it, else occlusion; a similarity request
        on a model without a pooled conv map is a ConfigError saying why."""
        if check_method(method) == "auto":
            return self.methods[0]
        if method not in self.methods:
            raise ConfigError(f"no similarity maps for {self.name or 'this model'}: "
                              f"{self.why_not_similarity}; use --method occlusion")
        return method

    def _check(self, image: np.ndarray, what: str) -> np.ndarray:
        image = np.asarray(image)
        s = self.input_size
        if image.shape != (s, s, 3) or image.dtype != np.uint8:
            raise ConfigError(f"{what} must be a uint8 [{s},{s},3] image, got "
                              f"{image.dtype}{list(image.shape)}")
        return image

    def score(self, query: np.ndarray, result: np.ndarray) -> float:
        z = self._embed(np.stack([self._check(query, "query"), self._check(result, "result")]))
        return float(_cosines(z[:1], z[1])[0])

    def explain(self, query: np.ndarray, result: np.ndarray, method: str = "auto", *,
                patch: int = 0, stride: int = 0) -> Explanation:
        method = self.resolve(method)
        pair = np.stack([self._check(query, "query"), self._check(result, "result")])
        if method == SIMILARITY:
            local = self._local(pair)
            score, mq, mr = self._sim(local[0], local[1])
            return Explanation(method, float(score), np.asarray(mq), np.asarray(mr))
        return self._occlusion(pair, patch, stride)

    def _occlusion(self, pair: np.ndarray, patch: int, stride: int) -> Explanation:
        size = self.input_size
        auto_patch, auto_stride = default_patch(size)
        patch = patch or auto_patch
        stride = stride or (auto_stride if patch == auto_patch else max(1, patch // 2))
        corners = patch_corners(size, patch, stride)
        z = np.asarray(self._embed(pair))
        score = float(_cosines(z[:1], z[1])[0])
        maps = []
        for which in (0, 1):
            other = jnp.asarray(z[1 - which])
            drops = []
            for start in range(0, len(corners), _CHUNK):
                chunk = corners[start:start + _CHUNK]
                n = len(chunk)
                padded = np.concatenate([chunk, np.repeat(chunk[-1:], _CHUNK - n, 0)])
                emb = self._occluded(jnp.asarray(pair[which]), jnp.asarray(padded), patch)
                drops.append(score - np.asarray(_cosines(emb, other))[:n])
            maps.append(_spread(np.concatenate(drops), corners, patch, size))
        return Explanation(OCCLUSION, score, maps[0], maps[1])

    # -- constructors

    @classmethod
    def from_model(cls, model, *, image_size: int, model_input_size: int, normalization: str,
                   name: str = "") -> Explainer:
        """From an `EmbeddingModel` (float32). Similarity maps when the backbone has a
        `feature_map` whose spatial mean (through its `project`, if any, and the embedding
        head) is the embedding, checked on a random image; otherwise occlusion only, with the
        reason (`_why_no_pooled_map`, or the failed check)."""
        from flax import nnx

        from facejax.data.augment import preprocess_eval

        graphdef, state = nnx.split(model)

        def prep(images_u8):
            return preprocess_eval(images_u8, model_input_size, normalization)

        def embed_fn(images_u8):
            m = nnx.merge(graphdef, state)
            return m.embedding(m.backbone(prep(images_u8), train=False)).astype(jnp.float32)

        def local_fn(images_u8):
            m = nnx.merge(graphdef, state)
            f = m.backbone.feature_map(prep(images_u8), train=False)
            project = getattr(m.backbone, "project", None)
            if project is not None:
                f = project(f)
            return m.embedding(f).astype(jnp.float32)

        why = _why_no_pooled_map(model.backbone, model_input_size)
        has_map = not why
        explainer = cls(embed_fn, local_fn if has_map else None, input_size=image_size,
                        name=name, why_not_similarity=why)
        if has_map:  # the exactness the maps rely on, checked on a random image
            probe = np.random.default_rng(0).integers(0, 256, (2, image_size, image_size, 3),
                                                      dtype=np.uint8)
            z = np.asarray(explainer._embed(probe))
            pooled = np.asarray(explainer._local(probe)).mean(axis=(1, 2))
            err = np.abs(pooled - z).max() / max(np.abs(z).max(), 1e-12)
            if not err <= _POOL_RTOL:
                explainer._local = None
                explainer.why_not_similarity = (
                    f"its embedding is not an affine map of the feature map's global mean "
                    f"(relative difference {err:.2g})")
        return explainer

    @classmethod
    def from_embedder(cls, embedder, why: str = "") -> Explainer:
        """Occlusion only, from an exported embedder (`retrieval.embed.Embedder`)."""
        exported_call, leaves = embedder._fn, embedder._leaves
        return cls(lambda images_u8: exported_call(leaves, images_u8), None,
                   input_size=embedder.cache_size, name=str(embedder.meta.get("model", "")),
                   why_not_similarity=why or "explained from the exported embedder, which has "
                                             "no feature map")


def load_explainer(workdir: str, embedder=None, *, need_model: bool = False) -> Explainer:
    """The explainer of a run: from the checkpoint the embedder was exported from (similarity
    maps where the model allows), else, when `need_model` is false, from the exported embedder
    (occlusion only; the reason is in `why_not_similarity`).

    The checkpoint must still give the exported embedder's embeddings (cosine >= 0.99 on a
    probe image): training that went on after the export would explain another model.
    """
    from facejax.retrieval.embed import load_embedder
    from facejax.retrieval.workdir import EMBEDDER_DIR

    if embedder is None:
        embedder = load_embedder(os.path.join(workdir, EMBEDDER_DIR))
    meta = embedder.meta
    try:
        from facejax.train.checkpoint import restore_model

        model, config = restore_model(workdir, meta.get("checkpoint", "best"))
    except FacejaxError as e:  # no checkpoint, or a config it cannot be rebuilt from
        if need_model:
            raise
        return Explainer.from_embedder(embedder, f"the run's checkpoint cannot be used ({e})")
    explainer = Explainer.from_model(
        model, image_size=int(meta["cache_size"]),
        model_input_size=int(meta.get("model_input_size", meta["cache_size"])),
        normalization=meta["normalization"], name=config.model.name)
    probe = np.random.default_rng(1).integers(0, 256, (2, explainer.input_size,
                                                       explainer.input_size, 3), np.uint8)
    ours = np.asarray(explainer._embed(probe))
    theirs = embedder(probe)
    agree = -1.0 if ours.shape != theirs.shape else float(np.min(np.sum(ours * theirs, 1) / (
        np.maximum(np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1), 1e-12))))
    if not agree >= _AGREE_MIN:
        raise CheckpointError(
            f"the {meta.get('checkpoint', 'best')} checkpoint of {workdir} no longer gives the "
            f"exported embedder's embeddings (cosine {agree:.3f} on a probe image): re-export "
            f"with scripts/export.py --workdir {workdir} (and rebuild the index) first")
    return explainer


# ----------------------------------------------------------------------------- pictures

def upsample(m: np.ndarray, size: int) -> np.ndarray:
    """A map [h,w] stretched bilinearly over a size x size image (identity at full size)."""
    m = np.asarray(m, np.float32)
    if m.shape == (size, size):
        return m
    return np.asarray(jax.image.resize(jnp.asarray(m), (size, size), "linear"))


def overlay(image: np.ndarray, m: np.ndarray, vmax: float) -> np.ndarray:
    """uint8 image [S,S,3] with map m drawn over it: red where it raises the similarity, blue
    where it lowers it, opacity growing with |m| / vmax (0 shows the image as it is)."""
    from matplotlib import colormaps

    size = image.shape[0]
    v = upsample(m, size) / max(float(vmax), 1e-12)
    colour = colormaps["RdBu_r"]((np.clip(v, -1, 1) + 1) / 2)[..., :3]
    alpha = 0.7 * np.clip(np.abs(v), 0, 1)[..., None]
    out = (1 - alpha) * image.astype(np.float32) / 255 + alpha * colour
    return np.clip(np.round(out * 255), 0, 255).astype(np.uint8)


def shown(e: Explanation, m: np.ndarray) -> np.ndarray:
    """What is drawn of map m: occlusion drops as they are; similarity contributions minus
    their mean (the uniform share score/N), since with all-positive features (dlib's) every
    cell raises the cosine and only the differences between cells say where."""
    m = np.asarray(m, np.float32)
    return m - m.mean() if e.method == SIMILARITY else m


def overlays(query: np.ndarray, result: np.ndarray, e: Explanation
             ) -> tuple[np.ndarray, np.ndarray]:
    """The two overlays, each on its own colour scale (its largest |value|)."""
    out = []
    for image, m in ((query, e.query_map), (result, e.result_map)):
        v = shown(e, m)
        out.append(overlay(image, v, max(float(np.abs(v).max()), 1e-12)))
    return out[0], out[1]


def caption(e: Explanation, m: np.ndarray) -> str:
    v = shown(e, m)
    if e.method == SIMILARITY:
        return f"{m.shape[0]}x{m.shape[1]} cells, \u00b1{float(np.abs(v).max()):.2g} of mean"
    return f"largest drop {float(m.max()):.2g}"


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


def pair_figure(pairs: Sequence[Mapping[str, Any]], out_png: str, *, title: str = "") -> None:
    """One row per pair: query, result, then for each explanation the query's and the result's
    overlay. `pairs[i]` = {query, result (uint8 [S,S,3]), query_caption, result_caption,
    explanations: [Explanation, ...]}."""
    from matplotlib.figure import Figure

    from facejax.retrieval.report import displayable

    if out_png.endswith(("/", os.sep)) or os.path.isdir(out_png):
        raise ConfigError(f"{out_png} is a folder; give the PNG file to write")
    ncols = 2 + 2 * max((len(p["explanations"]) for p in pairs), default=0)
    nrows = max(1, len(pairs))
    height = 2.3 * nrows + 0.6
    fig = Figure(figsize=(2.1 * ncols, height))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1 - 0.6 / height,
                        wspace=0.08, hspace=0.5)
    for i, p in enumerate(pairs):
        cells = [(p["query"], "query\n" + p.get("query_caption", "")),
                 (p["result"], "result\n" + p.get("result_caption", ""))]
        for e in p["explanations"]:
            q, r = overlays(p["query"], p["result"], e)
            cells += [(q, f"{e.method}: query (cos {e.score:.3f})\n{caption(e, e.query_map)}"),
                      (r, f"{e.method}: result\n{caption(e, e.result_map)}")]
        for j, ax in enumerate(axes[i]):
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(cells):
                ax.axis("off")
                continue
            ax.imshow(cells[j][0])
            ax.set_title(displayable(cells[j][1]), fontsize=7)
    fig.suptitle(title or "why these match: red raises the cosine, blue lowers it "
                          "(similarity: relative to the mean cell)",
                 fontsize=9, y=1 - 0.1 / height, va="top")
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    with atomic_path(out_png, ".png") as tmp:
        fig.savefig(tmp, dpi=110)


def explained_examples_figure(examples: Sequence[Mapping[str, Any]],
                              image_loader: Callable[[str], np.ndarray | None],
                              explainer: Explainer, out_png: str, *, method: str = "auto",
                              title: str = "") -> None:
    """Figure 9 explained: per query, a row of its results with their maps over them, and
    below it a row of the query with its map for each of those results."""
    from facejax.retrieval.report import _short, draw_grid

    method = explainer.resolve(method)
    rows = []
    for ex in examples:
        query = image_loader(ex["query"])
        top, below = [], []
        for r in ex["results"]:
            image = image_loader(r["path"])
            if query is None or image is None:
                top.append(dict(image=image, correct=r["correct"], caption=_short(r["name"])))
                below.append(dict(image=None, correct=None, caption=""))
                continue
            e = explainer.explain(query, image, method)
            q_over, r_over = overlays(query, image, e)
            top.append(dict(image=r_over, correct=r["correct"],
                            caption=f"{_short(r['name'])}\n{r['score']:.3f}"))
            below.append(dict(image=q_over, correct=None, caption=f"query vs #{len(below) + 1}"))
        rows.append(dict(image=query, caption=_short(ex["name"]), results=top))
        rows.append(dict(image=query, caption="(query)", results=below))
    draw_grid(rows, out_png, title=title,
              legend=f"top results with {method} maps (red raises the cosine); below: the "
                     f"query's map for each")
