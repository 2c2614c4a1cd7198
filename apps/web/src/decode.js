// The greedy decoding modes of the JavaScript loop: `ar`, `ngram` and `staged` (runtime/decoding.py,
// runtime/staged.py). A mode is an async generator over a state; it reads `state.tokens` (every committed token,
// appended by the engine between steps) and yields each step's tokens with the origin of each: "target" (the
// target's own token), "ngram" or "draft" (a proposal the target accepted). Greedy verification accepts a
// proposed token only where it equals the target's argmax, so every mode commits exactly `ar`'s tokens, provided
// the target computes a row alike in passes of every size (selfcheck.js).
//
// Proposal sizes are fixed settings here (`k`, `depth`); the Python runtime also sizes them step by step from
// cost curves it measures, which this loop does not port. With the same fixed settings both propose the same
// tokens, which the tests check through their pass counts.

import {ContextLookup, NgramDrafter} from "./ngram.js";
import {argmax} from "./model.js";
import {DraftTree} from "./tree.js";

// The most tokens a step proposes; the pass-size check covers every verify pass up to MAX_PROPOSAL + 1 rows.
export const MAX_PROPOSAL = 8;

export const MODES = {
  ar: {help: "one target pass per token", settings: {}},
  ngram: {help: "n-gram proposals verified by the target, no draft; lossless", settings: {k: 4}},
  staged: {help: "n-gram guesses checked by the draft in a tree, its path verified by the target; lossless",
    settings: {depth: 3, ngramWidth: 2}, draft: true},
};

export function modeSettings(mode, given = {}) {
  const spec = MODES[mode];
  if (!spec) throw new Error(`unknown mode ${JSON.stringify(mode)}; modes: ${Object.keys(MODES).join(", ")}`);
  const settings = {...spec.settings};
  for (const [name, value] of Object.entries(given)) {
    if (!(name in settings)) {
      throw new Error(`${mode} has no setting ${JSON.stringify(name)}`
        + ` (settings: ${Object.keys(settings).join(", ") || "none"})`);
    }
    if (!Number.isInteger(value) || value < 0 || value > MAX_PROPOSAL) {
      throw new Error(`${name} must be an integer from 0 to ${MAX_PROPOSAL}, got ${JSON.stringify(value)}`);
    }
    settings[name] = value;
  }
  return settings;
}

// Feed what `runner` does not hold of `tokens`, leaving the last `keepLast` unfed; its buffer may hold another
// text, which is rolled back to the first difference.
export async function catchUp(runner, tokens, keepLast = 0) {
  const end = tokens.length - keepLast;
  const common = Math.min(runner.commonPrefix(tokens), end);
  if (runner.length > common) runner.rollback(common);
  if (common === end) return null;
  return runner.prefill(tokens.slice(common, end));
}

export class DecodeStats {
  constructor() {
    this.steps = 0;
    this.drafted = 0;
    this.accepted = 0;
    this.kinds = {};
  }

  record(kind, drafted, accepted) {
    this.steps += 1;
    this.drafted += drafted;
    this.accepted += accepted;
    this.kinds[kind] = (this.kinds[kind] ?? 0) + 1;
  }
}

// The target verifies the pending token plus `proposal` in one pass; returns the accepted prefix plus its own next
// token, with their origins.
async function verify(state, proposal, origin, kind) {
  const {target, tokens} = state;
  const start = target.length;
  const logits = await target.forward([tokens.at(-1), ...proposal]);
  let n = 0;
  while (n < proposal.length && proposal[n] === argmax(logits[n])) n++;
  const next = argmax(logits[n]);
  target.rollback(start + 1 + n);
  state.stats.record(proposal.length ? kind : "ar", proposal.length, n);
  return {tokens: [...proposal.slice(0, n), next], origins: [...new Array(n).fill(origin), "target"]};
}

async function* decodeAr(state) {
  await catchUp(state.target, state.tokens, 1);
  for (;;) yield await verify(state, [], "target", "ar");
}

