"""The steps the retrieval scripts run on a training workdir: build the index, evaluate, search.

Each loads the workdir's exported embedder (`embedder/`), never the training code, and reads
the data through `facejax.data.prepare_data` with the image size and resize mode the embedder
was exported for.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence

import ml_collections
import numpy as np

from facejax.config import has_key
from facejax.errors import CheckpointError, ConfigError, DataError
from facejax.retrieval import competition, report
from facejax.retrieval.embed import Embedder, embed_to_shards, load_embedder
from facejax.retrieval.evaluate import (EXACT_MAX_PAIRS, check_exact_max_pairs, check_ks,
                                        check_num_examples, evaluate)
from facejax.retrieval.index import (BACKENDS, DEFAULT_TARGET_RECALL, SearchIndex, check_k,
                                     check_scann_init, check_target_recall, load_index)

EMBEDDER_DIR, INDEX_DIR, WORK_DIR, REPORT_DIR = "embedder", "index", "index_work", "report"
COMPETITION_JSON = "competition_topk.json"
_GRID_MAX_QUERIES = 16
# The run settings these steps read (prepare_data checks the rest of `data` itself).
_RUN_KEYS = ("seed", "model.name", "data.source", "data.root", "data.image_size",
             "data.resize_mode", "data.max_pixels", "index.backend", "index.exact_max_items",
             "index.target_recall", "index.batch_size", "eval.ks", "eval.num_figure_queries")
# Settings added after runs were first saved: older config.json files get these defaults, so
# that they can also be overridden (--config.index.scann_init=kmeans++) on such a run.
_LATER_KEYS = {"index.scann_init": "random", "eval.exact_max_pairs": EXACT_MAX_PAIRS,
               "index.milvus_uri": "", "index.milvus_collection": "", "index.milvus_index": "auto"}
# Settings that hold for one command only: config.json's value (a resumed training run may
# have saved true) is never inherited; an override sets them again.
_COMMAND_KEYS = {"data.allow_changed_data": False}
# The report.json fields compare_workdirs reads.
_REPORT_KEYS = ("ks", "metrics", "protocol", "num_queries", "gallery_size")


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config that training saved as `workdir/config.json`, and nothing else.

    Unlike `facejax.train.checkpoint.load_run_config`, which returns (config, class names)
    for restoring a model, this needs only config.json: retrieval never imports the training
    code and never needs classes.json. Raises CheckpointError if the file is missing,
    unreadable or lacks a setting that retrieval reads.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: is {workdir} a training workdir?")
    try:
        with open(path) as f:
            raw = json.load(f)
        if not isinstance(raw, dict):
            raise ValueError(f"expected a JSON object, got {type(raw).__name__}")
        config = ml_collections.ConfigDict(raw)
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    missing = [key for key in _RUN_KEYS if not has_key(config, key)]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}: it was not written by this "
                              f"version of facejax; add the missing settings or retrain")
    for key, default in _LATER_KEYS.items():
        if not has_key(config, key):
            section, name = key.split(".")
            config[section][name] = default
    for key, value in _COMMAND_KEYS.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


def run_face_crop(config, meta: dict) -> tuple[float, ...]:
    """The crop the embedder was exported with (as input_size and resize_mode); embedders
    exported before face_crop existed use the run config's data.face_crop."""
    from facejax.data.decode import check_face_crop

    box = check_face_crop(config.data.get("face_crop", ()))
    if "face_crop" in meta and check_face_crop(meta["face_crop"]) != box:
        exported = check_face_crop(meta["face_crop"])
        print(f"note: using the embedder's data.face_crop={exported} instead of the config's "
              f"{box}", flush=True)
        box = exported
    return box


