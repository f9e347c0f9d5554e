"""Evaluation: closed-set and leave-one-out scoring, ANN recall, competition JSON, bad k."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
from test_index import two_people

from facejax.errors import ConfigError, DataError
from facejax.retrieval import competition
from facejax.retrieval import evaluate as E
from facejax.retrieval.index import SearchIndex

META = dict(model="toy", params_hash="c" * 64, embed_dim=2, normalization="unit",
            l2_normalized=True, metric="dot", input_size=4, resize_mode="crop")


def unit(deg):
    r = np.deg2rad(np.asarray(deg, np.float64))
    return np.stack([np.cos(r), np.sin(r)], axis=1).astype(np.float32)


# Gallery on the unit circle: identity 0 near 0 deg, identity 1 near 90 deg.
G_DEG = [0, 10, 20, 85, 95]
G_LAB = [0, 0, 0, 1, 1]
G_PATHS = ["ann/a0.jpg", "ann/a1.jpg", "ann/a2.jpg", "bob/b0.jpg", "bob/b1.jpg"]


def test_closed_set_by_hand():
    index = SearchIndex.build(unit(G_DEG), G_PATHS, G_LAB, META, backend="exact")
    # q0 (ann) at 5 deg: ranking 0,10,20,85,95 -> T T T F F.
    # q1 (bob) at 30 deg: ranking 20,10,0,85,95 -> F F F T T.
    q = unit([5, 30])
    r = E.evaluate_embeddings(q, np.array([0, 1]), index, ks=(1, 3), query_paths=["x/q0",
                                                                                 "y/q1"])
    m = r["metrics"]
    assert m["top1"] == 0.5 and m["top3"] == 0.5
    assert m["precision@3"] == pytest.approx((1 + 0) / 2)
    assert m["recall@3"] == pytest.approx((1 + 0) / 2)
    # AP@R: q0 R=3 -> 1; q1 R=2, top-2 both wrong -> 0.
    assert m["map@r"] == pytest.approx(0.5)
    assert r["num_queries"] == 2 and r["gallery_size"] == 5 and not r["leave_one_out"]
    assert [c["name"] for c in r["per_class"]] == ["ann", "bob"]
    assert r["ann_recall"] is None
    ex = {e["query"]: e for e in r["examples"]}
    assert [x["correct"] for x in ex["y/q1"]["results"]] == [False, False, False, True, True]
    assert ex["x/q0"]["results"][0]["path"] == "ann/a0.jpg"


def test_leave_one_out_drops_self():
    index = SearchIndex.build(unit(G_DEG), G_PATHS, G_LAB, META, backend="exact")
    emb = index.embeddings
    r = E.evaluate_embeddings(emb, np.array(G_LAB), index, ks=(1, 2),
                              self_rows=np.arange(5), query_paths=G_PATHS)
    # Without self every query's nearest is a same-identity item.
    assert r["metrics"]["top1"] == 1.0
    # b0's neighbours: b1 (10 deg), then a2 (65 deg): precision@2 = 1/2; others all 1.
    assert r["metrics"]["precision@2"] == pytest.approx((1 + 1 + 1 + 0.5 + 0.5) / 5)
    assert r["gallery_size"] == 4 and r["leave_one_out"]
    for ex in r["examples"]:
        assert ex["query"] not in [x["path"] for x in ex["results"]]
    with pytest.raises(DataError, match="k=5 but the gallery has only 4"):
        E.evaluate_embeddings(emb, np.array(G_LAB), index, ks=(5,), self_rows=np.arange(5))


def test_unlabelled_and_orphan_queries_are_counted_not_scored():
    index = SearchIndex.build(unit(G_DEG), G_PATHS, G_LAB, META, backend="exact")
    r = E.evaluate_embeddings(unit([0, 90, 45]), np.array([0, -1, 7]), index, ks=(1,))
    assert r["num_queries"] == 1 and r["num_queries_unlabelled"] == 1
    assert r["num_queries_without_relevant"] == 1 and r["metrics"]["top1"] == 1.0


class FakeEmbedder:
    """Stands in for an exported Embedder: the 'image' holds its embedding in pixel (0, 0)."""

    meta = META

    def embed_array(self, images, batch_size=256, progress=False, indices=None):
        x = images if indices is None else images[np.asarray(indices)]
        v = x[:, 0, 0, :2].astype(np.float32) - 128.0
        return v / np.linalg.norm(v, axis=1, keepdims=True)


def fake_data(loo):
    rng = np.random.default_rng(0)
    n, ids = 60, 6
    labels = np.repeat(np.arange(ids), n // ids).astype(np.int32)
    angles = labels * 60 + rng.uniform(-8, 8, n)
    images = np.zeros((n, 4, 4, 3), np.uint8)
    images[:, 0, 0, :2] = np.round(128 + 100 * unit(angles)).astype(np.uint8)
    paths = [f"p{lab}/img{i}.png" for i, lab in enumerate(labels)]
    sub = lambda idx: SimpleNamespace(indices=idx, labels=labels[idx])
    q, g = np.arange(0, n, 5), np.setdiff1d(np.arange(n), np.arange(0, n, 5))
    names = [f"c{i}" for i in range(ids)] if not loo else []
    return SimpleNamespace(images=images, paths=paths, identity_names=names,
                           query=sub(np.arange(n) if loo else q), gallery=None if loo else sub(g),
                           protocol="open_set" if loo else "closed_set")


@pytest.mark.slow
@pytest.mark.parametrize("loo", [False, True])
def test_evaluate_end_to_end(loo):
    data = fake_data(loo)
    r = E.evaluate(FakeEmbedder(), data, ks=(1, 5))
    assert r["metrics"]["top1"] == 1.0 and r["metrics"]["map@r"] == 1.0
    assert r["leave_one_out"] == loo
    assert r["num_queries"] == (60 if loo else 12)
    assert r["gallery_size"] == (59 if loo else 48)
    assert r["per_class"][0]["name"] == ("p0" if loo else "c0")
    assert "Top-1=1.0000" in E.result_summary(r)


@pytest.mark.slow
def test_scann_backend_reports_ann_recall():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((20, 16))
    labels = rng.integers(0, 20, 3000).astype(np.int32)
    x = centers[labels] + 0.3 * rng.standard_normal((3000, 16))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    meta = dict(META, embed_dim=16)
    index = SearchIndex.build(x[200:], [f"g{i}" for i in range(2800)], labels[200:], meta,
                              backend="scann")
    r = E.evaluate_embeddings(x[:200], labels[:200], index, ks=(1, 10))
    assert r["backend"] == "scann" and r["ann_recall"]["recall@10"] >= 0.9
    assert r["metrics"]["top1"] > 0.9


def test_competition_json(tmp_path):
    paths = ["gallery/a.jpg", "gallery/sub/b.jpg", "gallery/c.jpg"]
    index = SearchIndex.build(unit([0, 45, 90]), paths, None, META, backend="exact")
    mapping = competition.competition_topk(["query/q1.jpg", "query/q2.jpg"], unit([80, 5]),
                                           index, 2)
    assert mapping == {"q1.jpg": ["c.jpg", "sub/b.jpg"], "q2.jpg": ["a.jpg", "sub/b.jpg"]}
    out = tmp_path / "topk.json"
    competition.write_competition_json(mapping, str(out))
    assert json.loads(out.read_text()) == mapping
    with pytest.raises(DataError, match="k=4"):
        competition.competition_topk(["query/q1.jpg"], unit([80]), index, 4)


@pytest.mark.parametrize("ks", [(0, 5), ("a", 5), (1.5, 5), (), (True,), 3, None])
def test_bad_ks_are_config_errors(ks):
    index = SearchIndex.build(unit(G_DEG), G_PATHS, G_LAB, META, backend="exact")
    with pytest.raises(ConfigError, match="eval.ks must be"):
        E.evaluate_embeddings(unit([5]), np.array([0]), index, ks=ks)
    # evaluate() refuses before it embeds anything.
    with pytest.raises(ConfigError, match="eval.ks must be"):
        E.evaluate(None, fake_data(False), ks=ks)


def test_ks_accept_numpy_ints_and_duplicates():
    assert E.check_ks([np.int64(5), 1, 5]) == [1, 5]


@pytest.mark.parametrize("num", [-2, 1.5, True, "3"])
def test_bad_num_figure_queries(num):
    index = SearchIndex.build(unit(G_DEG), G_PATHS, G_LAB, META, backend="exact")
    with pytest.raises(ConfigError, match="num_figure_queries must be"):
        E.evaluate_embeddings(unit([5]), np.array([0]), index, ks=(1,), num_examples=num,
                              query_paths=["x/q"])
    with pytest.raises(ConfigError, match="num_figure_queries must be"):
        E.evaluate(None, fake_data(False), ks=(1,), num_examples=num)


def test_nothing_scored_summary_has_no_nan():
    index = SearchIndex.build(unit(G_DEG), G_PATHS, G_LAB, META, backend="exact")
    r = E.evaluate_embeddings(unit([0, 90]), np.array([-1, -1]), index, ks=(1,))
    line = E.result_summary(r)
    assert "nan" not in line.lower()
    assert "none of the 2 queries could be scored (2 unlabelled" in line


@pytest.fixture(scope="module")
def faces():
    x, y = two_people(1362)
    meta = dict(META, embed_dim=64)
    paths = [f"p{label}/img{i}.jpg" for i, label in enumerate(y)]
    untuned = SearchIndex.build(x, paths, y, meta, backend="scann", target_recall=0)
    exact = SearchIndex.build(x, paths, y, meta, backend="exact")
    kw = dict(ks=(1, 5, 10), self_rows=np.arange(len(x)), protocol="open_set")
    return x, y, untuned, E.evaluate_embeddings(x, y, exact, **kw), kw


@pytest.mark.slow
def test_metrics_come_from_exact_search_when_affordable(faces, tmp_path):
    from facejax.retrieval import report as R

    x, y, untuned, want, kw = faces
    got = E.evaluate_embeddings(x, y, untuned, **kw)
    assert got["search"]["metrics_from"] == "exact" and got["search"]["pairs"] == 1362 * 1362
    assert got["metrics"] == want["metrics"]
    # The served (untuned) setting is measured against exact search and flagged.
    assert got["ann_recall"]["recall@10"] < 0.6
    assert any("recall@10 against exact search on these queries is" in w
               for w in got["warnings"])
    assert any("never tuned" in w for w in got["warnings"])
    R.write_report(got, str(tmp_path))
    md = (tmp_path / "report.md").read_text()
    page = (tmp_path / "report.html").read_text()
    assert "**Warning: the ScaNN index's recall@10 against exact search on these queries" in md
    assert "<b>Warning: the ScaNN index&#x27;s recall@10 against exact search" in page
    assert ("Metrics from exact search (1,855,044 query x gallery pairs, within "
            "eval.exact_max_pairs=10,000,000,000), not from the scann index.") in md


@pytest.mark.slow
def test_metrics_beyond_the_bound_come_from_scann_tuned_for_their_depth(faces):
    from facejax.retrieval import report as R

    x, y, untuned, want, kw = faces
    before = dict(untuned.scann_params)
    got = E.evaluate_embeddings(x, y, untuned, exact_max_pairs=1000, **kw)
    s = got["search"]
    # mAP@R reads R (~680) results deep: the search is tuned for that depth, not for 10.
    assert s["metrics_from"] == "scann" and s["depth"] > 600
    assert s["tuned_for"] == f"recall@{s['depth']}" and s["depth_recall"] >= 0.93
    assert abs(got["metrics"]["map@r"] - want["metrics"]["map@r"]) < 0.03
    assert "Metrics from the ScaNN index re-tuned for recall@" in R.search_line(got)
    # The index itself is left as it was served.
    assert untuned.scann_params == before and untuned.tuning is None
    with pytest.raises(ConfigError, match="eval.exact_max_pairs must be a whole number"):
        E.evaluate_embeddings(x, y, untuned, exact_max_pairs=-1, **kw)


@pytest.mark.slow
def test_chance_levels_are_what_random_rankings_score():
    from facejax.retrieval import metrics as M

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 40)
    n, ks = len(labels), (1, 5, 10)
    num_rel = M.count_relevant(labels, labels, leave_one_out=True)
    want = E.chance_levels(num_rel, n - 1, ks)
    others = np.array([np.delete(np.arange(n), i) for i in range(n)])  # [Q, n-1]
    sums = {}
    trials = 3000
    for _ in range(trials):
        order = np.argsort(rng.random(others.shape), axis=1)
        rel = labels[np.take_along_axis(others, order, axis=1)] == labels[:, None]
        for key, v in M.per_query_metrics(rel, num_rel, ks).items():
            sums[key] = sums.get(key, 0.0) + v.mean() / trials
    assert set(want) == set(sums)
    for key in sums:
        assert want[key] == pytest.approx(sums[key], abs=0.006), key


def test_open_set_results_state_their_held_out_identities_and_chance(tmp_path):
    from facejax.retrieval import report as R

    x, y = two_people(300, d=8)
    paths = [f"p{label}/img{i}.jpg" for i, label in enumerate(y)]
    index = SearchIndex.build(x, paths, y, dict(META, embed_dim=8), backend="exact")
    r = E.evaluate_embeddings(x, y, index, ks=(1, 5), self_rows=np.arange(300),
                              protocol="open_set")
    assert r["held_out_identities"] == 2
    assert r["chance"]["top1"] == pytest.approx(0.5, abs=0.02)
    assert any("only 2 held-out identities (fewer than 10)" in w for w in r["warnings"])
    assert f"(2 held-out identities; chance Top-1={r['chance']['top1']:.4f}" in \
        E.result_summary(r)
    R.write_report(r, str(tmp_path))
    md = (tmp_path / "report.md").read_text()
    assert "**Warning: only 2 held-out identities (fewer than 10)" in md
    assert "Held-out identities (never trained on): 2" in md
    assert f"| chance, k=1 | {r['chance']['top1']:.4f} |" in md
    assert f"(chance {r['chance']['map@r']:.4f}; 2 held-out identities)" in md
    table = R.compare_table([("a", r)]).splitlines()
    assert table[0].endswith("| Held-out identities | Top-1 by chance |")
    assert table[2].endswith(f"| 2 | {r['chance']['top1']:.4f} |")
    # A closed-set result carries none of it.
    closed = E.evaluate_embeddings(x[:50], y[:50], index, ks=(1,))
    assert closed["held_out_identities"] is None and not closed["warnings"]
    assert not any(row[0].startswith("chance") for row in R.metric_rows(closed)[1])
