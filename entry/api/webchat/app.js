// Web chat for the mesh entry: plain JS, no build step, talks to the same OpenAI-compatible
// API as any client. The conversation is sent whole each turn and kept in this browser only
// (localStorage), so it survives a reload; "New chat" forgets it. Answers are Markdown,
// rendered by the vendored marked and cleaned by DOMPurify: no HTML from a model reaches the
// page as HTML.
"use strict";

const KEY_STORAGE = "mesh.apiKey";
const CHAT_STORAGE = "mesh.chat";
const SETTINGS_STORAGE = "mesh.chatSettings";
// The guards llama.cpp's own front ends set: without them a small model at temperature 0.7
// falls into a loop and repeats it to the end of its budget.
const DEFAULTS = {
  temperature: 0.7, max_tokens: 512, top_k: 40, top_p: 0.95, min_p: 0.05, repeat_penalty: 1.1, repeat_last_n: 64,
};
const SETTING_INPUTS = {
  temperature: "temperature", max_tokens: "max-tokens", top_k: "top-k", top_p: "top-p", min_p: "min-p",
  repeat_penalty: "repeat-penalty", repeat_last_n: "repeat-last-n",
};
const $ = (id) => document.getElementById(id);

const ui = {
  model: $("model"), modelHint: $("model-hint"), refresh: $("refresh"), newChat: $("new-chat"),
  settings: $("settings"), apiKey: $("api-key"), saveKey: $("save-key"),
  resetSettings: $("reset-settings"),
  log: $("log"), empty: $("empty"), error: $("error"),
  form: $("composer"), prompt: $("prompt"), send: $("send"), stop: $("stop"),
};

let history = [];        // [{role, content, meta}]: role and content are sent with every request
let controller = null;   // AbortController of the generation in progress
let pending = [];        // [{text, view}]: messages typed while an answer streams, sent in order after it
let epoch = 0;           // bumped by "New chat": an answer that ends later belongs to the old chat

// --- Markdown, safely --------------------------------------------------------------------------

const markdown = (typeof marked !== "undefined" && typeof DOMPurify !== "undefined") ? makeMarkdown() : null;

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function makeMarkdown() {
  // HTML in a model's answer is shown as text, not parsed: marked hands raw HTML to this
  // renderer, which escapes it. DOMPurify then cleans what marked made, as a second wall.
  const md = new marked.Marked({ gfm: true, breaks: true });
  md.use({ renderer: { html(token) { return escapeHtml(token.text || token.raw || ""); } } });
  DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A") {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer");
    }
  });
  // Images are dropped: a model could otherwise make the browser fetch any URL.
  const config = { FORBID_TAGS: ["img", "style", "form", "input", "button", "textarea", "select", "iframe", "svg", "math"],
                   FORBID_ATTR: ["style"] };
  return (text) => DOMPurify.sanitize(md.parse(text), config);
}

function renderText(el, role, text) {
  if (role === "assistant" && markdown) {
    el.classList.add("markdown");
    el.innerHTML = markdown(text);
  } else {
    el.textContent = text;
  }
}

// --- settings and the stored conversation -------------------------------------------------------

function loadSettings() {
  let saved = {};
  try { saved = JSON.parse(localStorage.getItem(SETTINGS_STORAGE) || "{}") || {}; } catch (_) { saved = {}; }
  for (const [name, id] of Object.entries(SETTING_INPUTS)) {
    const v = saved[name];
    $(id).value = typeof v === "number" && Number.isFinite(v) ? v : DEFAULTS[name];
  }
}

function saveSettings() {
  const out = {};
  for (const [name, id] of Object.entries(SETTING_INPUTS)) {
    const v = Number($(id).value);
    if ($(id).value !== "" && Number.isFinite(v)) out[name] = v;
  }
  localStorage.setItem(SETTINGS_STORAGE, JSON.stringify(out));
}

function samplingSettings() {
  const out = {};
  for (const [name, id] of Object.entries(SETTING_INPUTS)) {
    const raw = $(id).value;
    const v = Number(raw);
    if (raw === "" || !Number.isFinite(v)) continue;
    if (name === "max_tokens" && v < 1) continue;
    out[name] = name === "max_tokens" || name === "top_k" || name === "repeat_last_n" ? Math.round(v) : v;
  }
  return out;
}

function saveChat() {
  try {
    localStorage.setItem(CHAT_STORAGE, JSON.stringify({ model: ui.model.value || null, messages: history }));
  } catch (_) { /* storage full or off: the chat still works, it just won't survive a reload */ }
}

function restoreChat() {
  let saved = null;
  try { saved = JSON.parse(localStorage.getItem(CHAT_STORAGE) || "null"); } catch (_) { saved = null; }
  if (!saved || !Array.isArray(saved.messages)) return null;
  history = saved.messages.filter((m) => m && (m.role === "user" || m.role === "assistant") && typeof m.content === "string");
  for (const m of history) {
    const view = addMessage(m.role, m.content);
    view.meta.textContent = m.meta || "";
  }
  return saved.model;
}

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
    else if (restoredModel && models.some((m) => m.id === restoredModel)) ui.model.value = restoredModel;
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
  renderText(body, role, text);
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
  // While an answer streams, Send queues the message instead.
  ui.send.disabled = !ui.model.value;
  ui.send.textContent = busy ? "Queue" : "Send";
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

