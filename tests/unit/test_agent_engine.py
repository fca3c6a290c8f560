"""The agent's engine and scheduler on real exported tiny bundles (ONNX Runtime, no network)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from edge_agent.inference.codec import Detokenizer
from edge_agent.inference.engine import Engine
from edge_agent.inference.generation import GenerationResult
from edge_agent.inference.sampling import Sampler, SamplingParams
from edge_agent.inference.scheduler import Scheduler
from edgeglm.errors import RequestError
from edgeglm.protocol import InferRequest

PROMPTS = [
    "The pressure sensor on line three reported",
    "Hello there",
    "The pump",
    "Wind from the east",
    "Check the valve in the south bay",
    "Temperature in hall two",
]


@pytest.fixture(scope="module", params=["fused-int8", "fused-int4", "standard-int8"])
def engine(request, tiny_bundle) -> Engine:
    folder, profile, _ = tiny_bundle(request.param)
    return Engine.load(folder, profile=profile)


def _direct(engine: Engine, prompt: str, **knobs) -> GenerationResult:
    return engine.generate(engine.prepare(InferRequest(prompt=prompt, **knobs)))


def test_greedy_matches_the_exporters_golden_tokens(engine):
    smoke = engine.manifest.smoke_test
    result = _direct(engine, smoke.prompt, max_tokens=smoke.max_new_tokens)
    assert engine.prepare(InferRequest(prompt=smoke.prompt)).ids == smoke.prompt_tokens
    assert list(result.tokens) == list(smoke.expected_tokens)


def _run_batched(engine: Engine, prompts: list[str], stagger_s: float, **knobs) -> tuple[list, int]:
    results: dict[int, GenerationResult] = {}
    done = threading.Event()

    def finisher(i: int):
        def on_done(result: GenerationResult) -> None:
            results[i] = result
            if len(results) == len(prompts):
                done.set()

        return on_done

    with Scheduler(engine, queue_size=64) as scheduler:
        for i, prompt in enumerate(prompts):
            scheduler.submit(engine.prepare(InferRequest(prompt=prompt, **knobs)), on_done=finisher(i))
            time.sleep(stagger_s)
        assert done.wait(60)
        steps = scheduler.steps
    return [results[i] for i in range(len(prompts))], steps


def test_batched_requests_get_the_same_tokens_as_alone(engine):
    """Requests arriving while others decode join the batch (fused) and change nothing."""
    prompts = PROMPTS * 2
    alone = [_direct(engine, p, max_tokens=24) for p in prompts]
    together, steps = _run_batched(engine, prompts, 0.0, max_tokens=24)
    assert [r.tokens for r in together] == [r.tokens for r in alone]
    # Batching happened: far fewer decode steps than tokens produced.
    assert steps < sum(r.completion_tokens for r in together) / 2
    staggered, _ = _run_batched(engine, prompts, 0.004, max_tokens=24)  # joining mid-batch
    assert [r.tokens for r in staggered] == [r.tokens for r in alone]
    assert [r.text for r in staggered] == [r.text for r in alone]


HEAD = "Check the valve in the south bay. The pressure sensor on line three reported"


def test_a_shared_prompt_head_is_reused_not_prefilled(engine):
    """A prompt starting like an earlier one copies that head's KV and prefills only the rest."""
    tails = [" a fault", " a fault near the pump", " nothing", " a fault"]
    prompts = [engine.prepare(InferRequest(prompt=HEAD + t, max_tokens=24)) for t in tails]
    prefix = getattr(engine.graph, "prefix", None)
    if prefix is None:  # the standard graph keeps no prefix cache (profile rule)
        assert engine.profile.prefix_cache_mb == 0
        assert {engine.generate(p).cached_tokens for p in prompts} == {0}
        return
    cold = []
    for p in prompts:
        prefix.clear()
        cold.append(engine.generate(p))
    assert {r.cached_tokens for r in cold} == {0}
    prefix.clear()
    warm = [engine.generate(p) for p in prompts]
    assert [r.tokens for r in warm] == [r.tokens for r in cold]

    def shared(a, b):  # common head, never the whole prompt: its last token always runs
        n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        return min(n, len(b) - 1)

    p0, p1, p2, _ = (p.ids for p in prompts)
    # p1 extends p0 (and replaces it); p2 parts from p1 after HEAD, which is all that stays; p3 == p0
    head = shared(p1, p2)
    assert head >= len(engine.prepare(InferRequest(prompt=HEAD)).ids) - 2
    assert [r.cached_tokens for r in warm] == [0, shared(p0, p1), head, head]
    assert len(prefix) == 1 and prefix.nbytes == head * prefix.per_token
    # Batched through the scheduler, sharing the cache, the tokens do not change either.
    together, _ = _run_batched(engine, [HEAD + t for t in tails], 0.0, max_tokens=24)
    assert [r.tokens for r in together] == [r.tokens for r in cold]
    assert all(r.cached_tokens > 0 for r in together)


