// facejax search page: plain DOM, no framework, no network access beyond the service's own API.
// Every server-provided string goes into the page through textContent or an attribute, never
// through innerHTML (labels are user input).
"use strict";

(function () {
  const KEY_STORAGE = "facejax.apiKey";
  const MAX_IDENTITIES_SHOWN = 500;
  const GALLERY_PAGE = 200;
  const DELETE_CONFIRM_MS = 4000;

  const $ = (id) => document.getElementById(id);
  const state = {
    info: null,
    queryFile: null,
    queryUrl: null,
    identities: [],
    selectedLabel: null,
    galleryOffset: 0,
    galleryTotal: 0,
    searchSeq: 0,
    lastResults: null,
  };

  // ---------------------------------------------------------------- helpers

  function el(tag, props, children) {
    const node = document.createElement(tag);
    if (props) {
      for (const [k, v] of Object.entries(props)) {
        if (v === undefined || v === null) continue;
        if (k === "className") node.className = v;
        else if (k === "text") node.textContent = v;
        else if (k === "dataset") Object.assign(node.dataset, v);
        else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
        else node.setAttribute(k, v);
      }
    }
    for (const child of children || []) {
      if (child !== null && child !== undefined) {
        node.append(child instanceof Node ? child : document.createTextNode(String(child)));
      }
    }
    return node;
  }

  function fmtInt(n) {
    return typeof n === "number" ? n.toLocaleString("en-US") : String(n);
  }

  function fmtMs(v) {
    if (typeof v !== "number") return String(v);
    return v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2);
  }

  // Only same-origin image URLs are used (a gallery entry cannot point the page elsewhere).
  function safeImageUrl(url) {
    if (typeof url !== "string" || !url) return null;
    try {
      const u = new URL(url, window.location.href);
      if (u.origin !== window.location.origin) return null;
      return u.pathname + u.search;
    } catch (e) {
      return null;
    }
  }

  // Thumbnails: a plain <img src>, unless the service wants the key on reads too (an <img>
  // cannot send a header): then the bytes come through fetch with the key, as a blob URL.
  function setImage(img, src) {
    const readsNeedKey = state.info && state.info.auth && state.info.auth.reads;
    if (!readsNeedKey) {
      img.src = src;
      return;
    }
    fetch(src, { headers: { "X-API-Key": apiKey() } })
      .then((r) => (r.ok ? r.blob() : Promise.reject(new Error(`HTTP ${r.status}`))))
      .then((blob) => {
        const url = URL.createObjectURL(blob);
        img.addEventListener("load", () => URL.revokeObjectURL(url), { once: true });
        img.src = url;
      })
      .catch(() => img.classList.add("broken"));
  }

  function thumbImage(url, alt) {
    const src = safeImageUrl(url);
    if (!src) return el("span", { className: "no-thumb", text: "no image" });
    const img = el("img", { alt, decoding: "async" });
    setImage(img, src);
    return img;
  }

  function apiKey() {
    return $("api-key").value.trim();
  }

  function showError(message) {
    $("error-message").textContent = message;
    $("error").hidden = false;
  }

  function clearError() {
    $("error").hidden = true;
    $("error-message").textContent = "";
  }

  class ApiError extends Error {}

  // fetch + JSON with the service's error shape {"error": ..., "status": N} turned into a message.
  async function api(method, path, { body, auth = false } = {}) {
    const headers = { Accept: "application/json" };
    const key = apiKey();
    const writesOpen = state.info && state.info.auth && state.info.auth.writes === false;
    if (auth && !key && !writesOpen) {
      throw new ApiError("This needs the API key: enter it at the top right.");
    }
    if (key) headers["X-API-Key"] = key;
    let response;
    try {
      response = await fetch(path, { method, headers, body });
    } catch (e) {
      throw new ApiError(`${method} ${path}: the service is unreachable (${e.message})`);
    }
    const text = await response.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch (e) {
      data = null;
    }
    if (!response.ok) {
      let message = data && typeof data.error === "string" ? data.error
        : data && data.detail ? JSON.stringify(data.detail)
        : text.trim().slice(0, 300) || response.statusText;
      if (response.status === 401 || response.status === 403) {
        message += key ? " (check the API key)" : " (enter the API key at the top right)";
      }
      throw new ApiError(`${method} ${path} failed (HTTP ${response.status}): ${message}`);
    }
    if (data === null) {
      throw new ApiError(`${method} ${path}: the service answered something that is not JSON`);
    }
    return data;
  }

  function reportError(e) {
    showError(e instanceof ApiError ? e.message : `Unexpected error: ${e && e.message || e}`);
    if (!(e instanceof ApiError)) console.error(e);
  }

  // ---------------------------------------------------------------- info

  async function loadInfo() {
    try {
      state.info = await api("GET", "/v1/info");
      renderInfo();
    } catch (e) {
      $("info").textContent = "service info unavailable";
      reportError(e);
    }
  }

  function setGallerySize(n) {
    if (state.info && typeof n === "number") {
      state.info.gallery_size = n;
      renderInfo();
    }
  }

  function renderInfo() {
    const info = state.info;
    const box = $("info");
    box.replaceChildren();
    const parts = [
      ["model", info.model],
      ["gallery", `${fmtInt(info.gallery_size)} images`],
      ["dim", info.embed_dim],
      ["backend", info.backend],
    ];
    if (info.match_threshold !== null && info.match_threshold !== undefined) {
      parts.push(["no-match below", Number(info.match_threshold).toFixed(3)]);
    }
    for (const [name, value] of parts) {
      if (value === undefined || value === null) continue;
      box.append(el("span", { className: "info-item", dataset: { field: name } }, [
        el("span", { className: "info-name", text: name }),
        el("span", { className: "info-value", text: String(value) }),
      ]));
    }
    const limits = info.limits || {};
    if (typeof limits.max_k === "number") $("k").max = String(limits.max_k);
    const hint = $("chip-hint");
    if (info.expects_face_chips) {
      hint.textContent = info.alignment_available
        ? "the model expects face chips; the service can align photos"
        : "the model expects aligned face chips (crop the face first)";
      hint.hidden = false;
    } else {
      hint.hidden = true;
    }
  }

  // ---------------------------------------------------------------- search

  function tooLarge(file) {
    const max = state.info && state.info.limits && state.info.limits.max_upload_bytes;
    return typeof max === "number" && file.size > max
      ? `${file.name || "image"} is ${fmtInt(file.size)} bytes; the service accepts at most ` +
        `${fmtInt(max)}`
      : null;
  }

  function setQuery(file) {
    if (!file) return;
    if (file.type && !file.type.startsWith("image/")) {
      showError(`${file.name || "the file"} is not an image (${file.type}).`);
      return;
    }
    state.queryFile = file;
    if (state.queryUrl) URL.revokeObjectURL(state.queryUrl);
    state.queryUrl = URL.createObjectURL(file);
    const preview = $("query-preview");
    preview.src = state.queryUrl;
    preview.hidden = false;
    $("drop-zone").classList.add("has-image");
    $("drop-zone").classList.remove("no-preview");
    $("search-button").disabled = false;
    runSearch();
  }

  async function runSearch() {
    const file = state.queryFile;
    if (!file) {
      showError("Pick a query image first.");
      return;
    }
    const big = tooLarge(file);
    if (big) {
      showError(big);
      return;
    }
    clearError();
    const seq = ++state.searchSeq;
    const form = new FormData();
    form.append("image", file, file.name || "pasted.png");
    const k = parseInt($("k").value, 10);
    form.append("k", String(Number.isFinite(k) && k > 0 ? k : 10));
    $("search-button").disabled = true;
    $("results-summary").textContent = "Searching…";
    $("results").classList.add("stale");
    try {
      const data = await api("POST", "/v1/search", { body: form });
      if (seq !== state.searchSeq) return;  // a newer query replaced this one
      renderResults(data);
      setGallerySize(data.gallery_size);
    } catch (e) {
      if (seq !== state.searchSeq) return;
      state.lastResults = null;
      $("results").replaceChildren();
      $("results-summary").textContent = "Search failed.";
      $("timings").replaceChildren();
      $("legend").hidden = true;
      reportError(e);
    } finally {
      if (seq === state.searchSeq) {
        $("search-button").disabled = false;
        $("results").classList.remove("stale");
      }
    }
  }

  function renderResults(data) {
    state.lastResults = data;
    const results = Array.isArray(data.results) ? data.results : [];
    const queryLabel = $("query-label").value.trim();
    const threshold = data.threshold === undefined ? null : data.threshold;
    const box = $("results");
    box.replaceChildren();
    let same = 0;
    let noMatch = 0;
    for (const r of results) {
      const label = r.label === null || r.label === undefined ? "" : String(r.label);
      const classes = ["result"];
      if (queryLabel) {
        const isSame = label === queryLabel;
        if (isSame) same += 1;
        classes.push(isSame ? "same" : "different");
      }
      const isNoMatch = threshold !== null && r.match === false;
      if (isNoMatch) {
        classes.push("no-match");
        noMatch += 1;
      }
      const score = typeof r.score === "number" ? r.score : Number(r.score);
      const thumb = el("div", { className: "thumb" }, [thumbImage(r.image_url, label)]);
      thumb.append(el("span", { className: "rank", text: `#${r.rank}` }));
      if (isNoMatch) thumb.append(el("span", { className: "badge", text: "no match" }));
      const figure = el("figure", {
        className: classes.join(" "),
        dataset: { label, id: String(r.id), score: String(r.score), rank: String(r.rank) },
      });
      const tooltip = [r.path, r.source, r.id !== undefined ? `id ${r.id}` : null]
        .filter((x) => x !== undefined && x !== null && x !== "").join("\n");
      if (tooltip) figure.title = tooltip;
      figure.append(
        thumb,
        el("figcaption", null, [
          el("span", { className: "label", title: label, text: label || "(no label)" }),
          el("span", { className: "score", text: Number.isFinite(score) ? score.toFixed(3) : "–" }),
        ]),
        el("button", {
          type: "button", className: "explain-toggle", text: "explain",
          title: "why does this match? heatmaps over the query and this result",
          onclick: (ev) => toggleExplain(figure, r.id, ev.currentTarget),
        }),
      );
      box.append(figure);
    }
    let summary = results.length
      ? `Top ${results.length} of ${fmtInt(data.gallery_size)} gallery images`
      : "No results (the gallery may be empty, or nothing passed min_score).";
    if (queryLabel && results.length) {
      summary += ` · ${same} of ${results.length} labelled “${queryLabel}”`;
      const first = results[0].label === queryLabel ? "top-1 correct" : "top-1 wrong";
      summary += ` · ${first}`;
    }
    if (threshold !== null) {
      summary += ` · threshold ${Number(threshold).toFixed(3)}: ${noMatch} below it`;
    }
    $("results-summary").textContent = summary;
    $("legend").hidden = !queryLabel || !results.length;
    renderTimings(data.timings_ms);
  }

  // ---------------------------------------------------------------- explain a match

  // Only PNG data URLs from the service are shown (CSP img-src allows data:).
  function pngDataUrl(v) {
    return typeof v === "string" && v.startsWith("data:image/png;base64,") ? v : null;
  }

  async function toggleExplain(figure, id, button) {
    const open = figure.querySelector(".explain");
    if (open) {
      open.hidden = !open.hidden;
      button.textContent = open.hidden ? "explain" : "hide";
      return;
    }
    if (!state.queryFile) return;
    const form = new FormData();
    form.append("image", state.queryFile, state.queryFile.name || "pasted.png");
    form.append("id", String(id));
    button.disabled = true;
    button.textContent = "explaining…";
    try {
      const data = await api("POST", "/v1/explain", { body: form });
      const q = pngDataUrl(data.query_overlay);
      const r = pngDataUrl(data.result_overlay);
      if (!q || !r) throw new ApiError("the service sent no explanation images");
      const note = `${data.method} map, cosine ${Number(data.score).toFixed(3)}: red raises it` +
        (data.note ? ` (${data.note})` : "");
      figure.append(el("div", { className: "explain", title: note }, [
        el("img", { className: "explain-query", alt: "query: regions behind the match", src: q }),
        el("img", { className: "explain-result", alt: "result: regions behind the match", src: r }),
        el("span", { className: "explain-note", text: `${data.method} · query | result` }),
      ]));
      button.textContent = "hide";
    } catch (e) {
      button.textContent = "explain";
      reportError(e);
    } finally {
      button.disabled = false;
    }
  }

  function renderTimings(t) {
    const box = $("timings");
    box.replaceChildren();
    if (!t || typeof t !== "object") return;
    const order = ["decode", "queue", "embed", "search", "total"];
    const keys = order.filter((k) => k in t).concat(Object.keys(t).filter((k) => !order.includes(k)));
    for (const k of keys) {
      box.append(el("span", { className: k === "total" ? "timing total" : "timing" }, [
        el("span", { className: "timing-name", text: k }),
        el("span", { className: "timing-value", text: `${fmtMs(t[k])} ms` }),
      ]));
    }
  }

  function setupSearch() {
    // A file the browser cannot show (the service may still read it, or explain why not).
    $("query-preview").addEventListener("error", () => {
      if (!$("query-preview").getAttribute("src")) return;
      $("query-preview").hidden = true;
      $("drop-zone").classList.remove("has-image");
      $("drop-zone").classList.add("no-preview");
    });
    $("query-file").addEventListener("change", (ev) => {
      const file = ev.target.files && ev.target.files[0];
      if (file) setQuery(file);
      ev.target.value = "";  // picking the same file again searches again
    });
    $("search-button").addEventListener("click", runSearch);
    $("k").addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && state.queryFile) runSearch();
    });
    // The frames follow the typed label without a new search.
    $("query-label").addEventListener("input", () => {
      if (state.lastResults) renderResults(state.lastResults);
    });
    $("query-label").addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && state.queryFile) runSearch();
    });
    const zone = $("drop-zone");
    zone.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" || ev.key === " ") {
        ev.preventDefault();
        $("query-file").click();
      }
    });
    for (const type of ["dragenter", "dragover"]) {
      zone.addEventListener(type, (ev) => {
        ev.preventDefault();
        zone.classList.add("dragging");
      });
    }
    for (const type of ["dragleave", "dragend"]) {
      zone.addEventListener(type, () => zone.classList.remove("dragging"));
    }
    zone.addEventListener("drop", (ev) => {
      ev.preventDefault();
      zone.classList.remove("dragging");
      const files = ev.dataTransfer && ev.dataTransfer.files;
      if (files && files.length) setQuery(files[0]);
      else showError("Drop an image file (dragging an image from another web page is not supported).");
    });
    // A file dropped outside the zone must not navigate away from the page.
    window.addEventListener("dragover", (ev) => ev.preventDefault());
    window.addEventListener("drop", (ev) => ev.preventDefault());
    document.addEventListener("paste", (ev) => {
      const items = (ev.clipboardData && ev.clipboardData.items) || [];
      for (const item of items) {
        if (item.kind === "file" && item.type.startsWith("image/")) {
          const file = item.getAsFile();
          if (file) {
            ev.preventDefault();
            setQuery(file);
            return;
          }
        }
      }
    });
  }

  // ---------------------------------------------------------------- enrol

  function setupEnrol() {
    $("enrol-button").addEventListener("click", async () => {
      const status = $("enrol-status");
      const label = $("enrol-name").value.trim();
      const files = Array.from($("enrol-files").files || []);
      status.className = "status";
      if (!label) {
        showError("Enrol: type a name first.");
        return;
      }
      if (!files.length) {
        showError("Enrol: choose at least one photo.");
        return;
      }
      const maxFiles = state.info && state.info.limits && state.info.limits.max_files;
      if (typeof maxFiles === "number" && files.length > maxFiles) {
        showError(`Enrol: at most ${maxFiles} photos per request, got ${files.length}.`);
        return;
      }
      for (const f of files) {
        const big = tooLarge(f);
        if (big) {
          showError(`Enrol: ${big}`);
          return;
        }
      }
      clearError();
      const form = new FormData();
      form.append("label", label);
      for (const f of files) form.append("images", f, f.name);
      $("enrol-button").disabled = true;
      status.textContent = `Enrolling ${files.length} photo${files.length > 1 ? "s" : ""}…`;
      try {
        const data = await api("POST", "/v1/gallery", { body: form, auth: true });
        const ids = Array.isArray(data.ids) ? data.ids : [];
        status.replaceChildren(
          el("span", { text: `Enrolled ${ids.length} image${ids.length === 1 ? "" : "s"} as ` }),
          el("strong", { text: String(data.label ?? label) }),
          el("span", { text: " · ids " }),
          el("code", { id: "enrol-ids", text: ids.join(", ") }),
        );
        status.classList.add("ok");
        $("enrol-files").value = "";
        setGallerySize(data.gallery_size);
        // Show what was just enrolled in the gallery panel.
        state.selectedLabel = String(data.label ?? label);
        state.galleryOffset = 0;
        await loadIdentities();
        await loadGallery();
      } catch (e) {
        status.textContent = "Enrol failed.";
        status.classList.add("failed");
        reportError(e);
      } finally {
        $("enrol-button").disabled = false;
      }
    });
  }

  // ---------------------------------------------------------------- gallery

  async function loadIdentities() {
    try {
      const data = await api("GET", "/v1/identities");
      const list = Array.isArray(data.identities) ? data.identities : [];
      state.identities = list.map((x) => ({ label: String(x.label), count: x.count }));
      state.identities.sort((a, b) => a.label.localeCompare(b.label));
      renderIdentities();
    } catch (e) {
      reportError(e);
    }
  }

  function renderIdentities() {
    const needle = $("identity-filter").value.trim().toLowerCase();
    const matching = needle
      ? state.identities.filter((x) => x.label.toLowerCase().includes(needle))
      : state.identities;
    const shown = matching.slice(0, MAX_IDENTITIES_SHOWN);
    const ul = $("identities");
    ul.replaceChildren();
    for (const item of shown) {
      const li = el("li", {
        className: item.label === state.selectedLabel ? "identity selected" : "identity",
        dataset: { label: item.label },
      }, [
        el("button", { type: "button", title: item.label,
                       onclick: () => selectIdentity(item.label) }, [
          el("span", { className: "identity-label", text: item.label }),
          el("span", { className: "count", text: fmtInt(item.count) }),
        ]),
      ]);
      ul.append(li);
    }
    let summary = `${fmtInt(state.identities.length)} identities`;
    if (needle) summary = `${fmtInt(matching.length)} of ${summary} match`;
    if (matching.length > shown.length) {
      summary += ` · showing the first ${fmtInt(shown.length)}; filter to narrow`;
    }
    $("identities-summary").textContent = summary;
  }

  function selectIdentity(label) {
    state.selectedLabel = label;
    state.galleryOffset = 0;
    for (const li of $("identities").children) {
      li.classList.toggle("selected", li.dataset.label === label);
    }
    loadGallery();
  }

  async function loadGallery() {
    const label = state.selectedLabel;
    if (label === null) return;
    const params = new URLSearchParams({
      label, offset: String(state.galleryOffset), limit: String(GALLERY_PAGE),
    });
    try {
      const data = await api("GET", `/v1/gallery?${params}`);
      if (label !== state.selectedLabel) return;
      const items = Array.isArray(data.items) ? data.items : [];
      const total = typeof data.total === "number" ? data.total : items.length;
      if (!items.length && total > 0 && state.galleryOffset > 0) {
        // The last item of a page was deleted: step back a page.
        state.galleryOffset = Math.max(0, state.galleryOffset - GALLERY_PAGE);
        return loadGallery();
      }
      state.galleryTotal = total;
      renderGallery(label, items);
    } catch (e) {
      reportError(e);
    }
  }

  function renderGallery(label, items) {
    const box = $("gallery-items");
    box.replaceChildren();
    for (const item of items) {
      const del = el("button", { type: "button", className: "delete", title: "delete from the gallery" },
        ["Delete"]);
      let armed = null;
      del.addEventListener("click", async () => {
        if (!armed) {  // first click arms, the second (within a few seconds) deletes
          del.textContent = "Confirm";
          del.classList.add("armed");
          armed = setTimeout(() => {
            armed = null;
            del.textContent = "Delete";
            del.classList.remove("armed");
          }, DELETE_CONFIRM_MS);
          return;
        }
        clearTimeout(armed);
        del.disabled = true;
        await deleteItem(item.id);
      });
      box.append(el("figure", {
        className: "gallery-item",
        dataset: { id: String(item.id), label: String(item.label ?? "") },
        title: [item.path, item.source].filter((x) => x).join("\n") || null,
      }, [
        el("div", { className: "thumb" }, [thumbImage(item.image_url, String(item.label ?? ""))]),
        el("figcaption", null, [el("span", { className: "item-id", text: `id ${item.id}` }), del]),
      ]));
    }
    const total = state.galleryTotal;
    const start = items.length ? state.galleryOffset + 1 : 0;
    const end = state.galleryOffset + items.length;
    const sel = $("gallery-selected");
    sel.replaceChildren(
      el("strong", { text: label }),
      el("span", { text: total ? ` · ${fmtInt(start)}–${fmtInt(end)} of ${fmtInt(total)}`
        : " · no images" }),
    );
    $("gallery-prev").disabled = state.galleryOffset <= 0;
    $("gallery-next").disabled = end >= total;
    $("gallery-pager").hidden = state.galleryOffset <= 0 && end >= total;
  }

  async function deleteItem(id) {
    try {
      const data = await api("DELETE", `/v1/gallery/${encodeURIComponent(id)}`, { auth: true });
      clearError();
      setGallerySize(data.gallery_size);
    } catch (e) {
      reportError(e);
    }
    await loadGallery();
    await loadIdentities();
  }

  function setupGallery() {
    let timer = null;
    $("identity-filter").addEventListener("input", () => {
      clearTimeout(timer);
      timer = setTimeout(renderIdentities, 120);
    });
    $("identities-refresh").addEventListener("click", async () => {
      await loadIdentities();
      await loadGallery();
    });
    $("gallery-prev").addEventListener("click", () => {
      state.galleryOffset = Math.max(0, state.galleryOffset - GALLERY_PAGE);
      loadGallery();
    });
    $("gallery-next").addEventListener("click", () => {
      state.galleryOffset += GALLERY_PAGE;
      loadGallery();
    });
  }

  // ---------------------------------------------------------------- start

  function setupApiKey() {
    const input = $("api-key");
    try {
      input.value = sessionStorage.getItem(KEY_STORAGE) || "";
    } catch (e) { /* storage disabled: the key just is not kept */ }
    // A service that wants the key on reads answered 401 before the key was typed: retry then.
    input.addEventListener("change", () => {
      if (!state.info || (state.info.auth && state.info.auth.reads)) {
        clearError();
        loadInfo();
        loadIdentities();
      }
    });
    input.addEventListener("input", () => {
      try {
        if (input.value) sessionStorage.setItem(KEY_STORAGE, input.value);
        else sessionStorage.removeItem(KEY_STORAGE);
      } catch (e) { /* ignore */ }
    });
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("error-close").addEventListener("click", clearError);
    setupApiKey();
    setupSearch();
    setupEnrol();
    setupGallery();
    loadInfo();
    loadIdentities();
  });
})();
