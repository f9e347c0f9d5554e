"""The decode-once cache: contents, skip reports, reuse, invalidation and atomic writes."""

import json
import os
import subprocess
import threading
import time

import numpy as np
import pytest
from conftest import CORPUS_BAD, CORPUS_GOOD, CORPUS_MAX_PIXELS, class_colour, write_corpus

from facejax.data import cache, decode
from facejax.data.cache import cache_listing
from facejax.data.sources import scan_folder
from facejax.errors import DataError


def _build(listing, tmp_path, **kw):
    kw = {"image_size": 8, "cache_dir": str(tmp_path / "cache"), "workers": 1,
          "max_pixels": CORPUS_MAX_PIXELS} | kw
    return cache_listing(listing, **kw)


def _entries(tmp_path):
    return sorted(os.listdir(tmp_path / "cache"))


def test_cache_holds_decoded_images_in_listing_order(image_folder, tmp_path, capsys):
    root, written = image_folder({"a": 3, "b": 2, "c": 2})
    listing = scan_folder(root)
    entry = _build(listing, tmp_path)
    assert not entry.reused and isinstance(entry.images, np.memmap)
    assert entry.images.shape == (7, 8, 8, 3) and entry.images.dtype == np.uint8
    assert entry.rows.tolist() == list(range(7)) and entry.skipped == []
    for j, row in enumerate(entry.rows):
        colour = written[listing.paths[row]]
        np.testing.assert_allclose(entry.images[j].reshape(-1, 3).mean(0), colour, atol=2)
    with open(os.path.join(entry.directory, "paths.json")) as f:
        assert json.load(f) == listing.paths
    np.testing.assert_array_equal(np.load(os.path.join(entry.directory, "labels.npy")),
                                  listing.labels)
    assert capsys.readouterr().out.strip() == "decoded 7 images"


def test_bad_files_are_skipped_with_reasons_and_counted(tmp_path, capsys):
    root = tmp_path / "data"
    names = write_corpus(root / "mixed")
    (root / "empty_class").mkdir()
    listing = scan_folder(str(root))
    entry = _build(listing, tmp_path)
    good = sorted(f"mixed/{n}" for n in CORPUS_GOOD)
    assert sorted(listing.paths[r] for r in entry.rows) == good
    assert len(entry.images) == len(good) == len(names) - len(CORPUS_BAD)
    expected = {(f"mixed/{n}", r) for n, r in CORPUS_BAD.items()} | {("empty_class/",
                                                                      "empty class folder")}
    assert set(entry.skipped) == expected
    with open(os.path.join(entry.directory, "skipped.json")) as f:
        report = json.load(f)
    assert {(s["path"], s["reason"]) for s in report} == expected
    assert "image file is truncated" in next(s["detail"] for s in report
                                             if s["reason"] == "truncated")
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"decoded {len(good)} images, skipped 5 (")
    for part in ("1 truncated", "1 empty file", "1 not an image", "1 too large",
                 "1 empty class folder"):
        assert part in line
    assert line.endswith(os.path.join(entry.directory, "skipped.json"))


def test_rerun_reuses_the_entry_without_decoding(image_folder, tmp_path, monkeypatch, capsys):
    root, _ = image_folder({"a": 2, "b": 2})
    first = _build(scan_folder(root), tmp_path)
    npy = os.path.join(first.directory, "images.npy")
    stamp = os.stat(npy).st_mtime_ns
    monkeypatch.setattr(decode, "decode_image", lambda *a, **k: pytest.fail("decoded again"))
    second = _build(scan_folder(root), tmp_path)
    assert second.reused and second.directory == first.directory
    assert os.stat(npy).st_mtime_ns == stamp
    np.testing.assert_array_equal(second.images, first.images)
    assert capsys.readouterr().out.strip().splitlines()[-1] == "reused cache of 4 images"


