"""The live view's page: plain HTML, one stylesheet and one small script, all inline.

The script asks for a private key (kept in ``sessionStorage``, so it is gone when the tab
closes), then polls ``GET /v1/dashboard/state`` every second and redraws three tables. Each live
session has a Stop button (``DELETE /v1/agents/{agent}/sessions/{id}``). Every value reaches the
page through ``textContent``, never as HTML. The Content-Security-Policy allows exactly this
script and stylesheet, by hash.
"""

from __future__ import annotations

import base64
import hashlib

__all__ = ["CONTENT_SECURITY_POLICY", "PAGE"]

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #1d2329; background: #f6f7f9; }
h1 { font-size: 1.3em; margin: 0 0 .2em; }
h2 { font-size: 1.05em; margin: 1.4em 0 .4em; }
table { border-collapse: collapse; width: 100%; background: #fff; }
th, td { text-align: left; padding: .3em .6em; border-bottom: 1px solid #e3e6ea; }
th { font-weight: 600; background: #eef0f3; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
code { font-size: .92em; }
.muted { color: #6b7580; }
.error { color: #b3261e; }
.empty td { color: #6b7580; font-style: italic; }
.status-completed, .status-client_closed { color: #1b7f3b; }
.status-stopped, .status-time_limit, .status-drained { color: #8a5a00; }
.status-bot_error, .status-agent_crashed { color: #b3261e; }
button { font: inherit; padding: .15em .7em; cursor: pointer; }
button.stop { color: #b3261e; }
#login input { font: inherit; width: 22em; padding: .2em .4em; }
#bar { display: flex; gap: 1em; align-items: baseline; }
[hidden] { display: none !important; }
"""

_SCRIPT = r"""
"use strict";
const KEY = "catflap.privateKey";
const $ = (id) => document.getElementById(id);
let timer = null;

function key() { return sessionStorage.getItem(KEY); }

async function call(method, path) {
  const abort = new AbortController();
  const limit = setTimeout(() => abort.abort(), 5000);
  try {
    const response = await fetch(path, {
      method, signal: abort.signal, cache: "no-store",
      headers: { "Authorization": "Bearer " + key() },
    });
    const body = await response.json().catch(() => null);
    if (!response.ok) {
      const error = new Error((body && body.error) || ("HTTP " + response.status));
      error.status = response.status;
      throw error;
    }
    return body;
  } finally {
    clearTimeout(limit);
  }
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text === null || text === undefined ? "-" : String(text);
  if (className) td.className = className;
  return td;
}

function duration(seconds) {
  if (seconds < 60) return seconds.toFixed(1) + " s";
  const m = Math.floor(seconds / 60), s = Math.floor(seconds % 60);
  if (m < 60) return m + "m" + String(s).padStart(2, "0") + "s";
  return Math.floor(m / 60) + "h" + String(m % 60).padStart(2, "0") + "m";
}

function bytes(n) {
  if (n < 1024) return n + " B";
  if (n < 1048576) return (n / 1024).toFixed(1) + " KiB";
  return (n / 1048576).toFixed(1) + " MiB";
}

function clock(t) { return t ? new Date(t * 1000).toLocaleTimeString() : "-"; }

function fill(table, rows, columns, draw, emptyText) {
  const body = table.tBodies[0];
  body.replaceChildren();
  if (!rows.length) {
    const row = body.insertRow();
    row.className = "empty";
    const td = row.insertCell();
    td.colSpan = columns;
    td.textContent = emptyText;
    return;
  }
  for (const item of rows) draw(body.insertRow(), item);
}

async function stop(button, session) {
  button.disabled = true;
  button.textContent = "stopping";
  try {
    await call("DELETE", "/v1/agents/" + encodeURIComponent(session.agent) +
      "/sessions/" + encodeURIComponent(session.sessionId));
  } catch (error) {
    $("message").textContent = "could not stop " + session.sessionId + ": " + error.message;
    button.disabled = false;
    button.textContent = "Stop";
  }
}

function render(state) {
  $("org").textContent = state.organization;
  $("message").textContent = state.draining ? "gateway draining: new sessions are refused" : "";
  $("updated").textContent = "updated " + clock(state.now);
  fill($("agents"), state.agents, 8, (row, a) => {
    row.dataset.agent = a.agent;
    cell(row, a.agent);
    const i = a.instances || {};
    for (const name of ["starting", "idle", "busy", "draining"]) {
      cell(row, a.instances ? i[name] : "-", "num");
    }
    cell(row, a.liveSessions, "num");
    cell(row, a.minAgents + " / " + a.maxAgents, "num");
    cell(row, a.websocketAuth);
  }, "no agents");
  fill($("live"), state.live, 8, (row, s) => {
    row.dataset.session = s.sessionId;
    cell(row, s.sessionId).className = "id";
    cell(row, s.agent);
    cell(row, s.transport);
    cell(row, s.coldStart ? "cold" : "warm");
    cell(row, duration(s.seconds), "num duration");
    cell(row, bytes(s.bytesClientToAgent), "num");
    cell(row, bytes(s.bytesAgentToClient), "num");
    const button = document.createElement("button");
    button.className = "stop";
    button.textContent = "Stop";
    button.addEventListener("click", () => stop(button, s));
    row.insertCell().append(button);
  }, "no live sessions");
  fill($("ended"), state.ended, 7, (row, s) => {
    row.dataset.session = s.sessionId;
    cell(row, s.sessionId).className = "id";
    cell(row, s.agent);
    cell(row, clock(s.endedAt));
    cell(row, duration(s.seconds), "num");
    cell(row, s.completionStatus, "status status-" + s.completionStatus);
    cell(row, bytes(s.bytesClientToAgent + s.bytesAgentToClient), "num");
    cell(row, s.error || "");
  }, "no sessions ended yet");
}

async function poll() {
  timer = null;
  try {
    render(await call("GET", "/v1/dashboard/state"));
  } catch (error) {
    if (error.status === 401) { logout("that key was refused: " + error.message); return; }
    $("updated").textContent = "update failed: " + error.message;
  }
  if (key()) timer = setTimeout(poll, 1000);
}

function show(loggedIn) {
  $("login").hidden = loggedIn;
  $("view").hidden = !loggedIn;
}

function logout(reason) {
  sessionStorage.removeItem(KEY);
  if (timer) { clearTimeout(timer); timer = null; }
  $("login-error").textContent = reason || "";
  show(false);
}

$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  const value = $("key").value.trim();
  if (!value) return;
  sessionStorage.setItem(KEY, value);
  $("key").value = "";
  $("login-error").textContent = "";
  show(true);
  poll();
});
$("logout").addEventListener("click", () => logout(""));
if (key()) { show(true); poll(); } else { show(false); }
"""

_BODY = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>catflap live view</title>
<style>{style}</style>
</head>
<body>
<h1>catflap live view <span class="muted" id="org"></span></h1>
<form id="login" hidden>
  <p>Enter a private API key (sk_...) of the organization. It is kept in this tab only.</p>
  <input id="key" type="password" autocomplete="off" placeholder="sk_..." aria-label="private key">
  <button type="submit">Show</button>
  <p class="error" id="login-error"></p>
</form>
<main id="view" hidden>
  <div id="bar">
    <span class="muted" id="updated"></span>
    <span class="error" id="message"></span>
    <button type="button" id="logout">Forget key</button>
  </div>
  <h2>Agents</h2>
  <table id="agents">
    <thead><tr><th>agent</th><th class="num">starting</th><th class="num">idle</th>
      <th class="num">busy</th><th class="num">draining</th><th class="num">live sessions</th>
      <th class="num">min / max</th><th>websocket_auth</th></tr></thead>
    <tbody></tbody>
  </table>
  <h2>Live sessions</h2>
  <table id="live">
    <thead><tr><th>session</th><th>agent</th><th>transport</th><th>start</th>
      <th class="num">duration</th><th class="num">client &rarr; agent</th>
      <th class="num">agent &rarr; client</th><th></th></tr></thead>
    <tbody></tbody>
  </table>
  <h2>Recent endings</h2>
  <table id="ended">
    <thead><tr><th>session</th><th>agent</th><th>ended</th><th class="num">duration</th>
      <th>status</th><th class="num">bytes</th><th>error</th></tr></thead>
    <tbody></tbody>
  </table>
</main>
<script>{script}</script>
</body>
</html>
"""


def _sha256(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


PAGE = _BODY.format(style=_STYLE, script=_SCRIPT)

#: Only this page's own script and stylesheet run; it may only call back to the gateway.
CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; script-src '{_sha256(_SCRIPT)}'; style-src '{_sha256(_STYLE)}'; "
    "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