def prepare_run_data(config, embedder: Embedder):
    """The run's data as the embedder takes it (its input size, resize mode and face_crop)."""
    from facejax.data.prepare import prepare_data

    data_cfg = ml_collections.ConfigDict(config.data.to_dict())
    size, mode = int(embedder.meta["input_size"]), embedder.meta["resize_mode"]
    if (data_cfg.image_size, data_cfg.resize_mode) != (size, mode):
        print(f"note: using the embedder's input format {size}px/{mode} instead of the config's "
              f"{data_cfg.image_size}px/{data_cfg.resize_mode}", flush=True)
        data_cfg.image_size, data_cfg.resize_mode = size, mode
    if "face_crop" in embedder.meta:
        data_cfg.face_crop = run_face_crop(config, embedder.meta)
    return prepare_data(data_cfg)


def _names(data) -> list[str]:
    return list(getattr(data, "identity_names", None) or data.class_names)


def build_workdir_index(workdir: str, config, *, backend: str | None = None,
                        target_recall: float | None = None, progress: bool = True
                        ) -> SearchIndex:
    """Embeds the gallery (resumably, in shards) and saves `workdir/index/`.

    The gallery is the protocol's gallery subset, or the query subset for leave-one-out.
    `backend` and `target_recall` default to the run's `index` settings. A ScaNN index is
    always tuned: a target of 0 (no tuning, the default of runs saved before tuning was)
    means DEFAULT_TARGET_RECALL. Holds the run's lock: not while it trains or is served.
    """
    from facejax.runlock import hold_workdir_lock

    with hold_workdir_lock(workdir, "build_index"):
        return _build_workdir_index(workdir, config, backend=backend,
                                    target_recall=target_recall, progress=progress)


def _build_workdir_index(workdir: str, config, *, backend: str | None, target_recall,
                         progress: bool) -> SearchIndex:
    backend = backend or config.index.backend
    target = config.index.target_recall if target_recall is None else target_recall
    # Checked before the (long) embedding pass.
    if backend not in BACKENDS:
        raise ConfigError(f"index.backend must be one of {BACKENDS}, got {backend!r}")
    check_target_recall(target)
    untuned, target = not target, target or DEFAULT_TARGET_RECALL
    init = check_scann_init(config.index.scann_init)
    ks = check_ks(config.eval.ks)
    milvus = _milvus_options(workdir, config) if backend == "milvus" else None
    embedder = load_embedder(os.path.join(workdir, EMBEDDER_DIR))
    data = prepare_run_data(config, embedder)
    loo = data.gallery is None
    gallery = data.query if loo else data.gallery
    if len(gallery) == 0:
        raise DataError("the gallery is empty: nothing to index")
    paths = [data.paths[i] for i in gallery.indices]
    work = os.path.join(workdir, WORK_DIR)
    emb = embed_to_shards(embedder, data.images, gallery.indices, paths, work,
                          batch_size=config.index.batch_size, progress=progress)
    info = dict(root=data.root, source=config.data.source, protocol=data.protocol,
                leave_one_out=loo, label_names=_names(data), data_id=data.data_id)
    index = SearchIndex.build(emb, paths, gallery.labels, embedder.meta, backend=backend,
                              exact_max_items=config.index.exact_max_items,
                              target_recall=target, k=ks[-1], info=info,
                              scann_params=dict(init=init), seed=config.seed, milvus=milvus)
    if untuned and index.backend == "scann":
        print(f"note: index.target_recall=0 (no tuning) is read as {target}: ScaNN indexes are "
              f"always tuned", flush=True)
    if target_recall and index.backend == "exact":
        print(f"note: target_recall={target} does not apply: the index uses exact search "
              f"(recall 1 by construction; {index.size} items, backend {backend!r}, "
              f"exact_max_items={config.index.exact_max_items})", flush=True)
    index.save(os.path.join(workdir, INDEX_DIR))
    shutil.rmtree(work, ignore_errors=True)  # the saved index holds every embedding now
    return index


