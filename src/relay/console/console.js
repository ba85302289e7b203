// The ringway console: a client of the relay's control API and nothing else. The operator
// token is sent once, to log in, and is not kept: the login lives in an HttpOnly cookie, and
// the CSRF proof it came with is kept in this page's memory only. Lists update from the live
// view (GET /api/v1/live, a WebSocket); nothing polls.
"use strict";

const $ = (id) => document.getElementById(id);
let csrf = null;
let me = null;
let live = null;
let liveRetry = 500;
let overview = { sessions: [], ended: [], devices: [] };
let countdown = null;

// ---- API -------------------------------------------------------------------------------

async function api(method, path, body) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET" && csrf) headers["X-CSRF-Token"] = csrf;
  const resp = await fetch(path, {
    method, headers, credentials: "same-origin", cache: "no-store",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (resp.status === 401) {
    loggedOut("Your login has ended; log in again.");
    throw new Error("logged out");
  }
  if (!resp.ok) {
    let message = resp.status + " " + resp.statusText;
    try { message = (await resp.json()).error || message; } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  return resp;
}

function showError(e) {
  if (e && e.message !== "logged out") $("action-error").textContent = e.message;
}

// ---- login -----------------------------------------------------------------------------

function loggedIn(who) {
  me = who;
  csrf = who.csrf_token;
  $("operator").textContent = who.operator;
  $("role").textContent = who.role;
  $("whoami").hidden = false;
  $("login-view").hidden = true;
  $("console-view").hidden = false;
  $("action-error").textContent = "";
  connectLive();
}

function loggedOut(message) {
  me = null;
  csrf = null;
  if (live) { live.onclose = null; live.close(); live = null; }
  $("whoami").hidden = true;
  $("live-state").hidden = true;
  $("console-view").hidden = true;
  $("login-view").hidden = false;
  $("login-error").textContent = message || "";
}

$("login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const input = $("token");
  const token = input.value;
  input.value = "";
  try {
    const resp = await fetch("/api/v1/login", {
      method: "POST", credentials: "same-origin", cache: "no-store",
      headers: { "Content-Type": "application/json" }, body: JSON.stringify({ token }),
    });
    if (!resp.ok) {
      let message = resp.status === 401 ? "Invalid token." : resp.status + " " + resp.statusText;
      try { const e = await resp.json(); if (resp.status !== 401) message = e.error; } catch (_) { /* */ }
      $("login-error").textContent = message;
      return;
    }
    loggedIn(await resp.json());
  } catch (e) {
    $("login-error").textContent = e.message;
  }
});

$("logout").addEventListener("click", async () => {
  try { await api("POST", "/api/v1/logout"); } catch (_) { /* logged out either way */ }
  loggedOut("Logged out.");
});

// ---- live view -------------------------------------------------------------------------

function connectLive() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(scheme + "//" + location.host + "/api/v1/live");
  live = ws;
  setLiveState("connecting…");
  ws.onopen = () => { liveRetry = 500; setLiveState("live"); };
  ws.onmessage = (ev) => { overview = JSON.parse(ev.data); render(); };
  ws.onclose = (ev) => {
    if (live !== ws) return;
    live = null;
    if (ev.code === 1008) { loggedOut("Your login has ended; log in again."); return; }
    setLiveState("reconnecting…");
    setTimeout(() => { if (me && !live) connectLive(); }, liveRetry);
    liveRetry = Math.min(liveRetry * 2, 10000);
  };
}

function setLiveState(text) {
  $("live-state").hidden = false;
  $("live-state").textContent = text;
}

// ---- rendering -------------------------------------------------------------------------

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text === undefined || text === null ? "" : String(text);
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return (i === 0 ? v : v.toFixed(1)) + " " + units[i];
}

function when(unix) {
  return unix ? new Date(unix * 1000).toLocaleString() : "";
}

function span(secs) {
  secs = Math.max(0, Math.floor(secs));
  const h = Math.floor(secs / 3600), m = Math.floor((secs % 3600) / 60), s = secs % 60;
  return (h ? h + "h " : "") + (h || m ? m + "m " : "") + s + "s";
}

function byteCell(row, n, cls) {
  const td = cell(row, bytes(n), "num " + cls);
  td.dataset.value = String(n);
}

// A session's row, with the cells active and ended sessions share.
function sessionRow(s) {
  const tr = document.createElement("tr");
  tr.dataset.session = s.id;
  cell(tr, s.id);
  cell(tr, s.operator);
  cell(tr, s.device);
  cell(tr, s.service);
  cell(tr, (s.client_addrs || []).join(", "), "wrap");
  return tr;
}

function replaceRows(table, rows) {
  const body = document.querySelector("#" + table + " tbody");
  body.replaceChildren(...rows);
}

