// The entry console: polls /v1/mesh/console and redraws. Plain JS, no build step; charts
// with the vendored Chart.js. Every value from the server goes in as text, never as HTML.
"use strict";

const KEY_STORAGE = "mesh.apiKey";  // the same key the chat keeps
const POLL_MS = 2000;
const charts = {};
let timer = null;

function headers() {
  const key = localStorage.getItem(KEY_STORAGE) || "";
  return key ? { Authorization: "Bearer " + key } : {};
}

function setupCharts() {
  if (typeof Chart === "undefined") {
    $("no-charts").hidden = false;
    return;
  }
  charts.throughput = timeChart("chart-throughput", "line", [
    { label: "tokens/s", data: [], borderColor: "#2563eb", backgroundColor: "rgba(37,99,235,.15)", fill: true, tension: 0.2 },
  ], false);
  // Lines, not bars: 360 bars of a fraction of a pixel each would not show.
  charts.requests = timeChart("chart-requests", "line", [
    { label: "answered", data: [], borderColor: "#2563eb", backgroundColor: "rgba(37,99,235,.15)", fill: true, stepped: true },
    { label: "errors", data: [], borderColor: "#dc2626", stepped: true },
    { label: "failovers", data: [], borderColor: "#d97706", stepped: true },
  ], true);
}

function updateCharts(series) {
  if (!charts.throughput) return;
  const labels = series.t.map(timeLabel);
  charts.throughput.data.labels = labels;
  charts.throughput.data.datasets[0].data = series.tokens.map((v) => v / series.bucket_s);
  charts.throughput.update("none");
  charts.requests.data.labels = labels;
  charts.requests.data.datasets[0].data = series.requests.map((v, i) => v - series.errors[i]);
  charts.requests.data.datasets[1].data = series.errors;
  charts.requests.data.datasets[2].data = series.failovers;
  charts.requests.update("none");
}

function updateTiles(s) {
  const t = s.totals;
  $("t-nodes").textContent = `${t.serving} / ${t.nodes}`;
  const minute = Math.max(1, Math.round(60 / s.series.bucket_s));
  const recent = s.series.tokens.slice(-minute).reduce((a, b) => a + b, 0);
  $("t-tps").textContent = `${fmt(recent / (minute * s.series.bucket_s), 1)} tok/s`;
  $("t-requests").textContent = fmt(s.series.requests.reduce((a, b) => a + b, 0));
  $("t-inflight").textContent = fmt(t.in_flight);
  $("tile-queue").hidden = t.queue == null;
  if (t.queue != null) $("t-queue").textContent = fmt(t.queue);
  $("t-failovers").textContent = fmt(t.failovers);
  $("t-demoted").textContent = fmt(t.demoted);
  $("t-saved").textContent = "$" + fmt(s.routing.cost_saved_usd, 4);
}

function updateNodes(nodes) {
  $("no-nodes").hidden = nodes.length > 0;
  fillRows($("nodes").tBodies[0], nodes.map((n) => [
    cell(n.node), cell(n.model), cell(n.state, "state-" + n.state), cell(n.path),
    cell(`${n.in_flight}/${n.slots} busy${n.queued ? `, ${n.queued} queued` : ""}`),
    cell(n.decode_tps ? `${fmt(n.decode_tps, 1)} tok/s` : "not measured"),
    cell(n.latency_ms == null ? null : `${fmt(n.latency_ms, 1)} ms`),
    cell(fmt(n.reputation, 3), n.reputation < 0.5 ? "bad" : ""),
    cell(`${fmt(n.served)}${n.failures ? ` (${fmt(n.failures)} failed)` : ""}`),
    cell(`${fmt(n.verified)} ok${n.verify_failed ? `, ${fmt(n.verify_failed)} failed` : ""}`, n.verify_failed ? "bad" : ""),
    cell(n.last_verdict || "none yet"),
    cell(n.demoted ? "yes" : "no", n.demoted ? "bad" : ""),
  ]));
}

function updateTables(s) {
  const verdicts = Object.entries(s.verification);
  $("no-verify").hidden = verdicts.length > 0;
  fillRows($("verify").tBodies[0], verdicts.map(([k, v]) => [cell(k), cell(fmt(v))]));
  const routed = s.routing.routed;
  $("no-routed").hidden = routed.length > 0;
  fillRows($("routed").tBodies[0], routed.map((r) => [cell(r.model), cell(r.task), cell(fmt(r.requests))]));

  const table = s.routing.table;
  const head = $("routing").tHead;
  const body = $("routing").tBodies[0];
  if (!table || !table.tasks || !table.tasks.length) {
    $("router-status").textContent = "No routing table: the entry routes `auto` by price and availability only.";
    head.replaceChildren();
    body.replaceChildren();
    return;
  }
  const r = table.router || {};
  $("router-status").textContent = [r.state || r.status, r.trained_on != null ? `trained on ${r.trained_on} prompts` : ""]
    .filter(Boolean).join(", ") || "Mean quality per task on the router's table, and what `auto` picks.";
  const models = [...new Set(table.tasks.flatMap((t) => Object.keys(t.models)))];
  const tr = document.createElement("tr");
  for (const name of ["Task", "Prompts", "auto picks", ...models]) {
    const th = document.createElement("th");
    th.textContent = name;
    tr.append(th);
  }
  head.replaceChildren(tr);
  fillRows(body, table.tasks.map((t) => {
    const choice = t.choice && t.choice.auto;
    const pick = choice && typeof choice === "object" ? (choice.model || JSON.stringify(choice)) : choice;
    return [cell(t.task), cell(t.prompts), cell(pick),
      ...models.map((m) => {
        const q = t.models[m] && t.models[m].quality;
        return cell(q == null ? null : fmt(q, 2), t.models[m] && !t.models[m].available ? "hint" : "");
      })];
  }));
}

async function poll() {
  try {
    const res = await fetch("v1/mesh/console", { headers: headers(), cache: "no-store" });
    if (res.status === 401) {
      $("key-form").hidden = false;
      showError("This entry needs an API key to show its console.");
      return;
    }
    if (!res.ok) {
      let message = `HTTP ${res.status}`;
      try { message = (await res.json()).error.message || message; } catch (_) { /* keep the status */ }
      showError(message);
      return;
    }
    const s = await res.json();
    showError("");
    $("key-form").hidden = true;
    updateTiles(s);
    updateCharts(s.series);
    updateNodes(s.nodes);
    updateTables(s);
    $("updated").textContent = "updated " + new Date(s.time * 1000).toLocaleTimeString();
    document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
  } catch (e) {
    showError("Could not reach the entry: " + e.message);
  }
}

function loop() {
  clearTimeout(timer);
  // A hidden tab does not poll; it catches up when shown.
  if (!document.hidden) poll().finally(() => { timer = setTimeout(loop, POLL_MS); });
}

$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const key = $("api-key").value.trim();
  if (key) localStorage.setItem(KEY_STORAGE, key);
  loop();
});
document.addEventListener("visibilitychange", () => { if (!document.hidden) loop(); });

setupCharts();
loop();
