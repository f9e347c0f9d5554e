"""The search service against the real server: uvicorn on a loopback port, queried with httpx."""

from __future__ import annotations

import io
import json
import os
import re
import threading
import time

import httpx
import numpy as np
import pytest
from conftest import CORPUS_BAD, CORPUS_GOOD, CORPUS_MAX_PIXELS, write_corpus
from PIL import Image
from serve_helpers import Server, make_serve_run, start_server

from facejax.retrieval import workdir as wd
from facejax.retrieval.embed import load_embedder
from facejax.retrieval.index import load_index

pytestmark = pytest.mark.slow  # every test here takes seconds: not in ./run.sh test --fast

CLASSES = {f"person_{c}": 8 for c in "abcdefgh"}
KEY = {"X-API-Key": "test-key"}


def _png(colour, size=(20, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def _file(path):
    with open(path, "rb") as f:
        return f.read()


def _search(client, url, data: bytes, k=5, **form):
    return client.post(url + "/v1/search", files={"image": ("q.png", data, "image/png")},
                       data={"k": str(k), **{a: str(b) for a, b in form.items()}})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_serve_run(tmp_path_factory.mktemp("serve"), CLASSES)


@pytest.fixture(scope="module")
def server(run):
    # max_pixels as in the data layer's corpus, so its "huge" image is refused here too.
    with start_server(run[0], extra_args=["--max_pixels", str(CORPUS_MAX_PIXELS)]) as s:
        yield s


def test_search_returns_the_right_identity_with_timings(run, server):
    work, root = run
    with httpx.Client(timeout=30) as c:
        r = _search(c, server.url, _file(os.path.join(root, "person_c", "person_c_002.png")), k=4)
        assert r.status_code == 200, r.text
        body = r.json()
        assert [h["rank"] for h in body["results"]] == [1, 2, 3, 4]
        assert body["results"][0]["label"] == "person_c"
        assert body["results"][0]["path"].startswith("person_c/")
        assert body["results"][0]["image_url"] == f"/v1/images/{body['results'][0]['id']}"
        scores = [h["score"] for h in body["results"]]
        assert scores == sorted(scores, reverse=True)
        assert set(body["timings_ms"]) == {"decode", "queue", "embed", "search", "total"}
        assert body["threshold"] is None and body["results"][0]["match"] is None
        # min_score drops what is below it; k bounds are checked.
        cut = (scores[0] + scores[-1]) / 2
        r = _search(c, server.url, _file(os.path.join(root, "person_c", "person_c_002.png")),
                    k=4, min_score=cut)
        assert [h["score"] for h in r.json()["results"]] == [s for s in scores if s >= cut]
        for k in (0, 101, "ten"):
            r = _search(c, server.url, _png((1, 2, 3)), k=k)
            assert r.status_code == 422 and "k" in r.json()["error"], r.text
        # The page and the generated OpenAPI page are served, with no CDN.
        docs = c.get(server.url + "/docs")
        assert docs.status_code == 200 and "cdn" not in docs.text.lower()
        assert "/v1/search" in c.get(server.url + "/openapi.json").json()["paths"]


def test_concurrent_clients_get_the_offline_results(run, server):
    """32 clients at once: every answer equals scripts/search.py's offline search, and the
    queries were batched (fewer embedder calls than queries)."""
    work, root = run
    files = sorted(os.path.join(root, d, f) for d in sorted(CLASSES)
                   for f in os.listdir(os.path.join(root, d)))[:64]
    expected = {}
    for f in files:
        res = wd.search_workdir(work, f, 5)["queries"][0]["results"]
        expected[f] = [(r["id"], r["score"]) for r in res]
    before = _batches(server.url)
    got, errors = {}, []
    barrier = threading.Barrier(32)

    def client(part):
        with httpx.Client(timeout=60) as c:
            barrier.wait()
            for f in part:
                r = _search(c, server.url, _file(f))
                if r.status_code != 200:
                    errors.append(r.text)
                    continue
                got[f] = [(h["id"], h["score"]) for h in r.json()["results"]]

    threads = [threading.Thread(target=client, args=(files[i::32],)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert set(got) == set(files)
    for f in files:
        assert [i for i, _ in got[f]] == [i for i, _ in expected[f]], f
        np.testing.assert_allclose([s for _, s in got[f]], [s for _, s in expected[f]],
                                   atol=1e-5)
    calls, images = (a - b for a, b in zip(_batches(server.url), before))
    assert images == len(files) and calls < len(files)


def _batches(url) -> tuple[float, float]:
    """(embedder calls, images embedded) from /metrics."""
    text = httpx.get(url + "/metrics").text
    count = float(re.search(r"^facejax_batch_size_count (\S+)$", text, re.M).group(1))
    total = float(re.search(r"^facejax_batch_size_sum (\S+)$", text, re.M).group(1))
    return count, total


def test_bad_uploads_get_clear_4xx_json(server, tmp_path):
    corpus = tmp_path / "corpus"
    write_corpus(corpus)
    with httpx.Client(timeout=30) as c:
        for name in CORPUS_GOOD:
            r = c.post(server.url + "/v1/search",
                       files={"image": (name, _file(corpus / name), "application/octet-stream")})
            assert r.status_code == 200, (name, r.text)
        statuses = {}
        for name, reason in CORPUS_BAD.items():
            r = c.post(server.url + "/v1/search",
                       files={"image": (name, _file(corpus / name), "image/jpeg")})
            body = r.json()
            assert 400 <= r.status_code < 500 and body["status"] == r.status_code, (name, body)
            statuses[name] = r.status_code
            assert name in body["error"], body  # names the file it refuses
        assert statuses == {"truncated.jpg": 422, "empty.jpg": 400, "text.jpg": 415,
                            "huge.png": 413}
        # A decompression bomb: tiny file, 4000 x 4000 pixels declared.
        buf = io.BytesIO()
        Image.new("L", (4000, 4000)).save(buf, "PNG")
        assert len(buf.getvalue()) < 100_000
        r = _search(c, server.url, buf.getvalue())
        assert r.status_code == 413 and "too large" in r.json()["error"]
        # The content decides, not the name: a PostScript file called .jpg (PIL would hand it
        # to Ghostscript), an SVG, and an HTML page.
        for data in (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",
                     b"<svg xmlns='http://www.w3.org/2000/svg'/>", b"<html>hi</html>"):
            r = c.post(server.url + "/v1/search", files={"image": ("a.jpg", data, "image/jpeg")})
            assert r.status_code == 415, r.text
        # Missing fields, a body over the byte limit, a path where an id goes.
        r = c.post(server.url + "/v1/search", data={"k": "3"})
        assert r.status_code == 422 and "image" in r.json()["error"]
        big = b"\xff\xd8\xff" + bytes(11 * 2**20)
        r = c.post(server.url + "/v1/search", files={"image": ("big.jpg", big, "image/jpeg")})
        assert r.status_code == 413 and "limit" in r.json()["error"]
        for path in ("/v1/images/..%2F..%2Fconfig.json", "/v1/images/-1", "/v1/images/99999",
                     "/v1/nothing", "/static/../config.json"):
            r = c.get(server.url + path)
            assert r.status_code in (404, 422) and "error" in r.json(), (path, r.text)
        # Never a 500 in all of the above.
        metrics = c.get(server.url + "/metrics").text
        assert not re.search(r'facejax_requests_total\{[^}]*status="500"', metrics)


def test_explain_a_result_with_the_upload_checks_of_search(run, server, tmp_path):
    """POST /v1/explain: two PNG heatmaps for the query and a result id. This run has no
    checkpoint, so it explains with occlusion through the exported embedder and says why."""
    import base64

    work, root = run
    query = _file(os.path.join(root, "person_c", "person_c_002.png"))

    def explain(c, data=query, **form):
        return c.post(server.url + "/v1/explain", files={"image": ("q.png", data, "image/png")},
                      data={a: str(b) for a, b in form.items()})

    with httpx.Client(timeout=120) as c:
        hit = _search(c, server.url, query, k=2).json()["results"][1]
        r = explain(c, id=hit["id"])
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["id"] == hit["id"] and body["method"] == "occlusion"
        assert abs(body["score"] - hit["score"]) < 1e-4
        assert "no similarity maps" in body["note"]
        for key in ("query_overlay", "result_overlay"):
            prefix = "data:image/png;base64,"
            assert body[key].startswith(prefix)
            png = Image.open(io.BytesIO(base64.b64decode(body[key][len(prefix):])))
            assert png.format == "PNG" and png.size == (16, 16)
        # Bad requests: 4xx JSON, never a 500.
        r = explain(c, id=99999)
        assert r.status_code == 404 and "99999" in r.json()["error"]
        r = explain(c, id=hit["id"], method="gradcam")
        assert r.status_code == 422 and "method" in r.json()["error"]
        r = explain(c, id=hit["id"], method="similarity")
        assert r.status_code == 422 and "use --method occlusion" in r.json()["error"]
        r = explain(c, data=b"<html>hi</html>", id=hit["id"])
        assert r.status_code == 415, r.text
        r = explain(c, data=b"\xff\xd8\xff" + bytes(11 * 2**20), id=hit["id"])
        assert r.status_code == 413 and "limit" in r.json()["error"]
        r = c.post(server.url + "/v1/explain", files={"image": ("q.png", query, "image/png")})
        assert r.status_code == 422 and "id" in r.json()["error"]
        metrics = c.get(server.url + "/metrics").text
        assert 'endpoint="/v1/explain",status="200"' in metrics
        assert not re.search(r'facejax_requests_total\{[^}]*status="500"', metrics)


def test_gallery_enrol_list_delete_and_auth(run, server):
    work, root = run
    url = server.url
    red = _png((250, 10, 10))
    with httpx.Client(timeout=30) as c:
        files = [("images", ("a.png", red, "image/png")),
                 ("images", ("b.png", _png((240, 20, 10)), "image/png"))]
        assert c.post(url + "/v1/gallery", data={"label": "Rita"}, files=files).status_code == 401
        r = c.post(url + "/v1/gallery", data={"label": "Rita"}, files=files,
                   headers={"X-API-Key": "wrong"})
        assert r.status_code == 403 and "not valid" in r.json()["error"]
        for bad in ("", "x" * 201, "tab\there"):
            r = c.post(url + "/v1/gallery", data={"label": bad}, files=files, headers=KEY)
            assert r.status_code == 422, (bad, r.text)
        size = c.get(url + "/v1/info").json()["gallery_size"]
        r = c.post(url + "/v1/gallery", data={"label": "Rita"}, files=files,
                   headers={"Authorization": "Bearer test-key"})
        assert r.status_code == 200, r.text
        ids = r.json()["ids"]
        assert len(ids) == 2 and r.json()["gallery_size"] == size + 2
        # Searchable at once, listed, counted, and its thumbnail served.
        top = _search(c, url, red, k=1).json()["results"][0]
        assert (top["id"], top["label"], top["source"]) == (ids[0], "Rita", "enrolled")
        listed = c.get(url + "/v1/gallery", params={"label": "Rita"}).json()
        assert [it["id"] for it in listed["items"]] == ids and listed["total"] == 2
        assert {"label": "Rita", "count": 2} in c.get(url + "/v1/identities").json()["identities"]
        thumb = c.get(url + f"/v1/images/{ids[0]}")
        assert thumb.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(thumb.content)).getpixel((5, 5))[0] > 200
        dataset = c.get(url + f"/v1/images/{_search(c, url, red, k=3).json()['results'][2]['id']}")
        assert dataset.status_code == 200 and dataset.content[:2] == b"\xff\xd8"
        # Delete needs the key; then the item is gone everywhere.
        assert c.delete(url + f"/v1/gallery/{ids[0]}").status_code == 401
        r = c.delete(url + f"/v1/gallery/{ids[0]}", headers=KEY)
        assert r.json() == {"deleted": ids[0], "gallery_size": size + 1}
        assert c.delete(url + f"/v1/gallery/{ids[0]}", headers=KEY).status_code == 404
        assert c.get(url + f"/v1/images/{ids[0]}").status_code == 404
        assert ids[0] not in [h["id"] for h in _search(c, url, red, k=5).json()["results"]]
        assert c.delete(url + f"/v1/gallery/{ids[1]}", headers=KEY).status_code == 200
        assert "Rita" not in [i["label"] for i in c.get(url + "/v1/identities").json()[
            "identities"]]


def _copy(run, tmp_path) -> str:
    """A copy of the run: the module's server holds the run itself (one process per run)."""
    import shutil

    work = str(tmp_path / "run_copy")
    shutil.copytree(run[0], work, ignore=shutil.ignore_patterns(".facejax.lock*"))
    return work


def test_verify_with_and_without_a_calibrated_threshold(run, tmp_path):
    work, root = _copy(run, tmp_path), run[1]
    a = _file(os.path.join(root, "person_a", "person_a_000.png"))
    a2 = _file(os.path.join(root, "person_a", "person_a_001.png"))
    b = _file(os.path.join(root, "person_b", "person_b_000.png"))
    report = os.path.join(work, "report")
    os.makedirs(report, exist_ok=True)
    path = os.path.join(report, "verification.json")
    try:
        with start_server(work) as s, httpx.Client(timeout=30) as c:
            r = c.post(s.url + "/v1/verify", files={"image_a": ("a", a, "image/png"),
                                                    "image_b": ("b", a2, "image/png")})
            body = r.json()
            assert body["score"] > 0.999 and body["same"] is None and body["threshold"] is None
            assert "eval_verification.py" in body["note"]
        with open(path, "w") as f:
            json.dump(dict(metric="cosine", best_threshold_all=0.9), f)
        with start_server(work) as s, httpx.Client(timeout=30) as c:
            same = c.post(s.url + "/v1/verify", files={"image_a": ("a", a, "image/png"),
                                                       "image_b": ("b", a2, "image/png")}).json()
            diff = c.post(s.url + "/v1/verify", files={"image_a": ("a", a, "image/png"),
                                                       "image_b": ("b", b, "image/png")}).json()
            assert (same["same"], diff["same"]) == (True, False)
            assert same["threshold"] == 0.9 and same["threshold_source"].endswith(
                "verification.json")
            hits = _search(c, s.url, a, k=12).json()["results"]
            assert [h["match"] for h in hits] == [h["score"] >= 0.9 for h in hits]
            assert hits[0]["match"] and not hits[-1]["match"]
            assert c.get(s.url + "/v1/info").json()["threshold"] == 0.9
        # An evaluation that measured open-set rejection: a search's "match" then uses the
        # threshold that accepts 5% of unknown people; pair verification keeps the pair one.
        rows = [dict(target_false_accept=f, threshold=t) for f, t in ((0.1, 0.5), (0.05, 0.95))]
        report_json = os.path.join(report, "report.json")
        with open(report_json, "w") as f:
            json.dump(dict(rejection=dict(tradeoff=rows)), f)
        with start_server(work) as s, httpx.Client(timeout=30) as c:
            hits = _search(c, s.url, a, k=12).json()
            assert hits["threshold"] == 0.95
            assert [h["match"] for h in hits["results"]] == [h["score"] >= 0.95
                                                            for h in hits["results"]]
            info = c.get(s.url + "/v1/info").json()
            assert (info["threshold"], info["match_threshold"]) == (0.9, 0.95)
            assert "open set" in info["match_threshold_source"]
            same = c.post(s.url + "/v1/verify", files={"image_a": ("a", a, "image/png"),
                                                       "image_b": ("b", a2, "image/png")}).json()
            assert same["threshold"] == 0.9
    finally:
        os.remove(path) if os.path.exists(path) else None


def test_overload_answers_503_with_retry_after_and_nothing_else(run, tmp_path):
    work, root = _copy(run, tmp_path), run[1]
    data = _file(os.path.join(root, "person_a", "person_a_000.png"))
    statuses = []
    with start_server(work, extra_args=["--queue_size", "2", "--max_batch", "1",
                                        "--max_wait_ms", "0"]) as s:
        def client():
            with httpx.Client(timeout=60) as c:
                for _ in range(6):
                    r = _search(c, s.url, data)
                    statuses.append((r.status_code, r.headers.get("retry-after")))

        threads = [threading.Thread(target=client) for _ in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    codes = {code for code, _ in statuses}
    assert codes <= {200, 503} and 200 in codes and 503 in codes, codes
    assert all(retry == "1" for code, retry in statuses if code == 503)


def test_kill_9_during_enrolments_loses_no_acknowledged_change(run, tmp_path):
    """kill -9 mid-stream: after a restart every acknowledged enrolment is there and
    searchable, nothing is twice, and the compacted index passes the manifest checks."""
    work = _copy(run, tmp_path)
    rng = np.random.default_rng(0)
    colours = [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(400)]
    acked: dict[int, tuple] = {}
    deleted: list[int] = []
    deleting: list[int] = []  # a delete sent but not answered: it may or may not have happened
    server = Server(work, extra_args=["--compact_every", "7"]).wait_ready()
    stop = threading.Event()

    def stream():
        with httpx.Client(timeout=30) as c:
            for i, colour in enumerate(colours):
                if stop.is_set():
                    return
                try:
                    image = ("images", ("x.png", _png(colour), "image/png"))
                    r = c.post(server.url + "/v1/gallery", data={"label": f"s{i % 5}"},
                               headers=KEY, files=[image])
                    if r.status_code == 200:
                        acked[r.json()["ids"][0]] = colour
                    if i % 9 == 8:
                        victim = next(iter(acked))
                        deleting.append(victim)
                        if c.delete(server.url + f"/v1/gallery/{victim}",
                                    headers=KEY).status_code == 200:
                            deleted.append(victim)
                            acked.pop(victim)
                        deleting.remove(victim)
                except httpx.HTTPError:
                    return  # the server died mid-request: that change was never acknowledged

    writers = [threading.Thread(target=stream)]
    writers[0].start()
    while len(acked) < 40:
        time.sleep(0.01)
    assert server.kill() == -9
    stop.set()
    writers[0].join()
    # (The log may be empty: with --compact_every 7 the kill can follow a compaction.)
    assert os.path.exists(os.path.join(work, "gallery", "log.jsonl"))

    with start_server(work) as s, httpx.Client(timeout=30) as c:
        items = []
        for label in (f"s{i}" for i in range(5)):
            items += c.get(s.url + "/v1/gallery", params={"label": label, "limit": 1000}
                           ).json()["items"]
        ids = [it["id"] for it in items]
        assert len(ids) == len(set(ids))                  # nothing twice
        assert set(acked) - set(deleting) <= set(ids)     # nothing acknowledged lost
        assert not set(deleted) & set(ids)                # no acknowledged delete undone
        assert len(set(ids) - set(acked)) <= 1            # at most the one in flight
        for item_id in [i for i in acked if i in ids][::7]:
            top = _search(c, s.url, _png(acked[item_id]), k=3).json()["results"]
            assert item_id in [h["id"] for h in top if h["score"] > 0.9999], item_id
    # The graceful stop compacted the log into the saved index, which loads and checks out.
    meta = load_embedder(os.path.join(work, "embedder")).meta
    index = load_index(os.path.join(work, "index"), expect=meta)
    assert set(acked) - set(deleting) <= set(index.ids.tolist())
    assert os.path.getsize(os.path.join(work, "gallery", "log.jsonl")) == 0


def test_bad_start_up_is_one_line(tmp_path):
    s = Server(str(tmp_path / "nothing"))
    assert s.proc.wait(timeout=120) == 2
    out = s.output()
    assert out.startswith("error: ") and "Traceback" not in out, out


def test_faces_info_and_alignment(run, monkeypatch):
    """A face embedder says what it expects; align=true finds no face in a flat colour (422),
    and without dlib it is a 422 that names the extra to install."""
    from facejax.serve.service import SearchService
    from facejax.serve.settings import ServeSettings
    from facejax.serve.uploads import UploadError

    service = SearchService(run[0], ServeSettings())
    assert not service.expects_face_chips and service.info()["faces_note"] == ""
    service.face_crop = (0.2, 0.1, 1.0, 0.9)
    assert service.expects_face_chips and "face_crop" in service.info()["faces_note"]
    with pytest.raises(UploadError, match="no face found") as e:
        service.decode(_png((90, 90, 90), size=(120, 120)), "image", align=True)
    assert e.value.status == 422
    monkeypatch.setattr(SearchService, "alignment_available", property(lambda self: False))
    service._aligner = None
    with pytest.raises(UploadError, match=r"\.\[faces\]") as e:
        service.decode(_png((90, 90, 90)), "image", align=True)
    assert e.value.status == 422
    assert "pip install" in service.info()["faces_note"]


def test_a_scann_index_below_its_target_is_announced(run):
    from facejax.serve.service import SearchService
    from facejax.serve.settings import ServeSettings

    service = SearchService(run[0], ServeSettings())
    assert service.search_warning() == "" and service.info()["search_warning"] == ""
    index = service.gallery.index
    index.backend, index.tuning = "scann", None
    assert "never tuned" in service.info()["search_warning"]
    index.tuning = dict(k=10, recall=0.61, target_recall=0.95, met=False)
    assert "recall@10 0.610, below its target 0.95" in service.info()["search_warning"]
    index.tuning["met"] = True
    assert service.search_warning() == ""


def test_a_served_run_is_locked(run, server):
    """While a service holds the run, a second service and build_index stop with one line
    naming it; the lock goes with the process."""
    second = Server(run[0])
    assert second.proc.wait(timeout=120) == 2
    out = second.output()
    assert "in use by serve (pid" in out and "Traceback" not in out, out
    from facejax.runlock import Busy

    with pytest.raises(Busy, match="in use by serve"):
        wd.build_workdir_index(run[0], wd.read_run_config(run[0]), progress=False)
