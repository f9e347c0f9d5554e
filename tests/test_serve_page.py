"""The service's web page in a real browser (headless Chromium through Selenium).

Searches by example through the file input, enrols a new identity with the API key, and deletes
it again from the gallery panel, against the real server on a tiny real run. Chromium and
chromedriver are required: without them the test fails (it never skips).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import urllib.parse
import urllib.request

import pytest
from serve_helpers import make_serve_run, start_server

from facejax.serve.app import STATIC_DIR

CHROMIUM = os.environ.get("FACEJAX_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("FACEJAX_CHROMEDRIVER", "/usr/bin/chromedriver")
# Set to a .png path to keep a screenshot of the finished page (tmp_path goes when a test passes).
SCREENSHOT_ENV = "FACEJAX_PAGE_SCREENSHOT"
CLASSES = {"amber": 4, "blue_jay": 4, "cobalt": 4}
WAIT_S = 30
# A label that is also markup: the page must show it as text, never run or render it.
NEW_LABEL = 'Zoë <img src=x onerror="window.__pwned=1"> & co'


@pytest.fixture
def driver():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.isfile(p)]
    if missing:
        pytest.fail(f"the web page test needs Chromium and its driver, missing: {missing}. "
                    f"Install them (Debian: apt-get install chromium chromium-driver) or point "
                    f"FACEJAX_CHROMIUM / FACEJAX_CHROMEDRIVER at them.", pytrace=False)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as e:
        pytest.fail(f"the web page test needs selenium (pip install selenium): {e}",
                    pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1000",
                "--disable-dev-shm-usage", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield drv
    finally:
        drv.quit()


def _wait(drv, condition, what: str):
    """WebDriverWait that fails with what it waited for and the page's error box."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(drv, WAIT_S, poll_frequency=0.1).until(condition)
    except TimeoutException:
        pytest.fail(f"timed out after {WAIT_S} s waiting for {what}; page error box: "
                    f"{_error_text(drv)!r}; browser log: {_browser_log(drv)}", pytrace=False)


def _error_text(drv) -> str | None:
    from selenium.webdriver.common.by import By

    box = drv.find_element(By.ID, "error")
    return box.text if box.is_displayed() else None


def _browser_log(drv) -> list[str]:
    try:
        return [e["message"] for e in drv.get_log("browser")]
    except Exception:  # the log is a diagnostic only
        return []


def _css(drv, selector):
    from selenium.webdriver.common.by import By

    return drv.find_elements(By.CSS_SELECTOR, selector)


def _by_id(drv, element_id):
    from selenium.webdriver.common.by import By

    return drv.find_element(By.ID, element_id)


def _identity(drv, label):
    """The .identity item whose data-label is exactly `label` (any characters), or None."""
    for item in _css(drv, "#identities .identity"):
        if item.get_attribute("data-label") == label:
            return item
    return None


def _api(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def test_static_page_fetches_nothing_from_the_network():
    """The page works offline: no CDN, no absolute URL, in any of its files."""
    names = sorted(os.listdir(STATIC_DIR))
    assert {"index.html", "app.js", "style.css"} <= set(names)
    for name in names:
        with open(os.path.join(STATIC_DIR, name), encoding="utf-8") as f:
            text = f.read()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), name
        assert "@import" not in text, name
        if name.endswith(".js"):
            assert not re.search(r"\.(inner|outer)HTML\b|insertAdjacentHTML|document\.write",
                                 text), name


