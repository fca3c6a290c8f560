"""Long-lived engines under request mixes give every request what a fresh engine gives it.

Property-based (hypothesis) over mixes of scheduled and direct requests, prefix-cache hits and
evictions, batches that drain (row compaction) and switches between two loaded versions (serve,
retire, standby reuse, switch back); see ``tests/engine_state.py``. Two injected faults, a
compaction that skips the KV copy and a prefix cache that keeps views of a row instead of copies
(stale entries), must make the same harness fail.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.agent_bundles import derive
from tests.engine_state import Ask, EngineWorld, check, measure_tolerance

HEAD_LENGTHS = (10, 14, 20)  # shared heads: the prefix cache keeps prompts of 8 tokens or more
CACHE_TOKENS = 48  # a small prefix cache: entries are evicted within a mix


class Lab:
    def __init__(self, live: dict[str, Any], fresh: dict[str, Any], tolerance: float, diffs: Any) -> None:
        self.live, self.fresh, self.tolerance, self.diffs = live, fresh, tolerance, diffs
        engine = live["1.0.0"]
        self.vocab = engine.graph.vocab
        self.stop = engine.stop_tokens
        rng = np.random.default_rng(7)
        self.heads = [self._tokens(rng, n) for n in HEAD_LENGTHS]

    def _tokens(self, rng: np.random.Generator, n: int) -> tuple[int, ...]:
        out = rng.integers(3, self.vocab, n * 2)
        return tuple(int(t) for t in out if int(t) not in self.stop)[:n]

    def ask(self, head: int | None, tail: int, forced: int, seed: int, direct: bool = False) -> Ask:
        rng = np.random.default_rng(seed)
        ids = (self.heads[head] if head is not None else ()) + self._tokens(rng, tail)
        return Ask(ids, self._tokens(rng, forced), direct)

    def world(self) -> EngineWorld:
        return EngineWorld(self.live)


@pytest.fixture(scope="module")
def lab(tiny_bundle: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    from edge_agent.inference.engine import Engine
    from edgeglm.keys import load_private_key

    folder, profile, public = tiny_bundle("fused-int4-fp32")  # the shipped layout, fp32 compute
    key = load_private_key(public.with_suffix(".key"))
    folders = {
        "1.0.0": folder,
        "1.1.0": derive(folder, tmp_path_factory.mktemp("state") / "1.1.0", key, "1.1.0", scale=1.001),
    }
    live = {name: Engine.load(f, profile=profile) for name, f in folders.items()}
    _small_caches(live)
    uncached = profile.model_copy(update={"prefix_cache_mb": 0})
    fresh = {name: Engine.load(f, profile=uncached) for name, f in folders.items()}
    probe = Lab(live, fresh, 0.0, None)
    samples = [probe.ask(h, 3, 10, seed) for seed, h in enumerate((0, 1, 2, None))]
    tolerance, diffs = measure_tolerance(fresh["1.0.0"], samples)
    yield Lab(live, fresh, tolerance, diffs)


def _small_caches(engines: dict[str, Any]) -> None:
    """An empty prefix cache of ``CACHE_TOKENS`` tokens on each engine: entries get evicted."""
    from edge_agent.inference.prefix_cache import PrefixCache

    for engine in engines.values():
        per_token = engine.graph.prefix.per_token
        engine.graph.prefix = PrefixCache(CACHE_TOKENS * per_token, per_token)


def _scripted(lab: Lab) -> list[tuple[Any, ...]]:
    """Every state path once: hits, a drained batch (compaction), direct calls, switches, evictions."""
    a = lab.ask
    return [
        ("serve", "1.0.0"),
        ("ask", a(0, 2, 3, 1)),
        ("wait",),
        ("ask", a(0, 3, 2, 2)),  # a hit on head 0
        ("ask", a(1, 2, 2, 3)),
        ("ask", a(None, 5, 12, 4)),  # outlives the two beside it: moved down a row
        ("ask", a(2, 1, 4, 5, direct=True)),  # on the spare row while the batch runs
        ("wait",),
        ("ask", a(1, 4, 6, 6)),
        ("ask", a(2, 2, 3, 7)),
        ("serve", "1.1.0"),  # 1.0.0 retires as a standby
        ("ask", a(0, 2, 5, 8)),
        ("ask", a(None, 9, 3, 9, direct=True)),
        ("serve", "1.0.0"),  # and serves again, with its cache and arena as it left them
        ("ask", a(0, 1, 4, 10)),
        ("ask", a(1, 1, 4, 11)),
        ("ask", a(2, 6, 9, 12)),
    ]


def _compacting(lab: Lab) -> list[tuple[Any, ...]]:
    a = lab.ask
    return [
        ("serve", "1.0.0"),
        ("ask", a(None, 4, 2, 21)),
        ("ask", a(None, 5, 2, 22)),
        ("ask", a(None, 6, 12, 23)),
        ("wait",),
    ]


def _stale(lab: Lab) -> list[tuple[Any, ...]]:
    a = lab.ask
    return [
        ("serve", "1.0.0"),
        ("ask", a(1, 2, 3, 31)),  # stored: head 1 and its tail
        ("wait",),
        ("ask", a(None, 20, 8, 32)),  # another prompt on the same row
        ("wait",),
        ("ask", a(1, 3, 6, 33)),  # a hit on head 1
    ]


def test_the_scripted_mix_matches_fresh_engines_and_takes_every_path(lab: Lab, record_property: Any) -> None:
    record_property("tolerance", lab.tolerance)
    record_property("kernel_diffs", lab.diffs)
    moves = {name: e.graph.moves for name, e in lab.live.items()}
    world = lab.world()
    try:
        observed = world.run(_scripted(lab))
    finally:
        world.close()
    worst = check(observed, lab.fresh, lab.tolerance)
    assert lab.tolerance < 0.05 * max(float(np.abs(o.logits[0]).max()) for o in observed)
    assert sum(o.cached > 0 for o in observed) >= 3  # prefix-cache hits
    assert any(o.ask.direct for o in observed)
    assert {o.engine for o in observed} == {"1.0.0", "1.1.0"}
    assert lab.live["1.0.0"].graph.moves > moves["1.0.0"]  # a drained batch moved a row down
    assert worst <= lab.tolerance


def _mixes(lab: Lab) -> st.SearchStrategy[list[tuple[Any, ...]]]:
    ask = st.builds(
        lambda head, tail, forced, seed, direct: ("ask", lab.ask(head, tail, forced, seed, direct)),
        st.one_of(st.none(), st.integers(0, len(HEAD_LENGTHS) - 1), st.integers(0, len(HEAD_LENGTHS) - 1)),
        st.integers(1, 8),
        st.integers(1, 10),
        st.integers(0, 2**16),
        st.sampled_from([False, False, False, True]),  # a quarter on the spare row
    )
    serve = st.sampled_from([("serve", "1.0.0"), ("serve", "1.1.0")])
    wait = st.just(("wait",))  # sequential requests share a row; batched ones move down rows
    ops = st.lists(st.one_of(ask, ask, wait, serve), min_size=2, max_size=16)
    return st.tuples(serve, ops).map(lambda first_rest: [first_rest[0], *first_rest[1]])


def _empty_caches(engines: dict[str, Any]) -> None:
    """Each engine's prefix cache emptied, its budget kept: an example depends on itself alone, so
    hypothesis can replay (and shrink) a failing one instead of calling it flaky."""
    from edge_agent.inference.prefix_cache import PrefixCache

    for engine in engines.values():
        old = engine.graph.prefix
        engine.graph.prefix = PrefixCache(old.budget, old.per_token, old.min_tokens)


def _property(lab: Lab, examples: int) -> Any:
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(mix=_mixes(lab))
    def any_mix_matches_fresh_engines(mix: list[tuple[Any, ...]]) -> None:
        _empty_caches(lab.live)
        world = lab.world()
        try:
            observed = world.run(mix)
        finally:
            world.close()
        check(observed, lab.fresh, lab.tolerance)

    return any_mix_matches_fresh_engines


def test_any_mix_matches_fresh_engines(lab: Lab) -> None:
    _property(lab, 60)()


FAULTS = {
    "compaction skips the KV copy": ("_move_kv", lambda self, src, dst, n: None),
    # the cache keeps views of the row, not copies: the next request on that row rewrites the entry
    "stale prefix-cache entry": ("_row_kv", lambda self, row, n: [buf[row, :, :n] for buf in self.arena]),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_random_mixes_find_each_injected_fault(lab: Lab, fault: str, monkeypatch: Any) -> None:
    from edge_agent.inference.runtime import FusedGraph

    monkeypatch.setattr(FusedGraph, *FAULTS[fault])
    _small_caches(lab.live)
    try:
        with pytest.raises(AssertionError, match="differs from a fresh engine"):
            _property(lab, 500)()  # stops at the first failing mix: usually within a few dozen
    finally:
        _small_caches(lab.live)


def test_the_harness_fails_when_compaction_skips_the_kv_copy(lab: Lab, monkeypatch: Any) -> None:
    from edge_agent.inference.runtime import FusedGraph

    monkeypatch.setattr(FusedGraph, *FAULTS["compaction skips the KV copy"])
    before = lab.live["1.0.0"].graph.moves
    world = lab.world()
    try:
        observed = world.run(_compacting(lab))
    finally:
        world.close()
    assert lab.live["1.0.0"].graph.moves > before
    with pytest.raises(AssertionError, match="differs from a fresh engine"):
        check(observed, lab.fresh, lab.tolerance)


def test_the_harness_fails_on_a_stale_prefix_cache_entry(lab: Lab, monkeypatch: Any) -> None:
    from edge_agent.inference.runtime import FusedGraph

    monkeypatch.setattr(FusedGraph, *FAULTS["stale prefix-cache entry"])
    _small_caches(lab.live)  # no sound entry of head 1 left from an earlier test
    world = lab.world()
    try:
        observed = world.run(_stale(lab))
    finally:
        world.close()
    assert observed[-1].cached > 0
    with pytest.raises(AssertionError, match="differs from a fresh engine"):
        check(observed, lab.fresh, lab.tolerance)
    _small_caches(lab.live)  # the faulty entries must not outlive this test
