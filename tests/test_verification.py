"""Pair verification: pairs-file parsing, the k-fold threshold protocol, and a run end to end."""

import importlib.util
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import class_colour, load_common_configs
from PIL import Image

from facejax.config import to_json
from facejax.errors import ConfigError, DataError
from facejax.retrieval import embed
from facejax.retrieval import verification as V
from facejax.retrieval.verify_run import find_pairs_file, verify_workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_pairs(path, folds, header=None):
    """folds: list of (same [(name, n1, n2)], diff [(name1, n1, name2, n2)])."""
    per = len(folds[0][0])
    lines = [header if header is not None else f"{len(folds)}\t{per}"]
    for same, diff in folds:
        lines += ["\t".join(map(str, s)) for s in same]
        lines += ["\t".join(map(str, d)) for d in diff]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


FOLDS = [([("Ann", 1, 2), ("Bob", 1, 3)], [("Ann", 1, "Cy", 1), ("Bob", 2, "Dee", 1)]),
         ([("Cy", 1, 2), ("Dee", 1, 2)], [("Cy", 2, "Ann", 3), ("Dee", 2, "Bob", 1)])]
COUNTS = {"Ann": 3, "Bob": 3, "Cy": 2, "Dee": 2}


def write_lfw(root, counts=COUNTS, size=20):
    """`root/Name/Name_0001.jpg`, each person a solid colour (+ a little noise)."""
    rng = np.random.default_rng(0)
    for k, (name, n) in enumerate(sorted(counts.items())):
        os.makedirs(root / name, exist_ok=True)
        for i in range(1, n + 1):
            px = np.clip(np.array(class_colour(k)) + rng.integers(-3, 4, (size, size, 3)), 0, 255)
            Image.fromarray(px.astype(np.uint8)).save(root / name / f"{name}_{i:04d}.jpg",
                                                      quality=95)
    return str(root)


# ----------------------------------------------------------------------------- parsing

def test_read_pairs_good_file(tmp_path):
    root = write_lfw(tmp_path / "lfw")
    pairs = V.read_pairs(write_pairs(tmp_path / "pairs.txt", FOLDS), root=root)
    assert len(pairs) == 8 and pairs.num_folds == 2
    assert pairs.left[0] == "Ann/Ann_0001.jpg" and pairs.right[0] == "Ann/Ann_0002.jpg"
    assert pairs.left[2] == "Ann/Ann_0001.jpg" and pairs.right[2] == "Cy/Cy_0001.jpg"
    assert pairs.same.tolist() == [True, True, False, False] * 2
    assert pairs.fold.tolist() == [0] * 4 + [1] * 4
    assert pairs.lines.tolist() == list(range(2, 10))
    assert len(pairs.images()) == len(set(pairs.images())) == 10
    assert pairs.summary() == ("8 pairs (4 same, 4 different) in 2 folds over 10 images of "
                               "4 identities")
    kept = pairs.subset(np.arange(8) % 2 == 0)
    assert len(kept) == 4 and kept.lines.tolist() == [2, 4, 6, 8]


@pytest.mark.parametrize("edit, match", [
    (lambda f: f[0][0].__setitem__(1, ("Bob", 1)), r"line 3: expected a same-person"),
    (lambda f: f[1][1].__setitem__(0, ("Cy", 2, "Ann")), r"line 8: expected a different-person"),
    (lambda f: f[0][0].__setitem__(0, ("Ann", "one", 2)), r"line 2: image number 'one'"),
    (lambda f: f[0][1].__setitem__(0, ("Ann", 0, "Cy", 1)), r"line 4: image numbers start at 1"),
])
def test_malformed_lines_name_their_line(tmp_path, edit, match):
    folds = [([*s], [*d]) for s, d in FOLDS]
    edit(folds)
    with pytest.raises(DataError, match=match):
        V.read_pairs(write_pairs(tmp_path / "pairs.txt", folds))


@pytest.mark.parametrize("header, match", [
    ("ten 300", r"line 1: expected the header"),
    ("1 4", r"at least 2 folds"),
    ("3 2", r"promises 3 folds x 2 x 2 = 12 pairs, the file has 8"),
])
def test_bad_header(tmp_path, header, match):
    with pytest.raises(DataError, match=match):
        V.read_pairs(write_pairs(tmp_path / "pairs.txt", FOLDS, header=header))


