"""The MQTT gateway: answers devices' manifest and piece requests on their data topic.

    edgeglm/v1/dev/{id}/fetch ($share/hub/edgeglm/v1/dev/+/fetch, FetchRequest)
        paho's thread: the device is the topic's {id}; its rate limit (cloud_hub.fetch_limit)
                       is checked before the request is queued: over it, one ERROR frame
                       ``rate_limited`` per burst, then silent drops
        a worker:      the body must name the same device (else dropped); the release and profile
                       must be targeted at the device (cloud_hub.fetch_scope, else ERROR
                       ``forbidden``); then
        kind=manifest ──> the bundle's manifest.json, exactly as signed, in MANIFEST frames
        kind=pieces   ──> for each piece of the recipe, PIECE frames: a tensor delta against the
                          same tensor slice in a version the device says it holds (``have``) when
                          that is smaller, else the piece raw (zstd / byte planes)
    replies: edgeglm/v1/dev/{id}/data, QoS 1, MQTT 5 correlation data = the request id

Plans and encodings come from the hub's :class:`cloud_hub.encoder.PieceEncoder` (shared with the
HTTP piece routes), so a wave of devices moving between the same two versions costs one encoding
per piece. The hub trusts nothing in a request:
the device is the one the broker let publish on that topic, the recipe may name only pieces of the
requested bundle, ``have`` only versions the device was given or reported (FetchScope.held: a
delta is invertible, so any other version would be readable as a base; the others are dropped and
counted in ``edgeglm_hub_have_dropped_total``) and that the hub knows; anything else is
dropped or answered with an ERROR frame (counted in ``edgeglm_hub_device_messages_dropped_total``
by reason, and logged) and the gateway goes on. Each piece sent counts in
``edgeglm_hub_pieces_served_total{transport="mqtt"}`` and its encoded bytes in
``edgeglm_hub_piece_bytes_served_total`` (the HTTP piece routes count ``transport="http"``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from cloud_hub.db import Database
from cloud_hub.encoder import PieceEncoder
from cloud_hub.fetch_limit import FetchLimiter, FetchLimits, Refusal
from cloud_hub.fetch_scope import FetchScope
from cloud_hub.metrics import HubMetrics
from edgeglm.errors import EdgeError, IntegrityError, NotFoundError, PermissionDenied, ProtocolError
from edgeglm.mqtt import Incoming
from edgeglm.pieces import piece_id
from edgeglm.planner import step_frames
from edgeglm.protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    ErrorBody,
    ErrorCode,
    FetchRequest,
    Frame,
    FrameKind,
    PieceEncoding,
    TopicKind,
    data_topic,
    decode,
    error_frame,
    parse_device_topic,
    split_payload,
)

__all__ = ["Gateway"]

log = logging.getLogger(__name__)

Send = Callable[[str, bytes, bytes], None]  # topic, payload, correlation
_DROPPED = "edgeglm_hub_device_messages_dropped_total"


class Gateway:
    def __init__(
        self,
        db: Database,
        encoder: PieceEncoder,
        send: Send,
        metrics: HubMetrics,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        workers: int = 2,
        max_pending: int = 1000,
        limits: FetchLimits | None = None,
        scope: FetchScope | None = None,
    ) -> None:
        self.db = db
        self.encoder = encoder
        self.send = send
        self.metrics = metrics
        self.max_message_bytes = max_message_bytes
        self._lock = threading.Lock()
        self._pending = 0
        self.max_pending = max_pending
        self.limiter = FetchLimiter(limits)
        self.scope = scope or FetchScope(db)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="hub-gateway")

    # -------------------------------------------------------------------------- entry
    def on_message(self, msg: Incoming) -> None:
        """paho's thread: check the device's rate, then hand the request to a worker (encoding
        must not stall other traffic)."""
        device_id = self._device(msg)
        if device_id is None:
            return
        refusal = self.limiter.admit(device_id)
        if refusal is not None:
            self._rate_limited(device_id, msg, refusal)
            return
        with self._lock:
            full = self._pending >= self.max_pending
            if not full:
                self._pending += 1
        if full:
            self.limiter.finished(device_id)
            self.metrics.inc(_DROPPED, reason="backlog")
            log.warning("fetch backlog full (%d): dropped a request; the device retries", self.max_pending)
            return
        self._pool.submit(self._run, device_id, msg)

    def _run(self, device_id: str, msg: Incoming) -> None:
        sent = 0
        try:
            sent = self.on_fetch(msg)
        finally:
            self.limiter.finished(device_id, sent)
            with self._lock:
                self._pending -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _device(self, msg: Incoming) -> str | None:
        """The asking device, from the topic (a subscription delivers only fetch topics here)."""
        try:
            device_id, kind = parse_device_topic(msg.topic)
            if kind is not TopicKind.FETCH:
                raise ProtocolError("topic", f"{kind.value} is not a fetch topic")
        except ProtocolError as exc:
            self.metrics.inc(_DROPPED, reason="malformed")
            log.warning("dropped a fetch request on %.120s: %s", msg.topic, exc)
            return None
        return device_id

    def _rate_limited(self, device_id: str, msg: Incoming, refusal: Refusal) -> None:
        """Count the drop; the first of a burst is answered (the request is decoded for its id)."""
        self.metrics.inc(_DROPPED, reason="rate_limited")
        if not refusal.notify:
            return
        log.warning("device %s rate limited (%s): retry after %.1f s", device_id, refusal.why, refusal.wait_s)
        try:
            req = decode(FetchRequest, msg.payload)
        except ProtocolError:
            return  # nothing to correlate an answer with
        if req.device_id != device_id:
            return
        message = f"rate limited ({refusal.why}): retry after {refusal.wait_s:.1f} s"
        self._send(data_topic(device_id), [self._error("rate_limited", message)], req.request_id.encode())

    def on_fetch(self, msg: Incoming) -> int:
        """Answer one fetch request (synchronously); returns the bytes sent."""
        device_id = self._device(msg)
        if device_id is None:
            return 0
        try:
            req = decode(FetchRequest, msg.payload)
        except ProtocolError as exc:
            self.metrics.inc(_DROPPED, reason="malformed")
            log.warning("dropped a fetch request from %s: %s", device_id, exc)
            return 0
        if req.device_id != device_id:  # the body is the device's word; the topic the broker's
            self.metrics.inc(_DROPPED, reason="wrong_device")
            log.warning("dropped a fetch request on %s's topic naming device %r", device_id, req.device_id)
            return 0
        correlation = req.request_id.encode()
        topic = data_topic(device_id)
        try:
            self.scope.check(device_id, req.model, req.version, req.profile)
            bundle_json, manifest = self.encoder.bundle(req.model, req.version, req.profile)
            if req.kind == "manifest":
                frames = split_payload(
                    FrameKind.MANIFEST,
                    PieceEncoding.RAW,
                    piece_id=bytes.fromhex(piece_id(bundle_json)),
                    piece_size=len(bundle_json),
                    payload=bundle_json,
                    max_message_bytes=self.max_message_bytes,
                )
                return self._send(topic, frames, correlation)
            have, dropped = self.scope.held(device_id, req.model, req.have)
            if dropped:
                self.metrics.inc("edgeglm_hub_have_dropped_total", float(dropped), transport="mqtt")
                log.warning("%s named %d version(s) it was never given in have: dropped", device_id, dropped)
            steps = self.encoder.steps(manifest, have)
            sent = 0
            for pid in req.pieces:
                step = steps.get(pid)
                if step is None:
                    error = self._error("not_found", f"piece {pid[:16]} is not in {req.version}", pid)
                    sent += self._send(topic, [error], correlation)
                    continue
                encoded = self.encoder.encoded(step)
                sent += self._send(topic, step_frames(step, encoded, self.max_message_bytes), correlation)
                self.metrics.inc("edgeglm_hub_pieces_served_total", transport="mqtt")
                self.metrics.inc(
                    "edgeglm_hub_piece_bytes_served_total", float(len(encoded.payload)), transport="mqtt"
                )
            return sent
        except PermissionDenied as exc:
            self.metrics.inc(_DROPPED, reason="forbidden")
            log.warning("refused a %s fetch: %s", req.kind, exc)
            refused = self._error("forbidden", f"{exc.why}: {req.model}@{req.version} for {req.profile}")
            return self._send(topic, [refused], correlation)
        except EdgeError as exc:
            if isinstance(exc, IntegrityError):  # our own store rotted: the operator must act
                self.metrics.inc("edgeglm_hub_store_corrupt_total")
                log.error("fetch for %s: %s; publish the release again to repair it", device_id, exc)
            code: ErrorCode = "not_found" if isinstance(exc, NotFoundError) else "internal"
            return self._send(topic, [self._error(code, str(exc))], correlation)
        except Exception:  # a bug must not stop the gateway: the device hears of it and retries
            log.exception("fetch request %s from %s failed", req.request_id, device_id)
            return self._send(
                topic, [self._error("internal", "the hub failed on this request; see its log")], correlation
            )

    # ---------------------------------------------------------------------- helpers
    def _error(self, code: ErrorCode, message: str, pid: str | None = None) -> Frame:
        body = ErrorBody(code=code, message=message[:500])
        return error_frame(body, bytes.fromhex(pid)) if pid else error_frame(body)

    def _send(self, topic: str, frames: list[Frame], correlation: bytes) -> int:
        sent = 0
        for frame in frames:
            payload = frame.pack()
            self.send(topic, payload, correlation)
            self.metrics.inc("edgeglm_hub_data_bytes_sent_total", float(len(payload)))
            sent += len(payload)
        return sent
