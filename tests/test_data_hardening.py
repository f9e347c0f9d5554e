"""Bad data and bad sizes, each generated here: bounds on size-like settings, changed data on
resume and on evaluation, symlinked and run folders inside the data, competition JSON keys and
file names that are not valid UTF-8."""

import json
import os
import shutil

import numpy as np
import pytest
from conftest import load_common_configs, make_run, write_idx, write_image_folder
from PIL import Image

from facejax.config import apply_override, load_config
from facejax.data import sources
from facejax.data.prepare import prepare_data
from facejax.data.splits import unit_hash
from facejax.errors import CheckpointError, ConfigError, DataError
from facejax.retrieval import competition
from facejax.retrieval import workdir as wd
from facejax.retrieval.index import SearchIndex

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


# ----------------------------------------------------------------------------- 1: size bounds

def test_an_image_size_far_too_large_is_refused_when_the_config_loads():
    # --config.data.image_size=100000 grew to ~20 GB before the OOM killer took the process.
    with pytest.raises(ConfigError, match=r"data\.image_size=100000 is above its upper bound"):
        load_config(TINY, ["data.image_size=100000"])
    with pytest.raises(ConfigError, match=r"model\.input_size"):
        load_config(TINY, ["model.input_size=50000"])


def test_overrides_of_a_saved_run_config_are_bounded_too():
    # The retrieval scripts apply overrides to config.json without load_config.
    cfg = load_common_configs().base()
    for item, key in (("index.embed_batch_size=10000000", "index.embed_batch_size"),
                      ("eval.ks=(1,5,100000000)", "eval.ks"),
                      ("data.max_pixels=100000000000", "data.max_pixels")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            apply_override(cfg, item)


def test_a_batch_that_no_machine_can_hold_is_refused_before_anything_is_allocated():
    # Both settings are within their own bounds; together the float32 batch alone is ~3 PB.
    with pytest.raises(ConfigError, match=r"training batch of 60000 .* lower train\.batch_size"):
        load_config(TINY, ["train.batch_size=60000", "data.image_size=2048",
                           "model.input_size=2048"])


def test_prepare_refuses_an_image_size_above_the_bound_before_decoding(data_config,
                                                                       image_folder):
    root, _ = image_folder({"a": 2, "b": 2})
    data_config.root = root
    data_config.image_size = 3000  # over the 2048 bound (a test must not allocate 30 GB)
    with pytest.raises(ConfigError, match=r"data\.image_size=3000"):
        prepare_data(data_config)
    assert not os.path.exists(data_config.cache_dir)


def test_a_cache_entry_above_max_cache_gb_is_refused_before_writing(data_config, image_folder):
    root, _ = image_folder({"a": 3, "b": 3})
    data_config.root = root
    data_config.max_cache_gb = 1e-6  # 1 kB: six 16x16 RGB images are 4.6 kB
    with pytest.raises(ConfigError, match=r"above data\.max_cache_gb=1e-06"):
        prepare_data(data_config)
    assert not os.listdir(data_config.cache_dir)


def test_a_cache_entry_larger_than_the_free_disk_is_refused(data_config, image_folder,
                                                            monkeypatch):
    root, _ = image_folder({"a": 3, "b": 3})
    data_config.root = root
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda p: real(p)._replace(free=(1 << 30) + 1000))  # 1 kB beyond
    with pytest.raises(DataError, match=r"needs .* of disk, but .* free"):
        prepare_data(data_config)
    assert not os.listdir(data_config.cache_dir)


def test_an_idx_header_asking_for_more_memory_than_there_is_is_refused_unread(tmp_path,
                                                                               monkeypatch):
    from facejax import limits

    write_idx(tmp_path, np.zeros((4, 28, 28), np.uint8), np.arange(4))
    monkeypatch.setattr(limits, "available_memory", lambda: 1000)  # < 4 x 28 x 28 bytes
    with pytest.raises(DataError, match=r"the idx file .* needs about .* is the file damaged"):
        sources.load_idx(str(tmp_path))


def test_a_max_pixels_that_one_decode_cannot_fit_is_refused(data_config, monkeypatch):
    from facejax import limits

    monkeypatch.setattr(limits, "available_memory", lambda: 100 * 2**20)
    data_config.root = "/nonexistent"
    with pytest.raises(ConfigError, match=r"data\.max_pixels=50,000,000"):
        prepare_data(data_config)


# ----------------------------------------------------------------------------- 3: changed data