@pytest.mark.slow
def test_page_search_enrol_delete(tmp_path, driver):
    from selenium.webdriver.common.by import By

    work, image_root = make_serve_run(tmp_path, CLASSES)
    query_label = "blue_jay"
    query = os.path.join(image_root, query_label, f"{query_label}_001.png")
    enrol_files = [os.path.join(image_root, "cobalt", f"cobalt_{i:03d}.png") for i in (0, 1)]
    bad_image = tmp_path / "not_an_image.png"
    bad_image.write_bytes(b"this is text, not a PNG")

    with start_server(work, api_keys=("test-key",)) as server:
        info = _api(server.url + "/v1/info")
        driver.get(server.url + "/")
        assert driver.title

        # -- header: model and gallery size from /v1/info; the identities list.
        _wait(driver, lambda d: "gallery" in _by_id(d, "info").text, "the #info header")
        header = _by_id(driver, "info").text
        assert str(info["model"]) in header and str(info["gallery_size"]) in header, header
        _wait(driver, lambda d: len(_css(d, "#identities .identity")) == len(CLASSES),
              "the identities list")
        shown = {e.get_attribute("data-label") for e in _css(driver, "#identities .identity")}
        assert shown == set(CLASSES)

        # -- search by example through the file input, the query's label typed for checking.
        _by_id(driver, "query-label").send_keys(query_label)
        k = _by_id(driver, "k")
        k.clear()
        k.send_keys("5")
        _by_id(driver, "query-file").send_keys(query)
        _wait(driver, lambda d: _css(d, "#results .result") or _error_text(d),
              "search results")
        assert _error_text(driver) is None, _error_text(driver)
        results = _css(driver, "#results .result")
        assert len(results) == min(5, info["gallery_size"]) > 1
        first = results[0]
        assert first.get_attribute("data-label") == query_label
        assert "same" in first.get_attribute("class").split()
        scores = [float(r.get_attribute("data-score")) for r in results]
        assert scores == sorted(scores, reverse=True), scores
        assert first.find_element(By.CSS_SELECTOR, ".score").text == f"{scores[0]:.3f}"
        assert first.find_element(By.CSS_SELECTOR, ".rank").text == "#1"
        for r in results:  # frames: green for the query's label, red for any other
            same = r.get_attribute("data-label") == query_label
            assert ("same" if same else "different") in r.get_attribute("class").split()
        ids = [int(r.get_attribute("data-id")) for r in results]
        assert len(set(ids)) == len(ids)
        # The thumbnails load (an <img> per result, served by /v1/images/{id}).
        _wait(driver, lambda d: d.execute_script(
            "return [...document.querySelectorAll('#results .result img')]"
            ".every(i => i.complete && i.naturalWidth > 0)"), "the result thumbnails")
        timings = _by_id(driver, "timings").text
        for name in ("decode", "embed", "search", "total"):
            assert name in timings, timings
        assert _by_id(driver, "query-preview").get_attribute("src").startswith("blob:")

        # -- explain the second result: two heatmaps appear under it; the toggle hides them.
        toggle = results[1].find_element(By.CSS_SELECTOR, "button.explain-toggle")
        toggle.click()
        _wait(driver, lambda d: d.execute_script(
            "const f = document.querySelectorAll('#results .result')[1];"
            "const i = [...f.querySelectorAll('.explain img')];"
            "return i.length === 2 && i.every(x => x.complete && x.naturalWidth > 0)")
            or _error_text(d), "the explanation overlays")
        assert _error_text(driver) is None, _error_text(driver)
        overlay = results[1].find_element(By.CSS_SELECTOR, ".explain img.explain-result")
        assert overlay.get_attribute("src").startswith("data:image/png;base64,")
        assert "occlusion" in results[1].find_element(By.CSS_SELECTOR, ".explain-note").text
        toggle.click()
        assert not results[1].find_element(By.CSS_SELECTOR, ".explain").is_displayed()
        assert toggle.text == "explain"

        # -- enrol needs the key: without it the page says so.
        _by_id(driver, "enrol-name").send_keys(NEW_LABEL)
        _by_id(driver, "enrol-files").send_keys("\n".join(enrol_files))
        _by_id(driver, "enrol-button").click()
        _wait(driver, lambda d: _error_text(d), "the missing-key error")
        assert "API key" in _error_text(driver)

        # -- enrol with the key: ids shown, the identity listed with its count.
        _by_id(driver, "api-key").send_keys("test-key")
        _by_id(driver, "enrol-button").click()
        _wait(driver, lambda d: "Enrolled" in _by_id(d, "enrol-status").text or _error_text(d),
              "the enrol status")
        assert _error_text(driver) is None, _error_text(driver)
        new_ids = [int(x) for x in _by_id(driver, "enrol-ids").text.split(",")]
        assert len(new_ids) == 2
        assert NEW_LABEL in _by_id(driver, "enrol-status").text
        _by_id(driver, "identity-filter").send_keys("Zoë")
        _wait(driver, lambda d: _identity(d, NEW_LABEL) is not None, "the new identity")
        _wait(driver, lambda d: len(_css(d, "#identities .identity")) == 1, "the filter")
        item = _identity(driver, NEW_LABEL)
        assert item.find_element(By.CSS_SELECTOR, ".identity-label").text == NEW_LABEL
        assert item.find_element(By.CSS_SELECTOR, ".count").text == "2"
        # The label stayed text: no element was made from it, no script ran.
        assert not _css(driver, "#identities img, #enrol-status img, #gallery-items img[src='x']")
        assert driver.execute_script("return window.__pwned") is None
        assert driver.execute_script(
            "return sessionStorage.getItem('facejax.apiKey')") == "test-key"

        # -- gallery panel: the identity's images, then delete both (two clicks: arm, confirm).
        item.find_element(By.TAG_NAME, "button").click()
        _wait(driver, lambda d: len(_css(d, "#gallery-items .gallery-item")) == 2,
              "the identity's gallery items")
        got = sorted(int(e.get_attribute("data-id")) for e in
                     _css(driver, "#gallery-items .gallery-item"))
        assert got == sorted(new_ids)
        after_enrol = _api(server.url + "/v1/info")["gallery_size"]
        assert after_enrol == info["gallery_size"] + 2

        # A screenshot of the page with results, the enrolled identity and its gallery.
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1280, max(1000, height + 140))  # the whole page in one image
        driver.save_screenshot(str(tmp_path / "page.png"))
        if os.environ.get(SCREENSHOT_ENV):
            shutil.copyfile(tmp_path / "page.png", os.environ[SCREENSHOT_ENV])

        for remaining in (1, 0):
            delete = _css(driver, "#gallery-items .gallery-item .delete")[0]
            delete.click()
            assert "armed" in delete.get_attribute("class").split()
            delete.click()
            _wait(driver, lambda d: len(_css(d, "#gallery-items .gallery-item")) == remaining,
                  f"{remaining} gallery item(s) left")
        assert _error_text(driver) is None, _error_text(driver)
        _wait(driver, lambda d: _identity(d, NEW_LABEL) is None, "the identity to go")
        gone = _api(server.url + "/v1/gallery?" + urllib.parse.urlencode({"label": NEW_LABEL}))
        assert gone["total"] == 0
        assert _api(server.url + "/v1/info")["gallery_size"] == info["gallery_size"]
        _wait(driver, lambda d: f"{info['gallery_size']} images" in _by_id(d, "info").text,
              "the header's gallery size")

        # -- a file that is not an image: the server's error message is shown, not swallowed.
        _by_id(driver, "query-file").send_keys(str(bad_image))
        _wait(driver, lambda d: _error_text(d), "the error box")
        assert "HTTP 4" in _error_text(driver), _error_text(driver)
        assert not _css(driver, "#results .result")
        _by_id(driver, "error-close").click()
        assert _error_text(driver) is None

        # Nothing was fetched from anywhere but the service itself.
        origins = driver.execute_script(
            "return performance.getEntriesByType('resource')"
            ".map(e => new URL(e.name).origin)")
        assert set(origins) <= {server.url}, origins
        assert os.path.getsize(tmp_path / "page.png") > 10_000


