"""The gateway's per-device fetch limits (cloud_hub.fetch_limit), on a fake clock."""

from __future__ import annotations

import pytest

from cloud_hub.fetch_limit import FetchLimiter, FetchLimits
from edgeglm.errors import ConfigError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_passes_then_the_rate_applies_and_one_refusal_per_burst_is_told() -> None:
    clock = Clock()
    lim = FetchLimiter(FetchLimits(requests_per_s=2, burst=3, pending=100), clock=clock)
    assert [lim.admit("a") for _ in range(3)] == [None, None, None]
    first = lim.admit("a")
    assert first is not None and first.notify and first.wait_s == pytest.approx(0.5)
    again = lim.admit("a")
    assert again is not None and not again.notify  # the rest of the burst is dropped silently
    assert lim.admit("b") is None  # another device has its own bucket
    clock.now += 0.5
    assert lim.admit("a") is None  # one token back
    told = lim.admit("a")
    assert told is not None and told.notify  # a new burst over the limit is told again


def test_a_normal_update_is_never_limited_by_the_defaults() -> None:
    """GLM-Edge-1.5B: ~2,000 pieces in requests of 32 (window 8) is ~63 requests, all at once."""
    lim = FetchLimiter(FetchLimits(), clock=Clock())
    for _ in range(2000 // 32 + 1):
        assert lim.admit("box") is None
        lim.finished("box", 32 << 20)


def test_pending_requests_of_one_device_are_bounded() -> None:
    lim = FetchLimiter(FetchLimits(burst=100, pending=2), clock=Clock())
    assert lim.admit("a") is None and lim.admit("a") is None
    refused = lim.admit("a")
    assert refused is not None and "queued" in refused.why
    lim.finished("a")
    assert lim.admit("a") is None


def test_bytes_sent_count_against_a_byte_rate() -> None:
    clock = Clock()
    lim = FetchLimiter(FetchLimits(burst=100, bytes_per_s=1000), clock=clock)
    assert lim.admit("a") is None
    lim.finished("a", 3000)  # 2000 bytes in debt
    refused = lim.admit("a")
    assert refused is not None and refused.wait_s == pytest.approx(2.0) and "bytes/s" in refused.why
    clock.now += 2.0
    assert lim.admit("a") is None


def test_the_bucket_table_forgets_idle_devices_and_is_bounded() -> None:
    clock = Clock()
    lim = FetchLimiter(FetchLimits(requests_per_s=10, burst=10, max_devices=50), clock=clock)
    for i in range(1000):  # a flood of device ids
        lim.admit(f"dev-{i}")
        lim.finished(f"dev-{i}")
    assert len(lim) <= 51
    clock.now += 1.0  # every bucket has refilled: each is the same as a new one
    lim.admit("late")
    assert len(lim) == 1


@pytest.mark.parametrize(
    "bad",
    [{"requests_per_s": 0}, {"burst": 0}, {"pending": 0}, {"bytes_per_s": -1}, {"max_devices": 0}],
)
def test_bad_limits_are_refused_by_name(bad: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match="fetch"):
        FetchLimits(**bad)  # type: ignore[arg-type]


def test_hub_settings_carry_the_limits_from_env_and_flags() -> None:
    from cloud_hub.settings import HubSettings

    env = {"EDGEGLM_HUB_FETCH_RATE": "5", "EDGEGLM_HUB_FETCH_BURST": "40"}
    s = HubSettings.from_env(env, fetch_burst=50)
    assert s.fetch_limits == FetchLimits(requests_per_s=5.0, burst=50)
    assert HubSettings.from_env({}).fetch_limits == FetchLimits()
    with pytest.raises(ConfigError, match="EDGEGLM_HUB_FETCH_PENDING"):
        HubSettings.from_env({"EDGEGLM_HUB_FETCH_PENDING": "many"})


def test_http_piece_requests_in_flight_per_device_fit_the_agents_window() -> None:
    """The hub's piece routes hold at most PIECES_IN_FLIGHT requests of one device (its thread pool
    is shared by every box); the agent's HTTP window never asks for more."""
    from types import SimpleNamespace

    from cloud_hub.routes.pieces import PieceDesk
    from edge_agent.fetch_http import HttpFirstFetcher, HttpPieces
    from edgeglm.hub_api import PIECES_IN_FLIGHT

    desk = PieceDesk(SimpleNamespace(fetch_limits=FetchLimits(), db=None))  # type: ignore[arg-type]
    assert [desk.limiter.admit("box") for _ in range(PIECES_IN_FLIGHT)] == [None] * PIECES_IN_FLIGHT
    refused = desk.limiter.admit("box")
    assert refused is not None and "already queued" in refused.why
    desk.limiter.finished("box")
    assert desk.limiter.admit("box") is None
    fetcher = HttpFirstFetcher(SimpleNamespace(), HttpPieces(), window=8)  # type: ignore[arg-type]
    assert fetcher.window == PIECES_IN_FLIGHT
