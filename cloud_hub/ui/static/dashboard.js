// EdgeGLM dashboard: the rollout page's live part (polled every 2 s while visible, swapped in
// without a reload; 304 when unchanged)
// and its latency chart (uPlot, vendored under static/vendor/uplot). No inline script: CSP allows
// only the hub's own files.
"use strict";
(function () {
  var POLL_MS = 2000, MAX_BACKOFF_MS = 60000;
  var plot = null;

  function drawChart(root) {
    var el = root.querySelector("[data-chart]");
    if (!el || typeof uPlot === "undefined") return;
    var d = JSON.parse(el.getAttribute("data-chart"));
    var x = d.waves.slice();  // numbered from 0, as the audit log and `edgectl rollouts status` do
    var data = [x, d.updated, d.baseline];
    var width = Math.max(280, Math.min(720, el.clientWidth || 600));
    if (plot) { plot.destroy(); plot = null; }
    el.textContent = "";
    plot = new uPlot({
      width: width,
      height: 220,
      scales: { x: { time: false } },
      axes: [
        { label: "wave", values: function (u, vals) { return vals.map(function (v) { return Number.isInteger(v) ? String(v) : ""; }); } },
        { label: "p95 latency (ms)" }
      ],
      series: [
        { label: "wave" },
        { label: "updated devices", stroke: "#1f6feb", width: 2, points: { size: 8 } },
        { label: "baseline (old version)", stroke: "#8b949e", width: 2, dash: [6, 4], points: { size: 6 } }
      ]
    }, data, el);
  }

  // Screen readers hear the rollout's state and wave when they change, not every poll.
  function announce(box) {
    var state = box.querySelector("#rollout-state"), wave = box.querySelector("#current-wave");
    var status = document.getElementById("live-status");
    if (!state || !status) return;
    var text = "Rollout " + state.textContent + ", wave " + (wave ? wave.textContent : "?");
    if (status.textContent !== text) status.textContent = text;
  }

  // Polling: the hub answers 304 while nothing changed (the fragment's ETag, sent back as
  // If-None-Match); a hidden tab does not poll; an error (403, 404, 5xx, no network) waits longer
  // each time, up to a minute; a rollout that ended stops it.
  var etag = null, delay = POLL_MS, timer = null, stopped = false, inflight = false;

  function schedule(box, ms) {
    if (stopped || inflight || timer !== null) return;
    if (document.hidden) return;  // visibilitychange starts it again
    timer = window.setTimeout(function () { timer = null; poll(box); }, ms);
  }

  function ended(box) {
    var status = box.querySelector("[data-final]");
    return status !== null && status.getAttribute("data-final") === "yes";
  }

  function poll(box) {
    var url = box.getAttribute("data-live");
    var headers = { "Accept": "text/html" };
    if (etag) headers["If-None-Match"] = etag;
    inflight = true;
    fetch(url, { credentials: "same-origin", cache: "no-store", headers: headers })
      .then(function (r) {
        if (r.redirected || r.status === 401) { stopped = true; window.location.assign("/ui/login?next=" + encodeURIComponent(window.location.pathname)); return null; }
        if (r.status === 304) { delay = POLL_MS; return null; }
        if (!r.ok) { delay = Math.min(delay * 2, MAX_BACKOFF_MS); return null; }
        delay = POLL_MS;
        etag = r.headers.get("ETag");
        return r.text();
      })
      .then(function (html) {
        if (html === null) return;
        var open = {};
        box.querySelectorAll("details.wave").forEach(function (d) { open[d.id] = d.open; });
        box.innerHTML = html;  // the hub's own escaped fragment
        box.querySelectorAll("details.wave").forEach(function (d) { if (d.id in open) d.open = open[d.id]; });
        box.setAttribute("data-updated", String(Date.now()));
        announce(box);
        drawChart(box);
      })
      .catch(function () { delay = Math.min(delay * 2, MAX_BACKOFF_MS); })
      .finally(function () {
        inflight = false;
        if (ended(box)) { stopped = true; return; }  // ended: nothing moves now
        schedule(box, delay);
      });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var box = document.getElementById("live");
    if (!box) return;
    drawChart(box);
    if (ended(box)) return;
    document.addEventListener("visibilitychange", function () {
      if (!document.hidden) schedule(box, 0);
    });
    schedule(box, POLL_MS);
  });
})();
