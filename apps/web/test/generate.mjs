// Greedy answers of the JavaScript loop in node, for bench/bench_web.py: the same loop as in the browser, on
// onnxruntime-node (the native CPU kernels the Python runtime uses) or onnxruntime-web's WASM build.
//
//   node test/generate.mjs BUNDLE BACKEND MODE MAX_NEW_TOKENS < prompts.json    # -> [[token ids], ...]

import {readFileSync} from "node:fs";

import {Engine} from "../src/engine.js";
import {fileSource, nodeDeps} from "./node-deps.js";

const [bundle, backend, mode, maxNewTokens] = process.argv.slice(2);
const prompts = JSON.parse(readFileSync(0, "utf-8"));
const engine = await Engine.load(await nodeDeps(backend), fileSource(bundle));
const answers = [];
for (const prompt of prompts) {
  const gen = engine.generate(prompt, {mode, chat: true, maxNewTokens: Number(maxNewTokens)});
  for (;;) {
    const {value, done} = await gen.next();
    if (done) {
      answers.push(value.tokenIds);
      break;
    }
  }
}
console.log(JSON.stringify({passCheck: engine.passCheck, answers}));
