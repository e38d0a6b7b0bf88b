// The node console: polls api/state and redraws; "Stop serving" drains the node like
// `mesh node stop`. Plain JS, charts with the vendored Chart.js; server values go in as text.
"use strict";

const POLL_MS = 2000;
const ARM_MS = 5000;  // a second click within this confirms the stop
const token = document.querySelector('meta[name="mesh-console-token"]').content;
const charts = {};
let timer = null;
let armed = null;
let stopped = false;

function duration(s) {
  if (s < 120) return `${fmt(s)} s`;
  if (s < 7200) return `${fmt(s / 60)} min`;
  return `${fmt(s / 3600, 1)} h`;
}

function makeChart(id, label, color) {
  return timeChart(id, "line", [{ label, data: [], borderColor: color, backgroundColor: color + "26", fill: true, stepped: true }], false);
}

function setupCharts() {
  if (typeof Chart === "undefined") {
    $("no-charts").hidden = false;
    return;
  }
  charts.requests = makeChart("chart-requests", "requests", "#2563eb");
  charts.tokens = makeChart("chart-tokens", "tokens", "#059669");
}

function updateCharts(series) {
  if (!charts.requests) return;
  const labels = series.t.map(timeLabel);
  for (const [name, chart] of Object.entries(charts)) {
    chart.data.labels = labels;
    chart.data.datasets[0].data = series[name];
    chart.update("none");
  }
}

function credits(t, state) {
  const v = t && t[state];
  return v ? `${fmt(v.credits, 3)} (${fmt(v.requests)} req)` : "0";
}

function update(s) {
  const st = s.status;
  const state = stopped ? "stopped" : st.draining ? "draining" : "serving";
  $("state").textContent = state;
  $("state").className = "badge " + state;
  if (st.draining) $("stop").disabled = true;
  $("ident").textContent = `${st.model.name} ${st.model.quantization} · peer ${st.peer_id} · pid ${st.pid}`;
  $("t-requests").textContent = fmt(st.requests_served);
  $("t-tokens").textContent = fmt(st.tokens_served);
  $("t-failed").textContent = fmt(st.requests_failed);
  $("t-load").textContent = `${st.active}/${st.slots} busy` + (st.queued ? `, ${st.queued} queued` : "");
  $("t-speed").textContent = st.decode_tps ? `${fmt(st.decode_tps, 1)} tok/s` : "–";
  $("t-uptime").textContent = duration(st.uptime_s);
  updateCharts(s.series);

  $("no-entries").hidden = s.entries.length > 0;
  const wide = (text, cls) => {  // one cell across the numbers, so a long message does not stretch a column
    const td = cell(text, cls);
    td.colSpan = 7;
    return td;
  };
  fillRows($("credits").tBodies[0], s.entries.map((e) => e.error ? [cell(e.url), wide(e.error, "bad")]
    : e.pending ? [cell(e.url), wide("asking the entry…", "hint")]
    : [cell(e.url), cell(credits(e.totals, "held")), cell(credits(e.totals, "vested")),
      cell(credits(e.totals, "withheld"), e.totals.withheld && e.totals.withheld.requests ? "bad" : ""),
      cell(fmt(e.booked)), cell(fmt(e.receipts)),
      cell(e.problem_count ? fmt(e.problem_count) : "none", e.problem_count ? "bad" : "good"),
      cell(Object.entries(e.verdicts).map(([k, v]) => `${k === "none" ? "not checked" : k}: ${v}`).join(", ") || "none")]));
  const problems = s.entries.flatMap((e) => (e.problems || []).map((p) => ({ url: e.url, ...p })));
  $("problems").replaceChildren(...problems.map((p) => {
    const li = document.createElement("li");
    const detail = Object.entries(p).filter(([k]) => !["url", "request_id", "problem"].includes(k)).map(([k, v]) => `${k}=${v}`).join(", ");
    li.textContent = `${p.url}: ${p.request_id} ${p.problem.replace(/_/g, " ")}${detail ? ` (${detail})` : ""}`;
    return li;
  }));

  $("no-receipts").hidden = s.receipts.length > 0;
  fillRows($("receipts").tBodies[0], s.receipts.map((r) => [cell(r.entry), cell(fmt(r.receipts)), cell(fmt(r.tokens))]));
  $("updated").textContent = "updated " + new Date(s.time * 1000).toLocaleTimeString();
  document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
}

async function poll() {
  try {
    const res = await fetch("api/state", { cache: "no-store" });
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    update(await res.json());
    showError("");
  } catch (e) {
    if (stopped) {
      // The node finished draining and exited: nothing is left to ask.
      $("state").textContent = "stopped";
      $("state").className = "badge stopped";
      $("stop-hint").textContent = "The node has stopped.";
      $("stop").textContent = "Stopped";
      document.body.dataset.nodeGone = "1";
      return false;
    }
    showError("Could not reach the node: " + e.message);
  }
  return true;
}

function loop() {
  clearTimeout(timer);
  if (document.hidden) return;
  poll().then((more) => { if (more) timer = setTimeout(loop, POLL_MS); });
}

async function stopServing() {
  $("stop").disabled = true;
  $("stop-hint").textContent = "Stopping…";
  try {
    const res = await fetch("api/stop", { method: "POST", headers: { "X-Mesh-Console-Token": token } });
    const body = await res.json();
    if (!res.ok) throw new Error(body.error ? body.error.message : `HTTP ${res.status}`);
    stopped = true;
    $("stop").textContent = "Stopping";
    $("stop-hint").textContent = `Draining: ${body.in_flight} generation(s) in flight may finish within ${body.grace_s} s, then the node exits.`;
    loop();
  } catch (e) {
    $("stop").disabled = false;
    $("stop-hint").textContent = "";
    showError("Could not stop the node: " + e.message);
  }
}

$("stop").addEventListener("click", () => {
  if (armed) {
    clearTimeout(armed);
    armed = null;
    $("stop").classList.remove("armed");
    stopServing();
    return;
  }
  $("stop").classList.add("armed");
  $("stop").textContent = "Click again to stop";
  $("stop-hint").textContent = "The node stops taking work and exits once in-flight work is done.";
  armed = setTimeout(() => {
    armed = null;
    $("stop").classList.remove("armed");
    $("stop").textContent = "Stop serving";
    $("stop-hint").textContent = "";
  }, ARM_MS);
});
document.addEventListener("visibilitychange", () => { if (!document.hidden) loop(); });

setupCharts();
loop();
