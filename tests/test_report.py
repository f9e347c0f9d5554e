"""Report files: metric table with the setting stated, Figure 9 PNG, curves, comparison table."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from facejax.errors import ConfigError
from facejax.retrieval import report as R
from facejax.retrieval.evaluate import evaluate_embeddings
from facejax.retrieval.index import SearchIndex

META = dict(model="toy", params_hash="d" * 64, embed_dim=2, normalization="unit",
            l2_normalized=True, metric="dot", input_size=8, resize_mode="crop")


def _points():
    """4 identities on the unit circle, each within 50 degrees of its own axis."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 6).astype(np.int32)
    ang = np.deg2rad(labels * 90 + rng.uniform(-50, 50, len(labels)))
    return np.stack([np.cos(ang), np.sin(ang)], 1).astype(np.float32), labels


def _result():
    x, labels = _points()
    paths = [f"Person_{lab}/img{i}.jpg" for i, lab in enumerate(labels)]
    index = SearchIndex.build(x, paths, labels, META, backend="exact")
    return evaluate_embeddings(x, labels, index, ks=(1, 5, 10), self_rows=np.arange(len(x)),
                               query_paths=paths, protocol="open_set", num_examples=3)


def _loader(path):
    # A flat colour per identity, so a wrong hit is visible in the picture.
    lab = int(path.split("/")[0].split("_")[1])
    img = np.zeros((32, 32, 3), np.uint8)
    img[..., lab % 3] = 60 + 60 * lab
    return img


def _rgb(hex_colour: str) -> np.ndarray:
    return np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])


def _panels(path, nrows: int, ncols: int, top_inches: float):
    """(centre 5x5 patch, pixels from the gap on the left to the centre) of each grid cell,
    [row][col], read from the PNG by draw_grid's layout: columns between 2% margins with gaps of
    0.12 column, equal row bands below the top margin, 110 dpi."""
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB")).astype(int)
    h, w = pixels.shape[:2]
    top = top_inches * 110
    col = 0.96 * w / (ncols + 0.12 * (ncols - 1))
    cells = []
    for i in range(nrows):
        y = int(top + (i + 0.5) * (h - top) / nrows)
        row = []
        for j in range(ncols):
            left = 0.02 * w + j * 1.12 * col
            x = int(left + col / 2)
            row.append((pixels[y - 2:y + 3, x - 2:x + 3],
                        pixels[y, int(left - 0.06 * col):x]))
        cells.append(row)
    return cells


def _is(pixels, colour, tol=3) -> np.ndarray:
    return np.all(np.abs(pixels - np.asarray(colour)) <= tol, axis=-1)


def _loo_top1(x, labels) -> float:
    """Leave-one-out Top-1 by brute force: is each row's most similar other row its class?"""
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    return float(np.mean(labels[np.argmax(sims, axis=1)] == labels))


