// GdsLLM chat page: streams /v1/chat/completions (server-sent events), keeps the conversation,
// shows time to first token and tokens/s. Plain browser JavaScript, no build step, no library.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, history: [], busy: false, abort: null };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function setStatus(text, ok) {
  const b = $("status");
  b.textContent = text;
  b.className = "badge " + (ok ? "ok" : "bad");
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role;
  const body = document.createElement("span");
  body.className = "content";
  body.textContent = text;  // text only: nothing the model writes is parsed as HTML
  div.append(label, body);
  $("messages").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function errorText(res) {
  try {
    const j = await res.json();
    return `${res.status}: ${(j.error && j.error.message) || JSON.stringify(j)}`;
  } catch (e) {
    return `HTTP ${res.status}`;
  }
}

async function connect() {
  try {
    const h = await fetch("/health").then((r) => r.json());
    setStatus(h.status, h.status === "ok");
    const res = await fetch("/v1/models", { headers: headers() });
    if (!res.ok) {
      $("model").textContent = await errorText(res);
      if (res.status === 401) $("settings").open = true;
      if (h.status !== "ok") setTimeout(connect, 2000);  // still loading: try again
      return;
    }
    state.model = (await res.json()).data[0].id;
    $("model").textContent = state.model;
  } catch (e) {
    setStatus("unreachable", false);
    setTimeout(connect, 2000);
  }
}

function showStats(tSend, tFirst, tEnd, tokens, finish) {
  $("ttft").textContent = tFirst ? ((tFirst - tSend) / 1000).toFixed(2) + " s" : "–";
  let rate = null;
  if (tokens > 1 && tFirst && tEnd > tFirst) rate = (tokens - 1) / ((tEnd - tFirst) / 1000);
  else if (tokens > 0 && tEnd > tSend) rate = tokens / ((tEnd - tSend) / 1000);
  $("tps").textContent = rate === null ? "–" : rate.toFixed(1) + " tokens/s";
  $("tokens").textContent = String(tokens);
  $("finish").textContent = finish ? "finish: " + finish : "";
}

// Reads the SSE body: yields each `data:` JSON object until [DONE].
async function* events(res) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function send(text) {
  if (state.busy || !text.trim()) return;
  if (!state.model) await connect();
  state.busy = true;
  $("send").disabled = true;
  $("stop").disabled = false;
  state.history.push({ role: "user", content: text });
  addMessage("user", text);
  const div = addMessage("assistant", "");
  div.classList.add("pending");
  const out = div.querySelector(".content");
  const system = $("system").value.trim();
  const body = {
    model: state.model,
    messages: (system ? [{ role: "system", content: system }] : []).concat(state.history),
    stream: true,
    stream_options: { include_usage: true },
    max_tokens: parseInt($("max-tokens").value, 10) || 256,
    temperature: parseFloat($("temperature").value),
    top_p: parseFloat($("top-p").value),
  };
  state.abort = new AbortController();
  const tSend = performance.now();
  let tFirst = 0, tokens = 0, chunks = 0, finish = "", reply = "";
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: state.abort.signal });
    if (!res.ok) throw new Error(await errorText(res));
    for await (const ev of events(res)) {
      if (ev.error) throw new Error(ev.error.message);
      if (ev.usage) tokens = ev.usage.completion_tokens;
      for (const c of ev.choices || []) {
        const delta = (c.delta && c.delta.content) || "";
        if (delta) {
          if (!tFirst) tFirst = performance.now();
          chunks += 1;
          reply += delta;
          out.textContent = reply;
          div.scrollIntoView({ block: "end" });
        }
        if (c.finish_reason) finish = c.finish_reason;
      }
      showStats(tSend, tFirst, performance.now(), tokens || chunks, finish);
    }
    state.history.push({ role: "assistant", content: reply });
  } catch (e) {
    if (e.name === "AbortError") {
      finish = "stopped";
      state.history.push({ role: "assistant", content: reply });
    } else {
      state.history.pop();  // the failed turn is not part of the conversation
      div.remove();
      addMessage("error", String(e.message || e));
      connect();
    }
  } finally {
    div.classList.remove("pending");
    showStats(tSend, tFirst, performance.now(), tokens || chunks, finish);
    div.dataset.done = "1";
    state.busy = false;
    state.abort = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("prompt").value;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) {
    ev.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => state.abort && state.abort.abort());
$("reset").addEventListener("click", () => {
  if (state.abort) state.abort.abort();
  state.history = [];
  $("messages").replaceChildren();
  showStats(0, 0, 0, 0, "");
  $("tokens").textContent = "–";
});
// Settings survive a reload: each kept in localStorage as it is edited.
for (const id of ["max-tokens", "temperature", "top-p"]) {
  const saved = localStorage.getItem(`gdsllm-${id}`);
  if (saved !== null && saved !== "") $(id).value = saved;
  $(id).addEventListener("input", () => localStorage.setItem(`gdsllm-${id}`, $(id).value));
}
$("api-key").value = localStorage.getItem("gdsllm-api-key") || "";
$("api-key").addEventListener("change", () => {
  localStorage.setItem("gdsllm-api-key", $("api-key").value.trim());
  connect();
});
connect();
