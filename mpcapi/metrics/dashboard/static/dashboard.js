/* MPC-API dashboard: polls GET /api/stats (admin key as Bearer token, kept in sessionStorage)
 * and draws the totals it returns; rates and interval latencies come from two readings. */
(function () {
  "use strict";

  var STORAGE_KEY = "mpcapi-admin-key";
  var POLL_MS = 2000;
  var KEEP_POINTS = 300; // 10 minutes at one reading every 2 s
  var MAX_SERIES = 8;
  var COLORS = ["#2563eb", "#16a34a", "#dc2626", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777"];

  var state = {
    readings: 0,
    last: null,
    timer: null,
    history: { t: [], rps: [], p50: [], p95: [], e4xx: [], e5xx: [] },
    grouped: { modelTokens: {}, modelCost: {}, userTokens: {}, userCost: {} },
    charts: {},
  };
  window.mpcapiDashboard = state; // for the browser test and for curious people

  function $(id) { return document.getElementById(id); }

  // --- numbers -------------------------------------------------------------------------------

  function fmtInt(n) { return Math.round(n).toLocaleString("en-US"); }
  function fmtMs(ms) { return ms == null ? "–" : (ms < 10 ? ms.toFixed(2) : ms.toFixed(0)) + " ms"; }
  function fmtCost(x) {
    if (!x) return "0";
    return x < 0.01 ? x.toPrecision(3) : x.toFixed(4);
  }
  function fmtPct(x) { return x == null ? "–" : x.toFixed(1) + " %"; }

  function bucketsOf(stats) {
    return stats.latency.buckets.map(function (b) {
      return [b[0] === "+Inf" ? Infinity : Number(b[0]), Number(b[1])];
    });
  }

  // Prometheus' histogram_quantile over cumulative [le, count] buckets, in seconds.
  function quantile(buckets, q) {
    if (!buckets.length) return null;
    var total = buckets[buckets.length - 1][1];
    if (total <= 0) return null;
    var rank = q * total, lowerBound = 0, lowerCount = 0;
    for (var i = 0; i < buckets.length; i++) {
      var bound = buckets[i][0], count = buckets[i][1];
      if (count >= rank) {
        if (bound === Infinity) return lowerBound;
        if (count === lowerCount) return bound;
        return lowerBound + (bound - lowerBound) * (rank - lowerCount) / (count - lowerCount);
      }
      lowerBound = bound; lowerCount = count;
    }
    return lowerBound;
  }

  function deltaBuckets(now, before) {
    var earlier = {};
    before.forEach(function (b) { earlier[b[0]] = b[1]; });
    return now.map(function (b) { return [b[0], b[1] - (earlier[b[0]] || 0)]; });
  }

  // --- history -------------------------------------------------------------------------------

  function push(list, value) {
    list.push(value);
    if (list.length > KEEP_POINTS) list.shift();
  }

  function pushGrouped(groups, values) {
    var length = state.history.t.length; // already includes this reading
    Object.keys(values).forEach(function (name) {
      if (!groups[name]) groups[name] = new Array(length - 1).fill(null);
    });
    Object.keys(groups).forEach(function (name) {
      push(groups[name], name in values ? values[name] : null);
      while (groups[name].length > length) groups[name].shift();
    });
  }

  function record(stats) {
    var h = state.history, totals = stats.totals, last = state.last;
    push(h.t, stats.now);
    if (last && stats.now > last.now) {
      var dt = stats.now - last.now;
      var requests = totals.requests - last.totals.requests;
      var interval = deltaBuckets(bucketsOf(stats), bucketsOf(last));
      var p50 = quantile(interval, 0.5), p95 = quantile(interval, 0.95);
      push(h.rps, Math.max(0, requests) / dt);
      push(h.p50, p50 == null ? null : p50 * 1000);
      push(h.p95, p95 == null ? null : p95 * 1000);
      push(h.e4xx, requests > 0 ? 100 * (totals.errors_4xx - last.totals.errors_4xx) / requests : 0);
      push(h.e5xx, requests > 0 ? 100 * (totals.errors_5xx - last.totals.errors_5xx) / requests : 0);
    } else {
      [h.rps, h.p50, h.p95, h.e4xx, h.e5xx].forEach(function (list) { push(list, null); });
    }
    var g = state.grouped, modelTokens = {}, modelCost = {}, userTokens = {}, userCost = {};
    Object.keys(stats.models).forEach(function (name) {
      var m = stats.models[name];
      modelTokens[name] = m.prompt_tokens + m.completion_tokens;
      modelCost[name] = m.cost_usd;
    });
    Object.keys(stats.users).forEach(function (name) {
      var u = stats.users[name];
      userTokens[name] = u.prompt_tokens + u.completion_tokens;
      userCost[name] = u.cost_usd;
    });
    pushGrouped(g.modelTokens, modelTokens);
    pushGrouped(g.modelCost, modelCost);
    pushGrouped(g.userTokens, userTokens);
    pushGrouped(g.userCost, userCost);
    state.last = stats;
    state.readings += 1;
  }

  // --- charts --------------------------------------------------------------------------------

  function axisValues(format) {
    return function (u, values) { return values.map(format); };
  }

  function fmtAxis(x) {
    if (x == null) return "";
    if (x === 0) return "0";
    var size = Math.abs(x);
    if (size >= 1000) return (x / 1000).toPrecision(3) + "k";
    return size < 1 ? String(Number(x.toPrecision(2))) : String(Number(x.toFixed(2)));
  }

  function draw(id, names, columns) {
    var element = $(id);
    var data = [state.history.t.slice()].concat(columns);
    var chart = state.charts[id];
    var width = Math.max(200, element.clientWidth || 400);
    if (chart && chart.names.join("\u0000") === names.join("\u0000")) {
      chart.plot.setData(data);
      return;
    }
    if (chart) chart.plot.destroy();
    var options = {
      width: width,
      height: 200,
      legend: { show: true },
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: true } },
      series: [{}].concat(names.map(function (name, i) {
        return { label: name, stroke: COLORS[i % COLORS.length], width: 2, points: { size: 4 } };
      })),
      axes: [{}, { size: 70, values: axisValues(fmtAxis) }],
    };
    state.charts[id] = { names: names, plot: new uPlot(options, data, element) };
  }

  function topSeries(groups) {
    var names = Object.keys(groups).sort(function (a, b) {
      return (last(groups[b]) || 0) - (last(groups[a]) || 0) || (a < b ? -1 : 1);
    }).slice(0, MAX_SERIES);
    names.sort();
    return { names: names, columns: names.map(function (n) { return groups[n].slice(); }) };
  }

  function last(list) { return list.length ? list[list.length - 1] : null; }

  function drawAll() {
    var h = state.history;
    draw("chart-rps", ["requests/s"], [h.rps.slice()]);
    draw("chart-latency", ["p50", "p95"], [h.p50.slice(), h.p95.slice()]);
    draw("chart-errors", ["4xx", "5xx"], [h.e4xx.slice(), h.e5xx.slice()]);
    [["chart-model-tokens", "modelTokens"], ["chart-model-cost", "modelCost"],
     ["chart-user-tokens", "userTokens"], ["chart-user-cost", "userCost"]].forEach(function (pair) {
      var top = topSeries(state.grouped[pair[1]]);
      draw(pair[0], top.names.length ? top.names : ["(none yet)"],
           top.names.length ? top.columns : [h.t.map(function () { return null; })]);
    });
  }

  window.addEventListener("resize", function () {
    Object.keys(state.charts).forEach(function (id) {
      var element = $(id);
      state.charts[id].plot.setSize({ width: Math.max(200, element.clientWidth), height: 200 });
    });
  });

  // --- tables and cards ----------------------------------------------------------------------

  function fill(tableId, rows) {
    var body = $(tableId).tBodies[0];
    while (body.firstChild) body.removeChild(body.firstChild);
    if (!rows.length) {
      var tr = body.insertRow(), td = tr.insertCell();
      td.colSpan = $(tableId).tHead.rows[0].cells.length;
      td.className = "empty";
      td.textContent = "none yet";
      return;
    }
    rows.forEach(function (cells) {
      var row = body.insertRow();
      cells.forEach(function (value) {
        var cell = row.insertCell();
        cell.textContent = value == null ? "" : String(value);
        if (typeof value === "number") cell.className = "num";
      });
    });
  }

  function show(stats) {
    var t = stats.totals;
    var errors = t.errors_4xx + t.errors_5xx;
    $("total-requests").textContent = fmtInt(t.requests);
    var rps = last(state.history.rps);
    $("current-rps").textContent = rps == null ? "–" : rps.toFixed(2);
    $("p50").textContent = fmtMs(stats.latency.p50_ms);
    $("p95").textContent = fmtMs(stats.latency.p95_ms);
    $("error-rate").textContent = t.requests ? fmtPct(100 * errors / t.requests) : "–";
    $("total-tokens").textContent = fmtInt(t.prompt_tokens + t.completion_tokens);
    $("total-cost").textContent = fmtCost(t.cost_usd);
    $("inflight").textContent = fmtInt(t.inflight);

    var models = Object.keys(stats.models).sort(function (a, b) {
      return stats.models[b].requests - stats.models[a].requests;
    });
    fill("models", models.map(function (name) {
      var m = stats.models[name];
      return [name, m.requests, m.errors, m.prompt_tokens, m.completion_tokens, fmtCost(m.cost_usd)];
    }));
    var users = Object.keys(stats.users).sort(function (a, b) {
      return stats.users[b].requests - stats.users[a].requests;
    });
    fill("users", users.map(function (name) {
      var u = stats.users[name];
      return [name, u.requests, u.prompt_tokens, u.completion_tokens, fmtCost(u.cost_usd)];
    }));
    fill("keys", stats.top_keys.map(function (k) {
      return [k.key_id, k.user, k.requests, k.tokens, fmtCost(k.cost_usd)];
    }));
    fill("errors", stats.errors.map(function (e) {
      return [new Date(e.time * 1000).toLocaleTimeString(), e.status, e.method + " " + e.path,
              e.model || "", e.user || "",
              e.upstream_failure || (e.outcome !== "completed" ? e.outcome : ""), e.request_id];
    }));
    var when = new Date(stats.now * 1000).toLocaleTimeString();
    $("status").textContent = "live · " + stats.workers + " worker" + (stats.workers === 1 ? "" : "s") +
      " · updated " + when;
  }

  // --- polling and signing in ----------------------------------------------------------------

  function signedIn(yes, message) {
    $("login-view").hidden = yes;
    $("dashboard-view").hidden = !yes;
    $("logout").hidden = !yes;
    if (!yes) {
      $("status").textContent = "not signed in";
      $("login-error").textContent = message || "";
    }
  }

  function stop() {
    if (state.timer) clearTimeout(state.timer);
    state.timer = null;
  }

  // Spend since the ledger began (GET /api/usage): every instance's rows, not just this one's.
  function showLedger(key) {
    return fetch("/api/usage?group_by=user", {
      headers: { Authorization: "Bearer " + key }, cache: "no-store"
    })
      .then(function (response) {
        if (response.status === 503) return { off: true };
        if (!response.ok) throw new Error("GET /api/usage answered " + response.status);
        return response.json();
      })
      .then(function (usage) {
        if (usage.off) {
          fill("ledger-users", [["(usage ledger off)", "", "", "", ""]]);
          return;
        }
        state.ledgerReadings = (state.ledgerReadings || 0) + 1;
        fill("ledger-users", usage.groups.map(function (g) {
          return [g.group === null ? "(no key)" : g.group, g.requests, g.errors,
                  g.prompt_tokens + g.completion_tokens, fmtCost(g.cost_usd)];
        }));
      });
  }

  function poll() {
    var key = sessionStorage.getItem(STORAGE_KEY);
    if (!key) { signedIn(false); return; }
    fetch("/api/stats", { headers: { Authorization: "Bearer " + key }, cache: "no-store" })
      .then(function (response) {
        if (response.status === 401 || response.status === 403) {
          return response.json().catch(function () { return {}; }).then(function (body) {
            sessionStorage.removeItem(STORAGE_KEY);
            stop();
            signedIn(false, body.message || ("refused: " + response.status));
            return null;
          });
        }
        if (!response.ok) throw new Error("GET /api/stats answered " + response.status);
        return response.json();
      })
      .then(function (stats) {
        if (!stats) return;
        signedIn(true);
        record(stats);
        show(stats);
        drawAll();
        return showLedger(key).then(function () { state.timer = setTimeout(poll, POLL_MS); });
      })
      .catch(function (error) {
        $("status").textContent = "cannot read statistics: " + error.message + " (retrying)";
        state.timer = setTimeout(poll, POLL_MS);
      });
  }

  $("login").addEventListener("submit", function (event) {
    event.preventDefault();
    var key = $("admin-key").value.trim();
    if (!key) return;
    sessionStorage.setItem(STORAGE_KEY, key);
    $("admin-key").value = "";
    stop();
    poll();
  });

  $("logout").addEventListener("click", function () {
    sessionStorage.removeItem(STORAGE_KEY);
    stop();
    signedIn(false);
  });

  poll();
})();
