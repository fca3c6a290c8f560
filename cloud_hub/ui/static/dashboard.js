// EdgeGLM dashboard: the rollout page's live part (polled every 2 s, swapped in without a reload)
// and its latency chart (uPlot, vendored under static/vendor/uplot). No inline script: CSP allows
// only the hub's own files.
"use strict";
(function () {
  var POLL_MS = 2000;
  var plot = null;

  function drawChart(root) {
    var el = root.querySelector("[data-chart]");
    if (!el || typeof uPlot === "undefined") return;
    var d = JSON.parse(el.getAttribute("data-chart"));
    var x = d.waves.map(function (w) { return w + 1; });
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

  function poll(box) {
    var url = box.getAttribute("data-live");
    fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (r) {
        if (r.redirected || r.status === 401) { window.location.assign("/ui/login?next=" + encodeURIComponent(window.location.pathname)); return null; }
        return r.ok ? r.text() : null;
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
      .catch(function () { /* the next poll tries again */ })
      .finally(function () {
        var status = box.querySelector("[data-final]");
        if (status && status.getAttribute("data-final") === "yes") return;  // ended: nothing moves now
        window.setTimeout(function () { poll(box); }, POLL_MS);
      });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var box = document.getElementById("live");
    if (!box) return;
    drawChart(box);
    var status = box.querySelector("[data-final]");
    if (!status || status.getAttribute("data-final") !== "yes") window.setTimeout(function () { poll(box); }, POLL_MS);
  });
})();
