// The model, off the page's thread: loads and verifies the bundle (from the browser's cache after the first
// load), runs the decode loop on onnxruntime-web's WASM backend, and posts each step's tokens and stats.

import {Template} from "./vendor/jinja.mjs";
import * as ort from "./vendor/ort.wasm.min.mjs";
import {Tokenizer} from "./vendor/tokenizers.min.mjs";
import {Engine} from "./src/engine.js";

const BUNDLE_CACHE = "edgespec-bundle";
let engine = null;
let stopping = false;
let busy = Promise.resolve();

// Reads bundle files over fetch with byte progress. With `cache`, each file is kept in the Cache API under its URL
// and sha256 (a re-exported file gets a new entry) and read from there next time; manifest.json is fetched first
// and taken from the cache only when the network fails (offline).
function bundleSource(base, cache) {
  let hashes = {};
  const store = cache ? caches.open(BUNDLE_CACHE) : null;
  async function download(url, rel) {
    const response = await fetch(url);
    if (!response.ok) throw new Error(`cannot fetch ${rel}: ${response.status} ${response.statusText}`);
    const total = Number(response.headers.get("Content-Length")) || 0;
    const reader = response.body.getReader();
    const chunks = [];
    let loaded = 0;
    let shown = 0;
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      chunks.push(value);
      loaded += value.length;
      if (loaded - shown > 1 << 20 || loaded === total) {
        shown = loaded;
        postMessage({type: "progress", rel, index: source.index, count: source.count, loaded, total});
      }
    }
    const bytes = new Uint8Array(loaded);
    let offset = 0;
    for (const chunk of chunks) {
      bytes.set(chunk, offset);
      offset += chunk.length;
    }
    return bytes;
  }
  const source = {
    index: 0,
    count: 1,
    async read(rel) {
      const url = new URL(rel, base).href;
      if (rel === "manifest.json") {
        let bytes;
        try {
          bytes = await download(url, rel);
          if (store) await (await store).put(url, new Response(bytes));
        } catch (error) {
          const cached = store && await (await store).match(url);
          if (!cached) throw error;
          bytes = new Uint8Array(await cached.arrayBuffer());
        }
        hashes = JSON.parse(new TextDecoder().decode(bytes)).files ?? {};
        return bytes;
      }
      const key = `${url}?sha256=${hashes[rel]}`;
      const cached = store && await (await store).match(key);
      if (cached) return new Uint8Array(await cached.arrayBuffer());
      const bytes = await download(url, rel);
      if (store) await (await store).put(key, new Response(bytes));
      return bytes;
    },
  };
  return source;
}

// The pass-size check's verdict, kept in the Cache API under what it depends on: the target graph's bytes, the
// onnxruntime-web version, its thread count and the browser and CPU (the user agent and core count).
async function passCheckStore(source) {
  const manifest = JSON.parse(new TextDecoder().decode(await source.read("manifest.json")));
  const graph = manifest.models.target.graphs.fused;
  const key = new URL(`pass-check/${manifest.files[graph.data_file ?? graph.file]}/${ort.env.versions.web}`
    + `/${ort.env.wasm.numThreads}/${navigator.hardwareConcurrency}/${encodeURIComponent(navigator.userAgent)}`,
  self.location.href).href;
  const store = await caches.open(BUNDLE_CACHE);
  return {
    async get() {
      const hit = await store.match(key);
      return hit ? hit.json() : null;
    },
    put: (verdict) => store.put(key, new Response(JSON.stringify(verdict))),
  };
}

async function load({bundle, cache}) {
  ort.env.wasm.wasmPaths = new URL("./vendor/", import.meta.url).href;
  ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;
  const source = bundleSource(bundle, cache);
  const verdicts = self.caches ? await passCheckStore(source) : null;
  try {
    engine = await Engine.load({ort, Tokenizer, Template}, source, {
      passCheck: verdicts && await verdicts.get(),
      sessionOptions: {executionProviders: ["wasm"]},
      onFile: ({index, count, rel}) => {
        Object.assign(source, {index, count});
        postMessage({type: "progress", rel, index, count, loaded: 0, total: 0});
      },
      onStage: (text) => postMessage({type: "stage", text}),
    });
  } catch (error) {
    if (cache) await caches.delete(BUNDLE_CACHE); // nothing half-verified stays cached
    throw error;
  }
  if (verdicts && !engine.passCheck.cached) await verdicts.put(engine.passCheck);
  const target = engine.manifest.models.target;
  const name = `${String(target.source).split(/[\\/]/).filter(Boolean).at(-1)} ${target.quantization.method}`
    + (engine.draft ? " + draft" : "");
  postMessage({type: "ready", model: name, modes: engine.modes, loadSeconds: engine.loadMs / 1000,
    passCheck: engine.passCheck, maxContext: engine.maxContext,
    backend: `onnxruntime-web ${ort.env.versions.web} wasm, ${ort.env.wasm.numThreads} thread(s)`});
}

// Resolves in a new task, after messages already queued (a MessageChannel, not setTimeout, which browsers clamp
// to 4 ms once nested).
function nextTask() {
  const channel = new MessageChannel();
  const done = new Promise((resolve) => { channel.port1.onmessage = resolve; });
  channel.port2.postMessage(null);
  return done;
}

async function generate({messages, mode, maxNewTokens}) {
  stopping = false;
  const gen = engine.generate(messages, {mode, maxNewTokens, shouldStop: () => stopping});
  for (;;) {
    const {value, done} = await gen.next();
    if (done) {
      postMessage({type: "done", result: value});
      return;
    }
    postMessage({type: "step", pieces: value.pieces, stats: value.stats});
    await nextTask(); // lets a "stop" message in between steps
  }
}

self.onmessage = ({data}) => {
  if (data.type === "stop") {
    stopping = true;
    return;
  }
  const job = data.type === "load" ? load : generate;
  busy = busy.then(() => job(data)).catch((error) => postMessage({type: "error", message: error.message}));
};
