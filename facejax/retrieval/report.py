"""Evaluation report: report.json, report.md, a static report.html and the query-and-top-5
figure (PNG)."""

from __future__ import annotations

import glob
import html
import json
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from facejax.atomic import atomic_path, write_file_atomic
from facejax.data import counts
from facejax.errors import ConfigError
from facejax.retrieval import rejection, run_info

FIGURE = "topk_examples.png"
FIGURE_EXPLAINED = "topk_examples_explained.png"
CORRECT, WRONG, NEUTRAL, QUERY = "#1a9641", "#d7191c", "#9e9e9e", "#2c7bb6"


# ----------------------------------------------------------------------------- figures

def draw_grid(rows: Sequence[Mapping[str, Any]], out_png: str, *, title: str = "",
              legend: str = "top results (green = same identity, red = different)") -> None:
    """One row per query: the query, then its results with a coloured border.

    `rows[i]` = {image, caption, results: [{image, caption, correct: bool | None}]};
    green = correct identity, red = wrong, grey = unknown (no labels). The folder of
    `out_png` is created; a path naming a folder is a ConfigError.
    """
    if out_png.endswith(("/", os.sep)) or os.path.isdir(out_png):
        raise ConfigError(f"{out_png} is a folder; give the PNG file to write, e.g. "
                          f"{os.path.join(out_png, 'grid.png')}")
    # The Figure API without pyplot: no global backend switch, no GUI, safe in threads.
    from matplotlib.figure import Figure

    ncols = 1 + max((len(r["results"]) for r in rows), default=0)
    nrows = max(1, len(rows))
    top_margin = 0.75 + (0.3 if title else 0.0)
    height = 2.2 * nrows + top_margin
    fig = Figure(figsize=(1.8 * ncols, height))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1 - top_margin / height,
                        wspace=0.12, hspace=0.45)
    for i, row in enumerate(rows):
        cells = [(row["image"], row["caption"], QUERY)]
        for res in row["results"]:
            ok = res.get("correct")
            color = NEUTRAL if ok is None else (CORRECT if ok else WRONG)
            # A mark as well as the colour, for readers who cannot tell red from green.
            mark = "" if ok is None else ("\u2713 " if ok else "\u2717 ")
            cells.append((res["image"], mark + res["caption"], color))
        for j in range(ncols):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(cells):
                ax.axis("off")
                continue
            image, caption, color = cells[j]
            ax.imshow(image if image is not None else np.full((8, 8, 3), 200, np.uint8))
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(5 if j else 3)
            ax.set_title(displayable(caption), fontsize=8, color="black" if j else QUERY)
    axes[0, 0].annotate("query", xy=(0.5, 1.35), xycoords="axes fraction", ha="center",
                        fontsize=9, fontweight="bold", color=QUERY)
    if ncols > 1:
        axes[0, 1].annotate(legend, xy=(0.0, 1.35), xycoords="axes fraction", ha="left", fontsize=9,
                            fontweight="bold")
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 0.1 / height, va="top")
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    with atomic_path(out_png, ".png") as tmp:
        fig.savefig(tmp, dpi=110)


def displayable(text: str) -> str:
    """`text` with bytes that are not UTF-8 (file names taken as surrogate escapes) shown as
    \\xNN: matplotlib and Markdown take only valid text."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _short(name: str, width: int = 18) -> str:
    name = name.replace("_", " ")
    return name if len(name) <= width else name[: width - 1] + "…"


def examples_figure(examples: Sequence[Mapping[str, Any]],
                    image_loader: Callable[[str], np.ndarray | None], out_png: str,
                    title: str = "") -> None:
    """The query-and-top-5 figure from `evaluate` examples; `image_loader(path)` gives uint8
    HxWx3."""
    rows = []
    for ex in examples:
        rows.append(dict(
            image=image_loader(ex["query"]), caption=_short(ex["name"]),
            results=[dict(image=image_loader(r["path"]), correct=r["correct"],
                          caption=f"{_short(r['name'])}\n{r['score']:.3f}")
                     for r in ex["results"]]))
    draw_grid(rows, out_png, title=title)


# ----------------------------------------------------------------------------- tables

def _fmt(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def bold(text: str, stream=None) -> str:
    """`text` in bold for a terminal (ANSI), else between Markdown's ** marks."""
    stream = sys.stdout if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        return f"\033[1m{text}\033[0m"
    return f"**{text}**"


