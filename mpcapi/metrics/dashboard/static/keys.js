/* MPC-API keys page: lists, creates and revokes client keys and teams through the admin API
 * (/admin/keys, /admin/teams) with the admin key kept in sessionStorage (as the overview). */
(function () {
  "use strict";

  var STORAGE_KEY = "mpcapi-admin-key";
  var POLL_MS = 5000;
  var state = { keys: [], teams: [], timer: null, loads: 0 };
  window.mpcapiKeys = state; // for the browser test

  function $(id) { return document.getElementById(id); }

  function fmtCost(x) {
    if (!x) return "0";
    return x < 0.01 ? x.toPrecision(3) : x.toFixed(4);
  }

  function spendCell(item) {
    var cell = document.createElement("td");
    cell.className = "spend";
    var text = "$" + fmtCost(item.spend_usd) + (item.budget_usd == null ? "" : " / $" + item.budget_usd);
    if (item.budget_usd != null) {
      var share = item.budget_usd > 0 ? Math.min(1, item.spend_usd / item.budget_usd) : 1;
      var bar = document.createElement("span");
      bar.className = "bar" + (share >= 1 ? " full" : "");
      var fill = document.createElement("span");
      fill.style.width = (share * 100).toPrecision(3) + "%";
      bar.appendChild(fill);
      cell.appendChild(bar);
    }
    cell.appendChild(document.createTextNode(text));
    return cell;
  }

  function textCell(value) {
    var cell = document.createElement("td");
    cell.textContent = value == null || value === "" ? "–" : String(value);
    return cell;
  }

  function models(list) { return list == null ? "all" : list.join(", "); }

  function request(method, path, body) {
    var key = sessionStorage.getItem(STORAGE_KEY);
    var init = { method: method, headers: { Authorization: "Bearer " + key }, cache: "no-store" };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    return fetch(path, init).then(function (response) {
      return response.json().catch(function () { return {}; }).then(function (document) {
        if (response.status === 401 || response.status === 403) {
          sessionStorage.removeItem(STORAGE_KEY);
          signedIn(false, document.message || ("refused: " + response.status));
          throw new Error("signed out");
        }
        if (!response.ok) throw new Error(document.message || (method + " " + path + ": " + response.status));
        return document;
      });
    });
  }

  function showTeams() {
    var body = $("teams").querySelector("tbody");
    body.textContent = "";
    var select = $("key-team"), chosen = select.value;
    while (select.options.length > 1) select.remove(1);
    state.teams.forEach(function (team) {
      var row = document.createElement("tr");
      row.dataset.id = team.id;
      [team.id, team.name, team.rpm, team.tpm, models(team.models), team.active_keys].forEach(function (v) {
        row.appendChild(textCell(v));
      });
      row.appendChild(spendCell(team));
      row.appendChild(textCell(team.budget_resets_at));
      body.appendChild(row);
      var option = document.createElement("option");
      option.value = team.id;
      option.textContent = team.name;
      select.appendChild(option);
    });
    select.value = chosen;
    if (!state.teams.length) body.innerHTML = '<tr><td class="empty" colspan="8">no teams yet</td></tr>';
  }

  function showKeys() {
    var body = $("keys").querySelector("tbody");
    body.textContent = "";
    state.keys.forEach(function (key) {
      var row = document.createElement("tr");
      row.dataset.id = key.id;
      row.className = key.state;
      [key.id, key.alias, key.user, key.team_name, models(key.models), key.state, key.expires_at].forEach(function (v) {
        row.appendChild(textCell(v));
      });
      row.appendChild(spendCell(key));
      row.appendChild(textCell(key.budget_resets_at));
      var actions = document.createElement("td");
      if (key.state !== "revoked") {
        var revoke = document.createElement("button");
        revoke.type = "button";
        revoke.className = "revoke";
        revoke.textContent = "Revoke";
        revoke.addEventListener("click", function () {
          if (!window.confirm("Revoke " + key.id + " (" + key.user + ")? Clients using it are refused within 5 seconds.")) return;
          request("DELETE", "/admin/keys/" + encodeURIComponent(key.id)).then(load).catch(problem);
        });
        actions.appendChild(revoke);
      }
      row.appendChild(actions);
      body.appendChild(row);
    });
    if (!state.keys.length) body.innerHTML = '<tr><td class="empty" colspan="10">no keys yet</td></tr>';
  }

  function all(path) {
    // Every page of a list (500 a page).
    var items = [];
    function page(offset) {
      return request("GET", path + "?limit=500&offset=" + offset).then(function (document) {
        items = items.concat(document.data);
        return document.has_more ? page(document.next_offset) : items;
      });
    }
    return page(0);
  }

  function load() {
    return Promise.all([all("/admin/teams"), all("/admin/keys")]).then(function (lists) {
      state.teams = lists[0];
      state.keys = lists[1];
      state.loads += 1;
      signedIn(true);
      showTeams();
      showKeys();
      $("status").textContent = state.keys.length + " keys · " + state.teams.length + " teams · updated " +
        new Date().toLocaleTimeString();
    });
  }

  function problem(error) {
    if (error.message !== "signed out") $("keys-error").textContent = error.message;
  }

  function poll() {
    if (state.timer) clearTimeout(state.timer);
    if (!sessionStorage.getItem(STORAGE_KEY)) { signedIn(false); return; }
    load().then(function () { state.timer = setTimeout(poll, POLL_MS); }, function (error) {
      problem(error);
      if (sessionStorage.getItem(STORAGE_KEY)) state.timer = setTimeout(poll, POLL_MS);
    });
  }

  function signedIn(yes, message) {
    $("login-view").hidden = yes;
    $("keys-view").hidden = !yes;
    $("logout").hidden = !yes;
    if (!yes) {
      if (state.timer) clearTimeout(state.timer);
      state.timer = null;
      $("status").textContent = "not signed in";
      $("login-error").textContent = message || "";
    }
  }

  function limits(prefix) {
    var body = {};
    var budget = $(prefix + "-budget").value.trim();
    if (budget) body.budget_usd = Number(budget);
    if ($(prefix + "-period").value) body.budget_period = $(prefix + "-period").value;
    var list = $(prefix + "-models").value.split(",").map(function (m) { return m.trim(); })
      .filter(function (m) { return m; });
    if (list.length) body.models = list;
    return body;
  }

  $("create-team").addEventListener("submit", function (event) {
    event.preventDefault();
    var body = limits("team");
    body.name = $("team-name").value.trim();
    $("keys-error").textContent = "";
    request("POST", "/admin/teams", body).then(function () {
      $("create-team").reset();
      return load();
    }).catch(problem);
  });

  $("create-key").addEventListener("submit", function (event) {
    event.preventDefault();
    var body = limits("key");
    body.user = $("key-user").value.trim();
    if ($("key-alias").value.trim()) body.alias = $("key-alias").value.trim();
    if ($("key-team").value) body.team_id = $("key-team").value;
    if ($("key-expires").value.trim()) body.expires_in = $("key-expires").value.trim();
    $("keys-error").textContent = "";
    request("POST", "/admin/keys", body).then(function (made) {
      $("new-secret-id").textContent = made.id;
      $("new-secret-value").textContent = made.secret;
      $("new-secret").hidden = false;
      $("create-key").reset();
      return load();
    }).catch(problem);
  });

  $("login").addEventListener("submit", function (event) {
    event.preventDefault();
    var key = $("admin-key").value.trim();
    if (!key) return;
    sessionStorage.setItem(STORAGE_KEY, key);
    $("admin-key").value = "";
    poll();
  });

  $("logout").addEventListener("click", function () {
    sessionStorage.removeItem(STORAGE_KEY);
    signedIn(false);
  });

  poll();
})();