function render() {
  const now = Date.now() / 1000;
  replaceRows("devices", overview.devices.map((d) => {
    const tr = document.createElement("tr");
    tr.dataset.device = d.id;
    cell(tr, d.id);
    cell(tr, d.online ? "online" : "offline", "status " + (d.online ? "online" : "offline"));
    cell(tr, d.online ? "now" : when(d.last_seen));
    cell(tr, d.agent_version);
    cell(tr, d.agent_addr);
    cell(tr, d.services.join(", "), "wrap");
    cell(tr, d.node);
    const td = cell(tr, "");
    if (d.online && me && me.role === "admin") {
      const b = document.createElement("button");
      b.className = "danger disconnect-button";
      b.textContent = "Disconnect";
      b.addEventListener("click", () => act("POST", "/api/v1/devices/" + encodeURIComponent(d.id) + "/disconnect"));
      td.appendChild(b);
    }
    return tr;
  }));
  fillDevices();

  replaceRows("sessions", overview.sessions.map((s) => {
    const tr = sessionRow(s);
    cell(tr, s.connections, "num connections");
    byteCell(tr, s.bytes_to_device, "bytes-to-device");
    byteCell(tr, s.bytes_to_client, "bytes-to-client");
    cell(tr, span(now - s.created_at));
    cell(tr, s.client_connected ? "client attached" : "waiting for client", "status");
    const b = document.createElement("button");
    b.className = "danger end-button";
    b.textContent = "End";
    b.addEventListener("click", () => act("DELETE", "/api/v1/sessions/" + encodeURIComponent(s.id)));
    cell(tr, "").appendChild(b);
    return tr;
  }));

  replaceRows("ended", overview.ended.map((s) => {
    const tr = sessionRow(s);
    byteCell(tr, s.bytes_to_device, "bytes-to-device");
    byteCell(tr, s.bytes_to_client, "bytes-to-client");
    cell(tr, span(s.ended_at - s.created_at));
    cell(tr, when(s.ended_at));
    cell(tr, s.close_code + " " + (s.close_reason || ""), "wrap close");
    return tr;
  }));
}

function fillDevices() {
  const select = $("start-device");
  const chosen = select.value;
  const online = overview.devices.filter((d) => d.online && d.services.length > 0);
  const ids = online.map((d) => d.id);
  const current = Array.from(select.options).map((o) => o.value);
  if (ids.join("\n") !== current.join("\n")) {
    select.replaceChildren(...ids.map((id) => new Option(id, id)));
    if (ids.includes(chosen)) select.value = chosen;
  }
  fillServices();
}

function fillServices() {
  const device = overview.devices.find((d) => d.id === $("start-device").value);
  const select = $("start-service");
  const chosen = select.value;
  const services = device ? device.services : [];
  const current = Array.from(select.options).map((o) => o.value);
  if (services.join("\n") !== current.join("\n")) {
    select.replaceChildren(...services.map((s) => new Option(s, s)));
    if (services.includes(chosen)) select.value = chosen;
  }
}

$("start-device").addEventListener("change", fillServices);

async function act(method, path, body) {
  $("action-error").textContent = "";
  try {
    return await api(method, path, body);
  } catch (e) {
    showError(e);
    return null;
  }
}

// ---- starting a session ----------------------------------------------------------------

$("start-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const device = $("start-device").value, service = $("start-service").value;
  if (!device || !service) return;
  const resp = await act("POST", "/api/v1/sessions", { device, service });
  if (!resp) return;
  const started = await resp.json();
  const relay = location.origin;
  const code = started.launch_code;
  $("launch-code").textContent = code;
  $("launch-session").textContent = started.id;
  $("launch-commands").textContent =
    "ringway connect --relay " + relay + " --code " + code + "\n" +
    "ssh -o ProxyCommand='ringway connect --relay " + relay + " --code " + code + " --stdio' user@" + device;
  $("launch").hidden = false;
  const until = Date.now() + 120 * 1000;
  clearInterval(countdown);
  const tick = () => {
    const left = Math.round((until - Date.now()) / 1000);
    $("launch-countdown").textContent = left > 0 ? left + " s left" : "expired";
    if (left <= 0) clearInterval(countdown);
  };
  tick();
  countdown = setInterval(tick, 1000);
});

// ---- audit -----------------------------------------------------------------------------

function auditQuery() {
  const q = new URLSearchParams();
  const device = $("audit-device").value.trim(), operator = $("audit-operator").value.trim();
  if (device) q.set("device", device);
  if (operator) q.set("operator", operator);
  const since = $("audit-since").value, until = $("audit-until").value;
  if (since) q.set("since", String(Math.floor(new Date(since).getTime() / 1000)));
  if (until) q.set("until", String(Math.floor(new Date(until).getTime() / 1000) + 59));
  return "/api/v1/audit?" + q.toString();
}

$("audit-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const resp = await act("GET", auditQuery());
  if (!resp) return;
  const lines = (await resp.text()).split("\n").filter((l) => l);
  const records = lines.map((l) => JSON.parse(l)).reverse();
  replaceRows("audit-results", records.map((r) => {
    const tr = document.createElement("tr");
    tr.dataset.event = r.event;
    if (r.session) tr.dataset.session = r.session;
    cell(tr, when(r.time));
    cell(tr, r.event);
    cell(tr, r.operator || r.by);
    cell(tr, r.device);
    cell(tr, r.session);
    const rest = Object.assign({}, r);
    for (const k of ["time", "event", "operator", "device", "session"]) delete rest[k];
    cell(tr, Object.entries(rest).map(([k, v]) => k + "=" + v).join(" "), "wrap");
    return tr;
  }));
});

$("audit-export").addEventListener("click", async () => {
  const resp = await act("GET", auditQuery());
  if (!resp) return;
  const blob = new Blob([await resp.text()], { type: "application/x-ndjson" });
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = "ringway-audit.jsonl";
  a.click();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
});

// ---- start -----------------------------------------------------------------------------

(async () => {
  const resp = await fetch("/api/v1/login", { credentials: "same-origin", cache: "no-store" });
  if (resp.status === 200) loggedIn(await resp.json());
  else loggedOut(resp.status === 401 ? "Your login has ended; log in again." : "");
})();
