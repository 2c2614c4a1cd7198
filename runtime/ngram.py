"""The lowest drafting stage: context lookup plus a Katz-backoff trigram table (no model at all).

- `ContextLookup` finds the most recent earlier occurrence of the context's last n tokens
  (n = 4..1) in the prompt and generated text and proposes what followed it (prompt-lookup
  decoding); this is what makes repetitive and code-like output fast.
- `NgramModel` is Spector & Ré's draft2: a trigram table with backoff to bigrams and unigrams,
  built at export time from text the draft model generates, stored as flat numpy arrays.
- `NgramDrafter` combines them: the lookup's continuation first, the table's best guesses after.
"""

from __future__ import annotations

import zipfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DISCOUNT = 0.75  # absolute discount of each seen n-gram count (Kneser-Ney style constant)


class ContextLookup:
    """Incremental index of every n-gram (n <= max_n) of a growing token list; O(new tokens) per sync."""

    def __init__(self, tokens: list[int], max_n: int = 4):
        self.tokens = tokens  # the live list the engine appends to
        self.max_n = max_n
        self._last: dict[tuple, int] = {}
        self._prev: dict[tuple, int] = {}
        self._indexed = 0
        self.sync()

    def sync(self) -> None:
        """Index tokens appended since the last call; rebuild if the list was shortened (a new turn)."""
        if len(self.tokens) < self._indexed:
            self._last.clear()
            self._prev.clear()
            self._indexed = 0
        for end in range(self._indexed + 1, len(self.tokens) + 1):
            for n in range(1, self.max_n + 1):
                if end - n < 0:
                    break
                key = tuple(self.tokens[end - n:end])
                if key in self._last:
                    self._prev[key] = self._last[key]
                self._last[key] = end
        self._indexed = len(self.tokens)

    def propose(self, context_tail: Sequence[int] = (), max_tokens: int = 8) -> list[int]:
        """Continuation after the latest earlier match of the longest suffix of tokens + `context_tail`."""
        return self.match(context_tail, max_tokens)[0]

    def match(self, context_tail: Sequence[int] = (), max_tokens: int = 8) -> tuple[list[int], int]:
        """The continuation and the length of the suffix that matched (0: none); a longer match is a
        far safer guess (runtime/ngram_sizing.py)."""
        self.sync()
        seq = self.tokens
        tail = list(context_tail)
        for n in range(self.max_n, 0, -1):
            if n <= len(tail):
                suffix = tail[len(tail) - n:]
            elif n - len(tail) <= len(seq):
                suffix = list(seq[len(seq) - (n - len(tail)):]) + tail
            else:
                continue
            key = tuple(suffix)
            end = self._last.get(key)
            if end == len(seq) and not tail:
                end = self._prev.get(key)  # the suffix itself is the latest occurrence
            if end is None or end >= len(seq):
                continue
            return list(seq[end:end + max_tokens]), n
        return [], 0


