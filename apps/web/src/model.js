// One model of a bundle on onnxruntime (web or node) with its fixed-size KV buffer (runtime/model.py,
// docs/kv-interface.md). The buffer holds `maxContext` slots per layer; `length` is the write index, so rollback
// is assigning it and a tree pass keeps its accepted path by moving a few rows. onnxruntime-web has no IO binding
// on its WASM backend, so each pass hands the buffers in and takes the graph's present_* outputs (the same
// buffers with the chunk's rows written) back as the next pass's input.

export const UNLISTED = -1e30; // logit of a token outside a restricted draft head

export class ContextFullError extends Error {}

export class PassStats {
  constructor() {
    this.passes = 0;
    this.tokens = 0;
    this.ms = 0;
  }
}

const int64 = (ort, values, dims) => new ort.Tensor("int64", BigInt64Array.from(values, BigInt), dims);

export class ModelRunner {
  // `info`: the manifest's model entry; `session`: an InferenceSession over its fused graph; `headIds`: the
  // token ids of a restricted draft head (Float64Array) or null.
  constructor(ort, session, info, maxContext, {headIds = null, maxChunk = 128} = {}) {
    const graph = info.graphs.fused;
    if (!graph) {
      throw new Error(`the ${info.role} model has no fused graph (static NPU graphs run with the Python runtime only)`);
    }
    this.ort = ort;
    this.session = session;
    this.role = info.role;
    this.graph = graph;
    this.maxContext = maxContext;
    this.maxChunk = maxChunk;
    this.vocabSize = info.spec.vocab_size;
    this.layers = info.spec.num_layers;
    this.heads = info.spec.num_kv_heads;
    this.headDim = info.spec.head_dim;
    this.headIds = headIds;
    this.tailLogits = graph.inputs.some((i) => i.name === "logits_from");
    // Attention sees at least two rows (a one-row GroupQueryAttention pass computes apart): graphs with
    // attention_rows >= 2 pad attention themselves, others get a padding row as input (runtime/model.py).
    this.minRows = 2;
    this.inputRows = 1; // 2 where the pass-size check finds one-row passes computing apart (selfcheck.js)
    const shape = [1, this.heads, maxContext, this.headDim];
    this.kv = [];
    for (let i = 0; i < 2 * this.layers; i++) {
      this.kv.push(new ort.Tensor("float32", new Float32Array(this.heads * maxContext * this.headDim), shape));
    }
    this.tokens = []; // the ids whose K/V fill slots 0..length-1
    this.treeFrom = null; // first slot of a tree pass that `keep` has not settled yet
    this.stats = new PassStats();
  }

  get length() {
    return this.tokens.length;
  }

  get capacity() {
    return this.maxContext - this.length;
  }

  get kvBytes() {
    return this.kv.reduce((sum, t) => sum + t.data.byteLength, 0);
  }

  // Rows a pass of n tokens runs with.
  width(n) {
    return Math.max(n, this.inputRows, this.graph.attention_rows >= this.minRows ? 1 : this.minRows);
  }

  // How many leading `tokens` the buffer holds (rows of an unsettled tree pass do not count).
  commonPrefix(tokens) {
    const held = this.treeFrom === null ? this.tokens : this.tokens.slice(0, this.treeFrom);
    const n = Math.min(held.length, tokens.length);
    let i = 0;
    while (i < n && held[i] === tokens[i]) i++;
    return i;
  }

  // One pass over `tokens` writing their K/V at slots length..length+n-1; returns the logits of each row (or of
  // the last `lastRows`) as Float32Arrays over the whole vocabulary. Without positions/mask a causal chunk.
  async forward(tokens, {positions = null, mask = null, lastRows = 0} = {}) {
    const n = tokens.length;
    if (!n) throw new Error("forward needs at least one token");
    if (n > this.maxChunk) throw new Error(`chunk of ${n} tokens exceeds the max chunk ${this.maxChunk}`);
    const width = this.width(n);
    const need = Math.max(width, this.minRows); // a pass writes K/V for its padding rows too
    if (this.length + need > this.maxContext) {
      throw new ContextFullError(`the ${this.role} KV buffer holds ${this.maxContext} tokens; ${this.length} are `
        + `used and this pass needs ${need} more`);
    }
    if (mask && !this.graph.tree_mask && !isCausal(mask, n)) {
      throw new Error(`the ${this.role} graph is causal: it cannot run a tree pass`);
    }
    const first = lastRows && this.tailLogits ? Math.max(0, n - lastRows) : 0;
    const feeds = this.feeds(tokens, positions, mask, width, first);
    const t0 = performance.now();
    const out = await this.session.run(feeds);
    this.stats.ms += performance.now() - t0;
    this.stats.passes += 1;
    this.stats.tokens += n;
    for (let i = 0; i < this.layers; i++) {
      this.kv[2 * i] = out[`present_key.${i}`];
      this.kv[2 * i + 1] = out[`present_value.${i}`];
    }
    if (positions || mask) this.treeFrom ??= this.length;
    this.tokens.push(...tokens);
    return this.rows(out.logits.data, n - first);
  }

