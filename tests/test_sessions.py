"""Several conversations on one engine: each gives exactly what it would give alone on a fresh engine.

The runners' KV buffers are shared; each runner records the token ids its buffer holds and every
generation re-prefills from the first id that differs from its own text (runtime/decoding.py `catch_up`).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from edgespec.runtime.engine import Engine

FIRST = ["alpha beta gamma delta", "again please", "and once more"]
SECOND = ["zeta eta theta iota kappa lambda mu nu xi omicron", "tell me more", "thanks"]
TINY_MODES = ["ar", "spec", "ngram", "staged"]


def alone(bundle, turns: list[str], mode: str, n: int) -> list[list[int]]:
    """Each turn's tokens from a fresh engine that holds only this conversation."""
    chat = Engine.load(bundle).chat()
    return [chat.send(turn, max_new_tokens=n, mode=mode).token_ids for turn in turns]


def generate_between_turns(engine: Engine, mode: str, n: int) -> list[list[int]]:
    """The issue's reproduction: a one-off generation on the same engine between two turns of a chat."""
    chat = engine.chat()
    first = chat.send(FIRST[0], max_new_tokens=n, mode=mode).token_ids
    engine.generate(SECOND[0], max_new_tokens=n, mode=mode)
    return [first, chat.send(FIRST[1], max_new_tokens=n, mode=mode).token_ids]


def interleaved(engine: Engine, mode: str, n: int) -> tuple[list[list[int]], list[list[int]]]:
    """Two chats on one engine, turn by turn."""
    a, b = engine.chat(), engine.chat()
    out_a, out_b = [], []
    for turn_a, turn_b in zip(FIRST, SECOND, strict=True):
        out_a.append(a.send(turn_a, max_new_tokens=n, mode=mode).token_ids)
        out_b.append(b.send(turn_b, max_new_tokens=n, mode=mode).token_ids)
    return out_a, out_b


def threaded(engine: Engine, mode: str, n: int) -> tuple[list[list[int]], list[list[int]]]:
    """Two threads, each running its own conversation on the shared engine at the same time."""
    start = threading.Barrier(2)

    def converse(turns: list[str]) -> list[list[int]]:
        chat = engine.chat()
        start.wait(timeout=60)
        return [chat.send(turn, max_new_tokens=n, mode=mode).token_ids for turn in turns]

    with ThreadPoolExecutor(2) as pool:
        a, b = pool.submit(converse, FIRST), pool.submit(converse, SECOND)
        return a.result(timeout=900), b.result(timeout=900)


@pytest.fixture(scope="module")
def pair(tiny_pair_bundle):
    return Engine.load(tiny_pair_bundle)


@pytest.mark.parametrize("mode", TINY_MODES)
def test_a_generation_between_turns_leaves_the_chat_as_it_was(pair, tiny_pair_bundle, mode):
    assert generate_between_turns(pair, mode, 8) == alone(tiny_pair_bundle, FIRST[:2], mode, 8)


@pytest.mark.parametrize("mode", TINY_MODES)
def test_interleaved_chats_each_give_what_they_give_alone(pair, tiny_pair_bundle, mode):
    a, b = interleaved(pair, mode, 12)
    assert a == alone(tiny_pair_bundle, FIRST, mode, 12)
    assert b == alone(tiny_pair_bundle, SECOND, mode, 12)


@pytest.mark.parametrize("mode", ["ar", "staged"])
def test_chats_in_two_threads_each_give_what_they_give_alone(pair, tiny_pair_bundle, mode):
    a, b = threaded(pair, mode, 12)
    assert a == alone(tiny_pair_bundle, FIRST, mode, 12)
    assert b == alone(tiny_pair_bundle, SECOND, mode, 12)


def test_an_abandoned_stream_releases_the_engine(pair):
    """A stream holds the engine's lock while it runs; closing it half-read lets another thread generate."""
    stream = pair.stream("hello", max_new_tokens=40)
    next(stream)
    stream.close()
    done = []
    worker = threading.Thread(target=lambda: done.append(pair.generate("hello", max_new_tokens=4)))
    worker.start()
    worker.join(timeout=60)
    assert done and len(done[0].token_ids) == 4


def test_the_runner_records_the_ids_its_buffer_holds(pair):
    """forward appends, rollback cuts, keep picks a tree pass's kept rows; a tree pass counts only once kept."""
    from edgespec.runtime.tree import DraftTree

    draft = pair.draft
    draft.rollback(0)
    draft.prefill([5, 6, 7])
    assert draft.tokens == [5, 6, 7] and draft.common_prefix([5, 6, 9, 9]) == 2
    tree = DraftTree.rooted(8)
    tree.add_chain(0, [9, 10])
    tree.add(0, 11)
    positions, mask = tree.behind(0, draft.length)
    draft.forward(tree.tokens, positions=positions, mask=mask)
    assert draft.common_prefix([5, 6, 7, 8, 9]) == 3  # rows of an unsettled tree are not a causal text
    draft.keep(3, [0, 3])
    assert draft.tokens == [5, 6, 7, 8, 11] and draft.common_prefix([5, 6, 7, 8, 11, 1]) == 5
    draft.rollback(4)
    assert draft.tokens == [5, 6, 7, 8] and draft.length == 4
    draft.rollback(0)
    assert draft.tokens == [] and draft.capacity == draft.max_context


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ar", "ngram", "staged"])
def test_conversations_on_the_real_int8_bundle_each_give_what_they_give_alone(default_int8, mode):
    engine = Engine.load(default_int8)
    first, second = alone(default_int8, FIRST, mode, 16), alone(default_int8, SECOND, mode, 16)
    assert generate_between_turns(engine, mode, 16) == first[:2]
    assert interleaved(engine, mode, 16) == (first, second)
    assert threaded(engine, mode, 16) == (first, second)
