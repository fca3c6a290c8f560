"""Fetching manifests and pieces from the hub's MQTT gateway (the update machine's ``Fetcher``).

    agent ──FetchRequest (request id, recipe of ≤ batch pieces)──> edgeglm/v1/hub/fetch
    agent <──Frames (correlation data = request id)─────────────── edgeglm/v1/dev/{id}/data

At most ``window`` requests are in flight; each piece is reassembled from its frames (any order,
duplicates ignored) and handed to the caller, which decodes and verifies it. A request that goes
quiet for ``timeout_s`` is sent again for the pieces it still lacks (after a reconnect too), up to
``retries`` times; an ERROR frame for a piece drops that piece (the machine sees it missing). The
broker going away mid-download costs only the requests in flight: nothing received is asked for
again, because the caller keeps every verified piece in its store.

An optional bandwidth cap (bytes per second) is a token bucket on what arrives: while capped, one
request is in flight at a time, for about one second's worth of pieces, and the next goes out once
the bucket has refilled, so the rate on the wire stays at or below the cap without the hub knowing.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from edgeglm.bundle import Manifest
from edgeglm.errors import NotFoundError, ProtocolError, UnavailableError, UpdateError
from edgeglm.mqtt import Incoming, MqttLink
from edgeglm.planner import PieceStep
from edgeglm.protocol import (
    ErrorBody,
    FetchRequest,
    Frame,
    FrameAssembler,
    FrameKind,
    data_topic,
    decode,
    encode,
    fetch_topic,
)
from edgeglm.tensor_delta import Encoded

__all__ = ["MqttFetcher"]

log = logging.getLogger(__name__)


class _Bucket:
    """``rate`` bytes per second, bursts up to one second's worth; 0 means no cap."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.tokens = float(rate)
        self.at = time.monotonic()

    def spend(self, n: int) -> None:
        if self.rate:
            self._refill()
            self.tokens -= n

    def ready(self) -> bool:
        if not self.rate:
            return True
        self._refill()
        return self.tokens > 0

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(float(self.rate), self.tokens + (now - self.at) * self.rate)
        self.at = now


@dataclass
class _Request:
    rid: str
    pieces: dict[str, PieceStep]  # still missing
    sent: float
    tries: int = 1
    parts: dict[str, FrameAssembler] = field(default_factory=dict)