def _classes_idx(directory, seed: int) -> str:
    """4 classes x 12 images; class k is a bright band at row 6k. `seed` changes the noise."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(4), 12)
    images = rng.integers(0, 60, (len(labels), 28, 28)).astype(np.uint8)
    for i, k in enumerate(labels):
        images[i, 4 + 6 * k:8 + 6 * k] = 220
    write_idx(directory, images, labels)
    return str(directory)


@pytest.mark.slow
def test_resuming_on_other_pixels_is_refused_unless_allowed(tmp_path, capsys):
    from facejax.train import loop

    data = _classes_idx(tmp_path / "idx", seed=0)
    work = str(tmp_path / "run")
    base = [f"data.root={data}", "train.epochs=1", f"data.cache_dir={tmp_path / 'cache'}"]
    loop.train_and_evaluate(load_config(TINY, base), work)
    # A copy elsewhere, with new file times (a new cache key), is the same data: it resumes.
    moved = str(tmp_path / "moved")
    shutil.copytree(data, moved, copy_function=shutil.copy)
    loop.train_and_evaluate(load_config(TINY, [f"data.root={moved}"] + base[1:]), work)
    # Same names, same labels, other pixels: refused, saying what changed.
    _classes_idx(tmp_path / "idx", seed=1)
    with pytest.raises(CheckpointError, match=r"trained on other data: the same 48 file names "
                                              r"and labels, but other pixels"):
        loop.train_and_evaluate(load_config(TINY, base), work)
    capsys.readouterr()
    more = base + ["train.epochs=2"]
    summary = loop.train_and_evaluate(load_config(TINY, more + ["data.allow_changed_data=true"]),
                                      work)
    assert "resuming on the new data because data.allow_changed_data=true" in \
        capsys.readouterr().out
    assert summary["epochs_run"] == 2
    # The checkpoint saved on the new data records it: a plain resume is accepted now.
    loop.train_and_evaluate(load_config(TINY, more), work)


def test_a_checkpoint_without_a_data_id_resumes_with_a_note(capsys):
    from facejax.train import checkpoint as ckpt_lib

    ckpt_lib.check_same_data({}, {"files": "f", "pixels": "p"}, "ckpt")
    assert "records no data id" in capsys.readouterr().out


def _recolour(root, rel, colour):
    # Same path and size on disk does not matter: new pixels under the same name.
    Image.new("RGB", (20, 16), colour).save(os.path.join(root, rel))


@pytest.mark.slow
def test_evaluating_an_index_against_other_pixels_is_refused_unless_allowed(tmp_path, capsys):
    root = str(tmp_path / "images")
    write_image_folder(root, {f"p{c}": 5 for c in "abcd"}, size=(20, 16))
    work = make_run(tmp_path, root)
    wd.build_workdir_index(work, wd.read_run_config(work), progress=False)
    wd.evaluate_workdir(work, wd.read_run_config(work), progress=False)  # unchanged: fine
    for i in range(5):  # class pa now looks like class pd
        _recolour(root, f"pa/pa_{i:03d}.png", (203, 127, 209))
    with pytest.raises(DataError, match=r"changed since the index .* was built: the same 20 "
                                         r"file names and labels, but other pixels"):
        wd.evaluate_workdir(work, wd.read_run_config(work), progress=False)
    cfg = wd.read_run_config(work)
    apply_override(cfg, "data.allow_changed_data=true")
    capsys.readouterr()
    wd.evaluate_workdir(work, cfg, progress=False)
    assert "evaluating anyway because data.allow_changed_data=true" in capsys.readouterr().out
    # Accepting once is not remembered: config.json never carries it into the next command.
    config_json = json.loads(open(os.path.join(work, "config.json")).read())
    config_json["data"]["allow_changed_data"] = True
    with open(os.path.join(work, "config.json"), "w") as f:
        json.dump(config_json, f)
    with pytest.raises(DataError, match="changed since the index"):
        wd.evaluate_workdir(work, wd.read_run_config(work), progress=False)


@pytest.mark.slow
def test_an_index_without_a_data_id_evaluates_with_a_note(tmp_path, capsys):
    root = str(tmp_path / "images")
    write_image_folder(root, {f"p{c}": 4 for c in "abc"}, size=(20, 16))
    work = make_run(tmp_path, root)
    index = wd.build_workdir_index(work, wd.read_run_config(work), progress=False)
    del index.info["data_id"]  # as an index saved before data ids were recorded
    index.save(os.path.join(work, wd.INDEX_DIR))
    capsys.readouterr()
    wd.evaluate_workdir(work, wd.read_run_config(work), progress=False)
    assert "records no data id" in capsys.readouterr().out


# ----------------------------------------------------------------------------- 6: symlinks

def test_a_symlinked_class_folder_is_one_class_counted_once(tmp_path):
    root = str(tmp_path / "faces")
    write_image_folder(root, {"s1": 3, "s8": 3})
    os.symlink(os.path.join(root, "s8"), os.path.join(root, "s8_alias"))
    os.symlink("s8", os.path.join(root, "a_alias"))  # sorts first, still counted under s8
    listing = sources.scan_folder(root)
    assert listing.class_names == ["s1", "s8"]
    assert len(listing) == 6 and all(not p.startswith(("s8_alias", "a_alias"))
                                     for p in listing.paths)
    reasons = dict(listing.skipped)
    assert reasons["s8_alias/"] == reasons["a_alias/"] == \
        "same files as s8/ (links; counted once there)"


def test_a_symlinked_file_in_another_class_is_counted_once_where_it_lives(tmp_path):
    root = str(tmp_path / "faces")
    write_image_folder(root, {"a": 2, "b": 2})
    os.symlink(os.path.join(root, "b", "b_000.png"), os.path.join(root, "a", "0_link.png"))
    os.symlink("b_001.png", os.path.join(root, "b", "b_002.png"))  # a link in its own class
    listing = sources.scan_folder(root)
    assert listing.paths == ["a/a_000.png", "a/a_001.png", "b/b_000.png", "b/b_001.png"]
    assert listing.labels.tolist() == [0, 0, 1, 1]
    assert sorted(listing.skipped) == [("a/0_link.png", sources.DUPLICATE_REASON),
                                       ("b/b_002.png", sources.DUPLICATE_REASON)]


def test_a_symlink_loop_inside_a_class_is_reported_not_followed(tmp_path):
    root = str(tmp_path / "faces")
    write_image_folder(root, {"a": 2, "b": 2})
    os.symlink(root, os.path.join(root, "a", "loop"))
    listing = sources.scan_folder(root)
    assert len(listing) == 4 and ("a/loop/", sources.LINKED_FOLDER_REASON) in listing.skipped


def test_prepared_data_has_no_second_label_for_a_linked_folder(data_config, tmp_path):
    root = str(tmp_path / "faces")
    write_image_folder(root, {"s1": 3, "s2": 3, "s8": 3})
    os.symlink(os.path.join(root, "s8"), os.path.join(root, "s8_alias"))
    data_config.root = root
    data = prepare_data(data_config)
    assert data.class_names == ["s1", "s2", "s8"] and len(data.images) == 9
    assert len(set(data.paths)) == len(data.paths)


# ----------------------------------------------------------------------------- 7: run folders

def _fake_run(folder, marker="classes.json"):
    os.makedirs(os.path.join(folder, "plots"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        f.write("{}")
    if marker.endswith(".json"):
        with open(os.path.join(folder, marker), "w") as f:
            f.write("[]")
    else:
        os.makedirs(os.path.join(folder, marker))
    Image.new("RGB", (40, 30), (255, 255, 255)).save(os.path.join(folder, "plots", "loss.png"))


def test_a_run_folder_inside_the_data_root_is_left_out(tmp_path, data_config, capsys):
    root = str(tmp_path / "faces")
    write_image_folder(root, {"a": 3, "b": 3})
    _fake_run(os.path.join(root, "demo_run"), "checkpoints")   # a class-level workdir
    _fake_run(os.path.join(root, "a", "runs", "r1"))            # one nested in a class
    lr = os.path.join(root, "b", "lr")                         # scripts/lr_find.py --workdir
    os.makedirs(lr)
    with open(os.path.join(lr, "lr_find.json"), "w") as f:
        f.write("{}")
    Image.new("RGB", (40, 30)).save(os.path.join(lr, "lr_find.png"))
    listing = sources.scan_folder(root)
    assert listing.class_names == ["a", "b"] and len(listing) == 6
    for folder in ("demo_run/", "a/runs/r1/", "b/lr/"):
        assert (folder, sources.RUN_FOLDER_REASON) in listing.skipped
    data_config.root = root
    prepare_data(data_config)
    assert "note: left out 3 facejax run folders inside the data" in capsys.readouterr().out


def test_a_data_root_that_is_a_run_folder_is_refused(tmp_path):
    run = str(tmp_path / "run")
    _fake_run(run)
    with pytest.raises(DataError, match="is a facejax run folder"):
        sources.scan_folder(run)


@pytest.mark.slow
def test_a_workdir_inside_the_data_root_never_enters_its_own_gallery(tmp_path):
    root = tmp_path / "faces"
    write_image_folder(str(root), {f"p{c}": 4 for c in "abc"}, size=(20, 16))
    work = make_run(root, str(root))  # root/run_folder: config.json, plots/loss.png, embedder/
    index = wd.build_workdir_index(work, wd.read_run_config(work), progress=False)
    assert not [p for p in index.paths if "run_folder" in p]
    assert index.info["label_names"] == ["pa", "pb", "pc"]
    wd.evaluate_workdir(work, wd.read_run_config(work), progress=False)  # report PNGs now too
    again = wd.build_workdir_index(work, wd.read_run_config(work), progress=False)
    assert again.info["label_names"] == ["pa", "pb", "pc"]


# ----------------------------------------------------------------------------- 8: competition keys

META = dict(model="m", input_size=16, resize_mode="crop", normalization="unit",
            params_hash="x", embed_dim=2)


def _unit(angles):
    a = np.deg2rad(np.asarray(angles, np.float32))
    return np.stack([np.cos(a), np.sin(a)], 1).astype(np.float32)


def test_a_backslash_in_a_query_name_is_not_a_folder_separator(tmp_path):
    index = SearchIndex.build(_unit([0, 90]), ["gallery/g\\1.jpg", "gallery/g/1.jpg"], None,
                              META, backend="exact")
    mapping = competition.competition_topk(["query/a/b.pgm", "query/a\\b.pgm"],
                                           _unit([5, 85]), index, 1)
    assert mapping == {"a/b.pgm": ["g\\1.jpg"], "a\\b.pgm": ["g/1.jpg"]}
    out = tmp_path / "topk.json"
    competition.write_competition_json(mapping, str(out))
    assert len(json.loads(out.read_text())) == 2


def test_two_queries_with_one_key_fail_naming_both():
    index = SearchIndex.build(_unit([0, 90]), ["gallery/x.jpg", "gallery/y.jpg"], None, META,
                              backend="exact")
    with pytest.raises(DataError, match=r"'query/x\.jpg' and 'x\.jpg' both become the key"):
        competition.competition_topk(["query/x.jpg", "x.jpg"], _unit([5, 85]), index, 1)


def test_competition_scan_keeps_a_backslash_name_apart(tmp_path):
    root = tmp_path / "comp"
    write_image_folder(str(root / "training"), {"x": 3, "y": 3})
    write_image_folder(str(root / "query"), {"a": 1})
    shutil.copy(root / "query" / "a" / "a_000.png", root / "query" / "a\\a_000.png")
    write_image_folder(str(root / "gallery"), {"g": 2})
    comp = sources.scan_competition(str(root))
    keys = {competition.split_relative(p, "query") for p in comp.query.paths}
    assert keys == {"a/a_000.png", "a\\a_000.png"}


# ----------------------------------------------------------------------------- 11: non-UTF-8 names

def test_unit_hash_takes_a_name_that_is_not_utf8():
    bad = os.fsdecode(b"bad\xff")  # how Python holds such a name: a surrogate escape
    assert 0.0 <= unit_hash(0, "split", bad, bad + "/x.png") < 1.0
    assert unit_hash(0, bad) != unit_hash(0, os.fsdecode(b"bad\xfe"))
    assert unit_hash(1, "a", "é") == unit_hash(1, "a", "é".encode().decode())  # UTF-8 unchanged


def test_a_folder_and_a_file_whose_names_are_not_utf8_are_used(tmp_path, data_config):
    root = os.fsencode(str(tmp_path / "faces"))
    write_image_folder(os.fsdecode(root), {"a": 3, "b": 3})
    os.mkdir(root + b"/bad\xff")
    for i in range(3):
        Image.new("RGB", (12, 10), (10, 200, 30)).save(root + b"/bad\xff/" + b"x%d.png" % i)
    Image.new("RGB", (12, 10), (90, 90, 90)).save(root + b"/a/odd\xfe.png")
    data_config.root = os.fsdecode(root)
    data = prepare_data(data_config)
    assert len(data.images) == 10 and data.num_classes == 3
    assert os.fsdecode(b"bad\xff") in data.class_names
    assert os.fsdecode(b"a/odd\xfe.png") in data.paths
    again = prepare_data(data_config)  # the same split and cache entry on a rerun
    assert again.cache_dir == data.cache_dir
    assert np.array_equal(again.train.indices, data.train.indices)


def test_a_competition_json_with_a_name_that_is_not_utf8_is_valid_json(tmp_path):
    bad = os.fsdecode(b"q\xff.png")
    out = tmp_path / "topk.json"
    competition.write_competition_json({bad: ["g.png"]}, str(out))
    assert json.loads(out.read_bytes().decode("utf-8")) == {bad: ["g.png"]}