@pytest.mark.slow
def test_page_with_keyed_reads(tmp_path, driver):
    """--auth_reads: the page asks for the key, then loads everything with it (thumbnails too:
    an <img> cannot send the header, so they come through fetch)."""
    from selenium.webdriver.common.keys import Keys

    work, image_root = make_serve_run(tmp_path, CLASSES)
    with start_server(work, api_keys=("test-key",), extra_args=("--auth_reads",)) as server:
        driver.get(server.url + "/")
        _wait(driver, lambda d: _error_text(d), "the missing-key error")
        assert "401" in _error_text(driver) and "API key" in _error_text(driver)
        assert not _css(driver, "#identities .identity")

        _by_id(driver, "api-key").send_keys("test-key", Keys.TAB)
        _wait(driver, lambda d: len(_css(d, "#identities .identity")) == len(CLASSES),
              "the identities list")
        _wait(driver, lambda d: "gallery" in _by_id(d, "info").text, "the #info header")
        assert _error_text(driver) is None, _error_text(driver)

        _by_id(driver, "query-file").send_keys(os.path.join(image_root, "amber", "amber_002.png"))
        _wait(driver, lambda d: _css(d, "#results .result") or _error_text(d), "search results")
        assert _error_text(driver) is None, _error_text(driver)
        assert _css(driver, "#results .result")[0].get_attribute("data-label") == "amber"
        _wait(driver, lambda d: d.execute_script(
            "const imgs = [...document.querySelectorAll('#results .result img')];"
            "return imgs.length > 0 && imgs.every("
            "  i => i.src.startsWith('blob:') && i.complete && i.naturalWidth > 0)"),
            "the result thumbnails, fetched with the key")
        # /v1/explain is a read like /v1/search: keyed here.
        import httpx

        query = open(os.path.join(image_root, "amber", "amber_002.png"), "rb").read()
        r = httpx.post(server.url + "/v1/explain", data={"id": "0"},
                       files={"image": ("q.png", query, "image/png")}, timeout=60)
        assert r.status_code == 401 and "API key" in r.json()["error"], r.text
