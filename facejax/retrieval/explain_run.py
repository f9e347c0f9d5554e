"""`explain_workdir`: a run's explanation of a query and a result (or its top-k), as a PNG."""

from __future__ import annotations

import os

import ml_collections
import numpy as np

from facejax.errors import ConfigError, DataError
from facejax.retrieval import explain as ex

BOTH = "both"
CHOICES = ("auto", ex.SIMILARITY, ex.OCCLUSION, BOTH)
_FILE_SOURCES = ("folder", "competition")


def _methods(explainer: ex.Explainer, method: str) -> list[str]:
    if method not in CHOICES:
        raise ConfigError(f"--method must be one of {CHOICES}, got {method!r}")
    if method == BOTH:
        return list(explainer.methods)
    return [explainer.resolve(method)]


def _decoder(config, meta: dict):
    from facejax.data.decode import BadImage, decode_image
    from facejax.retrieval.workdir import run_face_crop

    size, mode = int(meta["cache_size"]), meta["resize_mode"]
    max_pixels, crop = int(config.data.max_pixels), run_face_crop(config, meta)

    def decode(path: str, what: str) -> np.ndarray:
        if not os.path.isfile(path):
            raise DataError(f"{what} {path} is not a file")
        try:
            return decode_image(path, size, mode, max_pixels, crop)
        except BadImage as e:
            raise DataError(f"cannot use {what} {path}: {e}") from None

    return decode


def explain_workdir(workdir: str, query: str, *, result: str | None = None, k: int = 0,
                    out_png: str, method: str = BOTH, patch: int = 0, stride: int = 0,
                    config: ml_collections.ConfigDict | None = None) -> dict:
    """Explains `query` against the image `result`, or against its top `k` in the run's index;
    writes `out_png` and returns {score(s), method(s), out}."""
    from facejax.retrieval.embed import load_embedder
    from facejax.retrieval.index import check_k, load_index
    from facejax.retrieval.workdir import EMBEDDER_DIR, INDEX_DIR, read_run_config

    if (result is None) == (not k):
        raise ConfigError("give either --result IMAGE or --k N (explain the top N results)")
    if k:
        check_k(k)
    for path, what in ((query, "query"), (result, "result")):
        if path is not None and not os.path.isfile(path):
            raise DataError(f"{what} {path} is not a file")
    if out_png.endswith(("/", os.sep)) or os.path.isdir(out_png):
        raise ConfigError(f"--out {out_png} is a folder; give the PNG file to write")
    config = config or read_run_config(workdir)
    embedder = load_embedder(os.path.join(workdir, EMBEDDER_DIR))
    decode = _decoder(config, embedder.meta)
    q_image = decode(query, "query")
    if result is not None:
        targets = [(decode(result, "result"), os.path.basename(result), None)]
    else:
        index = load_index(os.path.join(workdir, INDEX_DIR), expect=embedder.meta)
        check_k(k, index.size)
        if index.info.get("source", "folder") not in _FILE_SOURCES:
            raise ConfigError("--k reads the results' image files, and this run's gallery is "
                              f"not made of files ({index.info.get('source')}); use --result")
        rows, scores = index.search(embedder(q_image[None]), k)
        root = index.info.get("root") or ""
        names = index.info.get("label_names") or []
        targets = []
        for r, s in zip(rows[0], scores[0]):
            if r < 0:
                continue
            label = int(index.labels[r])
            name = names[label] if 0 <= label < len(names) else os.path.basename(index.paths[r])
            targets.append((decode(os.path.join(root, index.paths[r]), "result"), name,
                            float(s)))
    explainer = ex.load_explainer(workdir, embedder)
    methods = _methods(explainer, method)
    pairs, scores = [], []
    for image, caption, index_score in targets:
        explanations = [explainer.explain(q_image, image, m, patch=patch, stride=stride)
                        for m in methods]
        score = explanations[0].score
        scores.append(score)
        extra = "" if index_score is None else f" (index {index_score:.3f})"
        pairs.append(dict(query=q_image, result=image, query_caption=os.path.basename(query),
                          result_caption=f"{caption[:20]}{extra}", explanations=explanations))
    note = "" if ex.SIMILARITY in explainer.methods else (
        f"no similarity maps: {explainer.why_not_similarity}")
    ex.pair_figure(pairs, out_png, title=f"{explainer.name or 'model'}: why these match "
                                         f"(red raises the cosine, blue lowers it; similarity "
                                         f"maps relative to the mean cell)")
    return dict(out=out_png, methods=methods, scores=scores, note=note)