  feeds(tokens, positions, mask, width, first) {
    const ort = this.ort;
    const n = tokens.length;
    const base = this.length;
    const ids = tokens.concat(new Array(width - n).fill(0));
    const pos = positions ? positions.slice() : tokens.map((_, i) => base + i);
    while (pos.length < width) pos.push(pos[n - 1]);
    const visible = new Uint8Array(width * width);
    for (let i = 0; i < width; i++) {
      for (let j = 0; j < width; j++) {
        visible[i * width + j] = i < n && j < n ? (mask ? mask[i * n + j] : Number(j <= i)) : Number(i === j);
      }
    }
    const feeds = {
      input_ids: int64(ort, ids, [1, width]),
      position_ids: int64(ort, pos, [1, width]),
      attention_mask: new ort.Tensor("bool", visible, [width, width]),
      past_length: int64(ort, [base], [1]),
    };
    if (this.tailLogits) feeds.logits_from = int64(ort, [first], [1]);
    for (let i = 0; i < this.layers; i++) {
      feeds[`past_key.${i}`] = this.kv[2 * i];
      feeds[`past_value.${i}`] = this.kv[2 * i + 1];
    }
    return feeds;
  }

  // The first `count` rows of a logits output, spread over the whole vocabulary for a restricted head.
  rows(data, count) {
    const columns = this.headIds ? this.headIds.length : this.vocabSize;
    const out = [];
    for (let r = 0; r < count; r++) {
      const row = data.subarray(r * columns, (r + 1) * columns);
      if (!this.headIds) {
        out.push(row);
        continue;
      }
      const full = new Float32Array(this.vocabSize).fill(UNLISTED);
      for (let c = 0; c < columns; c++) full[this.headIds[c]] = row[c];
      out.push(full);
    }
    return out;
  }

  // Forget every slot at or after `length`: the next pass overwrites them.
  rollback(length) {
    if (!(length >= 0 && length <= this.length)) {
      throw new Error(`cannot roll back to ${length}: ${this.length} slots are valid`);
    }
    this.tokens.length = length;
    if (this.treeFrom !== null && length <= this.treeFrom) this.treeFrom = null;
  }

  // After a tree pass that began at slot `start`, keep chunk rows `rows` (increasing) as slots start, start+1...
  keep(start, rows) {
    const d = this.headDim;
    const slots = this.maxContext;
    rows.forEach((row, i) => {
      if (i > 0 && row <= rows[i - 1]) throw new Error("rows must be increasing");
      if (row === i) return;
      for (const tensor of this.kv) {
        for (let h = 0; h < this.heads; h++) {
          const head = h * slots * d;
          tensor.data.copyWithin(head + (start + i) * d, head + (start + row) * d, head + (start + row + 1) * d);
        }
      }
    });
    this.tokens.splice(start, this.tokens.length - start, ...rows.map((r) => this.tokens[start + r]));
    this.treeFrom = null;
  }

  // Feed tokens in chunks of at most maxChunk; returns the logits of the last one.
  async prefill(tokens) {
    let logits = null;
    for (let i = 0; i < tokens.length; i += this.maxChunk) {
      logits = await this.forward(tokens.slice(i, i + this.maxChunk), {lastRows: 1});
    }
    if (!logits) throw new Error("prefill needs at least one token");
    return logits.at(-1);
  }
}

function isCausal(mask, n) {
  for (let i = 0; i < n; i++) for (let j = 0; j < n; j++) if (mask[i * n + j] !== Number(j <= i)) return false;
  return true;
}

export function argmax(row) {
  let best = 0;
  for (let i = 1; i < row.length; i++) if (row[i] > row[best]) best = i;
  return best;
}