def _open_set(result: Mapping[str, Any]) -> int | None:
    """The held-out identity count of an open-set result (None otherwise, or for reports
    written before it was recorded)."""
    return result.get("held_out_identities")


def metric_rows(result: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The metric table; open-set results get each k's chance level on the row below it."""
    m = result["metrics"]
    header = ["k", "Top-k (hit@k)", "Precision@k", "Recall@k", "F1@k"]
    chance = result.get("chance") if _open_set(result) is not None else None
    rows = []
    for k in result["ks"]:
        keys = (f"top{k}", f"precision@{k}", f"recall@{k}", f"f1@{k}")
        rows.append([str(k)] + [_fmt(m[key]) for key in keys])
        if chance:
            rows.append([f"chance, k={k}"] + [_fmt(chance.get(key)) for key in keys])
    return header, rows


def setting_line(result: Mapping[str, Any]) -> str:
    loo = " (leave-one-out: every query searches all other images)" \
        if result["leave_one_out"] else ""
    line = (f"Protocol: **{result['protocol']}**{loo}; {result['num_queries']} queries over "
            f"{result['num_identities']} identities; gallery of {result['gallery_size']} images; "
            f"index backend: {result['backend']}.")
    held = _open_set(result)
    if held is not None:
        line += (f" Held-out identities (never trained on): {held}; chance levels are those of "
                 f"a random ranking of this gallery.")
    skipped = result["num_queries_unlabelled"] + result["num_queries_without_relevant"]
    if skipped:
        line += (f" {skipped} of {result['num_queries_total']} queries were not scored "
                 f"(unlabelled, or no image of their identity in the gallery).")
    return line


def search_line(result: Mapping[str, Any]) -> str:
    """Which search ranked the results the metrics score (exact, or ScaNN tuned for depth)."""
    s = result.get("search")
    if not s:
        return ""
    pairs = f"{s['pairs']:,} query x gallery pairs"
    if s["metrics_from"] == "exact":
        if result["backend"] == "exact":
            return "Metrics from exact search (the index is exact)."
        return (f"Metrics from exact search ({pairs}, within eval.exact_max_pairs="
                f"{s['exact_max_pairs']:,}), not from the {result['backend']} index.")
    if s["metrics_from"] == "milvus":
        return (f"Metrics from the Milvus index ({pairs} is above eval.exact_max_pairs="
                f"{s['exact_max_pairs']:,}); its recall against exact search is below.")
    return (f"Metrics from the ScaNN index re-tuned for recall@{s['depth']} (the depth the "
            f"metrics read): leaves_to_search={s['leaves_to_search']}, reorder={s['reorder']}, "
            f"recall@{s['depth']} {_fmt(s['depth_recall'])} against exact search on "
            f"{s['ann_queries']} sampled queries ({pairs} is above eval.exact_max_pairs="
            f"{s['exact_max_pairs']:,}).")


def warning_lines(result: Mapping[str, Any]) -> list[str]:
    return [f"Warning: {w}" for w in result.get("warnings") or []]


def scored(result: Mapping[str, Any]) -> bool:
    """Whether any query could be scored; if not, every metric is NaN and no table is shown."""
    return bool(result["num_queries"])


def no_score_line(result: Mapping[str, Any]) -> str:
    """Why there are no metrics, and where the competition ranking went (if there is one)."""
    line = (f"No query could be scored: {result['num_queries_unlabelled']} of "
            f"{result['num_queries_total']} queries are unlabelled and "
            f"{result['num_queries_without_relevant']} have no image of their identity in the "
            f"gallery.")
    if result.get("competition_json"):
        line += f" The top-k ranking of every query is in {result['competition_json']}."
    return line


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def hardest_classes(result: Mapping[str, Any], n: int = 10) -> list[Mapping[str, Any]]:
    """The `n` identities with the lowest Top-1 (then mAP@R), single-query ones included."""
    rows = list(result["per_class"])
    return sorted(rows, key=lambda r: (r["top1"], r["map@r"], -r["queries"]))[:n]


SINGLE = "1 (single query)"


def _lists_all(result) -> bool:
    """Whether the identity table lists every identity (a small set), not only the hardest."""
    return bool((result.get("class_counts") or {}).get("per_identity"))


def _class_table(result) -> tuple[list[str], list[list[str]]]:
    k = result["ks"][-1]
    gallery = any("gallery" in r for r in result["per_class"])
    header = ["identity", "queries"] + ["gallery"] * gallery + ["Top-1", f"Top-{k}", "mAP@R"]
    n = len(result["per_class"]) if _lists_all(result) else 10
    rows = [[r["name"], SINGLE if r["queries"] == 1 else str(r["queries"])]
            + [str(r.get("gallery", "–"))] * gallery
            + [_fmt(r["top1"]), _fmt(r[f"top{k}"]), _fmt(r["map@r"])]
            for r in hardest_classes(result, n)]
    return header, rows


def class_heading(result) -> str:
    what = "Identities, hardest first" if _lists_all(result) else \
        "Hardest identities (lowest Top-1)"
    return (f"{what}; an identity with a single query is marked: its figures are that one "
            f"query's")


CURVES_NOTE = ("Classifier accuracy is the training head's softmax over the training classes "
               "(low with many classes or a cosine head, and not what retrieval uses); retrieval "
               "Top-1/Top-5 is nearest-neighbour search of validation images among the training "
               "images, the figure this report scores. Epoch 0 is the starting model.")
REJECTION_HEADING = "## Open-set rejection: is this person in the gallery at all?"
REJECTION_NOTE = ("Identities held out of the gallery play unknown people: a threshold rejects "
                  "one when its best gallery score is below it. Known people below it are "
                  "falsely rejected; 'identified' = accepted with the right identity first. "
                  "search.py and the service mark results below the calibrated threshold "
                  "'no match'.")


def counts_line(result) -> str:
    """Queries and gallery images per identity, min / median / max."""
    lines = counts.summary_lines({k: v for k, v in (result.get("class_counts") or {}).items()
                                  if k != "per_identity"})
    return (lines[0][0].upper() + lines[0][1:] + ".") if lines else ""


# ----------------------------------------------------------------------------- the report

def write_report(result: Mapping[str, Any], out_dir: str, *,
                 image_loader: Callable[[str], np.ndarray | None] | None = None,
                 plots_dir: str | None = None, title: str = "Retrieval report",
                 explain: Callable[..., None] | None = None) -> dict:
    """Writes report.json/.md/.html (+ the examples PNG) into `out_dir`; returns their paths.

    `explain(examples, image_loader, out_png)`, when given, draws the examples again with
    explanation maps (`retrieval.explain.explained_examples_figure`), shown after Figure 9.
    """
    os.makedirs(out_dir, exist_ok=True)
    paths = dict(json=os.path.join(out_dir, "report.json"),
                 md=os.path.join(out_dir, "report.md"),
                 html=os.path.join(out_dir, "report.html"))
    figure = None
    if image_loader is not None and result.get("examples"):
        figure = FIGURE
        held = _open_set(result)
        setting = result["protocol"] + (f" ({held} held-out identities)" if held is not None
                                        else "")
        examples_figure(result["examples"], image_loader, os.path.join(out_dir, FIGURE),
                        title=f"{setting}: query and top-5")
        paths["figure"] = os.path.join(out_dir, FIGURE)
        if explain is not None:
            paths["explained_figure"] = os.path.join(out_dir, FIGURE_EXPLAINED)
            explain(result["examples"], image_loader, paths["explained_figure"])
            result = {**result, "explained_figure": FIGURE_EXPLAINED}
    curves = []
    if plots_dir and os.path.isdir(plots_dir):
        curves = [os.path.relpath(p, out_dir)
                  for p in sorted(glob.glob(os.path.join(plots_dir, "*.png")))]

    write_file_atomic(paths["json"], json.dumps(_jsonable(result), indent=2).encode())
    write_file_atomic(paths["md"], displayable(_markdown(result, title, figure, curves)).encode())
    write_file_atomic(paths["html"], displayable(_html(result, title, figure, curves)).encode())
    return paths


def ann_line(result) -> str:
    ann = result.get("ann_recall")
    if not ann:
        return ""
    parts = ", ".join(f"{k} = {_fmt(v)}" for k, v in ann.items())
    line = f"ANN recall of the {result['backend']} index against exact search: {parts}"
    s = result.get("search") or {}
    if s.get("ann_queries"):
        line += f" (on {s['ann_queries']} queries)"
    t = result.get("index_tuning")
    if t:
        line += (f"; tuned at build for recall@{t['k']} >= {t['target_recall']}: "
                 f"{_fmt(t['recall'])} on {t['num_queries']} gallery queries "
                 f"({'met' if t.get('met') else 'NOT met'})")
    return line + "."


def _map_note(result) -> str:
    """After the mAP@R figure of an open-set result: its chance level and identity count."""
    held = _open_set(result)
    if held is None:
        return ""
    chance = (result.get("chance") or {}).get("map@r")
    return f" (chance {_fmt(chance)}; {held} held-out identities)"


def _markdown(result, title, figure, curves) -> str:
    emb = result.get("embedder") or {}
    m = result["metrics"]
    out = [f"# {title}", ""]
    warnings = warning_lines(result)
    if warnings:
        out += [f"**{w}**" for w in warnings] + [""]
    out += [setting_line(result), "",
            (f"Model: `{emb.get('model')}` (embedder {str(emb.get('params_hash'))[:12]}, "
             f"dim {emb.get('embed_dim')})."), ""]
    run = run_info.run_lines(result.get("run") or {})
    if run:
        out += ["## The run", ""] + run + [""]
    verification = run_info.verification_line(result.get("verification"))
    if verification:
        out += ["## Pair verification", "", verification, ""]
    if counts_line(result):
        out += [counts_line(result), ""]
    if search_line(result):
        out += [search_line(result), ""]
    if scored(result):
        out += [_md_table(*metric_rows(result)), "",
                f"mAP@R (R = the query's number of relevant gallery images): "
                f"**{_fmt(m['map@r'])}**{_map_note(result)}"]
    else:
        out.append(no_score_line(result))
    if result.get("map_r_truncated"):
        out.append(f"({result['map_r_truncated']} queries had R above the retrieved depth; "
                   f"their AP@R counts unretrieved items as misses.)")
    ann = ann_line(result)
    if ann:
        out += ["", ann]
    rej = result.get("rejection")
    if rej:
        out += ["", REJECTION_HEADING, "", rejection.summary_line(rej), "",
                _md_table(*rejection.table(rej)), "", REJECTION_NOTE]
    header, rows = _class_table(result)
    if rows:
        out += ["", f"## {class_heading(result)}", "", _md_table(header, rows)]
    if figure:
        out += ["", "## Examples: queries and their top-5", "",
                ("Each row: a random query (blue) and its top-5 results; green border = same "
                 "identity, red = different. Captions: identity and cosine score."), "",
                f"![query and top-5 results]({figure})"]
    if result.get("explained_figure"):
        out += ["", ("The same, explained: each result with its map over it (red: regions that "
                     "raise the cosine), and below it the query's map for that result."), "",
                f"![query and top-5 results, explained]({result['explained_figure']})"]
    if curves:
        out += ["", "## Training curves", "", CURVES_NOTE, ""]
        out += [f"![{os.path.basename(c)}]({c})" for c in curves]
    return "\n".join(out) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222}table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;