def test_changed_file_or_setting_invalidates(image_folder, tmp_path):
    root, _ = image_folder({"a": 2, "b": 2})
    first = _build(scan_folder(root), tmp_path)
    path = os.path.join(root, "a", "a_000.png")
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched
    touched = _build(scan_folder(root), tmp_path)
    assert not touched.reused and touched.directory != first.directory
    for kw in ({"image_size": 9}, {"resize_mode": "pad"}, {"max_pixels": 4_000}):
        assert not _build(scan_folder(root), tmp_path, **kw).reused
    os.remove(os.path.join(root, "b", "b_001.png"))
    assert len(_build(scan_folder(root), tmp_path).images) == 3
    assert len(_entries(tmp_path)) == 6  # older entries stay until pruned


def test_older_entries_of_a_source_are_reported_then_pruned_on_request(image_folder, tmp_path,
                                                                      capsys):
    root, _ = image_folder({"a": 2, "b": 2})
    twin, _ = image_folder({"a": 1, "b": 1}, name="other/images")  # same folder name
    first = _build(scan_folder(root), tmp_path)
    twin_entry = _build(scan_folder(twin), tmp_path)
    bigger = _build(scan_folder(root), tmp_path, image_size=9)
    capsys.readouterr()
    os.remove(os.path.join(root, "a", "a_001.png"))
    second = _build(scan_folder(root), tmp_path)
    out = capsys.readouterr().out
    assert "note: 1 older cache entry of this source" in out and "--prune_cache" in out, out
    assert os.path.isdir(first.directory)  # a run may still read it: kept unasked
    held = np.array(first.images)
    assert _build(scan_folder(root), tmp_path, prune=True).reused
    assert "removed 1 older cache entry of this source" in capsys.readouterr().out
    assert not os.path.exists(first.directory)
    assert os.path.isdir(second.directory)
    assert os.path.isdir(twin_entry.directory) and os.path.isdir(bigger.directory)
    np.testing.assert_array_equal(np.asarray(first.images), held)  # an open map stays valid
    _build(scan_folder(root), tmp_path, prune=True)
    assert "older cache" not in capsys.readouterr().out


