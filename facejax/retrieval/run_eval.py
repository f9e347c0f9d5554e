"""`evaluate_workdir`: score a run's saved index with its queries and write `workdir/report/`."""

from __future__ import annotations

import json
import os

import numpy as np

from facejax.errors import DataError
from facejax.retrieval import competition, report, run_info
from facejax.retrieval.embed import load_embedder
from facejax.retrieval.evaluate import (check_exact_max_pairs, check_ks, check_num_examples,
                                        evaluate)
from facejax.retrieval.index import SearchIndex, load_index
from facejax.retrieval.run_data import prepare_run_data
from facejax.retrieval.verify_run import calibrated_threshold
from facejax.rundir import EMBEDDER_DIR, INDEX_DIR, METRICS_JSONL, PLOTS_DIR, REPORT_DIR

COMPETITION_JSON = "competition_topk.json"


def evaluate_workdir(workdir: str, config, *, progress: bool = True) -> dict:
    """Evaluates the saved index with the run's queries; writes `workdir/report/`.

    For the competition layout it also writes `report/competition_topk.json` and names it in
    the result's `competition_json` (relative to the report folder).
    """
    # Checked before the index, data and embeddings are loaded.
    ks = check_ks(config.eval.ks)
    num_examples = check_num_examples(config.eval.num_figure_queries)
    exact_max_pairs = check_exact_max_pairs(config.eval.exact_max_pairs)
    explain_method = config.eval.explain_figure
    if explain_method:
        from facejax.retrieval import explain as ex

        ex.check_method(explain_method)
    embedder = load_embedder(os.path.join(workdir, EMBEDDER_DIR))
    index = load_index(os.path.join(workdir, INDEX_DIR), expect=embedder.meta)
    data = prepare_run_data(config, embedder)
    _check_index_data(index, data, workdir, allow=bool(config.data.allow_changed_data))
    threshold, threshold_source = calibrated_threshold(workdir)
    q_emb = None
    out_dir = os.path.join(workdir, REPORT_DIR)
    if data.protocol == "competition":
        q_emb = embedder.embed_array(data.images, batch_size=config.index.embed_batch_size,
                                     progress=progress, indices=data.query.indices)
        q_paths = [data.paths[i] for i in data.query.indices]
        k = min(ks[-1], index.size)
        os.makedirs(out_dir, exist_ok=True)
        competition.write_competition_json(
            competition.competition_topk(q_paths, q_emb, index, k),
            os.path.join(out_dir, COMPETITION_JSON))
    result = evaluate(embedder, data, ks=ks, index=index,
                      batch_size=config.index.embed_batch_size,
                      num_examples=num_examples, seed=config.seed,
                      progress=progress, query_emb=q_emb, exact_max_pairs=exact_max_pairs,
                      threshold=threshold, threshold_source=threshold_source or "",
                      rejection_holdout=config.eval.rejection_holdout)
    if data.protocol == "competition":
        result["competition_json"] = COMPETITION_JSON
    model = embedder.meta.get("model") or config.model.name
    result["run"] = dict(workdir=os.path.abspath(workdir), model=model,
                         source=config.data.source, root=data.root,
                         **run_info.describe_run(workdir, config, data))
    result["verification"] = run_info.read_verification(workdir)
    kept = kept_starting_point(workdir)
    if kept:
        result.setdefault("warnings", []).append(kept)
    row_of = {p: i for i, p in enumerate(data.paths)}

    def image_of(path: str):
        i = row_of.get(path)
        return None if i is None else np.asarray(data.images[i])

    explain = None
    if explain_method:
        def explain(examples, loader, out_png):
            ex.explained_examples_figure(examples, loader, ex.load_explainer(workdir, embedder),
                                         out_png, method=explain_method,
                                         title=f"{model}: query and top-5, explained")

    report.write_report(result, out_dir, image_loader=image_of,
                        plots_dir=os.path.join(workdir, PLOTS_DIR),
                        title=f"Retrieval report: {model}", explain=explain)
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
        with open(os.path.join(workdir, METRICS_JSONL)) as f:
            records = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return ""
    epochs = [r.get("epoch", 0) for r in records if isinstance(r, dict)]
    best = [r.get("epoch") for r in records if isinstance(r, dict) and r.get("best")]
    if not epochs or max(epochs) == 0 or not best or best[-1] != 0:
        return ""
    return (f"training did not beat the starting point: no epoch of {max(epochs)} improved on "
            f"the pretrained model (epoch 0), so these results are the untrained model's")
