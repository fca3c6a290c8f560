"""The edge agent's metrics registry: counts, cumulative buckets, exposition format, health window."""

from __future__ import annotations

import re
import threading

import pytest

from edge_agent import metrics as metrics_module
from edge_agent.metrics import Metrics, current_rss_mb

P = "edgeglm_agent_"
_SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)"
    r'(?:\{(?P<labels>(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*",?)*)\})?'
    r" (?P<value>[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|Inf|NaN))$"
)
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')
_SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("",), "gauge": ("",)}


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def parse(text: str) -> tuple[dict[str, str], dict[tuple[str, frozenset[tuple[str, str]]], float]]:
    """Parse exposition text strictly: returns {family: type} and {(name, labels): value}."""
    assert text.endswith("\n")
    helps: set[str] = set()
    types: dict[str, str] = {}
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[len("# HELP ") :].partition(" ")
            assert help_text, line
            helps.add(name)
        elif line.startswith("# TYPE "):
            name, _, kind = line[len("# TYPE ") :].partition(" ")
            assert kind in _SUFFIXES and name in helps and name not in types, line
            types[name] = kind
        else:
            match = _SAMPLE.match(line)
            assert match, f"bad sample line {line!r}"
            name = match["name"]
            family = next(
                (f for f, k in types.items() for s in _SUFFIXES[k] if name == f + s),
                None,
            )
            assert family is not None, f"{name} has no HELP/TYPE before it"
            labels = frozenset((k, _unescape(v)) for k, v in _LABEL.findall(match["labels"] or ""))
            key = (name, labels)
            assert key not in samples, f"duplicate sample {line!r}"
            samples[key] = float(match["value"])
    assert helps == set(types)
    return types, samples


def value(text: str, name: str, **labels: str) -> float:
    return parse(text)[1][(P + name, frozenset(labels.items()))]


def finish(m: Metrics, outcome: str = "stop", latency_s: float = 0.2, **kw: object) -> None:
    args: dict[str, object] = {"ttft_s": 0.02, "prompt_tokens": 10, "completion_tokens": 5} | kw
    m.request_finished(outcome=outcome, latency_s=latency_s, **args)  # type: ignore[arg-type]


def test_every_family_is_declared_and_parses_when_empty():
    types, samples = parse(Metrics(model="glm", version="1.0.0").render())
    assert types == {
        P + "requests_total": "counter",
        P + "errors_total": "counter",
        P + "tokens_total": "counter",
        P + "request_latency_seconds": "histogram",
        P + "time_to_first_token_seconds": "histogram",
        P + "queue_wait_seconds": "histogram",
        P + "batch_size": "histogram",
        P + "queue_depth": "gauge",
        P + "requests_in_flight": "gauge",
        P + "update_bytes_total": "counter",
        P + "update_http_fallbacks_total": "counter",
        P + "model_info": "gauge",
        P + "resident_memory_bytes": "gauge",
    }
    for transport in ("http", "mqtt"):  # both series from the start
        assert samples[(P + "update_bytes_total", frozenset({("transport", transport)}))] == 0
    names = {name for name, _ in samples}
    assert P + "requests_total" not in names and P + "errors_total" not in names
    assert samples[(P + "tokens_total", frozenset({("kind", "prompt")}))] == 0
    assert samples[(P + "tokens_total", frozenset({("kind", "completion")}))] == 0
    assert samples[(P + "model_info", frozenset({("model", "glm"), ("version", "1.0.0")}))] == 1
    assert samples[(P + "resident_memory_bytes", frozenset())] > 0


def test_counts_outcomes_errors_and_tokens():
    m = Metrics()
    finish(m, "stop", prompt_tokens=3, completion_tokens=7)
    finish(m, "length", prompt_tokens=4, completion_tokens=9)
    finish(m, "timeout", prompt_tokens=1, completion_tokens=0)
    m.rejected("busy")
    m.rejected("busy")
    text = m.render()
    assert value(text, "requests_total", outcome="stop") == 1
    assert value(text, "requests_total", outcome="length") == 1
    assert value(text, "requests_total", outcome="timeout") == 1
    assert value(text, "requests_total", outcome="busy") == 2
    assert value(text, "errors_total", code="timeout") == 1
    assert value(text, "errors_total", code="busy") == 2
    assert (P + "errors_total", frozenset({("code", "stop")})) not in parse(text)[1]
    assert value(text, "tokens_total", kind="prompt") == 8
    assert value(text, "tokens_total", kind="completion") == 16
    assert value(text, "request_latency_seconds_count") == 3  # rejections have no latency sample


