// shoal's chat page: the conversation lives in this page; each reply streams from /v1/chat/completions.
"use strict";
const $ = (id) => document.getElementById(id);
const conversation = [];  // {role, content} turns sent with each request
let running = null;       // the AbortController of the reply being streamed
let modelName = null;

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function addTurn(role, text) {
  const div = document.createElement("div");
  div.className = "turn " + role;
  if (role === "assistant") {
    const reasoning = document.createElement("div");
    reasoning.className = "reasoning";
    const content = document.createElement("div");
    content.className = "content";
    content.textContent = text || "";
    div.append(reasoning, content);
  } else {
    div.textContent = text;
  }
  $("log").append(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

async function loadModel() {
  try {
    const r = await fetch("v1/models", { headers: headers() });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    modelName = body.data[0].id;
    $("model").textContent = modelName;
  } catch (e) {
    $("model").textContent = "(model unknown: " + e.message + ")";
  }
}

function setRunning(controller) {
  running = controller;
  $("send").disabled = !!controller;
  $("stop").disabled = !controller;
}

async function send(text) {
  if (!modelName) await loadModel();
  conversation.push({ role: "user", content: text });
  addTurn("user", text);
  const turn = addTurn("assistant", "");
  const reasoningEl = turn.querySelector(".reasoning"), contentEl = turn.querySelector(".content");
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...conversation);
  const body = { model: modelName, messages, stream: true,
                 temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value) };
  const controller = new AbortController();
  setRunning(controller);
  $("status").textContent = "writing…";
  let reply = "";
  try {
    const r = await fetch("v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body),
                                                   signal: controller.signal });
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      throw new Error(err.error ? err.error.message : r.status + " " + r.statusText);
    }
    const reader = r.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        for (const choice of chunk.choices || []) {
          const delta = choice.delta || {};
          if (delta.reasoning_content) reasoningEl.textContent += delta.reasoning_content;
          if (delta.content) { reply += delta.content; contentEl.textContent = reply.trimStart(); }
        }
        $("log").scrollTop = $("log").scrollHeight;
      }
    }
    $("status").textContent = "";
  } catch (e) {
    if (e.name === "AbortError") {
      $("status").textContent = "stopped";
    } else {
      turn.classList.add("error");
      contentEl.textContent = reply + (reply ? "\n" : "") + "Error: " + e.message;
      $("status").textContent = "";
    }
  } finally {
    conversation.push({ role: "assistant", content: reply });
    setRunning(null);
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("input").value.trim();
  if (!text || running) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => { if (running) running.abort(); });
$("reset").addEventListener("click", () => {
  if (running) running.abort();
  conversation.length = 0;
  $("log").replaceChildren();
  $("status").textContent = "";
});
$("api-key").addEventListener("change", loadModel);
loadModel();
