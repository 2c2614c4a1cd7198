// The JavaScript loop against the Python runtime, on test vectors tests/test_web.py writes (EDGESPEC_VECTORS: a
// JSON file naming a bundle and, per prompt and mode, the Python runtime's prompt ids, greedy token ids, text and
// target passes). Run by that test; by hand: EDGESPEC_VECTORS=... node --test test/

import assert from "node:assert/strict";
import {readFileSync} from "node:fs";
import {test} from "node:test";

import {BundleError, Engine} from "../src/engine.js";
import {ContextLookup, NgramDrafter, NgramModel} from "../src/ngram.js";
import {fileSource, nodeDeps} from "./node-deps.js";

const path = process.env.EDGESPEC_VECTORS;
assert.ok(path, "EDGESPEC_VECTORS must name the vectors tests/test_web.py writes");
const vectors = JSON.parse(readFileSync(path, "utf-8"));

async function run(engine, c) {
  const gen = engine.generate(c.prompt, {mode: c.mode, chat: c.chat, maxNewTokens: c.max_new_tokens, settings: c.settings});
  const origins = [];
  const steps = [];
  for (;;) {
    const {value, done} = await gen.next();
    if (done) return {...value, origins, steps};
    origins.push(...value.pieces.map((p) => p.origin));
    steps.push(value.pieces.length);
  }
}

for (const backend of ["node", "web"]) {
  test(`${backend}: greedy ar, ngram and staged give the Python runtime's tokens`, async () => {
    const engine = await Engine.load(await nodeDeps(backend), fileSource(vectors.bundle));
    assert.ok(engine.passCheck.exact, `the pass-size check failed: ${JSON.stringify(engine.passCheck)}`);
    for (const c of vectors.cases) {
      const what = `${c.mode} on ${JSON.stringify(c.prompt).slice(0, 40)}`;
      assert.deepEqual(engine.promptTokens(c.prompt, c.chat), c.prompt_ids, `prompt ids, ${what}`);
      const result = await run(engine, c);
      assert.deepEqual(result.tokenIds, c.token_ids, `token ids, ${what}`);
      assert.equal(result.text, c.text, `text, ${what}`);
      assert.equal(result.finishReason, c.finish_reason, `finish reason, ${what}`);
      // Same proposals as the Python runtime with the same fixed sizes: the same tokens committed per verify pass.
      assert.deepEqual(result.steps, c.steps, `tokens per step, ${what}`);
      assert.equal(result.origins.length, c.token_ids.length);
      if (c.mode === "ar") assert.ok(result.origins.every((o) => o === "target"));
    }
  });
}

test("the n-gram table gives runtime/ngram.py's distributions and proposals", async () => {
  const {files, manifest} = await import("../src/bundle.js").then((b) => b.openBundle(fileSource(vectors.bundle)));
  const model = await NgramModel.fromNpz(files[manifest.ngram.file]);
  for (const check of vectors.ngram_checks) {
    assert.deepEqual(model.nextDistribution(check.context, 4), check.top);
    const drafter = new NgramDrafter(new ContextLookup(check.context.slice()), model);
    assert.deepEqual(drafter.propose([], 6), check.proposal);
  }
});

test("a changed byte in any file the loop reads is refused before it is parsed", async () => {
  const source = fileSource(vectors.bundle);
  const manifest = JSON.parse(new TextDecoder().decode(await source.read("manifest.json")));
  for (const rel of [manifest.tokenizer.file, manifest.models.target.graphs.fused.data_file, manifest.ngram.file]) {
    const tampered = {read: async (name) => {
      const bytes = await source.read(name);
      if (name === rel) bytes[bytes.length >> 1] ^= 1;
      return bytes;
    }};
    await assert.rejects(Engine.load(await nodeDeps("node"), tampered),
      (e) => e instanceof BundleError && e.message.includes(`checksum mismatch for ${rel}`));
  }
});
