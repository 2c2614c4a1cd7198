// The n-gram drafter of runtime/ngram.py: context lookup (prompt-lookup decoding over the committed text) first,
// then the bundle's Katz-backoff trigram table. Ported line for line so that, with fixed proposal sizes, the
// JavaScript loop proposes exactly what the Python runtime proposes (tests compare their pass counts).

import {readNpz} from "./npy.js";

const key = (tokens) => tokens.join(",");

// Incremental index of every n-gram (n <= maxN) of a growing token list.
export class ContextLookup {
  constructor(tokens, maxN = 4) {
    this.tokens = tokens; // the live list the engine appends to
    this.maxN = maxN;
    this.last = new Map();
    this.prev = new Map();
    this.indexed = 0;
    this.sync();
  }

  sync() {
    if (this.tokens.length < this.indexed) {
      this.last.clear();
      this.prev.clear();
      this.indexed = 0;
    }
    for (let end = this.indexed + 1; end <= this.tokens.length; end++) {
      for (let n = 1; n <= this.maxN && end - n >= 0; n++) {
        const k = key(this.tokens.slice(end - n, end));
        if (this.last.has(k)) this.prev.set(k, this.last.get(k));
        this.last.set(k, end);
      }
    }
    this.indexed = this.tokens.length;
  }

  // The continuation after the latest earlier match of the longest suffix of tokens + tail.
  propose(tail, maxTokens) {
    this.sync();
    const seq = this.tokens;
    for (let n = this.maxN; n > 0; n--) {
      let suffix;
      if (n <= tail.length) suffix = tail.slice(tail.length - n);
      else if (n - tail.length <= seq.length) suffix = seq.slice(seq.length - (n - tail.length)).concat(tail);
      else continue;
      const k = key(suffix);
      let end = this.last.get(k);
      if (end === seq.length && !tail.length) end = this.prev.get(k); // the suffix itself is the latest occurrence
      if (end === undefined || end >= seq.length) continue;
      return seq.slice(end, end + maxTokens);
    }
    return [];
  }
}

// numpy's float64 sum, in its order (pairwise over 8 accumulators from 8 elements on), so that the backoff weight
// has the bits runtime/ngram.py gives it.
function numpySum(values) {
  const n = values.length;
  if (n < 8) {
    let sum = 0;
    for (let i = 0; i < n; i++) sum += values[i];
    return sum;
  }
  const r = Array.from(values.subarray(0, 8));
  let i = 8;
  for (; i < n - (n % 8); i += 8) for (let j = 0; j < 8; j++) r[j] += values[i + j];
  let sum = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
  for (; i < n; i++) sum += values[i];
  return sum;
}

function search(keys, wanted) {
  let lo = 0;
  let hi = keys.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (keys[mid] < wanted) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// Top-k next tokens per trigram / bigram context and overall, with backoff weights (the bundle's ngram.npz).
export class NgramModel {
  constructor(arrays) {
    const names = ["tri_keys", "tri_offsets", "tri_tokens", "tri_probs", "bi_keys", "bi_offsets", "bi_tokens",
      "bi_probs", "uni_tokens", "uni_probs", "vocab_size"];
    const missing = names.filter((n) => !(n in arrays));
    if (missing.length) throw new Error(`the n-gram table is missing ${missing.join(", ")}`);
    for (const level of ["tri", "bi"]) {
      const offsets = arrays[`${level}_offsets`].data;
      if (offsets.length !== arrays[`${level}_keys`].data.length + 1
          || offsets[offsets.length - 1] !== arrays[`${level}_tokens`].data.length) {
        throw new Error(`the n-gram table has inconsistent ${level}gram offsets`);
      }
    }
    for (const name of names) this[name] = arrays[name].data;
    this.vocabSize = arrays.vocab_size.data[0];
  }

  static async fromNpz(bytes) {
    return new NgramModel(await readNpz(bytes, "the n-gram table"));
  }

  lookup(level, wanted) {
    const keys = this[`${level}_keys`];
    const offsets = this[`${level}_offsets`];
    const i = search(keys, wanted);
    if (i < keys.length && keys[i] === wanted) {
      return {tokens: this[`${level}_tokens`].subarray(offsets[i], offsets[i + 1]),
        probs: this[`${level}_probs`].subarray(offsets[i], offsets[i + 1])};
    }
    return {tokens: [], probs: new Float32Array(0)};
  }

  // Top-n next tokens with backoff probabilities for the last two tokens of `context`: [[token, probability]].
  nextDistribution(context, n = 4) {
    const scores = new Map();
    let weight = 1.0;
    const levels = [];
    if (context.length >= 2) levels.push(["tri", context.at(-2) * this.vocabSize + context.at(-1)]);
    if (context.length >= 1) levels.push(["bi", context.at(-1)]);
    for (const [level, wanted] of levels) {
      const {tokens, probs} = this.lookup(level, wanted);
      for (let i = 0; i < tokens.length; i++) scores.set(tokens[i], (scores.get(tokens[i]) ?? 0) + weight * probs[i]);
      if (tokens.length) weight *= Math.max(1.0 - numpySum(probs), 0.0);
    }
    for (let i = 0; i < this.uni_tokens.length; i++) {
      const t = this.uni_tokens[i];
      scores.set(t, (scores.get(t) ?? 0) + weight * this.uni_probs[i]);
    }
    return [...scores.entries()].sort((a, b) => b[1] - a[1]).slice(0, n);
  }
}

// Context lookup first, then the trigram table's greedy continuation.
export class NgramDrafter {
  constructor(lookup, model = null) {
    this.lookup = lookup;
    this.model = model;
  }

  // Up to `maxTokens` guesses continuing lookup.tokens + tail.
  propose(tail, maxTokens) {
    if (maxTokens <= 0) return [];
    const out = this.lookup.propose(tail, maxTokens);
    if (this.model) {
      const context = this.lookup.tokens.slice(-2).concat(tail, out);
      while (out.length < maxTokens) {
        const best = this.model.nextDistribution(context, 1);
        if (!best.length || best[0][1] < 0.2) break;
        out.push(best[0][0]);
        context.push(best[0][0]);
      }
    }
    return out;
  }

  // The table's other likely next tokens, for side branches of a draft tree.
  alternatives(tail, exclude, n) {
    if (!this.model || n <= 0) return [];
    const context = this.lookup.tokens.slice(-2).concat(tail);
    return this.model.nextDistribution(context, n + 1).map(([t]) => t).filter((t) => t !== exclude).slice(0, n);
  }
}
