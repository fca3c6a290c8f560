"""The prefix cache's bookkeeping: longest head, budget, least recently used out, extension."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.inference.prefix_cache import PrefixCache

PER_TOKEN = 2 * 3 * 4 * 4  # two cache tensors of [3 heads, n, 4] float32 per token


def _kv(ids: list[int]):
    """What a prefill would have written: values that identify token and position."""

    def read(n: int) -> list[np.ndarray]:
        position = np.arange(n, dtype=np.float32)[None, :, None] / 1000
        base = np.asarray(ids[:n], np.float32)[None, :, None] + position
        return [np.broadcast_to(base + layer, (3, n, 4)).copy() for layer in range(2)]

    return read


def test_the_longest_stored_head_is_found_never_the_whole_prompt():
    cache = PrefixCache(10_000, PER_TOKEN, min_tokens=4)
    a = list(range(10, 30))
    assert cache.store(a, _kv(a))
    assert cache.lookup([*list(range(10, 13)), 99]) is None  # 3 shared tokens: under min_tokens
    hit = cache.lookup([*list(range(10, 22)), 99, 98])
    assert hit is not None and hit.tokens == 12
    assert np.array_equal(hit.kv[1], _kv(a)(12)[1])
    assert cache.lookup(a).tokens == len(a) - 1  # the last prompt token always runs
    assert (cache.hits, cache.misses, cache.reused_tokens) == (2, 1, 12 + 19)


def test_budget_least_recently_used_and_extension():
    cache = PrefixCache(40 * PER_TOKEN, PER_TOKEN, min_tokens=4)
    assert cache.max_tokens == 40
    a, b, c = [1] * 16, [2] * 16, [3] * 16
    for ids in (a, b):
        cache.store(ids, _kv(ids))
    assert cache.lookup([*a, 7]) is not None  # a is now the most recently used
    cache.store(c, _kv(c))  # 48 tokens > 40: b goes
    assert cache.lookup([*b, 7]) is None
    assert cache.lookup([*a, 7]) is not None and cache.lookup([*c, 7]) is not None
    assert not cache.store(a[:10], _kv(a))  # held already, as the head of a
    longer = a + [5] * 8
    assert cache.store(longer, _kv(longer))  # replaces a, which it extends
    assert len(cache) == 2 and cache.nbytes == (24 + 16) * PER_TOKEN
    assert cache.lookup([*longer, 6]).tokens == 24
    huge = list(range(100, 200))  # longer than the budget: its first 40 tokens are kept
    assert cache.store(huge, _kv(huge))
    assert len(cache) == 1 and cache.lookup(huge).tokens == 40
    cache.clear()
    assert len(cache) == 0 and cache.lookup(huge) is None


def test_prompts_parting_after_a_shared_head_keep_one_copy_of_it():
    cache = PrefixCache(10_000, PER_TOKEN, min_tokens=4)
    head = list(range(50, 60))
    first, second, third = [*head, 1, 2, 3], [*head, 4, 5], [*head, 6]
    assert cache.store(first, _kv(first))
    assert not cache.store(second, _kv(second))  # parts from first after the head: first is cut back
    assert len(cache) == 1 and cache.nbytes == len(head) * PER_TOKEN
    hit = cache.lookup(third)
    assert hit.tokens == len(head) and np.array_equal(hit.kv[0], _kv(first)(len(head))[0])
    assert not cache.store(third, _kv(third))
    assert cache.nbytes == len(head) * PER_TOKEN
    assert not cache.store(first, _kv(first))  # a shared head is not extended by one of its tails
    assert len(cache) == 1 and cache.lookup(first).tokens == len(head)
    other = list(range(200, 220))
    assert cache.store(other, _kv(other)) and len(cache) == 2  # unrelated prompts have their own entry
    # A short common start (under half of the entry) is no reason to cut: both keep their heads.
    sibling = other[:5] + list(range(300, 320))
    assert cache.store(sibling, _kv(sibling)) and len(cache) == 3
    assert cache.lookup([*other, 1]).tokens == len(other)
    assert cache.lookup([*sibling, 1]).tokens == len(sibling)


def test_a_budget_smaller_than_min_tokens_stores_nothing():
    cache = PrefixCache(3 * PER_TOKEN, PER_TOKEN, min_tokens=4)
    assert not cache.store(list(range(20)), _kv(list(range(20))))
    with pytest.raises(ValueError):
        PrefixCache(100, 0)