@dataclass
class NgramModel:
    """Top-k next tokens per trigram / bigram context and overall, with backoff weights."""

    vocab_size: int
    tri_keys: np.ndarray  # int64 a * V + b, sorted
    tri_offsets: np.ndarray  # int64, len(tri_keys) + 1
    tri_tokens: np.ndarray  # int32
    tri_probs: np.ndarray  # float16
    bi_keys: np.ndarray  # int64 b, sorted
    bi_offsets: np.ndarray
    bi_tokens: np.ndarray
    bi_probs: np.ndarray
    uni_tokens: np.ndarray
    uni_probs: np.ndarray

    @staticmethod
    def build(sequences: Iterable[Sequence[int]], vocab_size: int, top_n: int = 8) -> NgramModel:
        """Count and discount n-grams of `sequences`; keep the top_n continuations of each context.

        Katz backoff, simplified: each seen count loses DISCOUNT and the freed mass goes to the
        lower order (the usual absolute-discount approximation of Good-Turing).
        """
        tri: dict[int, Counter] = defaultdict(Counter)
        bi: dict[int, Counter] = defaultdict(Counter)
        uni: Counter = Counter()
        for seq in sequences:
            seq = list(seq)
            for i, c in enumerate(seq):
                uni[c] += 1
                if i >= 1:
                    bi[seq[i - 1]][c] += 1
                if i >= 2:
                    tri[seq[i - 2] * vocab_size + seq[i - 1]][c] += 1
        total = sum(uni.values()) or 1
        uni_top = uni.most_common(top_n)
        uni_tokens = np.array([t for t, _ in uni_top], np.int32)
        uni_probs = np.array([c / total for _, c in uni_top], np.float16)

        def table(counts: dict[int, Counter]):
            keys = np.array(sorted(counts), np.int64)
            offsets, toks, probs = [0], [], []
            for k in keys:
                ctr = counts[int(k)]
                n = sum(ctr.values())
                for tok, c in ctr.most_common(top_n):
                    toks.append(tok)
                    probs.append(max(c - DISCOUNT, 0.0) / n)
                offsets.append(len(toks))
            return keys, np.array(offsets, np.int64), np.array(toks, np.int32), np.array(probs, np.float16)

        return NgramModel(vocab_size, *table(tri), *table(bi), uni_tokens, uni_probs)

    def _lookup(self, keys: np.ndarray, offsets: np.ndarray, tokens: np.ndarray, probs: np.ndarray,
                key: int) -> tuple[np.ndarray, np.ndarray]:
        i = int(np.searchsorted(keys, key))
        if i < len(keys) and keys[i] == key:
            return tokens[offsets[i]:offsets[i + 1]], probs[offsets[i]:offsets[i + 1]].astype(np.float64)
        return tokens[:0], probs[:0].astype(np.float64)

    def next_distribution(self, context: Sequence[int], n: int = 4) -> list[tuple[int, float]]:
        """Top-n next tokens with backoff probabilities for the last two tokens of `context`."""
        scores: dict[int, float] = {}
        weight = 1.0
        levels = []
        if len(context) >= 2:
            levels.append((self.tri_keys, self.tri_offsets, self.tri_tokens, self.tri_probs,
                           context[-2] * self.vocab_size + context[-1]))
        if len(context) >= 1:
            levels.append((self.bi_keys, self.bi_offsets, self.bi_tokens, self.bi_probs, context[-1]))
        for keys, offsets, toks, probs, key in levels:
            t, p = self._lookup(keys, offsets, toks, probs, key)
            for tok, pr in zip(t.tolist(), p.tolist(), strict=True):
                scores[tok] = scores.get(tok, 0.0) + weight * pr
            weight *= max(1.0 - float(p.sum()), 0.0) if len(t) else 1.0
        for tok, pr in zip(self.uni_tokens.tolist(), self.uni_probs.astype(np.float64).tolist(), strict=True):
            scores[tok] = scores.get(tok, 0.0) + weight * pr
        return sorted(scores.items(), key=lambda kv: -kv[1])[:n]

    @property
    def num_ngrams(self) -> int:
        return len(self.tri_tokens) + len(self.bi_tokens) + len(self.uni_tokens)

    def save(self, path: str | Path) -> None:
        arrays = {k: v for k, v in self.__dict__.items() if isinstance(v, np.ndarray)}
        with open(path, "wb") as f:
            np.savez_compressed(f, vocab_size=np.array(self.vocab_size, np.int64), **arrays)

    @staticmethod
    def load(path: str | Path) -> NgramModel:
        """Load without pickle; a truncated or inconsistent file raises ValueError."""
        try:
            with np.load(path, allow_pickle=False) as data:
                fields = {k: data[k] for k in data.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise ValueError(f"{path} is not a readable n-gram table: {exc}") from exc
        names = ("tri_keys", "tri_offsets", "tri_tokens", "tri_probs", "bi_keys", "bi_offsets", "bi_tokens",
                 "bi_probs", "uni_tokens", "uni_probs", "vocab_size")
        missing = [n for n in names if n not in fields]
        if missing:
            raise ValueError(f"{path} is missing n-gram arrays: {', '.join(missing)}")
        model = NgramModel(vocab_size=int(fields.pop("vocab_size")), **{n: fields[n] for n in names[:-1]})
        for level in ("tri", "bi"):
            keys, offsets = getattr(model, f"{level}_keys"), getattr(model, f"{level}_offsets")
            if len(offsets) != len(keys) + 1 or offsets[-1] != len(getattr(model, f"{level}_tokens")):
                raise ValueError(f"{path}: inconsistent {level}gram offsets")
        return model


def table_source(probability: float) -> str:
    """The source name of a table guess, by the table's own probability for it, so that the proposal sizing
    (runtime/ngram_sizing.py) learns a rate per band instead of one for every guess: with the corpus table the
    target accepted 54-76 % of the guesses the table gives >= 0.5 and 23-41 % of the others, and `ngram` on the
    w8a8 pair ran 4-6 % faster side by side (docs/speculative.md, "Table guesses sized by their probability")."""
    return "table-hi" if probability >= 0.5 else "table"


class NgramDrafter:
    """Context lookup first, then the trigram table's greedy continuation."""

    def __init__(self, lookup: ContextLookup, model: NgramModel | None = None):
        self.lookup = lookup
        self.model = model

    def propose(self, tail: Sequence[int], max_tokens: int) -> list[int]:
        """A chain of up to `max_tokens` guesses continuing `lookup.tokens + tail`."""
        return self.propose_sourced(tail, max_tokens)[0]

    def propose_sourced(self, tail: Sequence[int], max_tokens: int) -> tuple[list[int], list[str]]:
        """The chain and where each token came from: "ctx<n>" (copied after an n-token context match,
        n up to the lookup's max_n) or "table" / "table-hi" (the trigram table's best guess, `table_source`)."""
        if max_tokens <= 0:
            return [], []
        out, n = self.lookup.match(tail, max_tokens)
        sources = [f"ctx{n}"] * len(out)
        if self.model is not None:
            context = list(self.lookup.tokens[-2:]) + list(tail) + out
            while len(out) < max_tokens:
                best = self.model.next_distribution(context, 1)
                if not best or best[0][1] < 0.2:
                    break
                out.append(best[0][0])
                sources.append(table_source(best[0][1]))
                context.append(best[0][0])
        return out, sources

    def alternatives(self, tail: Sequence[int], exclude: int | None, n: int) -> list[int]:
        """The table's other likely next tokens, for side branches of a draft tree."""
        if self.model is None or n <= 0:
            return []
        context = list(self.lookup.tokens[-2:]) + list(tail)
        return [t for t, _ in self.model.next_distribution(context, n + 1) if t != exclude][:n]
