// What the node tests hand the engine: onnxruntime-node (or onnxruntime-web's WASM build, which runs in node too),
// the tokenizer libraries, and a bundle source over the file system.

import {readFile} from "node:fs/promises";
import {join} from "node:path";

import {Template} from "@huggingface/jinja";
import {Tokenizer} from "@huggingface/tokenizers";

export async function nodeDeps(backend = "node") {
  const ort = backend === "web" ? await import("onnxruntime-web") : await import("onnxruntime-node");
  return {ort: ort.default ?? ort, Tokenizer, Template};
}

export function fileSource(dir) {
  return {read: async (rel) => new Uint8Array(await readFile(join(dir, rel)))};
}