def test_histogram_buckets_are_cumulative():
    m = Metrics()
    for latency in (0.005, 0.01, 0.3, 3.0, 100.0):
        finish(m, latency_s=latency, ttft_s=None)
    text = m.render()
    expected = {"0.01": 2, "0.025": 2, "0.25": 2, "0.5": 3, "2.5": 3, "5": 4, "60": 4, "+Inf": 5}
    for le, count in expected.items():
        assert value(text, "request_latency_seconds_bucket", le=le) == count, le
    assert value(text, "request_latency_seconds_count") == 5
    assert value(text, "request_latency_seconds_sum") == pytest.approx(103.315)
    assert value(text, "time_to_first_token_seconds_count") == 0  # ttft None is not observed
    assert value(text, "time_to_first_token_seconds_bucket", le="+Inf") == 0
    assert value(text, "queue_wait_seconds_count") == 5

    _, samples = parse(text)
    for family in (
        "request_latency_seconds",
        "time_to_first_token_seconds",
        "queue_wait_seconds",
        "batch_size",
    ):
        buckets = [v for (name, _), v in samples.items() if name == f"{P}{family}_bucket"]
        assert buckets == sorted(buckets), family  # monotone in output order


def test_bucket_bounds_and_batch_sizes():
    m = Metrics()
    for size in (1, 1, 3, 8, 200):
        m.observe_batch(size)
    text = m.render()
    les = [dict(labels)["le"] for name, labels in parse(text)[1] if name == P + "batch_size_bucket"]
    assert les == ["1", "2", "4", "8", "16", "32", "64", "+Inf"]
    assert value(text, "batch_size_bucket", le="1") == 2
    assert value(text, "batch_size_bucket", le="4") == 3
    assert value(text, "batch_size_bucket", le="8") == 4
    assert value(text, "batch_size_bucket", le="64") == 4
    assert value(text, "batch_size_bucket", le="+Inf") == 5
    assert value(text, "batch_size_sum") == 213
    lat = [
        dict(labels)["le"] for name, labels in parse(text)[1] if name == P + "request_latency_seconds_bucket"
    ]
    assert lat == ["0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "30", "60", "+Inf"]
    ttft = [dict(labels)["le"] for name, labels in parse(text)[1] if name == P + "queue_wait_seconds_bucket"]
    assert ttft == ["0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "+Inf"]


def test_gauges_in_flight_never_negative_and_queue_depth():
    m = Metrics()
    m.request_started()
    m.request_started()
    assert value(m.render(), "requests_in_flight") == 2
    finish(m)
    finish(m)
    finish(m)  # one more finish than start
    assert value(m.render(), "requests_in_flight") == 0
    m.request_started()
    assert value(m.render(), "requests_in_flight") == 1
    m.set_queue_depth(4)
    assert value(m.render(), "queue_depth") == 4
    assert m.health(rss_mb=1.0).queue_depth == 4


def test_label_values_are_escaped():
    m = Metrics(model='we"ird\\mo\ndel', version="1.0.0")
    m.rejected('bad"code\\\n')
    text = m.render()
    assert 'model="we\\"ird\\\\mo\\ndel"' in text
    assert 'code="bad\\"code\\\\\\n"' in text
    assert value(text, "model_info", model='we"ird\\mo\ndel', version="1.0.0") == 1
    assert value(text, "errors_total", code='bad"code\\\n') == 1
    m.set_model("glm-4", "2.0.0")
    assert value(m.render(), "model_info", model="glm-4", version="2.0.0") == 1
    assert len([n for n, _ in parse(m.render())[1] if n == P + "model_info"]) == 1


def test_health_is_empty_at_start():
    h = Metrics(clock=FakeClock()).health(rss_mb=12.5)
    assert (h.latency_p50_ms, h.latency_p95_ms, h.tokens_per_s, h.error_rate) == (0, 0, 0, 0)
    assert (h.requests, h.errors, h.queue_depth, h.rss_mb, h.smoke_agreement) == (0, 0, 0, 12.5, None)


def test_health_percentiles_window_error_rate_and_tokens_per_s():
    clock = FakeClock()
    m = Metrics(window_s=60.0, clock=clock)
    clock.now += 10  # 10 s after start
    for ms in range(1, 101):  # latencies 1..100 ms, 2 completion tokens each
        finish(m, latency_s=ms / 1000, completion_tokens=2)
    h = m.health(rss_mb=1.0)
    assert h.latency_p50_ms == pytest.approx(50)
    assert h.latency_p95_ms == pytest.approx(95)
    assert h.requests == 100 and h.errors == 0 and h.error_rate == 0
    assert h.tokens_per_s == pytest.approx(200 / 10)  # covered span is time since start, not window_s

    clock.now += 40  # 50 s after start; the 100 samples are 40 s old
    finish(m, "internal", latency_s=5.0, completion_tokens=0)
    m.rejected("busy")
    h = m.health(rss_mb=1.0)
    assert (h.requests, h.errors) == (102, 2)
    assert h.error_rate == pytest.approx(2 / 102)
    assert h.tokens_per_s == pytest.approx(200 / 50)

    clock.now += 30  # 80 s after start: the first 100 are 70 s old and drop out
    h = m.health(rss_mb=1.0)
    assert (h.requests, h.errors) == (2, 2)
    assert h.error_rate == 1.0
    assert h.latency_p50_ms == pytest.approx(5000)  # the rejection has no latency
    assert h.latency_p95_ms == pytest.approx(5000)
    assert h.tokens_per_s == 0

    clock.now += 61
    h = m.health(rss_mb=1.0)
    assert (h.requests, h.errors, h.error_rate, h.latency_p95_ms) == (0, 0, 0, 0)
    assert value(m.render(), "requests_total", outcome="stop") == 100  # counters are not windowed


def test_health_samples_are_bounded():
    clock = FakeClock()
    m = Metrics(window_s=3600.0, clock=clock)
    clock.now += 100
    for _ in range(12_000):
        finish(m, completion_tokens=1)
    assert len(m._samples) == 10_000
    h = m.health(rss_mb=1.0)
    assert h.requests == 10_000
    assert value(m.render(), "requests_total", outcome="stop") == 12_000


def test_concurrent_recording_keeps_exact_totals():
    m = Metrics()
    threads, per_thread = 8, 500

    def work() -> None:
        for i in range(per_thread):
            m.request_started()
            finish(m, "stop" if i % 5 else "timeout", prompt_tokens=2, completion_tokens=3, queue_s=0.001)
            m.observe_batch(i % 7 + 1)
            if i % 50 == 0:
                m.rejected("busy")
                m.render()
                m.health(rss_mb=1.0)

    pool = [threading.Thread(target=work, name=f"metrics-writer-{n}") for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    text = m.render()
    total = threads * per_thread
    assert value(text, "requests_total", outcome="stop") == total * 4 / 5
    assert value(text, "requests_total", outcome="timeout") == total / 5
    assert value(text, "errors_total", code="busy") == threads * per_thread / 50
    assert value(text, "tokens_total", kind="prompt") == 2 * total
    assert value(text, "tokens_total", kind="completion") == 3 * total
    assert value(text, "request_latency_seconds_count") == total
    assert value(text, "batch_size_count") == total
    assert value(text, "requests_in_flight") == 0


def test_current_rss_mb_reads_statm_and_falls_back(monkeypatch: pytest.MonkeyPatch):
    rss = current_rss_mb()
    assert 1 < rss < 1_000_000
    assert Metrics().health().rss_mb > 0

    def no_proc(*args: object, **kwargs: object) -> object:
        raise OSError("no /proc here")

    monkeypatch.setattr(metrics_module, "open", no_proc, raising=False)
    assert current_rss_mb() >= rss * 0.5  # peak RSS from getrusage, still a sane size


def test_window_must_be_positive():
    with pytest.raises(ValueError, match="window_s"):
        Metrics(window_s=0)


def test_refusals_by_the_front_itself_stay_out_of_the_heartbeat():
    """No token, too many in flight: counted for Prometheus, never in the health a rollout gate
    reads, so strangers cannot push an updated box's error rate over a gate."""
    m = Metrics()
    finish(m, "stop", prompt_tokens=3, completion_tokens=7)
    for _ in range(20):
        m.rejected("invalid_api_key", health=False)
        m.rejected("overloaded", health=False)
    health = m.health(rss_mb=1.0)
    assert (health.requests, health.errors, health.error_rate) == (1, 0, 0.0)
    assert value(m.render(), "errors_total", code="invalid_api_key") == 20
    m.rejected("bad_request")  # a refusal of the request itself still counts
    assert m.health(rss_mb=1.0).errors == 1
