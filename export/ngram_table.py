"""Build the bundle's trigram table (stage 2 of staged speculation) from text the bundle's target writes.

Spector & Ré build their draft2 from text sampled from the draft; we sample from the target of
the freshly written bundle through the runtime (the draft imitates the target, and `ngram` mode
drafts straight for the target), at temperature 1.2 from varied seed prompts, until the token
budget is spent. A bundle whose draft was distilled also counts the distillation corpus: text the
target already wrote for its prompts (~170k tokens for the default model, against the 4000 that the
default budget generates here), so the table costs no more generation. Measured side by side on the
w8a8 default pair (docs/speculative.md, "The trigram table counts the distillation corpus"), that
raised `ngram`'s tokens per target pass from 2.26 to 2.70 on HumanEval and from 1.27 to 1.42 on prose.
"""

from __future__ import annotations

from pathlib import Path

from edgespec.runtime.engine import Engine
from edgespec.runtime.ngram import NgramModel

SEED_PROMPTS = [
    "Write a Python function that", "Explain how", "def ", "class ", "import numpy as np\n",
    "Write a short story about", "What are the benefits of", "Summarize the following idea:",
    "for i in range(", "Give three examples of", "The history of", "How do I", "# Utility functions\n",
    "if __name__ == \"__main__\":", "Describe a day in", "List the steps to",
]


# 2: also counts the distillation corpus. Benchmarks re-export bundles whose table is older.
TABLE_VERSION = 2


def build_ngram_table(bundle: Path, budget: int, log=print, temperature: float = 1.2,
                      chunk_tokens: int = 160, corpus: list[list[int]] | None = None) -> dict:
    """Generate `budget` tokens with the bundle's target, build the table from them and the sequences of
    `corpus` (the distillation corpus, when there is one), save `ngram.npz` into `bundle`."""
    engine = Engine.load(bundle, verify=False, cache_optimized=False, load_draft=False)
    sequences, produced, i = [], 0, 0
    while produced < budget:
        prompt = SEED_PROMPTS[i % len(SEED_PROMPTS)]
        chat = i % 2 == 0 and engine.tokenizer.chat_template is not None
        r = engine.generate(prompt, max_new_tokens=min(chunk_tokens, budget - produced), chat=chat,
                            temperature=temperature, seed=i)
        sequences.append(engine.prompt_tokens(prompt, chat) + r.token_ids)
        produced += len(r.token_ids)
        i += 1
    corpus = corpus or []
    model = NgramModel.build(sequences + corpus, engine.target.vocab_size)
    path = Path(bundle) / "ngram.npz"
    model.save(path)
    corpus_tokens = sum(len(s) for s in corpus)
    info = {"file": "ngram.npz", "version": TABLE_VERSION, "tokens": produced, "sequences": len(sequences),
            "corpus_tokens": corpus_tokens, "corpus_sequences": len(corpus), "ngrams": model.num_ngrams,
            "bytes": path.stat().st_size, "temperature": temperature}
    log(f"n-gram table: {model.num_ngrams} entries from {produced} generated tokens and {corpus_tokens} "
        f"distillation corpus tokens, "
        f"{info['bytes'] / 1e3:.0f} kB ({info['bytes'] / max(model.num_ngrams, 1):.1f} B per entry)")
    return info