padding:4px 10px;text-align:right}th{background:#f0f0f0}td:first-child,th:first-child{
text-align:left}img{max-width:100%;border:1px solid #ddd}.note{color:#555}
.warn{color:#b00020}"""


def _html_table(header, rows) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><tr>{h}</tr>{body}</table>"


def _html(result, title, figure, curves) -> str:
    setting = html.escape(setting_line(result)).replace("**", "")
    m = result["metrics"]
    parts = [(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
              f"</title><style>{_CSS}</style></head><body>"),
             f"<h1>{html.escape(title)}</h1>"]
    parts += [f"<p class='warn'><b>{html.escape(w)}</b></p>" for w in warning_lines(result)]
    parts.append(f"<p>{setting}</p>")
    run = run_info.run_lines(result.get("run") or {})
    if run:
        parts += ["<h2>The run</h2>", "<ul>"] + [
            f"<li>{html.escape(line[2:]).replace('`', '')}</li>" for line in run] + ["</ul>"]
    verification = run_info.verification_line(result.get("verification"))
    if verification:
        parts += ["<h2>Pair verification</h2>",
                  f"<p>{html.escape(verification).replace('**', '')}</p>"]
    if counts_line(result):
        parts.append(f"<p>{html.escape(counts_line(result))}</p>")
    if search_line(result):
        parts.append(f"<p class='note'>{html.escape(search_line(result))}</p>")
    if scored(result):
        parts += [_html_table(*metric_rows(result)),
                  f"<p>mAP@R: <b>{_fmt(m['map@r'])}</b>{html.escape(_map_note(result))}</p>"]
    else:
        parts.append(f"<p>{html.escape(no_score_line(result))}</p>")
    ann = ann_line(result)
    if ann:
        parts.append(f"<p class='note'>{html.escape(ann)}</p>")
    rej = result.get("rejection")
    if rej:
        parts += [f"<h2>{html.escape(REJECTION_HEADING[3:])}</h2>",
                  f"<p>{html.escape(rejection.summary_line(rej))}</p>",
                  _html_table(*rejection.table(rej)),
                  f"<p class='note'>{html.escape(REJECTION_NOTE)}</p>"]
    header, rows = _class_table(result)
    if rows:
        parts += [f"<h2>{html.escape(class_heading(result))}</h2>", _html_table(header, rows)]
    if figure:
        parts += ["<h2>Examples: queries and their top-5</h2>",
                  ("<p class='note'>A random query (blue) and its top-5 results: green border = "
                   "same identity, red = different.</p>"),
                  f"<img src='{html.escape(figure)}' alt='query and top-5 results'>"]
    if result.get("explained_figure"):
        parts += [("<p class='note'>The same, explained: each result with its map over it (red: "
                   "regions that raise the cosine), and below it the query's map for that "
                   "result.</p>"),
                  f"<img src='{html.escape(result['explained_figure'])}' "
                  "alt='query and top-5 results, explained'>"]
    if curves:
        parts += ["<h2>Training curves</h2>", f"<p class='note'>{html.escape(CURVES_NOTE)}</p>"]
        parts += [f"<img src='{html.escape(c)}' alt='{html.escape(os.path.basename(c))}'>"
                  for c in curves]
    parts.append("</body></html>")
    return "\n".join(parts)


def _jsonable(x):
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return None if math.isnan(x) or math.isinf(x) else float(x)
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    return x


# ----------------------------------------------------------------------------- comparison

def compare_table(runs: Sequence[tuple[str, Mapping[str, Any]]], k: int | None = None) -> str:
    """The paper's Table 3: one row per run, Top-1/5/10, then precision@k, mAP@R and F1@k.

    `k` defaults to 10, or the largest k that every run was evaluated at.
    """
    if k is None:
        common = set.intersection(*(set(r["ks"]) for _, r in runs)) if runs else set()
        k = 10 if 10 in common or not common else max(common)
    header = ["Model", "Top-1", "Top-5", "Top-10", f"Precision@{k}", "mAP@R", f"F1@{k}",
              "Protocol", "Queries", "Gallery"]
    # Open-set rows: how many identities were held out, and a random ranking's Top-1 there.
    open_set = any(_open_set(r) is not None for _, r in runs)
    if open_set:
        header += ["Held-out identities", "Top-1 by chance"]
    rows = []
    for name, r in runs:
        m = r["metrics"]
        proto = r["protocol"] + (" (LOO)" if r.get("leave_one_out") else "")
        rows.append([name] + [_fmt(m.get(key)) for key in
                              ("top1", "top5", "top10", f"precision@{k}", "map@r", f"f1@{k}")]
                    + [proto, str(r["num_queries"]), str(r["gallery_size"])])
        if open_set:
            held = _open_set(r)
            rows[-1] += ["–", "–"] if held is None else [
                str(held), _fmt((r.get("chance") or {}).get("top1"))]
    settings = {(r["protocol"], r["num_queries"], r["gallery_size"]) for _, r in runs}
    note = "" if len(settings) <= 1 else (
        "\n\nNote: the runs were evaluated on different query/gallery settings; compare "
        "rows with care.")
    return _md_table(header, rows) + note + "\n"
