"""The n-gram stage: context lookup, the trigram table, its storage, and draft trees."""

from __future__ import annotations

import numpy as np
import pytest

from edgespec.runtime.ngram import ContextLookup, NgramDrafter, NgramModel, table_source
from edgespec.runtime.ngram_sizing import SourceAcceptance
from edgespec.runtime.tree import DraftTree


def test_context_lookup_finds_latest_earlier_match():
    tokens = [1, 2, 3, 4, 5, 1, 2, 3]
    lookup = ContextLookup(tokens)
    assert lookup.propose(max_tokens=3) == [4, 5, 1]
    tokens += [9, 9, 1, 2, 3]  # the engine appends to the same list; the index follows incrementally
    assert lookup.propose(max_tokens=2) == [9, 9]
    assert lookup.propose([9], max_tokens=2) == [9, 1]
    assert ContextLookup([1, 2, 3]).propose(max_tokens=4) == []


def test_context_lookup_rebuilds_after_a_shorter_history():
    tokens = [1, 2, 1, 2]
    lookup = ContextLookup(tokens)
    assert lookup.propose(max_tokens=1) == [1]
    del tokens[3:]  # [1, 2, 1]: positions past the end must be forgotten
    assert lookup.propose(max_tokens=2) == [2, 1]
    tokens += [2, 7]
    assert lookup.propose(max_tokens=1) == []


def test_katz_backoff_prefers_longer_context_and_sums_below_one():
    corpus = [[1, 2, 3, 4], [5, 2, 3, 6], [1, 2, 3, 4], [7, 7, 7, 7, 7]]
    model = NgramModel.build(corpus, vocab_size=10)
    after_123 = dict(model.next_distribution([1, 2, 3][-2:], 5))
    assert max(after_123, key=after_123.get) == 4  # trigram (2,3) -> 4 seen twice, 6 once
    assert sum(after_123.values()) <= 1.0 + 1e-3
    unseen = dict(model.next_distribution([9, 9], 3))
    assert max(unseen, key=unseen.get) == 7  # backs off to the unigram table, where 7 is most frequent


def test_ngram_table_round_trip_and_corruption(tmp_path):
    model = NgramModel.build([[1, 2, 3, 1, 2, 4] * 3], vocab_size=8)
    path = tmp_path / "ngram.npz"
    model.save(path)
    loaded = NgramModel.load(path)
    assert loaded.next_distribution([1, 2], 3) == model.next_distribution([1, 2], 3)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="n-gram"):
        NgramModel.load(path)


def test_an_ngram_table_holding_pickled_objects_is_refused_unread(tmp_path):
    """The table is plain arrays, loaded without pickle: a file whose arrays need unpickling (code can run while
    unpickling) is an error before any of it is unpickled."""
    model = NgramModel.build([[1, 2, 3, 1, 2, 4] * 3], vocab_size=8)
    arrays = {k: v for k, v in model.__dict__.items() if isinstance(v, np.ndarray)}
    arrays["uni_tokens"] = np.array([_Unpickled(), 1], dtype=object)
    path = tmp_path / "ngram.npz"
    np.savez(path, vocab_size=np.array(8), **arrays)
    _Unpickled.loaded = 0
    with pytest.raises(ValueError, match="n-gram"):
        NgramModel.load(path)
    assert _Unpickled.loaded == 0


class _Unpickled:
    """Counts how often an instance is unpickled."""

    loaded = 0

    def __init__(self) -> None:
        self.state = "pickled"

    def __setstate__(self, state) -> None:
        _Unpickled.loaded += 1


def test_drafter_chains_lookup_then_table():
    tokens = [5, 6, 7, 8, 5, 6]
    model = NgramModel.build([[7, 8, 9, 9, 9, 9]], vocab_size=12)
    drafter = NgramDrafter(ContextLookup(tokens), model)
    out = drafter.propose([], 4)
    assert out[:2] == [7, 8] and len(out) == 4
    assert drafter.alternatives([], exclude=7, n=2) and 7 not in drafter.alternatives([], exclude=7, n=2)


def test_lookup_and_drafter_say_where_each_token_came_from():
    tokens = [5, 6, 7, 8, 9, 5, 6, 7]
    assert ContextLookup(tokens).match(max_tokens=2) == ([8, 9], 3)  # the suffix 5 6 7 matched
    assert ContextLookup([1, 2, 3]).match(max_tokens=2) == ([], 0)
    model = NgramModel.build([[8, 7, 4, 4, 4, 4]], vocab_size=12)
    out, sources = NgramDrafter(ContextLookup([7, 8, 7]), model).propose_sourced([], 4)
    # the copy runs out, the table goes on; its guesses are named by the band of their table probability (0.81, 0.94)
    assert out == [8, 7, 4, 4] and sources == ["ctx1", "ctx1", "table-hi", "table-hi"]
    assert [table_source(p) for p in (0.2, 0.49, 0.5, 0.9)] == ["table", "table", "table-hi", "table-hi"]


def test_sizing_sends_strong_copies_long_and_weak_guesses_not_at_all():
    def cost(rows):  # our int8 target: a 2-row pass costs ~1.17x a 1-row pass
        return 1.0 + 0.17 * (rows - 1)

    sizing = SourceAcceptance()
    k, value = sizing.best_length(["ctx4"] * 8, cost)
    assert k >= 4 and value > 1.5
    def steep(rows):  # our int4 target: a 2-row pass costs ~1.28x a 1-row pass
        return 1.0 + 0.28 * (rows - 1)

    assert sizing.best_length(["table"] * 4, steep) == (0, 1.0)
    assert sizing.best_length(["ctx4", "ctx4", "table", "table"], cost)[0] == 2
    for _ in range(10):  # guesses the target keeps rejecting stop being sent where rows are cheap too
        sizing.record(["table"], accepted=0)
    assert sizing.best_length(["table"] * 4, cost) == (0, 1.0)
    weak_start = sizing.best_length(["ctx1"] * 4, cost)[0]
    for _ in range(20):  # a source that keeps being accepted earns longer proposals
        sizing.record(["ctx1"] * 4, accepted=4)
    assert sizing.best_length(["ctx1"] * 4, cost)[0] > weak_start
    sizing.record(["ctx2", "ctx2", "ctx2"], accepted=1)  # the third token was never judged
    assert sizing.tried["ctx2"] == 2 and sizing.accepted["ctx2"] == 1
    assert sizing.summary()["ctx2"] == {"tried": 2, "accepted": 1, "rate": 0.5}


def test_draft_tree_mask_positions_and_walk():
    tree = DraftTree.rooted(10)
    a = tree.add(0, 11)
    tree.add(a, 12)
    tree.add(0, 13)
    np.testing.assert_array_equal(tree.depth(), [0, 1, 2, 1])
    np.testing.assert_array_equal(tree.position_ids(7), [7, 8, 9, 8])
    mask = tree.attention_mask()
    assert mask[2].tolist() == [True, True, True, False] and mask[3].tolist() == [True, False, False, True]
    choices = {0: 11, 1: 12, 2: 99}
    assert tree.walk(choices.get) == ([0, 1, 2], 99)
    assert tree.walk({0: 13, 3: 5}.get) == ([0, 3], 5)
    with pytest.raises(ValueError):
        tree.add(9, 1)
