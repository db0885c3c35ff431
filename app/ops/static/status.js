/* Status page: widgets for the /prometheus/metrics/summary figures.
 *
 * Plain JS, no build step. Fetches the summary every few seconds (?refresh=N
 * overrides, 1..300 s), renders every figure with its provenance (fresh,
 * cached, stale, failed, no data), an overall badge and the time of the last
 * update. A null value is shown as "—"; the raw JSON number is kept in the
 * element's data-raw attribute (empty when null) so tests and tools can read it.
 * Figures whose query matched no series (the summary's top-level `no_data` list,
 * or a figure's own `no_data` flag) are listed by name above the cards: "no
 * data" is not an error and does not make the summary degraded, but it must not
 * hide behind a dash either.
 */
(function () {
  "use strict";

  var SECTIONS = [
    { key: "http", title: "HTTP", figures: [
      ["total_requests", "Total requests", "count"],
      ["request_rate_per_minute", "Requests / minute", "rate"],
      ["error_rate", "5xx error rate", "percent"],
      ["avg_latency_ms", "Avg latency", "ms"],
      ["in_progress", "In progress", "count"]] },
    { key: "models", title: "Models", figures: [
      ["total_inference_requests", "Inference requests", "count"],
      ["tokens_used_total", "Tokens used", "count"],
      ["credits_used_total", "Credits used", "decimal"],
      ["avg_inference_latency_ms", "Avg inference latency", "ms"]] },
    { key: "providers", title: "Providers", figures: [
      ["total_providers", "Providers", "count"],
      ["healthy_providers", "Healthy", "count"],
      ["degraded_providers", "Degraded", "count"],
      ["unavailable_providers", "Unavailable", "count"],
      ["avg_error_rate", "Avg error rate", "ratio"],
      ["avg_response_time_ms", "Avg response time", "ms"]] },
    { key: "database", title: "Database", figures: [
      ["total_queries", "Queries", "count"],
      ["avg_query_latency_ms", "Avg query latency", "ms"],
      ["cache_hit_rate", "Cache hit rate", "ratio"]] },
    { key: "business", title: "Business", figures: [
      ["active_api_keys", "Active API keys", "count"],
      ["active_subscriptions", "Active subscriptions", "count"],
      ["active_trials", "Active trials", "count"],
      ["total_tokens_used", "Tokens used", "count"],
      ["total_credits_used", "Credits used", "decimal"]] }
  ];
  var UNIT_SUFFIX = { count: "", decimal: "", rate: "/min", percent: "%", ratio: "%", ms: "ms" };
  var DASH = "\u2014";

  var body = document.body;
  var summaryUrl = body.getAttribute("data-summary-url") || "/prometheus/metrics/summary";
  var refreshSeconds = clamp(Number(new URLSearchParams(location.search).get("refresh")) ||
    Number(body.getAttribute("data-refresh-seconds")) || 5, 1, 300);
  var lastGood = null;
  var elements = {};

  function clamp(v, lo, hi) { return Math.min(Math.max(v, lo), hi); }

  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined) { node.textContent = text; }
    return node;
  }

  function build() {
    var main = document.getElementById("sections");
    SECTIONS.forEach(function (section) {
      var card = el("section", { "class": "card", id: "section-" + section.key,
        "data-section": section.key, "data-state": "unknown" });
      var h2 = el("h2", {}, section.title);
      var sstate = el("span", { "class": "section-state" }, "");
      h2.appendChild(sstate);
      card.appendChild(h2);
      var grid = el("div", { "class": "figures" });
      section.figures.forEach(function (f) {
        var id = "fig-" + section.key + "-" + f[0];
        var box = el("div", { "class": "figure", id: id, "data-section": section.key,
          "data-key": f[0], "data-unit": f[2], "data-state": "unknown" });
        box.appendChild(el("div", { "class": "label" }, f[1]));
        var line = el("div");
        var value = el("span", { "class": "value", "data-raw": "" }, DASH);
        line.appendChild(value);
        line.appendChild(el("span", { "class": "unit" }, UNIT_SUFFIX[f[2]]));
        box.appendChild(line);
        var state = el("div", { "class": "state" }, "");
        box.appendChild(state);
        grid.appendChild(box);
        elements[id] = { box: box, value: value, state: state };
      });
      card.appendChild(grid);
      main.appendChild(card);
      elements["section-" + section.key] = { box: card, state: sstate };
    });
    document.getElementById("refresh-info").textContent = "refresh every " + refreshSeconds + " s";
  }

  function isNumber(v) { return typeof v === "number" && isFinite(v); }

  function format(v, unit) {
    if (!isNumber(v)) { return DASH; }
    var shown = unit === "ratio" ? v * 100 : v;
    var digits;
    if (unit === "count") { digits = Math.abs(shown) >= 100 ? 0 : 2; }
    else if (Math.abs(shown) >= 1000) { digits = 0; }
    else if (Math.abs(shown) >= 10) { digits = 1; }
    else { digits = 2; }
    return shown.toLocaleString("en-US", { maximumFractionDigits: digits,
      minimumFractionDigits: 0 });
  }

  function formatAge(seconds) {
    if (!isNumber(seconds)) { return ""; }
    if (seconds < 90) { return Math.round(seconds) + " s"; }
    if (seconds < 5400) { return Math.round(seconds / 60) + " min"; }
    return (seconds / 3600).toFixed(1) + " h";
  }

  /* Per-value provenance: accepts {values|figures|provenance: {section: {key: {...}}}}
   * or {values: {"section.key": {...}}}; state under state|status, age under
   * age_seconds|age, error type under error_type|errorType|error.errorType. */
  function provenance(data, section, key) {
    var blocks = [data.values, data.figures, data.provenance];
    for (var i = 0; i < blocks.length; i++) {
      var b = blocks[i];
      if (!b || typeof b !== "object") { continue; }
      var p = (b[section] && typeof b[section] === "object") ? b[section][key] : undefined;
      if (p === undefined) { p = b[section + "." + key]; }
      if (p && typeof p === "object") { return p; }
    }
    return null;
  }

  function errorTypeOf(p) {
    if (!p) { return ""; }
    if (p.error_type) { return String(p.error_type); }
    if (p.errorType) { return String(p.errorType); }
    if (p.error && typeof p.error === "object") {
      return String(p.error.errorType || p.error.error_type || p.error.type || "");
    }
    return p.error ? String(p.error) : "";
  }

  function figureState(value, p) {
    var s = p ? String(p.state || p.status || "").toLowerCase() : "";
    if (["fresh", "cached", "stale", "failed"].indexOf(s) >= 0) {
      if (s !== "failed" && !isNumber(value)) { return "nodata"; }
      return s;
    }
    return isNumber(value) ? "fresh" : "nodata";
  }

  var RANK = { ok: 0, nodata: 1, degraded: 2, failed: 3 };

  /* The figures without data, named: every figure shown as "no data", plus any query
   * the summary lists under no_data that no widget shows. */
  function renderNoData(data, missing) {
    var listed = {};
    missing.forEach(function (m) { if (m.query) { listed[m.query] = true; } });
    var extra = (data && Array.isArray(data.no_data)) ? data.no_data : [];
    extra.forEach(function (qid) {
      if (typeof qid === "string" && !listed[qid]) {
        listed[qid] = true;
        missing.push({ label: qid, query: qid, key: "" });
      }
    });
    var box = document.getElementById("no-data");
    var list = document.getElementById("no-data-list");
    if (!box || !list) { return; }
    while (list.firstChild) { list.removeChild(list.firstChild); }
    missing.forEach(function (m) {
      var item = el("li", { "data-key": m.key, "data-query": m.query || "" }, m.label);
      if (m.query) {
        item.appendChild(el("code", {}, m.query));
      }
      list.appendChild(item);
    });
    box.hidden = missing.length === 0;
    document.getElementById("no-data-count").textContent = String(missing.length);
  }

  function render(data) {
    var metrics = (data && data.metrics) || {};
    var missing = [];
    SECTIONS.forEach(function (section) {
      var values = metrics[section.key] || {};
      var worst = "ok";
      section.figures.forEach(function (f) {
        var id = "fig-" + section.key + "-" + f[0];
        var refs = elements[id];
        var raw = values[f[0]];
        var v = isNumber(raw) ? raw : null;
        var p = provenance(data, section.key, f[0]);
        var state = figureState(v, p);
        refs.value.textContent = format(v, f[2]);
        refs.value.setAttribute("data-raw", v === null ? "" : String(v));
        refs.box.setAttribute("data-state", state);
        var age = p ? (isNumber(p.age_seconds) ? p.age_seconds : p.age) : null;
        var note = state;
        if (state === "nodata") { note = "no data"; }
        if ((state === "cached" || state === "stale") && isNumber(age)) {
          note += " \u00b7 " + formatAge(age) + " old";
        }
        if (state === "failed") {
          var et = errorTypeOf(p);
          note += et ? " \u00b7 " + et : "";
        }
        refs.state.textContent = note;
        refs.box.title = note;
        if (state === "nodata") {
          missing.push({ label: section.title + " \u00b7 " + f[1], key: section.key + "." + f[0],
            query: p && typeof p.query === "string" ? p.query : "" });
        }
        var rank = state === "failed" ? "failed" : (state === "stale" ? "degraded" :
          (state === "nodata" ? "nodata" : "ok"));
        if (RANK[rank] > RANK[worst]) { worst = rank; }
      });
      var sec = elements["section-" + section.key];
      sec.box.setAttribute("data-state", worst);
      sec.state.textContent = worst === "ok" ? "" : (worst === "nodata" ? "no data" : worst);
    });
    renderNoData(data, missing);
    var overall = document.getElementById("overall");
    var status = (data && typeof data.status === "string") ? data.status : "unknown";
    overall.setAttribute("data-status", status);
    overall.textContent = status;
    var ts = document.getElementById("data-timestamp");
    if (data && typeof data.timestamp === "string") {
      ts.setAttribute("datetime", data.timestamp);
      ts.textContent = new Date(data.timestamp).toLocaleTimeString();
    }
  }

  function markUnreachable(message) {
    var overall = document.getElementById("overall");
    overall.setAttribute("data-status", "unreachable");
    overall.textContent = "unreachable";
    var err = document.getElementById("fetch-error");
    err.hidden = false;
    err.textContent = "Could not refresh the summary: " + message +
      (lastGood ? " — showing the last figures received." : "");
    Object.keys(elements).forEach(function (id) {
      if (id.indexOf("fig-") === 0) {
        elements[id].box.setAttribute("data-state", "unreachable");
        elements[id].state.textContent = "not refreshed";
      }
    });
  }

  // API token: from the form, or from the URL fragment (/status#token=...), which
  // browsers never send to a server; kept in sessionStorage for this tab only and
  // sent as an Authorization header, never in a URL.
  var TOKEN_KEY = "metricsGatewayToken";
  function storedToken() {
    var m = /(?:^|[#&])token=([^&]+)/.exec(window.location.hash || "");
    try {
      if (m) {
        sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
        history.replaceState(null, "", window.location.pathname + window.location.search);
      }
      return sessionStorage.getItem(TOKEN_KEY);
    } catch (e) {
      return m ? decodeURIComponent(m[1]) : null;
    }
  }
  var token = storedToken();
  var tokenForm = document.getElementById("token-form");
  if (tokenForm) {
    tokenForm.addEventListener("submit", function (ev) {
      ev.preventDefault();
      token = document.getElementById("token-input").value.trim();
      try { sessionStorage.setItem(TOKEN_KEY, token); } catch (e) { /* private mode */ }
      tokenForm.hidden = true;
    });
  }

  function refresh() {
    var ctrl = typeof AbortController === "function" ? new AbortController() : null;
    var timer = ctrl ? setTimeout(function () { ctrl.abort(); }, Math.max(1000,
      refreshSeconds * 900)) : null;
    var headers = { Accept: "application/json" };
    if (token) { headers.Authorization = "Bearer " + token; }
    fetch(summaryUrl, { cache: "no-store", headers: headers,
      signal: ctrl ? ctrl.signal : undefined })
      .then(function (resp) {
        if (resp.status === 401 || resp.status === 403) {
          if (tokenForm) { tokenForm.hidden = false; }
          throw new Error(resp.status === 401 ? "an API token is needed" : "the API token was refused");
        }
        return resp.json().then(function (data) {
          if (!data || typeof data !== "object" || !data.metrics) {
            throw new Error("HTTP " + resp.status + " without summary figures");
          }
          return data;
        });
      })
      .then(function (data) {
        lastGood = data;
        render(data);
        document.getElementById("fetch-error").hidden = true;
        var now = new Date();
        var lu = document.getElementById("last-update");
        lu.setAttribute("datetime", now.toISOString());
        lu.textContent = now.toLocaleTimeString();
        body.setAttribute("data-loaded", "true");
      })
      .catch(function (e) { markUnreachable(e && e.message ? e.message : String(e)); })
      .then(function () {
        if (timer) { clearTimeout(timer); }
        setTimeout(refresh, refreshSeconds * 1000);
      });
  }

  build();
  refresh();
})();
