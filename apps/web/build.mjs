// Assembles the web app in dist/ (or --out DIR): the page, the decode loop's modules, the desktop chat page's
// stylesheet, onnxruntime-web's WASM build and the tokenizer libraries from node_modules, a service worker that
// knows every file, and, with --bundle DIR, an edgespec bundle (only the manifest and the files it lists).
//
//   node build.mjs [--out DIR] [--bundle DIR]

import {createHash} from "node:crypto";
import {cpSync, existsSync, mkdirSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync} from "node:fs";
import {dirname, join, relative} from "node:path";
import {fileURLToPath} from "node:url";
import {parseArgs} from "node:util";

const HERE = dirname(fileURLToPath(import.meta.url));
const VENDOR = {
  "ort.wasm.min.mjs": "onnxruntime-web/dist/ort.wasm.min.mjs",
  "ort-wasm-simd-threaded.mjs": "onnxruntime-web/dist/ort-wasm-simd-threaded.mjs",
  "ort-wasm-simd-threaded.wasm": "onnxruntime-web/dist/ort-wasm-simd-threaded.wasm",
  "tokenizers.min.mjs": "@huggingface/tokenizers/dist/tokenizers.min.mjs",
  "jinja.mjs": "@huggingface/jinja/dist/index.js",
};

function files(dir) {
  return readdirSync(dir).flatMap((name) => {
    const path = join(dir, name);
    return statSync(path).isDirectory() ? files(path) : [path];
  });
}

export function build({out = join(HERE, "dist"), bundle = null} = {}) {
  rmSync(out, {recursive: true, force: true});
  mkdirSync(join(out, "vendor"), {recursive: true});
  cpSync(join(HERE, "web"), out, {recursive: true});
  cpSync(join(HERE, "src"), join(out, "src"), {recursive: true});
  cpSync(join(HERE, "..", "desktop", "chat_page", "style.css"), join(out, "chat.css"));
  cpSync(join(HERE, "..", "desktop", "chat_page", "messages.js"), join(out, "messages.js"));
  for (const [name, from] of Object.entries(VENDOR)) {
    const path = join(HERE, "node_modules", from);
    if (!existsSync(path)) throw new Error(`${path} is missing: run npm ci in apps/web first`);
    cpSync(path, join(out, "vendor", name));
  }
  const shell = files(out).map((p) => relative(out, p).split("\\").join("/")).filter((p) => p !== "sw.js").sort();
  const hash = createHash("sha256");
  for (const rel of shell) hash.update(rel).update(readFileSync(join(out, rel)));
  const list = ["./", ...shell.map((rel) => (rel === "index.html" ? "./index.html" : rel))];
  const sw = readFileSync(join(out, "sw.js"), "utf-8");
  writeFileSync(join(out, "sw.js"), `const VERSION = "${hash.digest("hex").slice(0, 16)}";\n`
    + `const APP_FILES = ${JSON.stringify(list)};\n${sw}`);
  if (bundle) {
    const manifest = JSON.parse(readFileSync(join(bundle, "manifest.json"), "utf-8"));
    for (const rel of ["manifest.json", ...Object.keys(manifest.files)]) {
      mkdirSync(dirname(join(out, "bundle", rel)), {recursive: true});
      cpSync(join(bundle, rel), join(out, "bundle", rel));
    }
  }
  return out;
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const {values} = parseArgs({options: {out: {type: "string"}, bundle: {type: "string"}}});
  console.log(`built ${build(values)}`);
}
