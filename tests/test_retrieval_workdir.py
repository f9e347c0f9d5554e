"""The retrieval scripts on a tiny workdir: build_index -> eval_topk -> search -> compare_runs."""

import importlib.util
import json
import os
import pathlib
import re

import numpy as np
import pytest
from conftest import colour_embedder, make_run, write_image_folder
from PIL import Image

from facejax.errors import CheckpointError, ConfigError, DataError
from facejax.retrieval import embed
from facejax.retrieval import workdir as wd
from facejax.retrieval.index import read_manifest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = {f"person_{c}": 6 for c in "abcdef"}


def _script(name):
    spec = importlib.util.spec_from_file_location(f"_script_{name}",
                                                  os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _json(*parts):
    return json.loads(pathlib.Path(*parts).read_text())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wd")
    root = str(tmp / "images")
    write_image_folder(root, CLASSES, size=(20, 16))
    work = make_run(tmp, root)
    assert _script("build_index").main(["--workdir", work, "--no_progress"]) == 0
    assert _script("eval_topk").main(["--workdir", work, "--no_progress"]) == 0
    return work, root


@pytest.mark.slow
def test_build_and_evaluate(run):
    work, _ = run
    assert os.path.isfile(os.path.join(work, "index", "manifest.json"))
    assert not os.path.exists(os.path.join(work, "index_work"))
    manifest = _json(work, "index", "manifest.json")
    assert manifest["backend"] == "exact" and manifest["info"]["protocol"] == "closed_set"
    report = _json(work, "report", "report.json")
    assert report["metrics"]["top1"] == 1.0 and report["metrics"]["map@r"] == 1.0
    # Queries and gallery are disjoint parts of the 36 images (validation images sit out).
    assert report["num_queries"] > 0 and report["num_queries"] + report["gallery_size"] <= 36
    assert manifest["count"] == report["gallery_size"]
    assert sorted(os.listdir(os.path.join(work, "report"))) == [
        "report.html", "report.json", "report.md", "topk_examples.png"]
    md = pathlib.Path(work, "report", "report.md").read_text()
    assert "../plots/loss.png" in md and "closed_set" in md


def test_search_file_folder_and_errors(run, tmp_path, capsys):
    work, root = run
    query = os.path.join(root, "person_c", "person_c_000.png")
    grid = str(tmp_path / "grid.png")
    assert _script("search").main(["--workdir", work, "--query", query, "--k", "3",
                                   "--json", "--out", grid]) == 0
    out = json.loads(capsys.readouterr().out)
    results = out["queries"][0]["results"]
    assert len(results) == 3 and results[0]["name"] == "person_c"
    assert results[0]["path"].startswith("person_c/") and results[0]["score"] > 0.99
    assert os.path.getsize(grid) > 0
    folder = tmp_path / "queries"
    folder.mkdir()
    Image.open(query).save(folder / "good.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    res = wd.search_workdir(work, str(folder), 2)
    assert len(res["queries"]) == 1 and res["skipped"][0]["path"].endswith("broken.jpg")
    assert "person_c" in wd.format_search_table(res)
    with pytest.raises(DataError, match="cannot use query image"):
        wd.search_workdir(work, str(folder / "broken.jpg"), 2)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="has no images"):
        wd.search_workdir(work, str(empty), 2)
    with pytest.raises(DataError, match="k=99"):
        wd.search_workdir(work, query, 99)


def test_compare_runs(run, tmp_path, capsys):
    work, _ = run
    out = tmp_path / "table.md"
    assert _script("compare_runs").main([work, work, "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[0].startswith("| Model | Top-1 | Top-5 | Top-10 | Precision@3 | mAP@R | F1@3")
    assert lines[2].startswith("| colour (run_folder) | 1.0000 | – | – |")
    with pytest.raises(DataError, match="run scripts/eval_topk.py"):
        wd.compare_workdirs([str(tmp_path)])


def test_index_from_another_embedder_is_refused(run, tmp_path):
    work, root = run
    other = make_run(tmp_path, root, centre=(0.4, 0.5, 0.5))
    os.symlink(os.path.join(work, "index"), os.path.join(other, "index"))
    with pytest.raises(CheckpointError, match="different embedder: params_hash"):
        wd.evaluate_workdir(other, wd.read_run_config(other), progress=False)


def test_competition_layout(tmp_path, capsys):
    root = tmp_path / "comp"
    write_image_folder(str(root / "training"), {"x": 3, "y": 3}, size=(20, 16))
    # Loose query/gallery files: unlabelled, as in a competition.
    write_image_folder(str(tmp_path / "loose"), {"x": 2, "y": 2}, size=(20, 16), seed=1)
    for part, names in (("query", ["x/x_000.png"]), ("gallery", ["x/x_001.png", "y/y_000.png",
                                                                 "y/y_001.png"])):
        (root / part).mkdir()
        for n in names:
            os.replace(tmp_path / "loose" / n, root / part / os.path.basename(n))
    work = make_run(tmp_path, str(root), source="competition")
    assert _script("build_index").main(["--workdir", work, "--no_progress"]) == 0
    capsys.readouterr()
    assert _script("eval_topk").main(["--workdir", work, "--no_progress"]) == 0
    out = capsys.readouterr().out
    path = os.path.join(work, "report", wd.COMPETITION_JSON)
    # No labelled query: one clear line about the ranking file, no table of NaNs.
    assert f"ranking of 1 queries (1 unlabelled) to {path}" in out
    assert "none of the 1 queries could be scored" in out
    assert "nan" not in out.lower() and "Top-k" not in out
    result = _json(work, "report", "report.json")
    assert result["num_queries"] == 0 and result["num_queries_unlabelled"] == 1
    assert result["competition_json"] == wd.COMPETITION_JSON
    assert "nan" not in pathlib.Path(work, "report", "report.md").read_text().lower()
    mapping = _json(work, "report", wd.COMPETITION_JSON)
    assert list(mapping) == ["x_000.png"]
    assert mapping["x_000.png"][0] == "x_001.png" and len(mapping["x_000.png"]) == 3


@pytest.mark.parametrize("override, match", [
    ("--config.eval.ks=(0,5)", "eval.ks must be"),
    ("--config.eval.num_figure_queries=-2", "num_figure_queries must be"),
])
def test_eval_topk_bad_settings_are_config_errors(run, override, match):
    work, _ = run
    with pytest.raises(ConfigError, match=match):
        _script("eval_topk").main(["--workdir", work, "--no_progress", override])


def test_bad_ks_reach_evaluate_as_config_errors(run):
    # Whatever the override parser lets through, evaluation refuses non-integer or < 1 ks.
    work, _ = run
    for ks in [("a", 5), (1.5, 5), (0, 5)]:
        cfg = wd.read_run_config(work)
        cfg.eval.ks = ks
        with pytest.raises(ConfigError, match="eval.ks must be"):
            wd.evaluate_workdir(work, cfg, progress=False)
        with pytest.raises(ConfigError, match="eval.ks must be"):
            wd.build_workdir_index(work, cfg, progress=False)


def test_build_index_target_recall(run, capsys):
    work, _ = run
    with pytest.raises(ConfigError, match=r"target_recall must be in \(0, 1\]"):
        _script("build_index").main(["--workdir", work, "--no_progress",
                                     "--target_recall", "1.5"])
    with pytest.raises(ConfigError, match="index.backend must be one of"):
        _script("build_index").main(["--workdir", work, "--no_progress",
                                     "--config.index.backend=faiss"])
    with pytest.raises(ConfigError, match=r"index.scann_init .* must be one of"):
        _script("build_index").main(["--workdir", work, "--no_progress",
                                     "--config.index.scann_init=kmeans"])
    capsys.readouterr()
    assert _script("build_index").main(["--workdir", work, "--no_progress", "--backend",
                                        "scann", "--target_recall", "0.9",
                                        "--config.index.scann_init=kmeans++"]) == 0
    out = capsys.readouterr().out
    assert read_manifest(os.path.join(work, "index"))["scann"]["init"] == "kmeans++"
    assert re.search(r"tuned: leaves_to_search=\d+ reorder=\d+ recall@\d+=[\d.]+ on \d+ gallery "
                     r"queries, [\d.-]+ less 2 standard errors \(target 0.9, (met|NOT met)\)",
                     out), out
    assert _script("build_index").main(["--workdir", work, "--no_progress", "--backend",
                                        "exact", "--target_recall", "0.9"]) == 0
    out = capsys.readouterr().out
    assert "note: target_recall=0.9 does not apply: the index uses exact search" in out


def test_a_run_saved_before_scann_init_takes_the_default_or_an_override(run, tmp_path):
    import shutil

    work = str(tmp_path / "old")
    shutil.copytree(run[0], work)
    path = os.path.join(work, "config.json")
    with open(path) as f:
        config = json.load(f)
    del config["index"]["scann_init"]
    with open(path, "w") as f:
        json.dump(config, f)
    assert wd.read_run_config(work).index.scann_init == "random"
    assert _script("build_index").main(["--workdir", work, "--no_progress", "--backend",
                                        "scann", "--config.index.scann_init=kmeans++"]) == 0
    assert read_manifest(os.path.join(work, "index"))["scann"]["init"] == "kmeans++"


def test_compare_runs_refuses_incomplete_reports(tmp_path):
    bad = tmp_path / "bad"
    (bad / "report").mkdir(parents=True)
    path = str(bad / "report" / "report.json")
    for content, match in [({}, "is incomplete .no ks, metrics, protocol"),
                           ({"ks": [1], "metrics": {}}, "is incomplete .no protocol"),
                           ([1, 2], "is not a report"),
                           (dict(ks=["a"], metrics={}, protocol="p", num_queries=1,
                                 gallery_size=2), "'ks' must be"),
                           (dict(ks=[1], metrics={"top1": "x"}, protocol="p", num_queries=1,
                                 gallery_size=2), "'metrics' must map")]:
        pathlib.Path(path).write_text(json.dumps(content))
        with pytest.raises(DataError, match=match) as e:
            _script("compare_runs").main([str(bad)])
        assert path in str(e.value)


def test_search_out_paths_k_and_pixel_limit(run, tmp_path, capsys):
    work, root = run
    query = os.path.join(root, "person_a", "person_a_000.png")
    grid = tmp_path / "new" / "deeper" / "g.png"
    assert _script("search").main(["--workdir", work, "--query", query, "--k", "2",
                                   "--out", str(grid)]) == 0
    assert grid.stat().st_size > 0
    folder = tmp_path / "grids"
    assert _script("search").main(["--workdir", work, "--query", query, "--k", "2",
                                   "--out", str(folder) + "/"]) == 0
    assert (folder / "search.png").stat().st_size > 0
    capsys.readouterr()
    with pytest.raises(DataError, match="k must be a whole number of at least 1, got 0"):
        _script("search").main(["--workdir", work, "--query", query, "--k", "0"])
    # The query images are 20x16 = 320 pixels: the run's pixel limit applies to them.
    with pytest.raises(DataError, match="cannot use query image"):
        _script("search").main(["--workdir", work, "--query", query,
                                "--config.data.max_pixels=100"])
    cfg = wd.read_run_config(work)
    cfg.data.max_pixels = 100
    with pytest.raises(DataError, match="cannot use query image"):
        wd.search_workdir(work, query, 2, config=cfg)


def test_read_run_config_refuses_foreign_files(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="expected a JSON object"):
        wd.read_run_config(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"seed": 0, "data": {"source": "folder"}}))
    with pytest.raises(CheckpointError, match="lacks model.name, data.root"):
        wd.read_run_config(str(tmp_path))


def test_embedders_face_crop_reaches_index_and_queries(tmp_path, capsys):
    """An embedder exported with data.face_crop gets that crop for the gallery and for search
    queries, whatever the run config says (as cache_size and resize_mode)."""
    root = tmp_path / "imgs"
    write_image_folder(root, CLASSES, size=(16, 16))
    work = make_run(tmp_path, str(root))
    meta = dict(model="colour", input_size=16, resize_mode="crop", normalization="unit",
                face_crop=[0.0, 0.0, 1.0, 0.5])  # the left half only
    embed.export_embedder(colour_embedder, {"centre": np.array((0.5,) * 3, np.float32)}, meta,
                          os.path.join(work, "embedder"))
    cfg = wd.read_run_config(work)
    assert wd.run_face_crop(cfg, meta) == (0.0, 0.0, 1.0, 0.5)
    assert "using the embedder's data.face_crop" in capsys.readouterr().out
    wd.build_workdir_index(work, cfg, progress=False)
    # Left half: person_b's colour; right half: person_a's. Only the left half is seen.
    from conftest import class_colour
    pixels = np.zeros((16, 16, 3), np.uint8)
    pixels[:, :8], pixels[:, 8:] = class_colour(1), class_colour(0)
    Image.fromarray(pixels).save(tmp_path / "q.png")
    result = wd.search_workdir(work, str(tmp_path / "q.png"), k=1, config=cfg)
    assert result["queries"][0]["results"][0]["name"] == "person_b"


def test_search_marks_results_below_the_calibrated_threshold(run, capsys):
    """A person who is not in the gallery still has nearest neighbours: below the run's
    calibrated same-person threshold they are marked 'no match'."""
    work, root = run
    query = os.path.join(root, "person_c", "person_c_000.png")
    args = ["--workdir", work, "--query", query, "--k", "6"]
    # The run's evaluation measured open-set rejection; without it, the pair threshold rules.
    report_json = pathlib.Path(work, "report", "report.json")
    evaluated = report_json.read_text()
    report_json.write_text(json.dumps({k: v for k, v in json.loads(evaluated).items()
                                       if k != "rejection"}))
    assert _script("search").main(args + ["--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["threshold"] is None
    assert all(r["match"] is None for r in plain["queries"][0]["results"])
    scores = [r["score"] for r in plain["queries"][0]["results"]]
    cut = (scores[0] + scores[-1]) / 2
    report = pathlib.Path(work, "report", "verification.json")
    report.write_text(json.dumps(dict(metric="cosine", best_threshold_all=cut)))
    try:
        assert _script("search").main(args + ["--json"]) == 0  # auto: the calibrated one
        res = json.loads(capsys.readouterr().out)
        assert res["threshold"] == cut
        assert [r["match"] for r in res["queries"][0]["results"]] == [s >= cut for s in scores]
        assert _script("search").main(args) == 0
        table = capsys.readouterr().out
        assert "no match" in table and f"{cut:.4f}" in table
        assert _script("search").main(args + ["--json", "--threshold", "none"]) == 0
        assert json.loads(capsys.readouterr().out)["threshold"] is None
        with pytest.raises(ConfigError, match="threshold"):
            _script("search").main(args + ["--threshold", "2"])
        # With the open-set figures back, auto takes the threshold that accepts 5% of unknown
        # people instead of the pair one.
        report_json.write_text(evaluated)
        open_set = [r["threshold"] for r in json.loads(evaluated)["rejection"]["tradeoff"]
                    if r["target_false_accept"] == 0.05]
        assert len(open_set) == 1 and open_set[0] != cut
        assert _script("search").main(args + ["--json"]) == 0
        assert json.loads(capsys.readouterr().out)["threshold"] == open_set[0]
    finally:
        report.unlink()
        report_json.write_text(evaluated)


def test_a_scann_index_below_its_target_is_flagged_in_bold(run, tmp_path, monkeypatch, capsys):
    """Every setting measured below the target (as on a gallery ScaNN cannot serve well):
    build_index and eval_topk say so in bold on stdout, and the report does too."""
    import shutil

    from facejax.retrieval import metrics

    work = str(tmp_path / "miss")
    shutil.copytree(run[0], work)
    monkeypatch.setattr(metrics, "ann_recall_per_query",
                        lambda approx, exact, k: np.zeros(len(approx)))
    capsys.readouterr()
    assert _script("build_index").main(["--workdir", work, "--no_progress",
                                        "--backend", "scann"]) == 0
    out = capsys.readouterr().out
    assert "(target 0.95, NOT met)" in out
    assert "**WARNING: this ScaNN index serves recall@3 0.0000, below its target 0.95" in out
    assert _script("eval_topk").main(["--workdir", work, "--no_progress"]) == 0
    out = capsys.readouterr().out
    assert "**Warning: the ScaNN index serves a setting below its target: recall@3" in out
    assert "**Warning: the ScaNN index's recall@3 against exact search on these queries" in out
    assert "Metrics from exact search" in out
    md = pathlib.Path(work, "report", "report.md").read_text()
    assert "**Warning: the ScaNN index serves a setting below its target" in md
    assert "tuned at build for recall@3 >= 0.95" in md and "(NOT met)" in md


def test_open_set_with_a_holdout_count_through_the_scripts(run, tmp_path, capsys):
    import shutil

    work = str(tmp_path / "open")
    shutil.copytree(run[0], work)
    overrides = ["--config.data.protocol=open_set", "--config.data.open_set_holdout=3",
                 "--config.data.open_set_min_images=2"]
    assert _script("build_index").main(["--workdir", work, "--no_progress"] + overrides) == 0
    assert "holds out only 3 identities (fewer than 10)" in capsys.readouterr().out
    assert _script("eval_topk").main(["--workdir", work, "--no_progress"] + overrides) == 0
    out = capsys.readouterr().out
    assert "Held-out identities (never trained on): 3" in out
    assert "**Warning: only 3 held-out identities (fewer than 10)" in out
    assert re.search(r"chance, k=1 +0\.\d{4}", out), out
    result = _json(work, "report", "report.json")
    assert result["held_out_identities"] == 3 and result["protocol"] == "open_set"
    assert 0 < result["chance"]["top1"] < 1


def test_the_report_says_when_training_kept_its_starting_point(run, tmp_path, capsys):
    import shutil

    work = str(tmp_path / "kept")
    shutil.copytree(run[0], work)
    metrics = pathlib.Path(work, "metrics.jsonl")
    rows = [dict(epoch=0, best=True), dict(epoch=1, best=False), dict(epoch=2, best=False)]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _script("eval_topk").main(["--workdir", work, "--no_progress"]) == 0
    md = pathlib.Path(work, "report", "report.md").read_text()
    assert "training did not beat the starting point: no epoch of 2" in md
    rows[2]["best"] = True  # a trained epoch won: nothing to say
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert wd.kept_starting_point(work) == ""
    metrics.unlink()
    assert wd.kept_starting_point(work) == ""


def _verification(threshold):
    return dict(name="LFW", metric="cosine", accuracy=0.99, accuracy_std=0.004, num_folds=10,
                auc=0.998, tar_at_far={"0.001": dict(tar=0.95, far=0.001, threshold=0.97)},
                best_threshold_all=threshold, best_accuracy_all=0.99, num_pairs=6000,
                model="colour", input_size=16, resize_mode="crop", face_crop=[])


@pytest.mark.slow
def test_report_has_the_calibrated_threshold_and_open_set_rejection(run, tmp_path, capsys):
    """Identities held out of the gallery play unknown people: at the run's calibrated
    threshold (report/verification.json) eval_topk and the report give how many are
    rejected, and the false-accept / false-reject trade-off."""
    import shutil

    work = str(tmp_path / "calibrated")
    shutil.copytree(run[0], work)
    pathlib.Path(work, "report", "verification.json").write_text(json.dumps(_verification(0.999)))
    capsys.readouterr()
    assert _script("eval_topk").main(["--workdir", work, "--no_progress"]) == 0
    out = capsys.readouterr().out
    # Flat colours: another person scores far below 0.999, the same person about 1.
    line = ("Open-set rejection at the calibrated threshold 0.9990 (report/verification.json): "
            "100.0% of unknown people correctly rejected (0.0% falsely accepted); known people: "
            "0.0% falsely rejected, 100.0% accepted and identified correctly")
    assert line in out
    md = pathlib.Path(work, "report", "report.md").read_text()
    page = pathlib.Path(work, "report", "report.html").read_text()
    assert line in md and line in page
    assert "| threshold | set by | unknown rejected | false accept |" in md
    assert "| 0.9990 | calibrated | 100.0% | 0.0% | 0.0% | 100.0% |" in md
    assert "Same-person threshold: 0.9990 (calibrated by pair verification, " \
           "report/verification.json)" in md
    rej = _json(work, "report", "report.json")["rejection"]
    assert rej["held_out_identities"] >= 1 and rej["at_threshold"]["rejection"] == 1.0
    # A threshold below another person's score accepts the unknown people: the report says so.
    pathlib.Path(work, "report", "verification.json").write_text(json.dumps(_verification(-1.0)))
    assert _script("eval_topk").main(["--workdir", work, "--no_progress"]) == 0
    assert "0.0% of unknown people correctly rejected" in capsys.readouterr().out
    # Without a calibrated threshold: the trade-off only, and how to get one.
    os.remove(os.path.join(work, "report", "verification.json"))
    assert _script("eval_topk").main(["--workdir", work, "--no_progress",
                                      "--config.eval.rejection_holdout=0.5"]) == 0
    assert "no calibrated same-person threshold (run scripts/eval_verification.py" in \
        capsys.readouterr().out
    with pytest.raises(ConfigError, match="rejection_holdout"):
        _script("eval_topk").main(["--workdir", work, "--config.eval.rejection_holdout=1.5"])


def test_report_says_what_was_trained_and_whether_it_helped(run, tmp_path):
    import shutil

    work = str(tmp_path / "trained")
    shutil.copytree(run[0], work)
    pathlib.Path(work, "report", "verification.json").write_text(json.dumps(_verification(0.9)))
    cfg = _json(work, "config.json")
    cfg["model"].update(pretrained="imagenet", weights_source="dlib")
    cfg["train"].update(finetune="last_n", trainable_last_n=2, epochs=5, head_init="imprint")
    pathlib.Path(work, "config.json").write_text(json.dumps(cfg))
    rows = [dict(epoch=0, val_top1=0.8, best=True), dict(epoch=1, val_top1=0.9, best=True),
            dict(epoch=2, val_top1=0.85, best=False)]
    pathlib.Path(work, "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _script("eval_topk").main(["--workdir", work, "--no_progress"]) == 0
    md = pathlib.Path(work, "report", "report.md").read_text()
    page = pathlib.Path(work, "report", "report.html").read_text()
    report = _json(work, "report", "report.json")
    n = report["run"]["data"]
    expected = [
        "## The run",
        "- Model: `colour`",
        "- Weights: the published pretrained weights (weights source: dlib)",
        "- Layers trained: the last 2 backbone layers and the head (the rest frozen); head "
        "initialised from class means (imprint)",
        "- Epochs run: 2 of 5 planned (stopped early)",
        "- Validation retrieval Top-1: 0.8000 at the start (epoch 0); best 0.9000 at epoch 1 "
        "(the exported model); +0.1000 over the start",
        f"- Data: {n['images']} images, 6 training classes; train {n['train']}, validation "
        f"{n['val']}, queries {report['num_queries_total']}, gallery {report['gallery_size']}",
        "## Pair verification",
        "**LFW verification**: 99.00 ± 0.40 % (10-fold), AUC 0.9980, TAR@FAR=0.001 95.00 % — "
        "6000 pairs, cosine, model colour",
        "## Training curves",
        "Classifier accuracy is the training head's softmax over the training classes",
    ]
    for text in expected:
        assert text in md, text
    assert "Layers trained: the last 2 backbone layers" in page and "LFW verification" in page
    assert n["images"] == 36 and n["train"] + n["val"] + n["queries"] == 36
    assert n["unused"] == 0 and "in none of these" not in md
    from facejax.retrieval.run_info import run_lines
    lines = run_lines(dict(report["run"], data=dict(n, images=40, unused=4)))
    assert lines[-1].endswith("; 4 images in none of these (classes too small to split)")
    # No epoch beat the start: the report says the start was kept.
    rows[1]["best"] = False
    pathlib.Path(work, "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _script("eval_topk").main(["--workdir", work, "--no_progress"]) == 0
    md = pathlib.Path(work, "report", "report.md").read_text()
    assert ("best 0.8000 at epoch 0 (the exported model); no epoch beat the starting point, "
            "which was kept") in md
    # A run from scratch, no epoch-0 score, no verification.
    os.remove(os.path.join(work, "report", "verification.json"))
    cfg["model"].update(pretrained="")
    cfg["train"].update(finetune="all", head_init="random", epochs=2)
    pathlib.Path(work, "config.json").write_text(json.dumps(cfg))
    rows = [dict(epoch=1, val_top1=0.7, best=True), dict(epoch=2, val_top1=0.75, best=True)]
    pathlib.Path(work, "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _script("eval_topk").main(["--workdir", work, "--no_progress"]) == 0
    md = pathlib.Path(work, "report", "report.md").read_text()
    assert "- Weights: random initialisation (trained from scratch)" in md
    assert "- Layers trained: all layers; head initialised at random" in md
    assert "- Epochs run: 2\n" in md
    assert "not scored at the start (random initialisation); best 0.7500 at epoch 2" in md
    assert "## Pair verification" not in md
