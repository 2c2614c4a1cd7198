// The page: the desktop chat page's layout and token colours, with the model running in a Web Worker
// (worker.js) instead of behind a server. The page only draws: it sends the conversation to the worker and
// appends each step's tokens, coloured by origin, with the live stats.

import {addMessage, addNote} from "./messages.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const inApp = location.hostname === "appassets.androidplatform.net"; // the Android WebView shell
const worker = new Worker(new URL("worker.js", import.meta.url), {type: "module"});
const history = [];
let busy = false;
let pending = null; // {content, message, answer, resolve} of the answer being written

const number = (value, digits) => (value === null || value === undefined ? "–" : value.toFixed(digits));
const megabytes = (bytes) => (bytes / 1e6).toFixed(1);

function setStatus(state, text) {
  const status = $("status");
  status.dataset.state = state;
  status.textContent = text || state;
}

function setBusy(value) {
  busy = value;
  $("send").disabled = value;
  $("stop").disabled = !value;
}

function showStats(stats) {
  $("stat-mode").textContent = stats.mode;
  $("stat-tps").textContent = number(stats.tokens_per_second, 1);
  $("stat-acc").textContent = stats.acceptance_rate === null ? "–" : `${(100 * stats.acceptance_rate).toFixed(0)}%`;
  $("stat-tpp").textContent = number(stats.tokens_per_target_pass, 2);
  $("stat-tokens").textContent = stats.new_tokens;
}

function showProgress({rel, index, count, loaded, total}) {
  const part = total ? loaded / total : 0;
  $("load-bar").value = (index + part) / count;
  $("load-text").textContent = `loading ${rel} (file ${index + 1} of ${count})`
    + (total ? `: ${megabytes(loaded)} of ${megabytes(total)} MB` : "");
}

function ready(info) {
  $("model").textContent = info.model;
  for (const [name, help] of Object.entries(info.modes)) {
    const option = new Option(name, name);
    option.title = help;
    $("mode").append(option);
  }
  $("mode").value = params.get("mode") || (info.modes.staged ? "staged" : "ngram");
  $("stat-backend").textContent = info.backend;
  $("loading").hidden = true;
  $("send").disabled = false;
  const check = info.passCheck.cached ? "pass sizes known" : `pass sizes checked in ${(info.passCheck.ms / 1000).toFixed(1)} s`;
  setStatus("ready", `ready (loaded in ${info.loadSeconds.toFixed(1)} s, ${check})`);
  document.body.dataset.passCheck = info.passCheck.cached ? "cached" : "checked";
  document.body.dataset.ready = "true";
}

function appendTokens(content, pieces) {
  for (const piece of pieces) {
    if (!piece.text) continue;
    const span = document.createElement("span");
    span.className = `tok o-${piece.origin}`;
    span.dataset.id = piece.id;
    span.textContent = piece.text;
    content.append(span);
  }
}

worker.onmessage = ({data}) => {
  if (data.type === "progress") showProgress(data);
  else if (data.type === "stage") $("load-text").textContent = data.text;
  else if (data.type === "ready") ready(data);
  else if (data.type === "step" && pending) {
    appendTokens(pending.content, data.pieces);
    pending.ids.push(...data.pieces.map((p) => p.id));
    showStats(data.stats);
    pending.message.scrollIntoView({block: "end"});
  } else if (data.type === "done" && pending) {
    pending.finish(data.result);
  } else if (data.type === "error") {
    if (pending) pending.fail(data.message);
    else {
      $("load-text").textContent = data.message;
      setStatus("error", "cannot load the model");
    }
  }
};

function send(text) {
  history.push({role: "user", content: text});
  addMessage("user", text);
  const message = addMessage("assistant", "");
  setBusy(true);
  setStatus("generating");
  pending = {
    message, content: message.querySelector(".content"), ids: [],
    finish(result) {
      history.push({role: "assistant", content: result.text});
      message.dataset.tokenIds = JSON.stringify(result.tokenIds); // read by tests and bench/bench_web.py
      message.dataset.stats = JSON.stringify(result.stats);
      if (result.message) addNote(message, result.message);
      if (result.finishReason === "stopped") addNote(message, "stopped");
      showStats(result.stats);
      setStatus("done", `done (${result.finishReason})`);
      pending = null;
      setBusy(false);
    },
    fail(error) {
      history.pop();
      message.classList.add("error");
      addNote(message, error);
      setStatus("error");
      pending = null;
      setBusy(false);
    },
  };
  worker.postMessage({type: "generate", messages: history.slice(), mode: $("mode").value,
    maxNewTokens: Number($("max-tokens").value)});
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value;
  if (!text.trim() || busy || $("send").disabled) return;
  $("prompt").value = "";
  send(text);
});

$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});

$("stop").addEventListener("click", () => worker.postMessage({type: "stop"}));

$("new-chat").addEventListener("click", () => {
  if (busy) worker.postMessage({type: "stop"});
  history.length = 0;
  $("conversation").replaceChildren();
  setStatus("idle");
});

// Installed as a PWA, the page and (in the worker) the bundle come from the browser's caches, so it works offline
// once loaded. Inside the Android app the assets are local already, and the WebView's service workers would not
// see the app's asset handler, so none is registered there.
if ("serviceWorker" in navigator && !inApp) {
  navigator.serviceWorker.register("sw.js").then(
    () => navigator.serviceWorker.ready.then(() => { document.body.dataset.offlineReady = "true"; }),
    (error) => console.warn(`no service worker: ${error.message}`));
}

worker.postMessage({type: "load", bundle: new URL(params.get("bundle") || "bundle/", location.href).href,
  cache: !inApp});
