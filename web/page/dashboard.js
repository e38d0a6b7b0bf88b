// What the entry and node consoles share (loaded before each page's own script): DOM
// helpers that put every server value in as text, never as HTML, and Chart.js defaults.
"use strict";

const $ = (id) => document.getElementById(id);

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function fmt(n, digits = 0) {
  if (n == null || Number.isNaN(n)) return "–";
  return Number(n).toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: digits });
}

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text == null ? "–" : String(text);
  if (cls) td.className = cls;
  return td;
}

function fillRows(tbody, rows) {
  tbody.replaceChildren(...rows.map((cells) => {
    const tr = document.createElement("tr");
    tr.append(...cells);
    return tr;
  }));
}

function timeLabel(t) {
  return new Date(t * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

// A time-series chart without animation (it is redrawn every poll) on the canvas `id`.
function timeChart(id, type, datasets, legend) {
  return new Chart($(id), {
    type,
    data: { labels: [], datasets },
    options: {
      animation: false, responsive: true, maintainAspectRatio: false, normalized: true,
      interaction: { mode: "index", intersect: false },
      scales: { x: { ticks: { maxTicksLimit: 7, autoSkip: true }, grid: { display: false } },
                y: { beginAtZero: true, ticks: { precision: 0 } } },
      plugins: { legend: { display: legend, position: "bottom" } },
      elements: { point: { radius: 0 } },
    },
  });
}