def test_write_report(tmp_path):
    result = _result()
    top1 = _loo_top1(*_points())  # independent of evaluate()
    assert top1 == 17 / 24  # hits and misses: the figure shows both
    plots = tmp_path / "plots"
    plots.mkdir()
    Image.new("RGB", (20, 10)).save(plots / "loss.png")
    out = tmp_path / "report"
    paths = R.write_report(result, str(out), image_loader=_loader, plots_dir=str(plots))
    assert sorted(os.listdir(out)) == ["report.html", "report.json", "report.md",
                                       R.FIGURE]
    md = (out / "report.md").read_text()
    assert "Protocol: **open_set** (leave-one-out" in md
    assert "24 queries over 4 identities; gallery of 23 images" in md
    assert "| k | Top-k (hit@k) | Precision@k | Recall@k | F1@k |" in md
    assert f"| 1 | {top1:.4f} |" in md
    assert "![loss.png](../plots/loss.png)" in md and f"]({R.FIGURE})" in md
    page = (out / "report.html").read_text()
    assert "<table>" in page and f"src='{R.FIGURE}'" in page and "../plots/loss.png" in page
    loaded = json.loads((out / "report.json").read_text())
    assert loaded["metrics"]["top1"] == pytest.approx(top1)
    assert loaded["gallery_size"] == 23
    with Image.open(paths["figure"]) as fig:
        # Three rows of query + top-5 at a legible size.
        assert fig.width >= 600 and fig.height >= 3 * 200
    # Each panel shows its image (the query's, then each result's flat identity colour) and
    # each result's border says whether its identity is the query's.
    cells = _panels(paths["figure"], 3, 6, top_inches=0.75 + 0.3)  # titled
    assert len(result["examples"]) == 3
    for row, ex in zip(cells, result["examples"]):
        assert _is(row[0][0], _loader(ex["query"])[0, 0]).all()
        for (patch, line), res in zip(row[1:], ex["results"]):
            assert _is(patch, _loader(res["path"])[0, 0]).all()
            same = res["path"].split("/")[0] == ex["query"].split("/")[0]
            assert _is(line, _rgb(R.CORRECT if same else R.WRONG)).sum() >= 5
            assert not _is(line, _rgb(R.WRONG if same else R.CORRECT)).any()


def test_grid_without_labels(tmp_path):
    rows = [dict(image=_loader("Person_1/x"), caption="q", results=[
        dict(image=_loader("Person_2/y"), caption="y\n0.9", correct=None),
        dict(image=None, caption="missing", correct=None)])]
    out = str(tmp_path / "grid.png")
    R.draw_grid(rows, out)
    with Image.open(out) as im:
        assert im.width > 200
    # The query, the result and the grey stand-in for the missing image, grey borders.
    (query, _), (hit, hit_line), (missing, missing_line) = _panels(out, 1, 3, 0.75)[0]
    assert _is(query, (0, 120, 0)).all() and _is(hit, (0, 0, 180)).all()
    assert _is(missing, (200, 200, 200)).all()
    for line in (hit_line, missing_line):
        assert _is(line, _rgb(R.NEUTRAL)).sum() >= 5
        assert not (_is(line, _rgb(R.CORRECT)).any() or _is(line, _rgb(R.WRONG)).any())


def test_compare_table():
    a = _result()
    b = json.loads(json.dumps(R._jsonable(a)))
    b["metrics"]["top1"] = 0.5
    table = R.compare_table([("resnet50", a), ("vgg16", b)])
    lines = table.splitlines()
    assert lines[0].startswith("| Model | Top-1 | Top-5 | Top-10 | Precision@10 | mAP@R | F1@10")
    assert lines[2].startswith(f"| resnet50 | {_loo_top1(*_points()):.4f} |")
    assert lines[3].startswith("| vgg16 | 0.5000 |") and "open_set (LOO) | 24 | 23 |" in lines[3]
    assert "different" not in table


def test_grid_creates_missing_folders_and_refuses_a_folder(tmp_path):
    rows = [dict(image=_loader("Person_1/x"), caption="q", results=[
        dict(image=_loader("Person_2/y"), caption="y", correct=False)])]
    out = tmp_path / "not" / "there" / "grid.png"
    R.draw_grid(rows, str(out))
    assert out.stat().st_size > 0
    for folder in (str(tmp_path), str(tmp_path / "new") + "/"):
        with pytest.raises(ConfigError, match="is a folder"):
            R.draw_grid(rows, folder)
    assert not (tmp_path / "new").exists() and not (tmp_path / ".png").exists()


def test_report_without_scored_queries_has_no_nan_table(tmp_path):
    labels = np.array([0, 0, 1], np.int32)
    x = np.array([[1, 0], [0.8, 0.6], [0, 1]], np.float32)
    index = SearchIndex.build(x, ["a/0", "a/1", "b/0"], labels, META, backend="exact")
    result = evaluate_embeddings(x[:2], np.array([-1, -1]), index, ks=(1, 2),
                                 query_paths=["q/0", "q/1"], protocol="competition")
    result["competition_json"] = "competition_topk.json"
    R.write_report(result, str(tmp_path))
    md = (tmp_path / "report.md").read_text()
    page = (tmp_path / "report.html").read_text()
    for text in (md, page):
        assert "No query could be scored: 2 of 2 queries are unlabelled" in text
        assert "competition_topk.json" in text
        assert "nan" not in text.lower() and "–" not in text and "Top-k (hit@k)" not in text
    loaded = json.loads((tmp_path / "report.json").read_text())
    assert loaded["metrics"]["top1"] is None