def test_missing_and_empty_files_and_images(tmp_path):
    with pytest.raises(DataError, match="not found"):
        V.read_pairs(str(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="is empty"):
        V.read_pairs(str(tmp_path / "empty.txt"))
    root = write_lfw(tmp_path / "lfw", {**COUNTS, "Bob": 2})  # Bob_0003 is missing
    path = write_pairs(tmp_path / "pairs.txt", FOLDS)
    with pytest.raises(DataError, match=r"1 images .* missing .*Bob/Bob_0003.jpg \(line 3\)"):
        V.read_pairs(path, root=root)
    with pytest.raises(DataError, match="image folder .* not found"):
        V.read_pairs(path, root=str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------- protocol

def synthetic(n_folds=10, per_fold=60, noise=0.0, dim=16, seed=0):
    """Pairs of embeddings: same pairs share an identity vector; optional noise."""
    rng = np.random.default_rng(seed)
    n = n_folds * per_fold
    same = np.tile(np.arange(per_fold) < per_fold // 2, n_folds)
    fold = np.repeat(np.arange(n_folds), per_fold)
    a = rng.standard_normal((n, dim))
    b = np.where(same[:, None], a, rng.standard_normal((n, dim)))
    b = b + noise * rng.standard_normal((n, dim))
    return a, b, same, fold


def test_separable_embeddings_score_one():
    a, b, same, fold = synthetic(noise=0.3)
    res = V.k_fold_verification(V.pair_scores(a, b), same, fold)
    assert res["accuracy"] == 1.0 and res["accuracy_std"] == 0.0
    assert res["auc"] == 1.0 and res["tar_at_far"]["0.001"]["tar"] == 1.0
    assert res["num_folds"] == 10 and len(res["thresholds"]) == 10
    assert res["num_pairs"] == 600 and res["num_same"] == 300
    assert json.loads(json.dumps(res)) == res  # JSON-able as written to the report


def test_random_embeddings_score_about_half():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((2, 4000, 16))
    same = np.tile([True, False], 2000)
    fold = np.repeat(np.arange(10), 400)
    res = V.k_fold_verification(V.pair_scores(a, b), same, fold)
    assert 0.44 < res["accuracy"] < 0.56
    assert 0.45 < res["auc"] < 0.55


def test_threshold_comes_from_the_other_folds():
    # Folds 1-2 separate at 0.5 (same 0.9, different 0.1); fold 0's pairs score lower (0.45 /
    # 0.05). Chosen on folds 1-2 alone, fold 0's threshold is 0.5 and it gets half its pairs
    # right; had fold 0 taken part, 0.275 would have scored it perfectly.
    scores = np.array([0.45, 0.45, 0.05, 0.05] + [0.9, 0.9, 0.1, 0.1] * 2)
    same = np.array([True, True, False, False] * 3)
    fold = np.repeat([0, 1, 2], 4)
    res = V.k_fold_verification(scores, same, fold)
    assert res["fold_accuracies"] == [0.5, 1.0, 1.0]
    assert res["thresholds"] == pytest.approx([0.5, 0.275, 0.275])
    assert res["accuracy"] == pytest.approx(2.5 / 3)
    assert res["best_accuracy_all"] == 1.0


def test_best_threshold_takes_the_middle_of_tied_cuts():
    # Every cut between 1 and 4 is perfect; the middle one is chosen, not an end.
    t, acc = V.best_threshold(np.array([0.0, 1.0, 2.0, 3.0, 4.0, 5.0]),
                              np.array([False, False, False, True, True, True]))
    assert (t, acc) == (2.5, 1.0)
    t, acc = V.best_threshold(np.array([1.0, 1.0]), np.array([True, True]))
    assert acc == 1.0 and t < 1.0  # all same: the cut lies below every score


def test_cosine_and_euclidean_agree_on_unit_vectors():
    a, b, same, fold = synthetic(noise=1.2, seed=3)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    cos = V.k_fold_verification(V.pair_scores(a, b, "cosine"), same, fold, metric="cosine")
    euc = V.k_fold_verification(V.pair_scores(a, b, "euclidean"), same, fold,
                                metric="euclidean")
    assert 0.6 < cos["accuracy"] < 1.0  # a case where the threshold matters
    assert cos["fold_accuracies"] == euc["fold_accuracies"]
    assert cos["auc"] == pytest.approx(euc["auc"])
    assert cos["tar_at_far"]["0.001"]["tar"] == euc["tar_at_far"]["0.001"]["tar"]
    # Euclidean thresholds are distances (same if closer); ||a-b||^2 = 2 - 2cos maps one onto
    # the other up to where in the gap between neighbouring scores each cut falls.
    d = np.sqrt(2 - 2 * np.array(cos["thresholds"]))
    assert np.all(np.array(euc["thresholds"]) > 0)
    assert np.allclose(d, euc["thresholds"], atol=0.05)


def test_dlib_fixed_rule_and_raw_euclidean():
    a = np.zeros((4, 3))
    b = np.array([[0.5, 0, 0], [0.59, 0, 0], [0.61, 0, 0], [2.0, 0, 0]])
    s = V.pair_scores(a, b, "euclidean")
    assert s == pytest.approx([-0.5, -0.59, -0.61, -2.0])
    assert V.accuracy_at(s, np.array([True, True, False, False]), -0.6) == 1.0
    # Raw vectors: euclidean is not scale-invariant, cosine is.
    assert V.pair_scores(a + 1, 3 * (a + 1), "cosine") == pytest.approx(np.ones(4))


def test_auc_matches_pairwise_count_with_ties():
    rng = np.random.default_rng(2)
    s = rng.integers(0, 5, 300).astype(float)
    y = rng.random(300) < 0.4
    pos, neg = s[y][:, None], s[~y][None, :]
    expected = ((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size)
    assert V.roc_auc(s, y) == pytest.approx(expected)


def test_tar_at_far_respects_the_false_accept_budget():
    rng = np.random.default_rng(4)
    neg, pos = rng.random(2000), rng.random(500) + 0.5
    s = np.concatenate([pos, neg])
    y = np.arange(2500) < 500
    tar, far, t = V.tar_at_far(s, y, 1e-2)
    assert far <= 1e-2 and np.sum(neg > t) == 20  # exactly the 20 false accepts allowed
    assert tar == pytest.approx(np.mean(pos > t))
    tar0, far0, t0 = V.tar_at_far(s, y, 1e-4)  # below 1/2000: no false accept at all
    assert far0 == 0.0 and t0 == neg.max()


def test_bad_protocol_inputs():
    with pytest.raises(ConfigError, match="metric"):
        V.pair_scores(np.ones((2, 3)), np.ones((2, 3)), "manhattan")
    with pytest.raises(DataError, match="one shape"):
        V.pair_scores(np.ones((2, 3)), np.ones((2, 4)))
    with pytest.raises(DataError, match="NaN"):
        V.pair_scores(np.full((2, 3), np.nan), np.ones((2, 3)))
    with pytest.raises(DataError, match="at least 2 folds"):
        V.k_fold_verification(np.ones(4), np.array([1, 0, 1, 0], bool), np.zeros(4))
    with pytest.raises(DataError, match="fold 2 lacks"):
        V.k_fold_verification(np.ones(4), np.array([1, 0, 1, 1], bool), np.array([0, 0, 1, 1]))
    pairs = V.Pairs(["x/x_0001.jpg"], ["y/y_0001.jpg"], np.array([True]), np.array([0]), 2,
                    np.array([2]))
    with pytest.raises(DataError, match="no embedding for image y/y_0001.jpg"):
        V.verify_embeddings(pairs, np.ones((1, 3)), {"x/x_0001.jpg": 0})


# ----------------------------------------------------------------------------- a run

def colour_embedder(params, images_u8):
    x = images_u8.astype(jnp.float32).mean(axis=(1, 2)) / 255.0 - params["centre"]
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


@pytest.fixture(scope="module")
def lfw_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("verify")
    root = write_lfw(tmp / "lfw")
    write_pairs(tmp / "pairs.txt", FOLDS)  # beside the images: found without --pairs
    cfg = load_common_configs().base()
    cfg.data.root = root
    work = tmp / "run"
    work.mkdir()
    (work / "config.json").write_text(to_json(cfg))
    meta = dict(model="colour", input_size=16, resize_mode="crop", normalization="unit")
    embed.export_embedder(colour_embedder, {"centre": np.full(3, 0.3, np.float32)}, meta,
                          str(work / "embedder"))
    return str(work), root, str(tmp / "pairs.txt")


def _script_main(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts",
                                                                     f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_eval_verification_script_writes_the_report(lfw_run, capsys):
    work, root, pairs = lfw_run
    assert find_pairs_file(root) == pairs
    assert _script_main("eval_verification")(["--workdir", work, "--no_progress"]) == 0
    out = capsys.readouterr().out
    assert "LFW verification: 100.00 ± 0.00 % (2-fold), AUC 1.0000, TAR@FAR=0.001 100.00 %" \
        in out
    assert "search.py and the service mark results below it 'no match'" in out
    report = json.loads(open(os.path.join(work, "report", "verification.json")).read())
    assert report["accuracy"] == 1.0 and report["num_pairs"] == 8 and report["num_images"] == 10
    assert report["pairs_file"] == pairs and report["face_crop"] == [] and not report["skipped"]
    md = open(os.path.join(work, "report", "verification.md")).read()
    assert md.startswith("**LFW verification**: 100.00 ± 0.00 %")


def test_verify_honours_face_crop_and_skips_bad_images(lfw_run, tmp_path, capsys):
    work, root, pairs = lfw_run
    # A box wholly outside the image: every image becomes black, so nothing is told apart.
    main = _script_main("eval_verification")
    assert main(["--workdir", work, "--no_progress",
                 "--config.data.face_crop=(1.5, 1.5, 2.0, 2.0)"]) == 0
    report = json.loads(open(os.path.join(work, "report", "verification.json")).read())
    assert report["face_crop"] == [1.5, 1.5, 2.0, 2.0] and report["accuracy"] == 0.5
    # A corrupt image: its pairs are left out and listed, the rest still scored.
    bad = tmp_path / "lfw"
    write_lfw(bad)
    (bad / "Ann" / "Ann_0003.jpg").write_bytes(b"not a jpeg")
    res = verify_workdir(work, pairs, str(bad), progress=False)
    assert res["num_pairs"] == 7 and res["skipped"][0]["path"] == "Ann/Ann_0003.jpg"
    assert "leaving out 1 of 8 pairs" in capsys.readouterr().out
    with pytest.raises(DataError, match="pass --pairs"):
        verify_workdir(work, None, str(tmp_path / "lfw"), progress=False)
