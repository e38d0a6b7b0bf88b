// Web chat for the mesh entry: plain JS, no build step, talks to the same OpenAI-compatible
// API as any client. The conversation lives only in this page and is sent whole each turn.
"use strict";

const KEY_STORAGE = "mesh.apiKey";
const $ = (id) => document.getElementById(id);

const ui = {
  model: $("model"), modelHint: $("model-hint"), refresh: $("refresh"), newChat: $("new-chat"),
  settings: $("settings"), apiKey: $("api-key"), saveKey: $("save-key"),
  temperature: $("temperature"), maxTokens: $("max-tokens"),
  log: $("log"), empty: $("empty"), error: $("error"),
  form: $("composer"), prompt: $("prompt"), send: $("send"), stop: $("stop"),
};

let history = [];        // [{role, content}] sent with every request
let controller = null;   // AbortController of the generation in progress

function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = apiKey();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function showError(message) {
  ui.error.textContent = message;
  ui.error.hidden = !message;
}

async function errorText(res) {
  let message = `HTTP ${res.status}`;
  try {
    const body = await res.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON: keep the status */ }
  const retry = res.headers.get("Retry-After");
  if (retry) message += ` (try again in ${retry} s)`;
  if (res.status === 401) {
    ui.settings.open = true;
    ui.apiKey.focus();
    message += ". Paste an API key in Settings.";
  }
  return message;
}

async function loadModels() {
  const previous = ui.model.value;
  try {
    const res = await fetch("v1/models", { headers: headers() });
    if (!res.ok) {
      showError(await errorText(res));
      return;
    }
    const body = await res.json();
    const models = body.data || [];
    ui.model.replaceChildren();
    for (const m of models) {
      const opt = document.createElement("option");
      opt.value = m.id;
      const nodes = m.nodes === 1 ? "1 node" : `${m.nodes} nodes`;
      if (m.owned_by === "mesh-router") opt.textContent = `${m.id} (picks a model per message)`;
      else if (m.owned_by !== "mesh") opt.textContent = `${m.id} (provider ${m.owned_by})`;
      else opt.textContent = `${m.id} (${nodes})`;
      ui.model.append(opt);
    }
    // With several models to choose from, let the router choose unless the user did.
    const choices = models.filter((m) => m.owned_by !== "mesh-router");
    if (models.some((m) => m.id === previous)) ui.model.value = previous;
    else if (choices.length > 1 && models.some((m) => m.id === "auto")) ui.model.value = "auto";
    ui.modelHint.textContent = models.length ? "" : "no model is being served right now";
    updateButtons();
    if (models.length && ui.error.textContent.startsWith("Could not reach")) showError("");
  } catch (e) {
    showError("Could not reach the entry: " + e.message);
  }
}

function addMessage(role, text) {
  ui.empty.hidden = true;
  const li = document.createElement("li");
  li.className = "msg " + role;
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Assistant";
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  const meta = document.createElement("div");
  meta.className = "meta";
  li.append(who, body, meta);
  ui.log.append(li);
  li.scrollIntoView({ block: "end" });
  return { li, body, meta };
}

function describe(mesh, usage, model) {
  const parts = [];
  if (model) {
    const route = mesh && mesh.route;
    const q = route && route.predicted_quality != null ? `, predicted quality ${route.predicted_quality.toFixed(2)}` : "";
    parts.push(route ? `answered by ${model} (routed${q})` : `answered by ${model}`);
  }
  if (mesh && mesh.served_by && mesh.served_by.length) {
    const kinds = [...new Set(mesh.served_by.map((p) => `${p.kind} (${p.node})`))];
    parts.push("served by " + kinds.join(", then "));
    if (mesh.failovers) parts.push(`${mesh.failovers} failover${mesh.failovers > 1 ? "s" : ""}`);
  }
  if (usage) parts.push(`${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens`);
  return parts.join(" · ");
}

