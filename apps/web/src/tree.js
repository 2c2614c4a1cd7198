// A draft tree flattened for one pass (runtime/tree.py): node 0 is the root (the last committed token, not yet in
// the model's KV buffer) and parents precede their children.

export class DraftTree {
  constructor(root) {
    this.tokens = [root];
    this.parents = [-1];
  }

  add(parent, token) {
    if (!(parent >= 0 && parent < this.tokens.length)) throw new Error(`parent ${parent} is not a node of this tree`);
    this.tokens.push(token);
    this.parents.push(parent);
    return this.tokens.length - 1;
  }

  addChain(parent, tokens) {
    const nodes = [];
    for (const token of tokens) {
      parent = this.add(parent, token);
      nodes.push(parent);
    }
    return nodes;
  }

  depths() {
    const depth = [0];
    for (let i = 1; i < this.tokens.length; i++) depth.push(depth[this.parents[i]] + 1);
    return depth;
  }

  // Positions and [n, n] mask (1 = visible) of one pass over `chain` causal tokens followed by this tree rooted
  // after them: a model lagging behind the committed text catches up in the same pass as its tree.
  behind(chain, pastLength) {
    const n = chain + this.tokens.length;
    const mask = new Uint8Array(n * n);
    for (let i = 0; i < n; i++) {
      for (let j = 0; j < Math.min(i + 1, chain); j++) mask[i * n + j] = 1;
    }
    for (let i = 0; i < this.tokens.length; i++) {
      for (let j = i; j >= 0; j = this.parents[j]) mask[(chain + i) * n + chain + j] = 1;
    }
    const positions = [];
    for (let i = 0; i < chain; i++) positions.push(pastLength + i);
    for (const d of this.depths()) positions.push(pastLength + chain + d);
    return {positions, mask};
  }

  children(i) {
    const out = [];
    for (let j = i + 1; j < this.tokens.length; j++) if (this.parents[j] === i) out.push(j);
    return out;
  }

  // Follows `choose(node) -> token` from the root while it names a child: {kept: nodes from the root, next: the
  // choice at the last kept node}.
  walk(choose) {
    let node = 0;
    const kept = [0];
    for (;;) {
      const token = choose(node);
      const child = this.children(node).find((c) => this.tokens[c] === token);
      if (child === undefined) return {kept, next: token};
      node = child;
      kept.push(node);
    }
  }
}