def _milvus_options(workdir: str, config) -> dict:
    """index.milvus_* checked before the embedding pass: a bad URI fails in seconds."""
    from facejax.retrieval import milvus_index as mi

    uri = config.index.milvus_uri or os.path.join(os.path.abspath(workdir), "milvus.db")
    collection = config.index.milvus_collection or mi.default_collection(workdir)
    opts = dict(uri=mi.check_uri(uri), collection=mi.check_collection_name(collection),
                index_type=mi.check_index_type(config.index.milvus_index))
    mi.connect(uri).close()
    return opts


def evaluate_workdir(workdir: str, config, *, progress: bool = True) -> dict:
    """Evaluates the saved index with the run's queries; writes `workdir/report/`.

    For the competition layout it also writes `report/competition_topk.json` and names it in
    the result's `competition_json` (relative to the report folder).
    """
    # Checked before the index, data and embeddings are loaded.
    ks = check_ks(config.eval.ks)
    num_examples = check_num_examples(config.eval.num_figure_queries)
    exact_max_pairs = check_exact_max_pairs(config.eval.exact_max_pairs)
    embedder = load_embedder(os.path.join(workdir, EMBEDDER_DIR))
    index = load_index(os.path.join(workdir, INDEX_DIR), expect=embedder.meta)
    data = prepare_run_data(config, embedder)
    _check_index_data(index, data, workdir, allow=bool(config.data.get("allow_changed_data")))
    q_emb = None
    out_dir = os.path.join(workdir, REPORT_DIR)
    if data.protocol == "competition":
        q_emb = embedder.embed_array(data.images, batch_size=config.index.batch_size,
                                     progress=progress, indices=data.query.indices)
        q_paths = [data.paths[i] for i in data.query.indices]
        k = min(ks[-1], index.size)
        os.makedirs(out_dir, exist_ok=True)
        competition.write_competition_json(
            competition.competition_topk(q_paths, q_emb, index, k),
            os.path.join(out_dir, COMPETITION_JSON))
    result = evaluate(embedder, data, ks=ks, index=index,
                      batch_size=config.index.batch_size,
                      num_examples=num_examples, seed=config.seed,
                      progress=progress, query_emb=q_emb, exact_max_pairs=exact_max_pairs)
    if data.protocol == "competition":
        result["competition_json"] = COMPETITION_JSON
    model = embedder.meta.get("model") or config.model.name
    result["run"] = dict(workdir=os.path.abspath(workdir), model=model,
                         source=config.data.source, root=data.root)
    kept = kept_starting_point(workdir)
    if kept:
        result.setdefault("warnings", []).append(kept)
    row_of = {p: i for i, p in enumerate(data.paths)}

    def image_of(path: str):
        i = row_of.get(path)
        return None if i is None else np.asarray(data.images[i])

    report.write_report(result, out_dir, image_loader=image_of,
                        plots_dir=os.path.join(workdir, "plots"),
                        title=f"Retrieval report: {model}")
    return result


def _check_index_data(index: SearchIndex, data, workdir: str, *, allow: bool) -> None:
    """Refuses to score an index against data that changed since it was built (its gallery
    embeddings would be stale), unless `allow` (data.allow_changed_data) says to go on."""
    from facejax.data.prepare import data_change

    recorded = index.info.get("data_id")
    if not recorded:
        print(f"note: the index in {workdir} records no data id (built by an older facejax): "
              f"cannot check that the data is unchanged; rebuild it with "
              f"scripts/build_index.py --workdir {workdir} to record one", flush=True)
        return
    change = data_change(recorded, data.data_id)
    if not change:
        return
    if allow:
        print(f"warning: the data changed since the index was built ({change}); evaluating "
              f"anyway because data.allow_changed_data=true: the gallery embeddings are the "
              f"old images'", flush=True)
        return
    raise DataError(f"the data changed since the index in {workdir} was built: {change}. "
                    f"Rebuild the index (scripts/build_index.py --workdir {workdir}), or pass "
                    f"--config.data.allow_changed_data=true to evaluate against it anyway")


