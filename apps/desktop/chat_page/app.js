// The chat page: streams /v1/chat/completions (server-sent events over fetch, so the request can be a POST and
// the stop button can abort it, which the server sees as a disconnect and stops decoding), colours each token by
// the origin the server reports in the chunk's `edgespec` object, and keeps the conversation in `history`.
import {addMessage, addNote} from "./messages.js";

const $ = (id) => document.getElementById(id);
const history = [];
let modelId = null;
let controller = null;
let conversation = 0; // a new chat makes an answer still being stopped forget its conversation

async function init() {
  const response = await fetch("/v1/models");
  const card = (await response.json()).data[0];
  modelId = card.id;
  $("model").textContent = card.id;
  const select = $("mode");
  select.append(new Option(`default (${card.edgespec.default_mode})`, ""));
  for (const [name, help] of Object.entries(card.edgespec.modes)) {
    const option = new Option(name, name);
    option.title = help;
    select.append(option);
  }
  for (const span of document.querySelectorAll("#legend .tok")) {
    span.title = card.edgespec.origins[span.dataset.origin] || "";
  }
}

function setStatus(state, text) {
  const status = $("status");
  status.dataset.state = state;
  status.textContent = text || state;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

const number = (value, digits) => (value === null || value === undefined ? "–" : value.toFixed(digits));

function showStats(stats) {
  $("stat-tps").textContent = number(stats.tokens_per_second, 1);
  $("stat-acc").textContent = stats.acceptance_rate === null || stats.acceptance_rate === undefined
    ? "–" : `${(100 * stats.acceptance_rate).toFixed(0)}%`;
  $("stat-tpp").textContent = number(stats.tokens_per_target_pass, 2);
  $("stat-tokens").textContent = stats.completion_tokens;
}

// Yields the JSON of each `data:` line of a server-sent event stream, until [DONE].
async function* events(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

function appendTokens(content, tokens) {
  for (const token of tokens) {
    const span = document.createElement("span");
    span.className = `tok o-${token.origin || "unknown"}`;
    span.textContent = token.text;
    content.append(span);
  }
}

async function send(text) {
  const mine = conversation;
  history.push({role: "user", content: text});
  addMessage("user", text);
  const message = addMessage("assistant", "");
  const content = message.querySelector(".content");
  const body = {
    model: modelId, messages: history.slice(), stream: true, stream_options: {include_usage: true},
    temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value),
  };
  if ($("mode").value) body.edgespec = {mode: $("mode").value};
  controller = new AbortController();
  setBusy(true);
  setStatus("generating");
  let answer = "";
  let finish = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!response.ok) {
      const error = await response.json().catch(() => null);
      throw new Error(error?.error?.message || `${response.status} ${response.statusText}`);
    }
    for await (const chunk of events(response.body)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const extra = chunk.edgespec || {};
      if (extra.mode) $("stat-mode").textContent = extra.mode;
      if (extra.stats) showStats(extra.stats);
      const choice = chunk.choices[0];
      if (!choice) continue;
      const piece = choice.delta.content || "";
      if (extra.tokens) appendTokens(content, extra.tokens);
      else if (piece) content.append(piece);
      answer += piece;
      if (choice.finish_reason) finish = choice.finish_reason;
      if (extra.message) addNote(message, extra.message);
      message.scrollIntoView({block: "end"});
    }
    history.push({role: "assistant", content: answer});
    setStatus("done", `done (${finish})`);
  } catch (error) {
    if (mine !== conversation) return;
    if (error.name === "AbortError") {
      history.push({role: "assistant", content: answer});
      addNote(message, "stopped");
      setStatus("stopped");
    } else {
      history.pop();
      message.classList.add("error");
      addNote(message, error.message);
      setStatus("error");
    }
  } finally {
    controller = null;
    setBusy(false);
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value;
  if (!text.trim() || controller) return;
  $("prompt").value = "";
  send(text);
});

$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});

$("stop").addEventListener("click", () => controller?.abort());

$("new-chat").addEventListener("click", () => {
  conversation += 1;
  controller?.abort();
  history.length = 0;
  $("conversation").replaceChildren();
  setStatus("idle");
});

init().catch((error) => setStatus("error", `cannot reach the server: ${error.message}`));
