"""The agent's fetcher (edge_agent.fetch) against a fake link: what it buffers, what it drops, how
it backs off when the hub refuses. No network: the fake answers each request synchronously."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from edge_agent import fetch
from edge_agent.fetch import MqttFetcher
from edgeglm.mqtt import Incoming
from edgeglm.pieces import piece_id
from edgeglm.planner import PieceStep
from edgeglm.protocol import (
    ErrorBody,
    FetchRequest,
    Frame,
    FrameKind,
    PieceEncoding,
    decode,
    error_frame,
    fetch_topic,
    split_payload,
)

Answer = Callable[[FetchRequest], list[Frame]]


class FakeLink:
    """Publishing a FetchRequest calls ``answer`` and delivers its frames, as the broker would."""

    connected = True

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.handler: Callable[[Incoming], None] | None = None
        self.requests: list[FetchRequest] = []
        self.topics: list[str] = []

    def subscribe(self, _topic: str, _qos: int, handler: Callable[[Incoming], None]) -> None:
        self.handler = handler

    def wait_connected(self, _timeout: float) -> bool:
        return True

    def publish(self, topic: str, payload: bytes, qos: int = 1, **_: Any) -> None:
        req = decode(FetchRequest, payload)
        self.requests.append(req)
        self.topics.append(topic)
        assert self.handler is not None
        for frame in self.answer(req):
            self.handler(Incoming(topic, frame.pack(), None, req.request_id.encode(), None, time.monotonic()))


@dataclass
class Target:
    model: str = "m"
    version: str = "1.1.0"
    profile: str = "p"


DATA = {i: os.urandom(3000 + i) for i in range(3)}
STEPS = [PieceStep(piece_id(d), len(d), "raw", len(d)) for d in DATA.values()]


def _real(step: PieceStep, max_message_bytes: int = 1200) -> list[Frame]:
    data = next(d for d in DATA.values() if piece_id(d) == step.piece_id)
    return split_payload(
        FrameKind.PIECE,
        PieceEncoding.RAW,
        piece_id=bytes.fromhex(step.piece_id),
        piece_size=len(data),
        payload=data,
        max_message_bytes=max_message_bytes,
    )


def _lie(pid: str, **fields: Any) -> Frame:
    base = {
        "kind": FrameKind.PIECE,
        "encoding": PieceEncoding.ZSTD,
        "piece_id": bytes.fromhex(pid),
        "piece_size": 60 << 20,
        "encoded_size": 60 << 20,
        "payload": b"x" * 1000,
        "parts": 60_000,
        "part": 0,
        "offset": 0,
    }
    return Frame(**{**base, **fields})


def _run(link: FakeLink, **kw: Any) -> dict[str, bytes]:
    fetcher = MqttFetcher(link, "box", timeout_s=5, **kw)  # type: ignore[arg-type]
    return {step.piece_id: enc.payload for step, enc, _ in fetcher.pieces(Target(), STEPS, [])}  # type: ignore[arg-type]


def test_requests_go_to_the_devices_own_fetch_topic() -> None:
    link = FakeLink(lambda req: [f for s in STEPS if s.piece_id in req.pieces for f in _real(s)])
    assert len(_run(link)) == 3
    assert set(link.topics) == {fetch_topic("box")} and link.requests[0].device_id == "box"


def test_frames_that_disagree_with_the_manifest_are_dropped_and_the_real_ones_complete(
    caplog: pytest.LogCaptureFixture,
) -> None:
    first, second = STEPS[0], STEPS[1]
    stranger = piece_id(b"not asked for")
    base = "ab" * 32

    def answer(req: FetchRequest) -> list[Frame]:
        lies = [
            _lie(first.piece_id),  # piece_size 60 MiB
            _lie(first.piece_id, piece_size=first.size),  # encoded_size 60 MiB
            _lie(
                stranger,
                piece_size=100,
                encoded_size=100,
                encoding=PieceEncoding.RAW,
                parts=1,
                payload=b"y" * 100,
            ),
            _lie(
                second.piece_id,
                encoding=PieceEncoding.XOR_ZSTD,
                element_width=1,
                base_id=bytes.fromhex(base),
                piece_size=second.size,
                encoded_size=100,
                parts=1,
                payload=b"z" * 100,
            ),
            error_frame(ErrorBody(code="not_found", message="a lie"), bytes.fromhex(stranger)),
        ]
        real = [f for s in STEPS if s.piece_id in req.pieces for f in _real(s)]
        # a part that does not fit the assembler started by the first real part
        clash = _lie(
            first.piece_id,
            encoding=PieceEncoding.RAW,
            piece_size=first.size,
            encoded_size=first.size,
            parts=2,
            part=1,
            offset=first.size - 10,
            payload=b"w" * 10,
        )
        return [*lies, real[0], clash, *real[1:]]

    with caplog.at_level(logging.WARNING, logger="edge_agent.fetch"):
        got = _run(FakeLink(answer))
    assert got == {piece_id(d): d for d in DATA.values()}
    text = caplog.text
    for check in (
        "piece_size: 62914560",
        "encoded_size: 62914560",
        "piece id: not one",
        "base_id: abab",
        "assembly:",
    ):
        assert check in text, check


def test_a_delta_against_a_piece_the_box_holds_is_accepted() -> None:
    step = STEPS[0]
    held = "cd" * 32
    delta = _lie(
        step.piece_id,
        encoding=PieceEncoding.XOR_ZSTD,
        element_width=1,
        base_id=bytes.fromhex(held),
        piece_size=step.size,
        encoded_size=10,
        parts=1,
        payload=b"d" * 10,
    )
    fetcher = MqttFetcher(FakeLink(lambda _req: [delta]), "box", timeout_s=5, holds={held}.__contains__)  # type: ignore[arg-type]
    ((got_step, encoded, base),) = list(fetcher.pieces(Target(), [step], []))  # type: ignore[arg-type]
    assert got_step == step and base == held and encoded.payload == b"d" * 10


def test_rate_limited_waits_and_asks_again_without_counting_a_try() -> None:
    calls: list[int] = []

    def answer(req: FetchRequest) -> list[Frame]:
        calls.append(1)
        if len(calls) == 1:
            return [error_frame(ErrorBody(code="rate_limited", message="rate limited: retry after 0.3 s"))]
        return [f for s in STEPS if s.piece_id in req.pieces for f in _real(s)]

    t0 = time.monotonic()
    got = _run(FakeLink(answer), retries=1, batch=1, window=3)  # a counted try would give up
    assert len(got) == 3 and time.monotonic() - t0 >= 0.3
    assert len(calls) >= 4  # the refused request and the two after it were asked again


def test_forbidden_manifest_is_retried_with_back_off_then_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetch, "_backoff", lambda _tries: 0.01)
    manifest = b'{"a manifest": true}'
    refusals = 2

    def answer(_req: FetchRequest) -> list[Frame]:
        nonlocal refusals
        if refusals:
            refusals -= 1
            return [error_frame(ErrorBody(code="forbidden", message="not targeted yet"))]
        return split_payload(
            FrameKind.MANIFEST,
            PieceEncoding.RAW,
            piece_id=bytes.fromhex(piece_id(manifest)),
            piece_size=len(manifest),
            payload=manifest,
        )

    assert MqttFetcher(FakeLink(answer), "box", timeout_s=5).manifest("m", "1.1.0", "p") == manifest  # type: ignore[arg-type]
    refusals = 99
    from edgeglm.errors import UpdateError

    with pytest.raises(UpdateError, match="not targeted yet"):
        MqttFetcher(FakeLink(answer), "box", timeout_s=5, retries=3).manifest("m", "1.1.0", "p")  # type: ignore[arg-type]


def test_an_oversized_manifest_frame_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    manifest = b'{"the real one": 1}'

    def answer(_req: FetchRequest) -> list[Frame]:
        huge = Frame(
            kind=FrameKind.MANIFEST,
            encoding=PieceEncoding.RAW,
            piece_id=bytes(32),
            piece_size=60 << 20,
            encoded_size=60 << 20,
            payload=b"m" * 100,
            parts=60_000,
        )
        real = split_payload(
            FrameKind.MANIFEST,
            PieceEncoding.RAW,
            piece_id=bytes.fromhex(piece_id(manifest)),
            piece_size=len(manifest),
            payload=manifest,
        )
        return [huge, *real]

    with caplog.at_level(logging.WARNING, logger="edge_agent.fetch"):
        assert MqttFetcher(FakeLink(answer), "box", timeout_s=5).manifest("m", "1.1.0", "p") == manifest  # type: ignore[arg-type]
    assert "manifest limit" in caplog.text
