"""A draft tree flattened for one pass: tokens in topological order, parent indices, tree mask, positions."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class DraftTree:
    """Node 0 is the root (the last committed token, not yet in the model's KV); parents precede children."""

    tokens: list[int]
    parents: list[int] = field(default_factory=lambda: [-1])

    @staticmethod
    def rooted(root: int) -> DraftTree:
        return DraftTree(tokens=[root], parents=[-1])

    def add(self, parent: int, token: int) -> int:
        if not 0 <= parent < len(self.tokens):
            raise ValueError(f"parent {parent} is not a node of this tree")
        self.tokens.append(int(token))
        self.parents.append(parent)
        return len(self.tokens) - 1

    def add_chain(self, parent: int, tokens: list[int]) -> list[int]:
        nodes = []
        for t in tokens:
            parent = self.add(parent, t)
            nodes.append(parent)
        return nodes

    def depth(self) -> np.ndarray:
        d = np.zeros(len(self.tokens), np.int64)
        for i in range(1, len(self.tokens)):
            d[i] = d[self.parents[i]] + 1
        return d

    def attention_mask(self) -> np.ndarray:
        """[n, n] bool: each node sees itself and its ancestors."""
        n = len(self.tokens)
        mask = np.zeros((n, n), bool)
        for i in range(n):
            j = i
            while j >= 0:
                mask[i, j] = True
                j = self.parents[j]
        return mask

    def position_ids(self, past_length: int) -> np.ndarray:
        return past_length + self.depth()

    def behind(self, chain: int, past_length: int) -> tuple[np.ndarray, np.ndarray]:
        """Position ids and mask of one pass over `chain` causal tokens followed by this tree, rooted after
        them: a model that lags behind the committed text catches up in the same pass as its tree."""
        n = chain + len(self.tokens)
        mask = np.zeros((n, n), bool)
        mask[:chain, :chain] = np.tri(chain, dtype=bool)
        mask[chain:, :chain] = True
        mask[chain:, chain:] = self.attention_mask()
        positions = np.concatenate([past_length + np.arange(chain), self.position_ids(past_length + chain)])
        return positions, mask

    def children(self, i: int) -> list[int]:
        return [j for j in range(i + 1, len(self.tokens)) if self.parents[j] == i]

    def walk(self, choose) -> tuple[list[int], int]:
        """Follow `choose(node) -> token` from the root while it names a child; returns (nodes kept, next token).

        `nodes kept` starts with the root; the next token is the choice at the last kept node.
        """
        node, kept = 0, [0]
        while True:
            token = choose(node)
            nxt = next((c for c in self.children(node) if self.tokens[c] == token), None)
            if nxt is None:
                return kept, token
            node = nxt
            kept.append(node)