def test_a_request_left_alone_on_a_high_row_moves_down(engine):
    """A fused step runs every KV row up to its highest: the last request of a drained batch
    moves to row 0 (one copy of its KV) and decodes exactly what it would have decoded alone."""
    graph = engine.graph
    if not hasattr(graph, "rows"):  # the standard graph stacks its sequences' own pasts: no rows
        return
    prompt = engine.prepare(InferRequest(prompt=PROMPTS[0], max_tokens=12))
    alone = engine.generate(prompt)
    seqs = [graph.open() for _ in range(min(4, graph.rows))]
    assert [s.row for s in seqs] == list(range(len(seqs)))  # lowest free row first
    last = seqs[-1]
    tokens = [int(np.argmax(graph.prefill(last, prompt.ids)))]
    for other in seqs[:-1]:
        graph.close(other)
    moves = graph.moves
    while len(tokens) < len(alone.tokens):
        tokens.append(int(np.argmax(graph.decode([last], [tokens[-1]])[0])))
    graph.close(last)
    assert last.row == 0 and graph.moves == moves + 1
    assert tokens == list(alone.tokens)
    again = graph.open()
    graph.close(again)
    assert again.row == 0


def test_decode_bindings_reused_across_spans_match_fresh_ones(engine):
    """A fused step binds the KV arena and the logits once per span and only the ids and mask each
    step: steps that switch between one and two rows give exactly the logits of fresh bindings."""
    graph = engine.graph
    if not hasattr(graph, "rows"):  # the standard graph feeds its pasts by value: no bindings kept
        return
    prompt = engine.prepare(InferRequest(prompt=PROMPTS[0], max_tokens=8))

    def run(fresh: bool) -> list[np.ndarray]:
        a, b = graph.open(), graph.open()
        tok_a = int(np.argmax(graph.prefill(a, prompt.ids, cache=False)))
        tok_b = int(np.argmax(graph.prefill(b, prompt.ids[:-1], cache=False)))
        rows = []
        for step in range(6):
            if fresh:
                graph._steps.clear()
            if step % 2:
                logits = graph.decode([a, b], [tok_a, tok_b])
                tok_b = int(np.argmax(logits[1]))
            else:
                logits = graph.decode([a], [tok_a])
            rows.append(logits[0])
            tok_a = int(np.argmax(logits[0]))
        graph.close(a)
        graph.close(b)
        return rows

    fresh, reused = run(fresh=True), run(fresh=False)
    assert all(np.array_equal(x, y) for x, y in zip(fresh, reused, strict=True))


def test_sampling_is_seeded_and_greedy_limits_agree(engine):
    knobs = {"max_tokens": 16, "temperature": 0.9, "top_p": 0.95, "top_k": 40}
    a = _direct(engine, "The pump", seed=7, **knobs)
    b = _direct(engine, "The pump", seed=7, **knobs)
    assert a.tokens == b.tokens
    greedy = _direct(engine, "The pump", max_tokens=16)
    assert (
        _direct(engine, "The pump", max_tokens=16, temperature=1.5, top_k=1, seed=1).tokens == greedy.tokens
    )
    assert (
        _direct(engine, "The pump", max_tokens=16, temperature=1.5, top_p=1e-6, seed=1).tokens
        == greedy.tokens
    )
    seeds = {_direct(engine, "The pump", seed=s, max_tokens=16, temperature=1.5).tokens for s in range(6)}
    assert len(seeds) > 1  # sampling samples


def test_stop_strings_cut_the_text(engine):
    # The first prompt the tiny model answers with at least four words (some end at EOS sooner).
    answers = [(p, _direct(engine, p, max_tokens=32)) for p in PROMPTS]
    prompt, full = next(((p, r) for p, r in answers if len(r.text.split()) >= 4), answers[0])
    words = full.text.split()
    assert len(words) >= 4, [r.text for _, r in answers]
    stop = words[3]
    cut = _direct(engine, prompt, max_tokens=32, stop=(stop,))
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]


