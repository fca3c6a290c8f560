"""Fetching manifests and pieces from the hub's MQTT gateway (the update machine's ``Fetcher``).

    agent ──FetchRequest (request id, recipe of ≤ batch pieces)──> edgeglm/v1/dev/{id}/fetch
    agent <──Frames (correlation data = request id)─────────────── edgeglm/v1/dev/{id}/data

At most ``window`` requests are in flight; each piece is reassembled from its frames (any order,
duplicates ignored) and handed to the caller, which decodes and verifies it. A request that goes
quiet for ``timeout_s`` is sent again for the pieces it still lacks (after a reconnect too), up to
``retries`` times; an ERROR frame for a piece drops that piece (the machine sees it missing). The
broker going away mid-download costs only the requests in flight: nothing received is asked for
again, because the caller keeps every verified piece in its store.

Whoever can publish on the broker can answer a request (the request id travels in the clear), so
every frame is checked on arrival (paho's thread) against what its request asked, before a byte
of it is queued or buffered::

    MANIFEST  kind MANIFEST, RAW, piece_size <= MAX_MANIFEST_BYTES (edgeglm.bundle)
    PIECE     kind PIECE, a piece id this request asked for, piece_size == the manifest's size
              of that piece (the PieceStep), encoded_size <= max_encoded_size(encoding, size)
              (RAW: equal), a delta's base_id the step's base or a piece this box holds
    both      the same identity (sizes, encoding, parts) as the frames already collected for it,
              and parts that fit together (the assembler's own checks)

A frame failing a check is dropped with a warning naming the check and the download goes on (the
hub's own frames still complete it); decoding and BLAKE3 verification happen downstream as before.

The hub's refusals: ``forbidden`` on a manifest (it has not targeted the release at this device
yet: a desired state is published before the hub's transaction commits) is retried after 1, 2,
4 s within ``retries``; on pieces it means the target was revoked since, and the request is
given up at once (the update machine then sees the newer desired state). ``rate_limited`` pauses
new requests for the time its message names ("retry after N s") and asks again for the refused
request's pieces (and those sent after it, which the hub dropped silently) without counting a try.
Other refusals of a whole request are asked again after the same back-off, counting a try.

Pieces may come over HTTP instead when the hub offers it (:mod:`edge_agent.fetch_http`, which
shares this fetcher's bucket and takes over MQTT whatever HTTP does not deliver).

An optional bandwidth cap (bytes per second) is a token bucket on what arrives: while capped, one
request is in flight at a time, for about one second's worth of pieces, and the next goes out once
the bucket has refilled, so the rate on the wire stays at or below the cap without the hub knowing.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from edgeglm.bundle import MAX_MANIFEST_BYTES, Manifest
from edgeglm.errors import NotFoundError, ProtocolError, UnavailableError, UpdateError
from edgeglm.mqtt import Incoming, MqttLink
from edgeglm.planner import PieceStep
from edgeglm.protocol import (
    ErrorBody,
    FetchRequest,
    Frame,
    FrameAssembler,
    FrameKind,
    PieceEncoding,
    data_topic,
    decode,
    encode,
    fetch_topic,
    max_encoded_size,
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


_RETRY_AFTER = re.compile(r"retry after ([0-9]{1,6}(?:\.[0-9]{1,3})?) s")
_MAX_BACKOFF_S = 4.0
_LOGGED_DROPS = 5  # per request; a flood of bad frames must not flood the log


def _backoff(tries: int) -> float:
    """1, 2, 4, 4, ... seconds before asking again after a refusal."""
    return min(_MAX_BACKOFF_S, 2.0 ** max(0, tries - 1))


def _retry_after(body: ErrorBody) -> float:
    """The wait a ``rate_limited`` refusal names (1 s if it names none), at most a minute."""
    found = _RETRY_AFTER.search(body.message)
    return min(60.0, max(0.1, float(found.group(1)))) if found else 1.0


@dataclass
class _Request:
    rid: str
    pieces: dict[str, PieceStep]  # still missing
    sent: float
    seq: int = 0  # the order requests went out in
    tries: int = 1
    answered: bool = False  # a frame that passed the checks arrived
    retry_at: float | None = None  # refused: ask again at this time (counts a try)
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
        holds: Callable[[str], bool] | None = None,
        on_bytes: Callable[[int], None] | None = None,
    ) -> None:
        """``holds(piece_id)``: whether this box keeps a piece (its store), so a delta against
        any held piece is accepted; without it only the planned base of each step is.
        ``on_bytes(n)``: the payload bytes of each piece frame taken (the agent's metrics)."""
        self.link = link
        self.on_bytes = on_bytes or (lambda _n: None)
        self.bucket = _Bucket(bandwidth_bytes_s)
        self.device_id = device_id
        self.window = window
        self.batch = batch
        self.timeout_s = timeout_s
        self.retries = retries
        self.holds = holds
        self._events: queue.Queue[tuple[str, Frame]] = queue.Queue()
        self._lock = threading.Lock()
        # request id -> what it asked for (piece id -> step; None for a manifest): frames are
        # checked against it on paho's thread, so a frame that fails is never even queued
        self._live: dict[str, dict[str, PieceStep] | None] = {}
        self._drops: dict[str, int] = {}  # frames dropped per live request: the first few are logged
        self._seq = 0
        self._paused_until = 0.0  # rate limited by the hub: no request before this (monotonic)
        link.subscribe(data_topic(device_id), 1, self._on_data)

    # paho's thread ---------------------------------------------------------------------
    def _on_data(self, msg: Incoming) -> None:
        rid = (msg.correlation or b"").decode("utf-8", "replace")
        with self._lock:
            if rid not in self._live:
                return  # an answer to a request given up (or another process's)
            asked = self._live[rid]
        try:
            frame = Frame.unpack(msg.payload)
        except ProtocolError as exc:
            log.warning("dropped a bad data frame: %s", exc)
            return
        if frame.kind is not FrameKind.ERROR:
            why = _manifest_check(frame) if asked is None else self._piece_check(asked, frame)
            if why is not None:
                self._dropped(rid, f"dropped a frame for {_what(asked)} {frame.piece_id.hex()[:16]}: {why}")
                return
        self._events.put((rid, frame))

    def _send(
        self,
        kind: Literal["manifest", "pieces"],
        version: str,
        model: str,
        profile: str,
        asked: dict[str, PieceStep] | None = None,
        have: Sequence[str] = (),
    ) -> str:
        rid = uuid.uuid4().hex[:24]
        pieces = tuple(asked or ())
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
            self._live[rid] = None if kind == "manifest" else asked
        self.link.publish(fetch_topic(self.device_id), encode(req), qos=1)
        return rid

    def _dropped(self, rid: str, line: str) -> None:
        """A warning for each of the first few frames dropped per request, then one saying so."""
        with self._lock:
            n = self._drops[rid] = self._drops.get(rid, 0) + 1
        if n <= _LOGGED_DROPS:
            log.warning("%s", line)
        elif n == _LOGGED_DROPS + 1:
            log.warning("request %s: more frames dropped; logged at debug level from now on", rid)
        else:
            log.debug("%s", line)

    def _forget(self, rid: str) -> None:
        with self._lock:
            self._live.pop(rid, None)
            self._drops.pop(rid, None)

    # the update machine's thread ---------------------------------------------------------
    def manifest(self, model: str, version: str, profile: str) -> bytes:
        what = f"manifest {model}@{version}"
        attempt = 0
        while attempt < self.retries:
            self._wait_paused()
            rid = self._send("manifest", version, model, profile)
            try:
                answer = self._manifest_answer(rid)
            finally:
                self._forget(rid)
            if isinstance(answer, bytes):
                return answer
            if answer is None:
                if self.link.connected:
                    attempt += 1  # a real silence, not time offline
                    log.info("manifest request %d for %s@%s timed out; asking again", attempt, model, version)
                else:
                    self._wait_online()
            elif answer.code == "rate_limited":
                wait = _retry_after(answer)
                log.info("%s: the hub rate limits this device; asking again in %.1f s", what, wait)
                self._paused_until = time.monotonic() + wait  # not a try: the hub asked us to wait
            elif answer.code == "forbidden":
                attempt += 1  # the hub may not have committed the desired state it published yet
                if attempt >= self.retries:
                    raise UpdateError(what, f"the hub says: {answer.message}")
                wait = _backoff(attempt)
                log.info("%s: the hub says %s; asking again in %.0f s", what, answer.message, wait)
                time.sleep(wait)
            else:
                cls = NotFoundError if answer.code == "not_found" else UpdateError
                raise cls(what, f"the hub says: {answer.message}")
        raise UnavailableError(f"hub (manifest {model}@{version})", f"no answer in {self.retries} tries")

    def _manifest_answer(self, rid: str) -> bytes | ErrorBody | None:
        """The whole manifest, the hub's refusal, or None after ``timeout_s`` of silence."""
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
                try:
                    return decode(ErrorBody, frame.payload)
                except ProtocolError as exc:
                    log.warning("dropped a manifest error frame: %s", exc)
                    continue
            try:  # its sizes were checked on arrival (_manifest_check)
                whole = assembler.add(frame)
            except ProtocolError as exc:
                log.warning("dropped a manifest frame: assembly: %s", exc.why)
                continue
            if whole is not None:
                return whole
        return None

    def _wait_online(self) -> None:
        log.info("cloud link down: the download waits for it")
        while not self.link.wait_connected(1.0):
            pass

    def _wait_paused(self) -> None:
        if (left := self._paused_until - time.monotonic()) > 0:
            time.sleep(left)

    def pieces(
        self,
        target: Manifest,
        steps: Sequence[PieceStep],
        have: Sequence[str],
        *,
        cancelled: Callable[[], bool] | None = None,
    ) -> Iterator[tuple[PieceStep, Encoded, str | None]]:
        todo = list(steps)
        open_: dict[str, _Request] = {}
        waiting: list[tuple[list[PieceStep], int]] = []  # refused for the rate: (pieces, tries)
        try:
            while todo or open_ or waiting:
                if cancelled is not None and cancelled():  # superseded: the machine stops the update
                    return
                if not self.link.connected:
                    # what was in flight is lost with the link: ask again, without counting a try
                    self._wait_online()
                    for req in list(open_.values()):
                        self._forget(req.rid)
                        del open_[req.rid]
                        self._open(target, list(req.pieces.values()), have, open_).tries = req.tries
                window = 1 if self.bucket.rate else self.window  # capped: one request, then wait
                if time.monotonic() >= self._paused_until:
                    while waiting and len(open_) < window:
                        held_back, tries = waiting.pop(0)
                        self._open(target, held_back, have, open_).tries = tries
                    while todo and len(open_) < window and self.bucket.ready():
                        n = self._chunk_len(todo)
                        chunk, todo = todo[:n], todo[n:]
                        self._open(target, chunk, have, open_)
                try:
                    rid, frame = self._events.get(timeout=0.2)
                except queue.Empty:
                    rid, frame = "", None
                if frame is not None and rid in open_:
                    req = open_[rid]
                    if frame.kind == FrameKind.ERROR and not any(frame.piece_id):
                        self._refused(req, frame, open_, waiting)  # about the whole request
                    else:
                        done = self._take(req, frame)
                        if done is not None:
                            yield done
                    if rid in open_ and not req.pieces:
                        self._forget(rid)
                        del open_[rid]
                now = time.monotonic()
                due = [
                    r
                    for r in open_.values()
                    if now - r.sent > self.timeout_s or (r.retry_at is not None and now >= r.retry_at)
                ]
                for req in due:
                    self._forget(req.rid)
                    del open_[req.rid]
                    if req.tries >= self.retries:
                        log.warning("giving up %d piece(s) after %d tries", len(req.pieces), req.tries)
                        continue
                    if req.retry_at is None:
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
        pieces = {s.piece_id: s for s in chunk}
        rid = self._send("pieces", target.version, target.model, target.profile, dict(pieces), have)
        self._seq += 1
        req = _Request(rid, pieces, time.monotonic(), seq=self._seq)
        open_[rid] = req
        return req

    def _refused(
        self,
        req: _Request,
        frame: Frame,
        open_: dict[str, _Request],
        waiting: list[tuple[list[PieceStep], int]],
    ) -> None:
        """The hub refused a whole request: wait as it says (rate), or back off and ask again."""
        try:
            body = decode(ErrorBody, frame.payload)
        except ProtocolError as exc:
            log.warning("dropped a request's error frame: %s", exc)
            return
        now = time.monotonic()
        if body.code == "rate_limited":
            wait = _retry_after(body)
            self._paused_until = max(self._paused_until, now + wait)
            # The hub answers the first refused request of a burst and drops the later ones
            # silently: ask again for all of them after the wait, without counting a try.
            later = [r for r in open_.values() if r.seq >= req.seq and not r.answered]
            for r in later:
                self._forget(r.rid)
                del open_[r.rid]
                waiting.append((list(r.pieces.values()), r.tries))
            log.info("the hub rate limits this device: %d request(s) wait %.1f s", len(later), wait)
            return
        if body.code == "forbidden":  # the manifest came, so the hub has revoked this target since
            log.warning("the hub refused request %s: %s; giving up its pieces", req.rid, body.message)
            req.pieces.clear()
            return
        req.retry_at = now + _backoff(req.tries)
        log.warning(
            "the hub refused request %s (%s: %s); asking again in %.0f s",
            req.rid,
            body.code,
            body.message,
            _backoff(req.tries),
        )

    def _take(self, req: _Request, frame: Frame) -> tuple[PieceStep, Encoded, str | None] | None:
        pid = frame.piece_id.hex()
        self.bucket.spend(len(frame.payload))
        if frame.kind == FrameKind.PIECE:
            self.on_bytes(len(frame.payload))
        if frame.kind == FrameKind.ERROR:
            if pid not in req.pieces:
                return None
            try:
                body = decode(ErrorBody, frame.payload)
            except ProtocolError as exc:
                log.warning("dropped an error frame for piece %s: %s", pid[:16], exc)
                return None
            log.warning("hub could not send piece %s: %s", pid[:16], body.message)
            req.pieces.pop(pid, None)
            req.sent, req.answered = time.monotonic(), True
            return None
        if pid not in req.pieces:
            return None  # a duplicate of a piece already complete (its sizes were checked on arrival)
        try:
            whole = req.parts.setdefault(pid, FrameAssembler()).add(frame)
        except ProtocolError as exc:
            log.warning("dropped a frame for piece %s: assembly: %s", pid[:16], exc.why)
            return None
        req.sent, req.answered = time.monotonic(), True  # alive: its timeout counts from now
        if whole is None:
            return None
        step = req.pieces.pop(pid)
        req.parts.pop(pid, None)
        base = frame.base_id.hex() if frame.base_id else None
        return step, Encoded(frame.encoding, frame.element_width, whole), base

    def _piece_check(self, asked: dict[str, PieceStep], frame: Frame) -> str | None:
        """Why a piece frame must not be buffered, or None: its sizes against the manifest's."""
        step = asked.get(frame.piece_id.hex())
        if step is None:
            return "piece id: not one this request asked for"
        if frame.kind is not FrameKind.PIECE:
            return f"kind: a {frame.kind.name} frame answers a pieces request"
        if frame.piece_size != step.size:
            return f"piece_size: {frame.piece_size} is not the manifest's {step.size}"
        limit = max_encoded_size(frame.encoding, step.size)
        if frame.encoded_size > limit:
            return f"encoded_size: {frame.encoded_size} is over {limit} for {frame.encoding.name}"
        if frame.base_id is not None:
            base = frame.base_id.hex()
            if base != step.base_id and not (self.holds is not None and self.holds(base)):
                return f"base_id: {base[:16]} is not a base this device offered"
        return None


def _what(asked: dict[str, PieceStep] | None) -> str:
    return "manifest" if asked is None else "piece"


def _manifest_check(frame: Frame) -> str | None:
    """Why a frame must not be buffered as (part of) a manifest, or None."""
    if frame.kind is not FrameKind.MANIFEST:
        return f"kind: a {frame.kind.name} frame answers a manifest request"
    if frame.encoding is not PieceEncoding.RAW:
        return f"encoding: a manifest travels RAW, not {frame.encoding.name}"
    if frame.piece_size > MAX_MANIFEST_BYTES:
        return f"piece_size: {frame.piece_size} is over the {MAX_MANIFEST_BYTES}-byte manifest limit"
    return None
