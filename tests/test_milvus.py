"""index.backend=milvus on Milvus Lite: round trip, add/remove, refusals, equality with exact
search, unreachable servers, and the build_index -> eval_topk -> service path on a tiny run."""

import importlib.util
import json
import os
import pathlib
import shutil
import socket

import numpy as np
import pytest
from conftest import make_run, write_image_folder
from milvus_lite.server_manager import server_manager_instance

from facejax.errors import CheckpointError, ConfigError
from facejax.retrieval import milvus_index as mi
from facejax.retrieval import workdir as wd
from facejax.retrieval.index import SearchIndex, exact_topk_numpy, read_manifest

D = 16
META = dict(model="tiny", params_hash="a" * 64, embed_dim=D, normalization="unit",
            l2_normalized=True, metric="dot", input_size=16, resize_mode="crop")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gallery(n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, D)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), rng.integers(0, 5, n).astype(np.int32)


def paths_for(n, start=0):
    return [f"person_{i % 5}/img_{i}.jpg" for i in range(start, start + n)]


def build(tmp_path, n=400, meta=META, collection="gallery", db="g.db", seed=0):
    x, y = gallery(n, seed)
    uri = str(tmp_path / db)
    return SearchIndex.build(x, paths_for(n), y, meta, backend="milvus",
                             milvus=dict(uri=uri, collection=collection)), x, y


def closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connections are refused at once
    return port


def test_round_trip_with_fields_and_results_equal_to_exact(tmp_path):
    idx, x, y = build(tmp_path)
    q, _ = gallery(50, seed=7)
    want = exact_topk_numpy(x, q, 10)
    rows, scores = idx.search(q, 10)
    np.testing.assert_array_equal(rows, want)
    np.testing.assert_allclose(scores, np.take_along_axis(q @ x.T, want, axis=1), atol=1e-5)
    assert idx._milvus.recall["recall"] == 1.0 and idx._milvus.index_type == "FLAT"
    # ids, labels and paths are fields of the collection.
    got = idx._milvus.client.get(idx._milvus.collection, ids=[3, 17],
                                 output_fields=["id", "label", "path"])
    assert sorted((r["id"], r["label"], r["path"]) for r in got) == \
        [(3, int(y[3]), paths_for(400)[3]), (17, int(y[17]), paths_for(400)[17])]
    idx.save(str(tmp_path / "index"))
    manifest = read_manifest(str(tmp_path / "index"))
    assert manifest["backend"] == "milvus"
    assert manifest["milvus"]["collection"] == "gallery"
    assert manifest["milvus"]["lite_relpath"] == os.path.join("..", "g.db")
    loaded = SearchIndex.load(str(tmp_path / "index"), expect=META)
    assert loaded.backend == "milvus" and loaded.size == 400
    np.testing.assert_array_equal(loaded.search(q, 10)[0], want)
    assert loaded.paths == idx.paths and (loaded.labels == y).all()


def test_add_and_remove_reach_the_collection_and_survive_a_reload(tmp_path):
    idx, x, _ = build(tmp_path)
    extra, _ = gallery(30, seed=3)
    new_ids = idx.add(extra, paths_for(30, 1000), np.full(30, 2, np.int32))
    np.testing.assert_array_equal(new_ids, np.arange(400, 430))
    gone = [0, 5, 401, 429]
    idx.remove(gone)
    assert idx._milvus.count() == idx.size == 426
    q = np.concatenate([x[:8], extra[:8]])
    rows, _ = idx.search(q, 5)
    np.testing.assert_array_equal(rows, exact_topk_numpy(idx.embeddings, q, 5))
    assert not np.isin(idx.ids[rows], gone).any()
    idx.save(str(tmp_path / "index"))
    loaded = SearchIndex.load(str(tmp_path / "index"), expect=META)
    assert loaded.next_id == 430 and loaded._milvus.count() == 426
    np.testing.assert_array_equal(loaded.search(q, 5)[0], rows)


def test_a_collection_that_missed_or_kept_changes_is_repaired_on_load(tmp_path, capsys):
    """A service stopped between a write and its compaction: the saved index is the truth."""
    idx, x, _ = build(tmp_path)
    idx.save(str(tmp_path / "index"))
    idx.add(x[:3] * -1, paths_for(3, 900))   # in Milvus, never saved
    idx.remove([10, 11])                      # gone from Milvus, never saved
    loaded = SearchIndex.load(str(tmp_path / "index"), expect=META)
    assert "differed from index" in capsys.readouterr().out
    assert loaded._milvus.count() == 400
    np.testing.assert_array_equal(loaded.search(x[10:12], 1)[0][:, 0], [10, 11])


def test_an_index_of_another_embedder_is_refused(tmp_path):
    idx, _, _ = build(tmp_path)
    idx.save(str(tmp_path / "index"))
    with pytest.raises(CheckpointError, match="different embedder: params_hash"):
        SearchIndex.load(str(tmp_path / "index"), expect=dict(META, params_hash="b" * 64))


@pytest.mark.slow
def test_a_collection_rebuilt_by_another_embedder_or_build_is_refused(tmp_path):
    idx, _, _ = build(tmp_path)
    idx.save(str(tmp_path / "a"))
    # Another run's embedder takes the same collection over.
    build(tmp_path, meta=dict(META, params_hash="c" * 64), seed=1)
    with pytest.raises(CheckpointError, match="holds embeddings of another embedder") as e:
        SearchIndex.load(str(tmp_path / "a"), expect=META)
    assert "\n" not in str(e.value)
    # The same embedder, another build: this index's rows are no longer what it holds.
    build(tmp_path, seed=2)
    with pytest.raises(CheckpointError, match="rebuilt by another index build"):
        SearchIndex.load(str(tmp_path / "a"), expect=META)