def test_streamed_pieces_add_up_to_the_text(engine):
    pieces: list[str] = []
    ids: list[int] = []
    prompt = engine.prepare(InferRequest(prompt=PROMPTS[4], max_tokens=40, stream=True, stop=("zz",)))
    result = engine.generate(prompt, lambda text, tokens: (pieces.append(text), ids.extend(tokens)))
    assert "".join(pieces) == result.text
    assert tuple(ids) == result.tokens
    assert len(pieces) > 3


def test_requests_the_engine_refuses(engine):
    with pytest.raises(RequestError) as err:
        engine.prepare(InferRequest(prompt="hi", model="another-model"))
    assert err.value.code == "unknown_model"
    long_prompt = " ".join(["pump valve sensor"] * (engine.limits.max_context // 2))
    with pytest.raises(RequestError) as err:
        engine.prepare(InferRequest(prompt=long_prompt))
    assert err.value.code == "too_long"
    # Prompt + max_tokens past the context: the completion is capped, not refused.
    fits = engine.limits.max_context - len(engine.prepare(InferRequest(prompt="The pump")).ids)
    assert engine.prepare(InferRequest(prompt="The pump", max_tokens=8192)).max_tokens == fits


def test_full_queue_is_busy_at_once_and_cancel_and_deadline_end_requests(engine):
    prompt = engine.prepare(InferRequest(prompt="The pump"))
    with Scheduler(engine, queue_size=0) as scheduler, pytest.raises(RequestError) as err:
        scheduler.submit(prompt)
    assert err.value.code == "busy"
    finished: list[GenerationResult] = []
    streamed = engine.prepare(InferRequest(prompt=PROMPTS[0], max_tokens=64, stream=True))
    holder: list = []
    with Scheduler(engine) as scheduler:
        # Cancelled from its first streamed piece: it ends at the next step boundary.
        gen = scheduler.submit(
            streamed, on_text=lambda *_: holder and holder[0].cancel(), on_done=finished.append
        )
        holder.append(gen)
        expired = engine.prepare(InferRequest(prompt="The pump"), deadline=time.monotonic() - 1)
        late = scheduler.submit(expired, on_done=finished.append)
        for _ in range(2000):
            if gen.done and late.done:
                break
            time.sleep(0.005)
    assert gen.result.finish_reason == "cancelled"
    assert late.result.finish_reason == "error" and late.result.error_code == "timeout"
    assert len(finished) == 2


def test_sampler_follows_the_distribution():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    sampler = Sampler(SamplingParams(temperature=1.0, seed=3))
    counts = np.bincount([sampler.pick(logits) for _ in range(4000)], minlength=4) / 4000
    assert np.allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    nucleus = Sampler(SamplingParams(temperature=1.0, top_p=0.75, seed=3))
    assert set(nucleus.pick(logits) for _ in range(500)) == {0, 1}
    penalised = Sampler(SamplingParams(repetition_penalty=10.0))
    assert penalised.pick(np.array([2.0, 1.9, 0.0]), history=[0]) == 1


def test_detokenizer_streams_whole_characters(tiny_bundle):
    folder, profile, _ = tiny_bundle("fused-int8")
    engine = Engine.load(folder, profile=profile)
    text = "Température: 21 °C — ok ✓"
    ids = engine.codec.tokenizer.encode(text, add_special_tokens=False).ids
    detok = Detokenizer(engine.codec)
    pieces = [detok.add(t) for t in ids] + [detok.flush()]
    assert "".join(pieces) == engine.codec.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_the_agent_needs_neither_torch_nor_transformers(tiny_bundle):
    folder, profile, _ = tiny_bundle("fused-int4")
    code = (
        "import sys, json\n"
        "from pathlib import Path\n"
        "from edgeglm.profiles import DeviceProfile\n"
        "from edge_agent.inference.engine import Engine\n"
        "from edge_agent.inference.scheduler import Scheduler\n"
        "from edge_agent import serving, metrics, http_api, server\n"
        "from edgeglm import mqtt\n"
        "from edgeglm.protocol import InferRequest\n"
        f"profile = DeviceProfile.from_dict(json.loads({profile.model_dump_json()!r}))\n"
        f"e = Engine.load(Path({str(folder)!r}), profile=profile)\n"
        "r = e.generate(e.prepare(InferRequest(prompt='The pump', max_tokens=4)))\n"
        "assert r.completion_tokens >= 1\n"
        "print(sorted({'torch', 'transformers', 'export', 'onnx', 'cloud_hub'} & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_smoke_test_passes_by_its_logits_and_a_broken_copy_fails(engine, tmp_path):
    from edge_agent.smoke import smoke_test
    from edgeglm.keys import load_private_key
    from export.smoke import TOLERANCE_FACTOR
    from tests.agent_bundles import derive

    smoke = engine.manifest.smoke_test
    assert len(smoke.reference) == len(smoke.expected_tokens) > 0
    assert smoke.logit_tolerance >= TOLERANCE_FACTOR * smoke.path_logit_diff
    result = smoke_test(engine)
    assert (result.rule, result.agreement, result.failed) == ("logits", 1.0, ())
    assert result.max_abs_logit_diff <= smoke.logit_tolerance
    with Scheduler(engine) as scheduler:  # the same through the serving scheduler
        assert smoke_test(engine, scheduler).agreement == 1.0

    key = load_private_key(next(engine.folder.parent.glob("keys/*.key")))
    # every float tensor halved after export, sealed with the source's smoke records
    folder = derive(engine.folder, tmp_path / "broken", key, "9.9.9", scale=0.5, fraction=1.0, smoke="source")
    broken = Engine.load(folder, profile=engine.profile)
    bad = smoke_test(broken)
    assert bad.agreement < 0.5 and bad.max_abs_logit_diff > 10 * smoke.logit_tolerance


def test_the_sampler_guards_scores_that_are_not_finite():
    row = np.array([1.0, np.nan, 3.0, -np.inf])
    assert Sampler(SamplingParams()).pick(row) == 2  # greedy never picks NaN
    drawn = {Sampler(SamplingParams(temperature=1.0, seed=s)).pick(row) for s in range(200)}
    assert drawn == {0, 2}
    # +inf scores hold all the mass, shared between them.
    inf = np.array([0.0, np.inf, 5.0, np.inf])
    assert {Sampler(SamplingParams(temperature=0.7, seed=s)).pick(inf) for s in range(200)} == {1, 3}
    # Knobs past what the edges allow (the sampler is their last line): a token, not NaN.
    tiny = SamplingParams(temperature=1e-320, repetition_penalty=1e-320, top_p=0.5, seed=1)
    assert Sampler(tiny).pick(np.array([0.5, 2.0, -1.0]), history=[0]) in (0, 1, 2)
    with pytest.raises(RequestError) as err:
        Sampler(SamplingParams(temperature=1.0)).pick(np.array([np.nan, -np.inf]))
    assert err.value.code == "internal"


def _fails_at_step(n: int, fail):
    steps = iter(range(1000))
    return lambda logits: fail(logits) if next(steps) == n else None


def test_a_request_that_fails_its_own_step_fails_alone(engine):
    """One request whose own step raises (its sampler, its logits observer) ends with an error;
    the requests batched with it finish exactly as they would alone."""
    alone = [_direct(engine, p, max_tokens=16) for p in PROMPTS[:4]]

    def broken(_logits: np.ndarray) -> None:
        raise FloatingPointError("a request's own step failed")

    results: dict[int, GenerationResult] = {}
    done = threading.Event()

    def finisher(i: int):
        def on_done(result: GenerationResult) -> None:
            results[i] = result
            if len(results) == 6:
                done.set()

        return on_done

    with Scheduler(engine, queue_size=64, batch_wait_ms=200) as scheduler:
        for i, prompt in enumerate(PROMPTS[:4]):
            scheduler.submit(engine.prepare(InferRequest(prompt=prompt, max_tokens=16)), on_done=finisher(i))
            if i == 1:  # one fails at its prefill, one at its third decode step
                bad = engine.prepare(InferRequest(prompt="The pump", max_tokens=16))
                scheduler.submit(dataclasses.replace(bad, observe=broken), on_done=finisher(4))
                later = dataclasses.replace(bad, observe=_fails_at_step(3, broken))
                scheduler.submit(later, on_done=finisher(5))
        assert done.wait(60)
        assert scheduler.alive
    for i, want in enumerate(alone):
        assert results[i].finish_reason == want.finish_reason and results[i].tokens == want.tokens
    for i in (4, 5):
        assert results[i].finish_reason == "error" and results[i].error_code == "internal"
    assert len(results[5].tokens) == 3
