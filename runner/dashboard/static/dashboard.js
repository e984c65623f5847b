// runner dashboard: live updates by polling the page's JSON twin (body[data-api]) every few seconds.
// No framework, no build step, no inline script (the CSP forbids it); values go in with textContent only.
(function () {
  "use strict";

  function get(obj, path) {
    return path.split(".").reduce(function (v, key) {
      return v === null || v === undefined ? undefined : v[key];
    }, obj);
  }

  function format(value, how) {
    if (value === null || value === undefined || value === "") {
      return "";
    }
    switch (how) {
      case "num":
        return typeof value === "number"
          ? value.toLocaleString("en-US", { maximumFractionDigits: Number.isInteger(value) ? 0 : 1, minimumFractionDigits: Number.isInteger(value) ? 0 : 1 })
          : String(value);
      case "secs":
        return Number(value).toLocaleString("en-US", { minimumFractionDigits: 1, maximumFractionDigits: 1 }) + " s";
      case "ts":
        return String(value).slice(0, 19).replace("T", " ");
      case "of":
        return value ? " / " + format(value, "num") : "";
      case "line":
        return String(value).split("\n")[0].slice(0, 120);
      case "count":
        return Array.isArray(value) ? (value.length ? String(value.length) : "") : String(value);
      case "json":
        return JSON.stringify(value, null, 2);
      default:
        return String(value);
    }
  }

  function setStatusClass(el, value) {
    el.className = "status status-" + String(value);
  }

  function setProgress(el, done, total) {
    el.hidden = !total;
    el.max = total || 1;
    el.value = done || 0;
  }

  // One row from a <template>: [data-bind] text, [data-bind-href] links, progress bars, checkbox values.
  function fillRow(row, tpl) {
    var node = tpl.content.firstElementChild.cloneNode(true);
    if (row.id !== undefined) {
      node.dataset.id = String(row.id);
    }
    node.querySelectorAll("[data-bind]").forEach(function (el) {
      var value = row[el.dataset.bind];
      el.textContent = format(value, el.dataset.format);
      if (el.hasAttribute("data-bind-status")) {
        setStatusClass(el, value);
      }
    });
    node.querySelectorAll("[data-bind-href]").forEach(function (el) {
      el.setAttribute("href", el.dataset.bindHref.replace(/\{(\w+)\}/g, function (_, key) {
        return encodeURIComponent(String(row[key]));
      }));
    });
    node.querySelectorAll("progress[data-bind-value]").forEach(function (el) {
      setProgress(el, row[el.dataset.bindValue], row[el.dataset.bindMax]);
    });
    node.querySelectorAll("[data-bind-value-attr]").forEach(function (el) {
      el.value = String(row[el.dataset.bindValueAttr]);
      el.setAttribute("aria-label", "select job " + el.value);
    });
    return node;
  }

  function updateRows(body, json) {
    var rows = get(json, body.dataset.liveRows);
    var tpl = document.getElementById(body.dataset.template);
    if (!Array.isArray(rows) || !tpl) {
      return;
    }
    var checked = new Set();
    body.querySelectorAll("input[name=ids]:checked").forEach(function (el) { checked.add(el.value); });
    var fresh = rows.map(function (row) { return fillRow(row, tpl); });
    fresh.forEach(function (node) {
      node.querySelectorAll("input[name=ids]").forEach(function (el) { el.checked = checked.has(el.value); });
    });
    body.replaceChildren.apply(body, fresh);
  }

  function updateChart(svg, json) {
    var chart = get(json, svg.dataset.liveChart);
    if (!chart || !Array.isArray(chart.bars)) {
      return;
    }
    var ns = "http://www.w3.org/2000/svg";
    var groups = chart.bars.map(function (bar) {
      var g = document.createElementNS(ns, "g");
      var title = document.createElementNS(ns, "title");
      title.textContent = bar.label;
      g.appendChild(title);
      [["ok", bar.ok_y, bar.ok_h], ["failed", bar.failed_y, bar.failed_h]].forEach(function (part) {
        var rect = document.createElementNS(ns, "rect");
        rect.setAttribute("class", part[0]);
        rect.setAttribute("x", bar.x);
        rect.setAttribute("y", part[1]);
        rect.setAttribute("width", bar.w);
        rect.setAttribute("height", part[2]);
        g.appendChild(rect);
      });
      return g;
    });
    svg.replaceChildren.apply(svg, groups);
  }

  function apply(json) {
    document.querySelectorAll("[data-live]").forEach(function (el) {
      var value = get(json, el.dataset.live);
      if (value === undefined) {
        return;
      }
      var text = format(value, el.dataset.format);
      if (el.textContent !== text) {
        el.textContent = text;
      }
      if (el.hasAttribute("data-live-status")) {
        setStatusClass(el, value);
      }
    });
    document.querySelectorAll("progress[data-live-value]").forEach(function (el) {
      setProgress(el, get(json, el.dataset.liveValue), get(json, el.dataset.liveMax));
    });
    document.querySelectorAll("[data-live-show]").forEach(function (el) {
      var value = get(json, el.dataset.liveShow);
      el.hidden = el.dataset.showWhen.split(" ").indexOf(String(value)) < 0;
    });
    document.querySelectorAll("tbody[data-live-rows]").forEach(function (body) { updateRows(body, json); });
    document.querySelectorAll("svg[data-live-chart]").forEach(function (svg) { updateChart(svg, json); });
  }

  function poll() {
    var api = document.body.dataset.api;
    var interval = Number(document.body.dataset.interval) || 2000;
    var status = document.getElementById("live-status");
    var timer = null;

    function tick() {
      fetch(api, { headers: { Accept: "application/json" }, credentials: "same-origin", cache: "no-store" })
        .then(function (response) {
          if (!response.ok) {
            throw new Error("HTTP " + response.status);
          }
          return response.json();
        })
        .then(function (json) {
          apply(json);
          if (status) {
            status.textContent = "live · " + new Date().toLocaleTimeString();
            status.classList.remove("offline");
          }
        })
        .catch(function (error) {
          if (status) {
            status.textContent = "offline (" + error.message + ")";
            status.classList.add("offline");
          }
        })
        .finally(function () {
          timer = window.setTimeout(tick, document.hidden ? interval * 5 : interval);
        });
    }
    timer = window.setTimeout(tick, interval);
    return timer;
  }

  function selectAll() {
    document.querySelectorAll("input[data-select-all]").forEach(function (box) {
      box.addEventListener("change", function () {
        document.querySelectorAll("input[name=ids]").forEach(function (el) { el.checked = box.checked; });
      });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    selectAll();
    if (document.body.dataset.api) {
      poll();
    }
  });
})();