function updateButtons() {
  const busy = controller !== null;
  ui.send.disabled = busy || !ui.model.value;
  ui.stop.hidden = !busy;
  ui.model.disabled = busy;
}

// Yields the JSON payloads of an SSE body ("data: ..." events), stopping at [DONE].
async function* sseEvents(res) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

async function send(text) {
  showError("");
  history.push({ role: "user", content: text });
  const question = addMessage("user", text);
  const answer = addMessage("assistant", "");
  answer.li.classList.add("streaming");
  answer.li.setAttribute("aria-busy", "true");  // screen readers read the answer once, when complete
  controller = new AbortController();
  updateButtons();

  const request = {
    model: ui.model.value,
    messages: history,
    stream: true,
    stream_options: { include_usage: true },
  };
  const temperature = parseFloat(ui.temperature.value);
  if (!Number.isNaN(temperature)) request.temperature = temperature;
  const maxTokens = parseInt(ui.maxTokens.value, 10);
  if (maxTokens > 0) request.max_tokens = maxTokens;

  let content = "";
  let mesh = null;
  let usage = null;
  let model = null;
  try {
    const res = await fetch("v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(request), signal: controller.signal,
    });
    if (!res.ok) throw new Error(await errorText(res));
    for await (const chunk of sseEvents(res)) {
      if (chunk.error) throw new Error(chunk.error.message || "the mesh failed to finish the answer");
      for (const choice of chunk.choices || []) {
        if (choice.index === 0 && choice.delta && choice.delta.content) {
          content += choice.delta.content;
          answer.body.textContent = content;
          answer.li.scrollIntoView({ block: "end" });
        }
      }
      if (chunk.mesh) mesh = chunk.mesh;
      if (chunk.usage) usage = chunk.usage;
      if (chunk.model) model = chunk.model;
      answer.meta.textContent = describe(mesh, usage, model);
    }
  } catch (e) {
    if (e.name === "AbortError") {
      answer.li.classList.add("stopped");
    } else {
      showError(e.message);
    }
  } finally {
    answer.li.classList.remove("streaming");
    answer.li.removeAttribute("aria-busy");
    const stopped = answer.li.classList.contains("stopped") ? "stopped" : "";
    answer.meta.textContent = [stopped, describe(mesh, usage, model)].filter(Boolean).join(" · ");
    if (content) {
      history.push({ role: "assistant", content });
    } else {
      // Nothing came back: undo the turn and give the text back, ready to resend.
      history.pop();
      question.li.remove();
      answer.li.remove();
      if (!ui.prompt.value) ui.prompt.value = text;
      ui.empty.hidden = history.length > 0;
    }
    controller = null;
    updateButtons();
    ui.prompt.focus();
  }
}

function newConversation() {
  if (controller) controller.abort();
  history = [];
  ui.log.replaceChildren();
  ui.empty.hidden = false;
  showError("");
  ui.prompt.focus();
}

ui.form.addEventListener("submit", (e) => {
  e.preventDefault();
  const text = ui.prompt.value.trim();
  if (!text || controller || !ui.model.value) return;
  ui.prompt.value = "";
  send(text);
});

ui.prompt.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    ui.form.requestSubmit();
  }
});

ui.stop.addEventListener("click", () => controller && controller.abort());
ui.newChat.addEventListener("click", newConversation);
ui.refresh.addEventListener("click", loadModels);
ui.model.addEventListener("change", updateButtons);

ui.saveKey.addEventListener("click", () => {
  const key = ui.apiKey.value.trim();
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
  showError("");
  loadModels();
});

document.addEventListener("keydown", (e) => {
  if (e.key === "Escape" && controller) controller.abort();
});

ui.apiKey.value = apiKey();
updateButtons();
loadModels();
// Nodes come and go: keep the list (and node counts) fresh while the page is open.
setInterval(() => { if (!controller && !document.hidden) loadModels(); }, 15000);