def test_names_that_are_not_utf8_reach_the_report(tmp_path):
    """A file or folder name that is not UTF-8 (os.fsdecode gives surrogate escapes) is shown
    as \\xNN in the figure, report.md and report.html instead of failing the report."""
    bad = os.fsdecode(b"Ren\xe9e")  # Latin-1 bytes: not UTF-8
    result = _result()
    for ex in result["examples"]:
        ex["name"] = bad
        ex["query"] = f"{bad}/{ex['query']}"
        for r in ex["results"]:
            r["name"] = bad
    out = tmp_path / "report"
    R.write_report(result, str(out), title=f"Report {bad}",
                   image_loader=lambda p: _loader(p.removeprefix(f"{bad}/")))
    assert "Ren\\xe9e" in (out / "report.md").read_text()
    assert "Ren\\xe9e" in (out / "report.html").read_text()
    assert os.path.getsize(out / R.FIGURE) > 0
    assert R.displayable("plain é") == "plain é"


def _closed_set_result(num_people: int):
    """Closed set: person 0 has a single query, whose nearest gallery image is person 1's
    (Top-1 0, mAP@R 0); the others have 2 queries each, all right."""
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(num_people, 16)).astype(np.float32)
    g_labels = np.repeat(np.arange(num_people), 6).astype(np.int32)
    q_labels = np.r_[0, np.repeat(np.arange(1, num_people), 2)].astype(np.int32)

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    g = unit(centres[g_labels] + 0.01 * rng.normal(size=(len(g_labels), 16))).astype(np.float32)
    q = unit(centres[q_labels] + 0.01 * rng.normal(size=(len(q_labels), 16))).astype(np.float32)
    q[0] = unit(centres[1:2] + 0.01)[0]  # person 0's only query looks like person 1
    paths = [f"Person_{lab}/g{i}.jpg" for i, lab in enumerate(g_labels)]
    index = SearchIndex.build(g, paths, g_labels, dict(META, embed_dim=16), backend="exact")
    return evaluate_embeddings(q, q_labels, index, ks=(1, 5), protocol="closed_set",
                               query_paths=[f"Person_{lab}/q{i}.jpg"
                                            for i, lab in enumerate(q_labels)],
                               names={i: f"Person_{i}" for i in range(num_people)},
                               num_examples=0)


@pytest.mark.parametrize("num_people", [5, 40])
def test_report_counts_and_single_query_identities(tmp_path, num_people):
    result = _closed_set_result(num_people)
    assert result["class_counts"]["queries"] == dict(min=1, median=2, max=2)
    assert result["class_counts"]["gallery"] == dict(min=6, median=6, max=6)
    R.write_report(result, str(tmp_path))
    md = (tmp_path / "report.md").read_text()
    page = (tmp_path / "report.html").read_text()
    line = (f"Per identity ({num_people}): queries 1 / 2 / 2, gallery 6 / 6 / 6 "
            f"(min / median / max).")
    assert line in md and line in page
    # The single-query identity that failed is listed first, marked, with its gallery count.
    assert "| identity | queries | gallery | Top-1 | Top-5 | mAP@R |" in md
    assert f"| Person_0 | {R.SINGLE} | 6 | 0.0000 |" in md
    assert R.SINGLE in page and "Person_0" in page
    table = [row for row in md.splitlines() if row.startswith("| Person_")]
    # Small sets list every identity; large ones the 10 hardest.
    assert len(table) == (num_people if num_people <= 30 else 10)
