"""Inference requests over MQTT: validate, queue on the scheduler, reply, never crash.

A request arrives on ``edgeglm/v1/dev/{id}/infer`` (or the site's shared topic). The reply goes
to the MQTT 5 response topic with the request's correlation data; a MQTT 3.1.1 sensor puts
``reply_to`` (and ``id``) in the JSON instead. Every problem becomes an error reply when there is
somewhere to send it: malformed JSON, wrong types, invalid UTF-8, a payload over the size limit,
an unknown model, a prompt longer than the context, a full queue (``busy``), an expired request
(``timeout``). A request with nowhere to reply to is logged and counted, and dropped.

Streaming (``stream: true``) sends sequenced replies (``seq`` 0, 1, ...) with the new text and
tokens (and their ``logprobs`` when asked), the last one with ``done``, the finish reason, usage
and timings. A whole reply must fit one message: ``logprobs`` without ``stream`` are refused
(``bad_request`` naming ``logprobs``) when ``max_tokens * (1 + top_logprobs)`` exceeds
``MAX_WHOLE_LOGPROBS``. MQTT 5 message expiry
is honoured: the remaining interval becomes the request's deadline, and replies expire too.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time

from edge_agent.inference.engine import Engine
from edge_agent.inference.generation import GenerationResult
from edge_agent.inference.scheduler import Scheduler
from edge_agent.metrics import Metrics
from edgeglm.errors import ProtocolError, RequestError
from edgeglm.mqtt import Incoming, MqttLink
from edgeglm.protocol import (
    InferReply,
    InferRequest,
    Timings,
    Usage,
    check_reply_topic,
    decode,
    encode,
    infer_topic,
    shared,
    site_infer_topic,
)

__all__ = ["InferService"]

log = logging.getLogger(__name__)

_REPLY_QOS = 1
MAX_WHOLE_LOGPROBS = 8192  # log-probability entries in one whole reply: ~70 bytes each, under 1 MiB


class _Reply:
    """Where and how to answer one request; numbers the streamed parts."""

    def __init__(self, link: MqttLink, topic: str, incoming: Incoming, request_id: str | None) -> None:
        self.link, self.topic, self.request_id = link, topic, request_id
        self.correlation = incoming.correlation
        self.expiry_s = incoming.expiry_s
        self._seq = itertools.count()

    def send(self, reply: InferReply) -> None:
        reply = reply.model_copy(update={"id": self.request_id, "seq": next(self._seq)})
        self.link.publish(
            self.topic,
            encode(reply),
            qos=_REPLY_QOS,
            correlation=self.correlation,
            expiry_s=self.expiry_s,
            content_type="application/json",
        )


class InferService:
    """Serves one engine on one MQTT link; :meth:`handle` is safe to call with any bytes."""

    def __init__(
        self,
        engine: Engine | None,  # None: no model yet, every request gets an ``unavailable`` reply
        scheduler: Scheduler | None,
        link: MqttLink | None,  # None: HTTP only (nothing arrives here, so nothing replies)
        metrics: Metrics,
        *,
        device_id: str,
        site: str | None = None,
        default_timeout_s: float = 300.0,
    ) -> None:
        self.engine, self.scheduler, self.link, self.metrics = engine, scheduler, link, metrics
        self.device_id, self.site = device_id, site
        self.default_timeout_s = default_timeout_s
        self.dropped = 0
        self._lock = threading.Lock()

    def topics(self) -> list[str]:
        topics = [infer_topic(self.device_id)]
        if self.site is not None:
            topics.append(shared(site_infer_topic(self.site), "agents"))
        return topics

    def _link(self) -> MqttLink:
        if self.link is None:  # only a link delivers requests: a call here without one is a bug
            raise RuntimeError("this service has no MQTT link")
        return self.link

    def retire(self, timeout_s: float = 60.0) -> None:
        """Let the requests this service accepted finish, then stop its scheduler."""
        sched = self.scheduler
        if sched is None:
            return
        deadline = time.monotonic() + timeout_s
        while (sched.queue_depth or sched.running) and time.monotonic() < deadline:
            time.sleep(0.05)
        sched.stop()

    # ------------------------------------------------------------------------------ handling
    def handle(self, incoming: Incoming) -> None:
        try:
            self._handle(incoming)
        except Exception:  # a bug in handling one message must not take serving down
            log.exception("unexpected failure handling a request on %s", incoming.topic)
            self.metrics.rejected("internal")

    def _handle(self, incoming: Incoming) -> None:
        try:
            request = decode(InferRequest, incoming.payload)
        except ProtocolError as exc:
            self._refuse(incoming, None, "bad_request", str(exc))
            return
        if self.engine is None or self.scheduler is None:
            self._refuse(incoming, request.id, "unavailable", "no model is installed on this box yet")
            return
        target = self._target(incoming, request.reply_to)
        if target is None:
            return
        reply = _Reply(self._link(), target, incoming, request.id)
        timeout = float(incoming.expiry_s) if incoming.expiry_s else self.default_timeout_s
        try:
            if request.logprobs and not request.stream:
                entries = request.max_tokens * (1 + request.top_logprobs)
                if entries > MAX_WHOLE_LOGPROBS:
                    raise RequestError(
                        "bad_request",
                        f"field 'logprobs': max_tokens x (1 + top_logprobs) is {entries}; a whole reply"
                        f" holds {MAX_WHOLE_LOGPROBS}: send 'stream': true, or ask for fewer",
                    )
            prompt = self.engine.prepare(request, deadline=incoming.received + timeout)
        except RequestError as exc:
            self.metrics.rejected(exc.code)
            reply.send(InferReply.failure(exc.code, exc.why))  # type: ignore[arg-type]
            return
        self.metrics.request_started()
        try:
            self.scheduler.submit(
                prompt,
                on_text=lambda text, tokens, lps=None: reply.send(
                    InferReply(text=text, tokens=tuple(tokens), logprobs=None if lps is None else tuple(lps))
                ),
                on_done=lambda result: self._finished(reply, result, prompt.stream, incoming.received),
            )
        except RequestError as exc:  # busy, or shutting down: it counts as a finished failure
            self.metrics.request_finished(
                outcome=exc.code, latency_s=0.0, ttft_s=None, prompt_tokens=0, completion_tokens=0
            )
            reply.send(InferReply.failure(exc.code, exc.why))  # type: ignore[arg-type]

    def _target(self, incoming: Incoming, reply_to: str | None) -> str | None:
        topic = incoming.response_topic or reply_to
        if topic is None:
            self._drop(incoming, "no response topic and no 'reply_to'")
            return None
        try:
            return check_reply_topic(topic)
        except ProtocolError as exc:
            self._drop(incoming, str(exc))
            return None

    def _refuse(self, incoming: Incoming, request_id: str | None, code: str, message: str) -> None:
        """An error reply for a request that did not parse: find a reply topic as best we can."""
        self.metrics.rejected(code)
        reply_to, rid = _salvage(incoming.payload)
        target = self._target(incoming, reply_to)
        if target is None:
            return
        log.info("refused a request on %s: %s", incoming.topic, message[:200])
        _Reply(self._link(), target, incoming, request_id or rid).send(InferReply.failure(code, message))  # type: ignore[arg-type]

    def _drop(self, incoming: Incoming, why: str) -> None:
        with self._lock:
            self.dropped += 1
        log.warning("dropped a request on %s: %s", incoming.topic, why[:200])

    def _finished(self, reply: _Reply, result: GenerationResult, stream: bool, received: float) -> None:
        total_s = time.monotonic() - received
        ttft = result.ttft_ms / 1000 if result.ttft_ms is not None else None
        self.metrics.request_finished(
            outcome=result.error_code or result.finish_reason,
            latency_s=total_s,
            ttft_s=ttft,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            queue_s=result.queue_ms / 1000,
            cached_tokens=result.cached_tokens,
        )
        if result.error_code is not None:
            failure = InferReply.failure(result.error_code, result.error_message)  # type: ignore[arg-type]
            reply.send(failure.model_copy(update={"usage": _usage(result), "timings": _timings(result)}))
            return
        answer = InferReply(
            text="" if stream else result.text,
            tokens=() if stream else result.tokens,
            logprobs=None if stream else result.logprobs,
            tool_calls=result.tool_calls,
            done=True,
            finish_reason=result.finish_reason,
            usage=_usage(result),
            timings=_timings(result),
        )
        try:
            reply.send(answer)
        except ProtocolError as exc:  # a whole answer over the reply's size limit: say so, once
            why = f"the whole reply is too large for one message ({exc.why}); ask for stream: true"
            failure = InferReply.failure("bad_request", why)
            reply.send(failure.model_copy(update={"usage": _usage(result), "timings": _timings(result)}))


def _usage(result: GenerationResult) -> Usage:
    return Usage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        cached_tokens=result.cached_tokens,
    )


def _timings(result: GenerationResult) -> Timings:
    return Timings(
        queue_ms=round(result.queue_ms, 3),
        prefill_ms=round(result.prefill_ms, 3),
        decode_ms=round(result.decode_ms, 3),
        total_ms=round(result.total_ms, 3),
    )


def _salvage(payload: bytes) -> tuple[str | None, str | None]:
    """``reply_to`` and ``id`` from a payload that failed validation, if it is JSON at all."""
    if len(payload) > InferRequest.MAX_BYTES:
        return None, None
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError):
        return None, None
    if not isinstance(obj, dict):
        return None, None
    reply_to, rid = obj.get("reply_to"), obj.get("id")
    return (
        reply_to if isinstance(reply_to, str) else None,  # checked as any reply topic is
        rid if isinstance(rid, str) and len(rid) <= 128 and _utf8(rid) else None,
    )


def _utf8(text: str) -> bool:
    """Whether a reply can carry ``text``: JSON's ``\\ud800`` escape gives a lone surrogate."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
