// Before the first generation: does the target compute a row alike in a one-token pass and in a pass of k rows,
// here (runtime/selfcheck.py)? That is a property of onnxruntime's kernels on this CPU and backend, and greedy
// speculation reproduces `ar` only where it holds. Every verify size a mode can run (2..MAX_PROPOSAL+1 rows) is
// compared bitwise with one-token passes over the same tokens, after a short and a longer context, first
// unpadded, then with one-token passes padded to two rows.

import {MAX_PROPOSAL} from "./decode.js";

function randomTokens(count, vocab, seed) {
  let x = seed >>> 0;
  const out = [];
  for (let i = 0; i < count; i++) {
    x = (Math.imul(x, 1664525) + 1013904223) >>> 0;
    out.push(x % vocab);
  }
  return out;
}

const same = (a, b) => a.length === b.length && a.every((v, i) => Object.is(v, b[i]));

// The first pass size whose rows (or the one-token pass after it) differ from one-token passes, or null.
async function firstMismatch(runner, sizes) {
  for (const prefix of [Math.min(16, runner.maxContext >> 2), Math.min(256, runner.maxContext >> 1)]) {
    const fit = sizes.filter((k) => prefix + k + runner.inputRows + 1 < runner.maxContext);
    if (!fit.length) continue;
    const tokens = randomTokens(prefix + fit.at(-1) + 1, runner.vocabSize, prefix);
    runner.rollback(0);
    await runner.prefill(tokens.slice(0, prefix));
    const reference = [];
    for (const t of tokens.slice(prefix)) reference.push(Float32Array.from((await runner.forward([t]))[0]));
    for (const k of fit) {
      runner.rollback(prefix);
      const rows = (await runner.forward(tokens.slice(prefix, prefix + k))).map((r) => Float32Array.from(r));
      const after = (await runner.forward([tokens[prefix + k]]))[0];
      if (!rows.every((r, i) => same(r, reference[i])) || !same(after, reference[k])) {
        runner.rollback(0);
        return k;
      }
    }
  }
  runner.rollback(0);
  return null;
}

// Picks the cheapest padding under which every size agrees and applies it; {inputRows, exact, mismatched, ms}.
export async function checkPassSizes(runner) {
  const t0 = performance.now();
  const sizes = Array.from({length: MAX_PROPOSAL}, (_, i) => i + 2);
  const mismatched = {};
  for (const rows of [1, 2]) {
    runner.inputRows = rows;
    const k = await firstMismatch(runner, sizes);
    if (k === null) return {inputRows: rows, exact: true, mismatched, ms: performance.now() - t0};
    mismatched[rows] = k;
  }
  runner.inputRows = 1;
  return {inputRows: 1, exact: false, mismatched, ms: performance.now() - t0};
}