async function* decodeNgram(state) {
  const drafter = new NgramDrafter(new ContextLookup(state.tokens), state.ngram);
  await catchUp(state.target, state.tokens, 1);
  for (;;) {
    const limit = Math.min(state.target.capacity, state.target.maxChunk) - 1;
    yield await verify(state, drafter.propose([], Math.max(0, Math.min(state.settings.k, limit))), "ngram", "ngram");
  }
}

// Stage 2 of `staged`: the draft checks a tree of n-gram guesses in one pass and keeps the path it agrees with, so
// it advances several tokens per pass (StagedDrafter in runtime/staged.py, greedy).
class StagedDrafter {
  constructor(state, drafter, width) {
    this.state = state;
    this.drafter = drafter;
    this.width = width;
  }

  // Tree rows the draft's next pass can hold beside `lagging` catch-up rows.
  room(lagging) {
    const draft = this.state.draft;
    return Math.min(draft.capacity - 1, draft.maxChunk) - lagging;
  }

  // Committed tokens the draft has not seen, the pending one aside, split into those fed in chunks of their own and
  // those riding along the first tree pass.
  lagSplit(treeRows) {
    const {tokens, draft} = this.state;
    const lag = tokens.length - 1 - Math.min(draft.commonPrefix(tokens), tokens.length - 1);
    const along = Math.min(lag, Math.max(0, draft.maxChunk - treeRows));
    return [lag - along, along];
  }

  tree(pending, path, want, rows) {
    const guess = this.drafter.propose(path, Math.max(0, Math.min(want, rows - 1 - this.width)));
    const tree = new DraftTree(pending);
    const chain = tree.addChain(0, guess);
    const side = Math.min(this.width, rows - tree.tokens.length);
    for (const alt of this.drafter.alternatives(path, guess.length ? guess[0] : null, side)) tree.add(0, alt);
    return {tree, guess, chain};
  }

  // The draft's greedy continuation of the committed text, `depth` tokens (its KV kept in step).
  async path(depth) {
    const {draft, tokens} = this.state;
    const path = [];
    let pending = tokens.at(-1);
    let first = true;
    let guessed = 0;
    while (path.length < depth && this.room(0) >= 1) {
      const want = depth - path.length;
      let {tree, chain} = this.tree(pending, path, want, this.room(0));
      let lagging = [];
      if (first) {
        first = false;
        const along = this.lagSplit(tree.tokens.length)[1];
        await catchUp(draft, tokens, 1 + along);
        lagging = tokens.slice(draft.length, tokens.length - 1);
        if (this.room(lagging.length) < 1) break;
        if (tree.tokens.length > this.room(lagging.length)) {
          ({tree, chain} = this.tree(pending, path, want, this.room(lagging.length)));
        }
      }
      const rows = tree.tokens.length;
      const start = draft.length;
      const {positions, mask} = tree.behind(lagging.length, start);
      const logits = (await draft.forward([...lagging, ...tree.tokens], {positions, mask, lastRows: rows})).slice(-rows);
      const {kept, next} = tree.walk((node) => argmax(logits[node]));
      draft.keep(start, [...lagging.keys(), ...kept.map((i) => lagging.length + i)]);
      guessed += kept.slice(1).filter((i) => chain.includes(i)).length;
      path.push(...kept.slice(1).map((i) => tree.tokens[i]), next);
      pending = next;
    }
    return {path: path.slice(0, depth), guessed};
  }
}

async function* decodeStaged(state) {
  const {target, draft, tokens, settings} = state;
  const drafter = new NgramDrafter(new ContextLookup(tokens), state.ngram);
  const stage2 = new StagedDrafter(state, drafter, settings.ngramWidth);
  for (;;) {
    await catchUp(target, tokens, 1);
    const limit = Math.min(target.capacity, target.maxChunk, draft.capacity) - 1;
    const depth = Math.max(0, Math.min(settings.depth, limit));
    if (!depth) {
      yield await verify(state, drafter.propose([], Math.min(MAX_PROPOSAL, limit)), "ngram", "ngram");
      continue;
    }
    const {path, guessed} = await stage2.path(depth);
    const step = await verify(state, path, "draft", guessed ? "staged" : "spec");
    draft.rollback(Math.min(draft.length, target.length));
    yield step;
  }
}

export const DECODERS = {ar: decodeAr, ngram: decodeNgram, staged: decodeStaged};