def test_a_collection_facejax_did_not_make_is_not_dropped(tmp_path):
    client = mi.connect(str(tmp_path / "g.db"))
    client.create_collection("theirs", dimension=D)
    with pytest.raises(ConfigError, match="was not made by facejax"):
        build(tmp_path, collection="theirs")
    assert client.has_collection("theirs")


@pytest.mark.slow
def test_a_missing_lite_database_or_collection_is_one_line(tmp_path):
    idx, _, _ = build(tmp_path)
    idx.save(str(tmp_path / "index"))
    idx._milvus.drop()
    with pytest.raises(CheckpointError, match="has no collection gallery"):
        SearchIndex.load(str(tmp_path / "index"), expect=META)
    idx2, _, _ = build(tmp_path, db="h.db")
    idx2.save(str(tmp_path / "index2"))
    # The database folder goes away (a moved or deleted file).
    server_manager_instance.release_server(str(tmp_path / "h.db"))
    shutil.rmtree(tmp_path / "h.db")
    with pytest.raises(CheckpointError, match="Milvus Lite database .* is missing"):
        SearchIndex.load(str(tmp_path / "index2"), expect=META)


def test_an_unreachable_server_is_a_one_line_config_error(tmp_path):
    uri = f"http://127.0.0.1:{closed_port()}"
    x, y = gallery(20)
    with pytest.raises(ConfigError, match=f"cannot reach Milvus at {uri}") as e:
        SearchIndex.build(x, paths_for(20), y, META, backend="milvus",
                          milvus=dict(uri=uri, collection="g"))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("uri, match", [
    ("", "needs index.milvus_uri"),
    ("gallery.sqlite", "neither a local path ending in .db"),
    ("ftp://host/x.db", "neither a local path ending in .db"),
])
def test_bad_uris_are_config_errors(tmp_path, uri, match):
    x, y = gallery(20)
    with pytest.raises(ConfigError, match=match):
        SearchIndex.build(x, paths_for(20), y, META, backend="milvus",
                          milvus=dict(uri=uri, collection="g"))


def test_an_index_type_milvus_lite_lacks_is_a_one_line_config_error(tmp_path):
    x, y = gallery(50)
    with pytest.raises(ConfigError, match="Milvus Lite has no SCANN index"):
        SearchIndex.build(x, paths_for(50), y, META, backend="milvus",
                          milvus=dict(uri=str(tmp_path / "g.db"), collection="g",
                                      index_type="SCANN"))


def test_server_index_type_follows_the_gallery_size():
    assert [mi.server_index(n, 128)[0] for n in (10_000, 500_000, 10**7, 10**9)] == \
        ["FLAT", "HNSW", "SCANN", "IVF_PQ"]
    assert mi.server_index(10**9, 128)[1]["m"] == 16
    # IVF lists follow the rows of one 1 GB segment, not the collection.
    assert mi.server_index(10**9, 128)[1]["nlist"] == mi.server_index(10**7, 128)[1]["nlist"]
    assert mi.pick_index("/x/g.db", "auto", 10**7, 128)[0] == "FLAT"
    with pytest.raises(ConfigError, match="index.milvus_index must be one of"):
        mi.pick_index("/x/g.db", "DISKANN", 10, 128)


# ----------------------------------------------------------------------------- a tiny run

def _script(name):
    spec = importlib.util.spec_from_file_location(f"_script_{name}",
                                                  os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_index_eval_topk_and_the_gallery_on_milvus(tmp_path, capsys):
    root = str(tmp_path / "images")
    write_image_folder(root, {f"person_{c}": 6 for c in "abcd"}, size=(20, 16))
    work = make_run(tmp_path, root)
    assert _script("build_index").main(["--workdir", work, "--no_progress",
                                        "--backend", "milvus"]) == 0
    assert "recall@" in capsys.readouterr().out
    manifest = read_manifest(os.path.join(work, "index"))
    assert manifest["backend"] == "milvus" and os.path.isdir(os.path.join(work, "milvus.db"))
    assert _script("eval_topk").main(["--workdir", work, "--no_progress"]) == 0
    report = json.loads(pathlib.Path(work, "report", "report.json").read_text())
    assert report["backend"] == "milvus" and report["metrics"]["top1"] == 1.0
    assert report["ann_recall"]["recall@1"] == 1.0

    # The service's gallery: enrol and delete go to the collection and come back on reload.
    from facejax.serve.gallery import Gallery

    g = Gallery.open(work, os.path.join(work, "index"), expect=manifest["embedder"])
    probe = np.asarray(g.index.embeddings[:1])
    new = g.enrol("Ada", probe, [(b"not really a jpeg", "jpg")])
    assert g.search(probe, 1)[0][0]["score"] == pytest.approx(1.0, abs=1e-5)
    g.delete(int(g.index.ids[0]))
    g.compact()
    again = Gallery.open(work, os.path.join(work, "index"), expect=manifest["embedder"])
    assert again.index.backend == "milvus" and new[0] in set(again.index.ids.tolist())
    assert again.index._milvus.count() == again.size == g.size


def test_build_index_with_an_unreachable_server_fails_before_embedding(tmp_path):
    root = str(tmp_path / "images")
    write_image_folder(root, {"a": 3, "b": 3}, size=(20, 16))
    work = make_run(tmp_path, root)
    cfg = wd.read_run_config(work)
    cfg.index.backend, cfg.index.milvus_uri = "milvus", f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(ConfigError, match="cannot reach Milvus"):
        wd.build_workdir_index(work, cfg, progress=False)
    assert not os.path.exists(os.path.join(work, "index_work"))