def kept_starting_point(workdir: str) -> str:
    """A warning when training from pretrained weights kept its starting point (no epoch
    beat epoch 0, so the exported model is the untrained one), else ''. Reads the run's
    metrics.jsonl; a run without one (or unreadable) gives ''."""
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return ""
    epochs = [r.get("epoch", 0) for r in records if isinstance(r, dict)]
    best = [r.get("epoch") for r in records if isinstance(r, dict) and r.get("best")]
    if not epochs or max(epochs) == 0 or not best or best[-1] != 0:
        return ""
    return (f"training did not beat the starting point: no epoch of {max(epochs)} improved on "
            f"the pretrained model (epoch 0), so these results are the untrained model's")


# ----------------------------------------------------------------------------- search

def list_query_images(query: str) -> list[str]:
    """A single image file, or the image files under a folder (recursively, sorted)."""
    from facejax.data.sources import IMAGE_EXTS

    if os.path.isfile(query):
        return [query]
    if not os.path.exists(query):
        raise DataError(f"query {query} not found")
    if not os.path.isdir(query):
        raise DataError(f"query {query} is neither an image file nor a folder")
    found = []
    for dirpath, dirnames, files in os.walk(query):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.join(dirpath, f) for f in sorted(files)
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTS]
    if not found:
        raise DataError(f"query folder {query} has no images "
                        f"({', '.join(sorted(IMAGE_EXTS))})")
    return found


def search_workdir(workdir: str, query: str, k: int = 10, *, grid_png: str | None = None,
                   config: ml_collections.ConfigDict | None = None,
                   threshold: float | None = None) -> dict:
    """Top-k gallery images for a query image or folder: {queries: [...], skipped: [...]}.

    In a folder, undecodable files are skipped and listed; a single bad file is an error.
    Images above the run's `data.max_pixels` are refused like in training; `config`
    defaults to `read_run_config(workdir)`. With a same-person `threshold` (cosine), each
    result says whether it is a `match`: results below it are "no match".
    """
    from facejax.data.decode import BadImage, decode_image

    check_k(k)  # 1 <= k now; k <= the gallery size once the index is loaded
    if config is None:
        config = read_run_config(workdir)
    max_pixels = int(config.data.max_pixels)
    embedder = load_embedder(os.path.join(workdir, EMBEDDER_DIR))
    index = load_index(os.path.join(workdir, INDEX_DIR), expect=embedder.meta)
    check_k(k, index.size)
    size, mode = int(embedder.meta["input_size"]), embedder.meta["resize_mode"]
    face_crop = run_face_crop(config, embedder.meta)
    files = list_query_images(query)
    images, kept, skipped = [], [], []
    for f in files:
        try:
            images.append(decode_image(f, size, mode, max_pixels, face_crop))
            kept.append(f)
        except BadImage as e:
            if len(files) == 1:
                raise DataError(f"cannot use query image {f}: {e}") from None
            skipped.append((f, str(e)))
    if not kept:
        raise DataError(f"none of the {len(files)} images in {query} could be decoded "
                        f"(first: {skipped[0][0]}: {skipped[0][1]})")
    emb = embedder.embed_array(np.stack(images), progress=False)
    rows, scores = index.search(emb, k)
    names = index.info.get("label_names") or []
    out = []
    for f, r_row, s_row in zip(kept, rows, scores):
        results = []
        for rank, (r, s) in enumerate(zip(r_row, s_row), 1):
            if r < 0:
                continue
            label = int(index.labels[r])
            results.append(dict(rank=rank, path=index.paths[r], id=int(index.ids[r]),
                                label=label, score=float(s),
                                name=names[label] if 0 <= label < len(names) else "",
                                match=None if threshold is None else bool(s >= threshold)))
        out.append(dict(query=f, results=results))
    result = dict(k=k, gallery_size=index.size, root=index.info.get("root", ""), queries=out,
                  threshold=threshold, skipped=[dict(path=p, reason=r) for p, r in skipped])
    if grid_png:
        _search_grid(result, dict(zip(kept, images)), size, mode, max_pixels, grid_png,
                     face_crop)
    return result