async function send(text, question = null) {
  showError("");
  history.push({ role: "user", content: text });
  if (question) {
    question.li.classList.remove("pending");
    question.meta.textContent = "";
  } else {
    question = addMessage("user", text);
  }
  const answer = addMessage("assistant", "");
  // Queued messages stay below the answer they wait for.
  for (const p of pending) ui.log.append(p.view.li);
  answer.li.classList.add("streaming");
  answer.li.setAttribute("aria-busy", "true");  // screen readers read the answer once, when complete
  controller = new AbortController();
  const mine = epoch;
  updateButtons();

  const request = {
    model: ui.model.value,
    messages: history.map((m) => ({ role: m.role, content: m.content })),
    stream: true,
    stream_options: { include_usage: true },
    ...samplingSettings(),
  };

  let content = "";
  let mesh = null;
  let usage = null;
  let model = null;
  let failed = false;
  let drawn = false;
  const draw = () => {
    drawn = false;
    renderText(answer.body, "assistant", content);
  };
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
          // Markdown is re-rendered at most once a frame, however fast tokens come.
          if (!drawn) {
            drawn = true;
            requestAnimationFrame(draw);
          }
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
      failed = true;
      showError(e.message);
    }
  } finally {
    if (mine !== epoch) {
      // "New chat" was clicked while this answer streamed: it is gone with its conversation.
      controller = null;
      updateButtons();
      return;
    }
    draw();
    answer.li.classList.remove("streaming");
    answer.li.removeAttribute("aria-busy");
    const stopped = answer.li.classList.contains("stopped") ? "stopped" : "";
    answer.meta.textContent = [stopped, describe(mesh, usage, model)].filter(Boolean).join(" · ");
    if (content) {
      history.push({ role: "assistant", content, meta: answer.meta.textContent });
    } else {
      // Nothing came back: undo the turn and give the text back, ready to resend.
      history.pop();
      question.li.remove();
      answer.li.remove();
      if (!ui.prompt.value) ui.prompt.value = text;
      ui.empty.hidden = history.length > 0 || pending.length > 0;
    }
    saveChat();
    controller = null;
    updateButtons();
    ui.prompt.focus();
    next(failed || !content);
  }
}

// After an answer: send the next queued message, or, when the answer failed, hand the queued
// text back to the composer instead of sending it into the same failure.
function next(failed) {
  if (!pending.length) return;
  if (failed) {
    const texts = pending.map((p) => p.text);
    for (const p of pending) p.view.li.remove();
    pending = [];
    ui.prompt.value = [ui.prompt.value, ...texts].filter(Boolean).join("\n\n");
    ui.empty.hidden = history.length > 0;
    const why = ui.error.textContent || "the answer above did not arrive";
    showError(`${why} — ${texts.length === 1 ? "your queued message was" : "your queued messages were"} not sent; it is back in the box.`);
    return;
  }
  const p = pending.shift();
  send(p.text, p.view);
}

function queue(text) {
  const view = addMessage("user", text);
  view.li.classList.add("pending");
  view.meta.textContent = "queued: sent when the answer above is complete";
  pending.push({ text, view });
}

function newConversation() {
  epoch += 1;
  pending = [];
  if (controller) controller.abort();
  history = [];
  localStorage.removeItem(CHAT_STORAGE);
  ui.log.replaceChildren();
  ui.empty.hidden = false;
  showError("");
  ui.prompt.focus();
}

ui.form.addEventListener("submit", (e) => {
  e.preventDefault();
  const text = ui.prompt.value.trim();
  if (!text) return;
  if (!ui.model.value) {
    showError("No model to send to: none is being served right now (Refresh to check again).");
    return;
  }
  ui.prompt.value = "";
  if (controller) queue(text);
  else send(text);
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
ui.model.addEventListener("change", () => { updateButtons(); saveChat(); });

ui.saveKey.addEventListener("click", () => {
  const key = ui.apiKey.value.trim();
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
  showError("");
  loadModels();
});

for (const id of Object.values(SETTING_INPUTS)) $(id).addEventListener("change", saveSettings);
ui.resetSettings.addEventListener("click", () => {
  localStorage.removeItem(SETTINGS_STORAGE);
  loadSettings();
});

document.addEventListener("keydown", (e) => {
  if (e.key === "Escape" && controller) controller.abort();
});

ui.apiKey.value = apiKey();
loadSettings();
const restoredModel = restoreChat();
updateButtons();
loadModels();
// Nodes come and go: keep the list (and node counts) fresh while the page is open.
setInterval(() => { if (!controller && !document.hidden) loadModels(); }, 15000);