class MqttFetcher:
    def __init__(
        self,
        link: MqttLink,
        device_id: str,
        *,
        model: str = "",
        profile: str = "",
        window: int = 8,
        batch: int = 32,
        timeout_s: float = 30.0,
        retries: int = 5,
        bandwidth_bytes_s: int = 0,
    ) -> None:
        self.link = link
        self.bucket = _Bucket(bandwidth_bytes_s)
        self.device_id = device_id
        self.window = window
        self.batch = batch
        self.timeout_s = timeout_s
        self.retries = retries
        self._events: queue.Queue[tuple[str, Frame]] = queue.Queue()
        self._lock = threading.Lock()
        self._live: set[str] = set()
        link.subscribe(data_topic(device_id), 1, self._on_data)

    # paho's thread ---------------------------------------------------------------------
    def _on_data(self, msg: Incoming) -> None:
        rid = (msg.correlation or b"").decode("utf-8", "replace")
        with self._lock:
            if rid not in self._live:
                return  # an answer to a request given up (or another process's)
        try:
            frame = Frame.unpack(msg.payload)
        except ProtocolError as exc:
            log.warning("dropped a bad data frame: %s", exc)
            return
        self._events.put((rid, frame))

    def _send(
        self,
        kind: Literal["manifest", "pieces"],
        version: str,
        model: str,
        profile: str,
        pieces: Sequence[str] = (),
        have: Sequence[str] = (),
    ) -> str:
        rid = uuid.uuid4().hex[:24]
        req = FetchRequest(
            device_id=self.device_id,
            request_id=rid,
            kind=kind,
            model=model,
            version=version,
            profile=profile,
            pieces=tuple(pieces),
            have=tuple(have)[:64],
            window=self.window,
        )
        with self._lock:
            self._live.add(rid)
        self.link.publish(fetch_topic(), encode(req), qos=1)
        return rid

    def _forget(self, rid: str) -> None:
        with self._lock:
            self._live.discard(rid)

    # the update machine's thread ---------------------------------------------------------
    def manifest(self, model: str, version: str, profile: str) -> bytes:
        attempt = 0
        while attempt < self.retries:
            rid = self._send("manifest", version, model, profile)
            try:
                whole = self._manifest_answer(rid, model, version)
            finally:
                self._forget(rid)
            if whole is not None:
                return whole
            if self.link.connected:
                attempt += 1  # a real silence, not time offline
                log.info("manifest request %d for %s@%s timed out; asking again", attempt, model, version)
            else:
                self._wait_online()
        raise UnavailableError(f"hub (manifest {model}@{version})", f"no answer in {self.retries} tries")

    def _manifest_answer(self, rid: str, model: str, version: str) -> bytes | None:
        assembler = FrameAssembler()
        deadline = time.monotonic() + self.timeout_s
        while (left := deadline - time.monotonic()) > 0 and self.link.connected:
            try:
                got, frame = self._events.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if got != rid:
                continue
            if frame.kind == FrameKind.ERROR:
                body = decode(ErrorBody, frame.payload)
                cls = NotFoundError if body.code == "not_found" else UpdateError
                raise cls(f"manifest {model}@{version}", f"the hub says: {body.message}")
            whole = assembler.add(frame)
            if whole is not None:
                return whole
        return None

    def _wait_online(self) -> None:
        log.info("cloud link down: the download waits for it")
        while not self.link.wait_connected(1.0):
            pass

    def pieces(
        self, target: Manifest, steps: Sequence[PieceStep], have: Sequence[str]
    ) -> Iterator[tuple[PieceStep, Encoded, str | None]]:
        todo = list(steps)
        open_: dict[str, _Request] = {}
        try:
            while todo or open_:
                if not self.link.connected:
                    # what was in flight is lost with the link: ask again, without counting a try
                    self._wait_online()
                    for req in list(open_.values()):
                        self._forget(req.rid)
                        del open_[req.rid]
                        self._open(target, list(req.pieces.values()), have, open_).tries = req.tries
                window = 1 if self.bucket.rate else self.window  # capped: one request, then wait
                while todo and len(open_) < window and self.bucket.ready():
                    n = self._chunk_len(todo)
                    chunk, todo = todo[:n], todo[n:]
                    self._open(target, chunk, have, open_)
                try:
                    rid, frame = self._events.get(timeout=0.2)
                except queue.Empty:
                    rid, frame = "", None
                if frame is not None and rid in open_:
                    done = self._take(open_[rid], frame)
                    if done is not None:
                        yield done
                    if not open_[rid].pieces:
                        self._forget(rid)
                        del open_[rid]
                now = time.monotonic()
                for req in [r for r in open_.values() if now - r.sent > self.timeout_s]:
                    self._forget(req.rid)
                    del open_[req.rid]
                    if req.tries >= self.retries:
                        log.warning("giving up %d piece(s) after %d tries", len(req.pieces), req.tries)
                        continue
                    log.info(
                        "request %s quiet for %.0fs: asking again for %d piece(s)",
                        req.rid,
                        self.timeout_s,
                        len(req.pieces),
                    )
                    again = self._open(target, list(req.pieces.values()), have, open_)
                    again.tries = req.tries + 1
        finally:
            for rid in open_:
                self._forget(rid)

    def _chunk_len(self, todo: Sequence[PieceStep]) -> int:
        if not self.bucket.rate:
            return min(self.batch, len(todo))
        n, size = 0, 0
        while n < min(self.batch, len(todo)) and (n == 0 or size + todo[n].size <= self.bucket.rate):
            size += todo[n].size
            n += 1
        return n

    def _open(
        self, target: Manifest, chunk: Sequence[PieceStep], have: Sequence[str], open_: dict[str, _Request]
    ) -> _Request:
        rid = self._send(
            "pieces", target.version, target.model, target.profile, [s.piece_id for s in chunk], have
        )
        req = _Request(rid, {s.piece_id: s for s in chunk}, time.monotonic())
        open_[rid] = req
        return req

    def _take(self, req: _Request, frame: Frame) -> tuple[PieceStep, Encoded, str | None] | None:
        pid = frame.piece_id.hex()
        self.bucket.spend(len(frame.payload))
        req.sent = time.monotonic()  # the request is alive: its timeout counts from the last frame
        if frame.kind == FrameKind.ERROR:
            body = decode(ErrorBody, frame.payload)
            log.warning("hub could not send piece %s: %s", pid[:16], body.message)
            req.pieces.pop(pid, None)
            return None
        step = req.pieces.get(pid)
        if step is None:
            return None
        whole = req.parts.setdefault(pid, FrameAssembler()).add(frame)
        if whole is None:
            return None
        del req.pieces[pid]
        req.parts.pop(pid, None)
        base = frame.base_id.hex() if frame.base_id else None
        return step, Encoded(frame.encoding, frame.element_width, whole), base