def test_prepare_data_script_prunes(image_folder, tmp_path, capsys, monkeypatch):
    import importlib.util

    root, _ = image_folder({"a": 3, "b": 3})
    monkeypatch.setenv("FACEJAX_CACHE", str(tmp_path / "cache"))
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location(
        "prepare_script", os.path.join(here, "..", "scripts", "prepare_data.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = ["--config", os.path.join(here, "..", "configs", "demo.py"),
            "--config.data.source=folder", f"--config.data.root={root}",
            "--config.data.image_size=8", "--config.data.min_images_per_class=2"]
    assert script.main(args) == 0
    os.remove(os.path.join(root, "a", "a_000.png"))
    assert script.main(args + ["--prune_cache"]) == 0
    assert "removed 1 older cache entry of this source" in capsys.readouterr().out
    assert len(_entries(tmp_path)) == 1


def test_killed_build_leaves_no_entry_and_stale_tmp_is_removed(image_folder, tmp_path,
                                                              monkeypatch):
    root, _ = image_folder({"a": 3, "b": 3})
    listing = scan_folder(root)
    real = decode.decode_image
    calls = []

    def dies_midway(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(decode, "decode_image", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        _build(listing, tmp_path)
    assert _entries(tmp_path) == []  # neither a half entry nor its temporary folder
    monkeypatch.setattr(decode, "decode_image", real)

    # A SIGKILLed build leaves its temporary folder; the next build of that entry removes it.
    dead = subprocess.Popen(["true"])
    dead.wait()
    name = _build(listing, tmp_path).directory.rsplit(os.sep, 1)[1]
    stale = tmp_path / "cache" / f".{name}.tmp-{dead.pid}-0000"
    stale.mkdir()
    (stale / "images.npy").write_bytes(b"partial")
    os.rename(tmp_path / "cache" / name, tmp_path / "cache" / "moved-away")
    _build(listing, tmp_path)
    assert _entries(tmp_path) == sorted([name, "moved-away"])


def test_damaged_entry_is_rebuilt(image_folder, tmp_path):
    root, _ = image_folder({"a": 2, "b": 2})
    first = _build(scan_folder(root), tmp_path)
    expected = np.array(first.images)
    del first
    npy = os.path.join(_build(scan_folder(root), tmp_path).directory, "images.npy")
    with open(npy, "r+b") as f:
        f.truncate(200)
    again = _build(scan_folder(root), tmp_path)
    assert not again.reused and again.images.shape == (4, 8, 8, 3)
    np.testing.assert_array_equal(again.images, expected)


def test_all_bad_folder_raises_and_leaves_nothing(tmp_path):
    root = tmp_path / "bad"
    (root / "cls").mkdir(parents=True)
    (root / "cls" / "empty.jpg").write_bytes(b"")
    (root / "cls" / "text.png").write_text("nope")
    with pytest.raises(DataError, match=r"no usable images .*1 empty file, 1 not an image"):
        _build(scan_folder(str(root)), tmp_path)
    assert _entries(tmp_path) == []


@pytest.mark.slow
def test_two_workers_give_the_same_cache(tmp_path):
    root = tmp_path / "data"
    write_corpus(root / "x")
    listing = scan_folder(str(root))
    one = _build(listing, tmp_path, cache_dir=str(tmp_path / "c1"))
    two = _build(listing, tmp_path, cache_dir=str(tmp_path / "c2"), workers=2)
    np.testing.assert_array_equal(one.rows, two.rows)
    np.testing.assert_array_equal(one.images, two.images)
    assert sorted(one.skipped) == sorted(two.skipped)
    with open(os.path.join(two.directory, "manifest.json")) as f:
        assert json.load(f)["workers"] == 2


def test_npy_header_rewrite_keeps_the_data_offset(tmp_path):
    big = cache._npy_header((123456, 8, 8, 3))
    small = cache._npy_header((7, 8, 8, 3), total=len(big))
    assert len(big) == len(small) and len(big) % 64 == 0
    data = np.arange(7 * 8 * 8 * 3, dtype=np.uint8)
    (tmp_path / "x.npy").write_bytes(small + data.tobytes())
    loaded = np.load(tmp_path / "x.npy", mmap_mode="r")
    assert loaded.shape == (7, 8, 8, 3)
    np.testing.assert_array_equal(loaded.reshape(-1), data)


def test_cache_dir_resolution(monkeypatch):
    monkeypatch.setenv("FACEJAX_CACHE", "/somewhere")
    assert cache.default_cache_dir("") == "/somewhere"
    assert cache.default_cache_dir("/explicit") == "/explicit"
    monkeypatch.delenv("FACEJAX_CACHE")
    assert cache.default_cache_dir("") == os.path.expanduser("~/.cache/facejax")


def test_bad_settings_are_data_errors(image_folder, tmp_path):
    root, _ = image_folder({"a": 1})
    with pytest.raises(DataError, match="resize_mode"):
        _build(scan_folder(root), tmp_path, resize_mode="squash")
    with pytest.raises(DataError, match="image_size"):
        _build(scan_folder(root), tmp_path, image_size=0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="cannot create cache folder"):
        _build(scan_folder(root), tmp_path, cache_dir=str(tmp_path / "file" / "sub"))


def test_colour_helper_is_distinct():
    colours = {class_colour(k) for k in range(20)}
    assert len(colours) == 20


@pytest.mark.slow
def test_crashed_worker_is_a_data_error_not_a_hang():
    # os._exit as the "reader" kills each worker on its first image, like a segfaulting decoder.
    with pytest.raises(DataError, match="decode worker process died"):
        list(cache._decode_all(os._exit, 20, 2))


def test_workers_fall_back_to_in_process_when_spawn_cannot_work(monkeypatch):
    import sys

    assert cache._resolve_workers(2, 10_000, parallel=True) == 2
    assert cache._resolve_workers(0, 100, parallel=True) == 1  # too few to pay for a worker
    assert cache._resolve_workers(4, 10_000, parallel=False) == 1
    monkeypatch.setattr(sys.modules["__main__"], "__file__", "<stdin>", raising=False)
    assert cache._resolve_workers(2, 10_000, parallel=True) == 1


def test_the_content_id_ignores_file_times_and_names_pixels_and_labels(image_folder, tmp_path):
    root, _ = image_folder({"a": 2, "b": 2})
    first = _build(scan_folder(root), tmp_path)
    assert first.content["images"] == 4 and first.content["classes"] == 2
    with open(os.path.join(first.directory, "manifest.json")) as f:
        assert json.load(f)["content"] == first.content
    for name in os.listdir(os.path.join(root, "a")):  # new times, same bytes: a new entry
        path = os.path.join(root, "a", name)
        os.utime(path, ns=(1, 1))
    touched = _build(scan_folder(root), tmp_path)
    assert touched.directory != first.directory and touched.content == first.content
    os.rename(os.path.join(root, "b"), os.path.join(root, "c"))  # same pixels, other label
    renamed = _build(scan_folder(root), tmp_path).content
    assert renamed["pixels"] == first.content["pixels"]
    assert renamed["files"] != first.content["files"]


def test_an_entry_from_before_content_ids_gets_one_equal_to_a_fresh_build(image_folder, tmp_path,
                                                                         capsys):
    root, _ = image_folder({"a": 3, "b": 2})
    listing = scan_folder(root)
    fresh = _build(listing, tmp_path, cache_dir=str(tmp_path / "c1"))
    old = _build(listing, tmp_path, cache_dir=str(tmp_path / "c2"))
    path = os.path.join(old.directory, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    del manifest["content"]  # as written before the content id existed
    with open(path, "w") as f:
        json.dump(manifest, f)
    capsys.readouterr()
    again = _build(listing, tmp_path, cache_dir=str(tmp_path / "c2"))
    assert again.reused and again.content == fresh.content
    assert "hashing the 5 images of an older cache entry (once)" in capsys.readouterr().out
    with open(path) as f:
        assert json.load(f)["content"] == fresh.content  # recorded: not hashed again


def test_a_disk_that_fills_up_while_writing_is_one_data_error(image_folder, tmp_path,
                                                             monkeypatch):
    root, _ = image_folder({"a": 2, "b": 2})

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", full)
    with pytest.raises(DataError, match="cannot write the cache entry .* No space left"):
        _build(scan_folder(root), tmp_path)
    assert _entries(tmp_path) == []  # no entry, no temporary folder


def test_a_second_build_of_the_same_entry_waits_for_the_first_and_reuses_it(
        image_folder, tmp_path, monkeypatch, capsys):
    """Two runs asking for one new entry used to decode it twice at once; the second now waits
    on the entry's lock (naming the holder) and reuses what the first built."""
    root, _ = image_folder({"a": 2, "b": 2})
    listing = scan_folder(root)
    started, release = threading.Event(), threading.Event()
    decoded = []
    real = decode.decode_image

    def slow_decode(*args, **kw):  # the first build holds the lock until released
        decoded.append(threading.current_thread().name)
        started.set()
        release.wait(120)
        return real(*args, **kw)

    monkeypatch.setattr(decode, "decode_image", slow_decode)
    results = {}
    threads = [threading.Thread(target=lambda n=name: results.setdefault(n, _build(listing,
                                                                                  tmp_path)),
                                name=name) for name in ("first", "second")]
    out = ""
    try:
        threads[0].start()
        assert started.wait(60)
        threads[1].start()
        deadline = time.monotonic() + 60
        while "waiting for another process" not in out and time.monotonic() < deadline:
            out += capsys.readouterr().out
            time.sleep(0.01)
    finally:
        release.set()
        for t in threads:
            t.join(120)
    assert f"finish decoding the same images into {results['first'].directory}: decoding " \
           f"(pid {os.getpid()}" in out
    assert not results["first"].reused and results["second"].reused
    assert decoded == ["first"] * 4  # decoded once, by the first
    assert _entries(tmp_path) == [os.path.basename(results["first"].directory)]  # lock gone