def _search_grid(result: dict, query_images: dict, size: int, mode: str, max_pixels: int,
                 out_png: str, face_crop=()) -> None:
    from facejax.data.decode import BadImage, decode_image

    root = result["root"]

    def gallery_image(path: str):
        full = os.path.join(root, path)
        try:
            return decode_image(full, size, mode, max_pixels, face_crop)
        except BadImage:
            return None  # the gallery moved or is not made of files (idx/tfds): a blank tile

    rows = []
    for q in result["queries"][:_GRID_MAX_QUERIES]:
        rows.append(dict(
            image=query_images[q["query"]], caption=os.path.basename(q["query"])[:22],
            results=[dict(image=gallery_image(r["path"]), correct=None,
                          caption=f"{(r['name'] or os.path.basename(r['path']))[:18]}\n"
                                  f"{r['score']:.3f}")
                     for r in q["results"]]))
    report.draw_grid(rows, out_png, legend="top results, best first (caption: identity, "
                                           "cosine score)")


def format_search_table(result: dict) -> str:
    lines = []
    t = result.get("threshold")
    if t is not None:
        lines.append(f"same-person threshold {t:.4f}: results below it are marked 'no match'")
    for q in result["queries"]:
        lines.append(f"query: {q['query']}")
        lines.append(f"  {'rank':>4}  {'score':>7}  {'identity':<28} path")
        for r in q["results"]:
            mark = "  (no match)" if r.get("match") is False else ""
            lines.append(f"  {r['rank']:>4}  {r['score']:7.4f}  {r['name'][:28]:<28} "
                         f"{r['path']}{mark}")
    for s in result["skipped"]:
        lines.append(f"skipped {s['path']}: {s['reason']}")
    return "\n".join(lines)


def compare_workdirs(workdirs: Sequence[str]) -> str:
    """Table 3 over runs: reads each `workdir/report/report.json` (run eval_topk first)."""
    runs = []
    for w in workdirs:
        path = os.path.join(w, REPORT_DIR, "report.json")
        try:
            with open(path) as f:
                res = json.load(f)
        except FileNotFoundError:
            raise DataError(f"{path} is missing: run scripts/eval_topk.py --workdir {w}") \
                from None
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {path}: {e}") from e
        _check_report(res, path, w)
        name = (res.get("run") or {}).get("model") or (res.get("embedder") or {}).get("model")
        runs.append((f"{name} ({os.path.basename(os.path.normpath(w))})", res))
    return report.compare_table(runs)


def _check_report(res, path: str, workdir: str) -> None:
    """DataError naming `path` unless it holds the report fields the comparison reads."""
    again = f"run scripts/eval_topk.py --workdir {workdir} again"
    if not isinstance(res, dict):
        raise DataError(f"{path} is not a report (a JSON object expected): {again}")
    missing = [key for key in _REPORT_KEYS if key not in res]
    if missing:
        raise DataError(f"{path} is incomplete (no {', '.join(missing)}): {again}")
    ks, metrics = res["ks"], res["metrics"]
    if (not isinstance(ks, list) or not ks
            or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks)):
        raise DataError(f"{path}: 'ks' must be a non-empty list of whole numbers >= 1, "
                        f"got {ks!r}: {again}")
    # A metric may be null (NaN when no query could be scored), never text or a list.
    if not isinstance(metrics, dict) or not all(
            v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
            for v in metrics.values()):
        raise DataError(f"{path}: 'metrics' must map names to numbers: {again}")
    for key in ("num_queries", "gallery_size"):
        if not isinstance(res[key], int) or isinstance(res[key], bool):
            raise DataError(f"{path}: {key!r} must be a whole number, got {res[key]!r}: {again}")
