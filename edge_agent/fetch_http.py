"""Pieces over HTTP when the hub offers them, MQTT for everything else (the update machine's ``Fetcher``).

    desired state (signed) ── pieces_url, pieces_token ──> HttpFirstFetcher.offer()
    UpdateMachine ── pieces(target, steps, have) ──> HttpFirstFetcher
        │ offered: each step as GET {pieces_url}/api/v1/pieces/{piece}[/delta/{base}]?model=..
        │          (``window`` at a time, at most PIECES_IN_FLIGHT = 4: the hub's per-device
        │          limit; Authorization: Bearer <pieces_token>)
        └─ whatever HTTP did not deliver ──> MqttFetcher.pieces (the same round)
    manifests always over MQTT (MqttFetcher.manifest)

An answer is checked as a frame is (edge_agent.fetch), before its body is read, against the step it
answers; the headers are the hub's word and nothing more::

    status 200, X-Edgeglm-Encoding a known encoding, X-Edgeglm-Element-Width fitting it,
    X-Edgeglm-Piece-Size == the manifest's size, Content-Length <= max_encoded_size (RAW: equal),
    X-Edgeglm-Base (a delta only) the base asked for or a piece this box holds

then the body is read to its length; the update machine decodes it and checks its BLAKE3 as for
MQTT. ``timeout_s`` bounds each socket operation, and each piece as a whole must arrive within
``timeout_s + size / MIN_BYTES_PER_S`` (64 KiB/s: a 1 MiB piece gets 16 s more than the timeout)
from its request: a server that drips bytes cannot hold a piece forever. The fetcher's wait loop
watches those deadlines (a connection past its piece's deadline is shut, which ends the read) and
the update machine's ``cancelled``: once the update is superseded (a revert) it shuts every
connection and returns at once, without falling back to MQTT.

A piece HTTP fails to deliver goes to MQTT: a connection error, a timeout or a piece past its
deadline, 401 or a 403 with ``X-Edgeglm-Credential: refused`` (revoked: no more HTTP until a new
desired state offers another credential), any other 403 (a release out of scope), 404, 5xx, an
answer failing a check, an error nothing here expects, and a piece delivered over HTTP that the
machine asks for again (it failed verification: a corrupted byte on the way). A 429 waits as
``Retry-After`` says and asks again. Three connection failures (or timeouts) in a row stop HTTP
for the round. Nothing verified is asked again (the machine asks only for what its store lacks),
and the bandwidth cap is the MQTT fetcher's bucket, shared: while capped, one request at a time.
Bytes received count per transport (``on_bytes``).
Tokens are secrets: never logged.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode, urlsplit

from edge_agent.fetch import MqttFetcher
from edgeglm.bundle import Manifest
from edgeglm.hub_api import PIECES_IN_FLIGHT
from edgeglm.planner import PieceStep
from edgeglm.protocol import DELTA_ENCODINGS, Desired, PieceEncoding, max_encoded_size
from edgeglm.tensor_delta import Encoded

__all__ = ["HttpFirstFetcher", "HttpOffer", "HttpPieces"]

log = logging.getLogger(__name__)

OnBytes = Callable[[str, int], None]  # transport ("http" | "mqtt"), bytes received
OnFallback = Callable[[str], None]  # why a piece went to MQTT
_UNPLANED = frozenset({PieceEncoding.RAW, PieceEncoding.ZSTD})
_BROKEN_AFTER = 3  # connection failures in a row: HTTP is down for the round
_MAX_WAITS = 5  # 429s for one piece before it goes to MQTT
_CHUNK = 64 * 1024
MIN_BYTES_PER_S = 64 * 1024  # the slowest rate a piece may arrive at, past timeout_s


@dataclass(frozen=True)
class HttpOffer:
    """Where the desired state says the bytes are, and the credential to fetch them with."""

    url: str
    token: str = ""

    def __repr__(self) -> str:  # the token is a secret
        return f"HttpOffer(url={self.url!r})"


class _Failed(Exception):
    """Why HTTP did not deliver a piece; ``kind`` labels the agent's fallback metric."""

    def __init__(self, kind: str, reason: str, *, wait_s: float = 0.0) -> None:
        super().__init__(reason)
        self.kind, self.reason, self.wait_s = kind, reason, wait_s

    @property
    def auth(self) -> bool:
        return self.kind == "refused"

    @property
    def link(self) -> bool:
        return self.kind in ("connection", "timeout")


class HttpPieces:
    """GETs one piece at a time per thread, each thread on its own keep-alive connection."""

    def __init__(
        self,
        *,
        ca_file: Path | None = None,
        timeout_s: float = 30.0,
        holds: Callable[[str], bool] | None = None,
    ) -> None:
        self.timeout_s = timeout_s
        self.holds = holds
        self._tls = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: list[http.client.HTTPConnection] = []
        self._due: dict[http.client.HTTPConnection, float] = {}  # in flight: its piece's deadline

    def deadline_s(self, size: int) -> float:
        """How long one piece of ``size`` bytes may take from its request to its last byte."""
        return self.timeout_s + size / MIN_BYTES_PER_S

    def get(
        self, offer: HttpOffer, target: Manifest, step: PieceStep, have: Sequence[str]
    ) -> tuple[Encoded, str | None]:
        """The step's piece as encoded by the hub, and the base of a delta; else :class:`_Failed`
        (also for an error nothing here expects: a bug on the HTTP path must leave MQTT to finish
        the update, not stop it)."""
        try:
            return self._get(offer, target, step, have)
        except _Failed:
            raise
        except Exception as exc:
            log.warning("HTTP piece fetch failed unexpectedly", exc_info=True)
            raise _Failed("connection", f"unexpected: {type(exc).__name__}: {str(exc)[:120]}") from exc

    def _get(
        self, offer: HttpOffer, target: Manifest, step: PieceStep, have: Sequence[str]
    ) -> tuple[Encoded, str | None]:
        parts = urlsplit(offer.url)
        query = {"model": target.model, "version": target.version, "profile": target.profile}
        path = f"{parts.path.rstrip('/')}/api/v1/pieces/{step.piece_id}"
        if step.action == "delta" and step.base_id and have:
            path += f"/delta/{step.base_id}"
            query["have"] = ",".join(sorted(set(have)))
        conn = self._connection(parts.scheme, parts.hostname or "", parts.port)
        deadline = time.monotonic() + self.deadline_s(step.size)
        with self._lock:
            self._due[conn] = deadline
        try:
            conn.request(
                "GET",
                f"{path}?{urlencode(query)}",
                headers={"Authorization": f"Bearer {offer.token}", "Accept-Encoding": "identity"},
            )
            resp = conn.getresponse()
            taken = False
            try:
                answer = self._take(resp, step, conn, deadline)
                taken = True
                return answer
            finally:
                # a body not read to its end (refused headers, an error) would be the next answer
                if not taken or resp.will_close:
                    self._drop()
        except (OSError, http.client.HTTPException) as exc:
            self._drop()
            if time.monotonic() >= deadline:
                raise _Failed("timeout", f"the piece took over {self.deadline_s(step.size):.0f} s") from exc
            raise _Failed("connection", f"connection: {type(exc).__name__}: {str(exc)[:120]}") from exc
        finally:
            with self._lock:
                self._due.pop(conn, None)

    def _take(
        self,
        resp: http.client.HTTPResponse,
        step: PieceStep,
        conn: http.client.HTTPConnection,
        deadline: float,
    ) -> tuple[Encoded, str | None]:
        if resp.status != 200:
            resp.read(4096)
            if resp.status == 429:
                wait_s = _seconds(resp.getheader("Retry-After"))
                raise _Failed("rate_limited", "rate limited (429)", wait_s=wait_s)
            refused = resp.getheader("X-Edgeglm-Credential") == "refused"
            if resp.status == 401 or (resp.status == 403 and refused):
                raise _Failed("refused", f"answered {resp.status}: the credential is refused")
            raise _Failed("forbidden" if resp.status == 403 else "status", f"answered {resp.status}")
        why, encoding, width, size = _check(resp, step, self.holds)
        if why is not None:
            raise _Failed("check", f"answer refused: {why}")
        body = bytearray()
        while len(body) < size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Failed(
                    "timeout", f"{len(body)} of {size} bytes after {self.deadline_s(step.size):.0f} s"
                )
            if conn.sock is not None:  # one read never waits past the piece's deadline
                conn.sock.settimeout(min(self.timeout_s, left))
            chunk = resp.read1(min(_CHUNK, size - len(body)))  # what arrived: read() waits for all
            if not chunk:
                raise _Failed("connection", f"truncated: {len(body)} of {size} bytes")
            body += chunk
        resp.read()  # b"": marks the answer complete (read1 does not), so the connection is reusable
        base = resp.getheader("X-Edgeglm-Base") if encoding in DELTA_ENCODINGS else None
        return Encoded(encoding, width, bytes(body)), base

    def _connection(self, scheme: str, host: str, port: int | None) -> http.client.HTTPConnection:
        key = (scheme, host, port)
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "key", None) == key:
            return conn
        self._drop()
        if scheme == "https":
            conn = http.client.HTTPSConnection(host, port, timeout=self.timeout_s, context=self._tls)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=self.timeout_s)
        self._local.conn, self._local.key = conn, key
        with self._lock:
            self._open.append(conn)
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def reap(self, now: float) -> None:
        """Shut the connections whose piece is past its deadline (their reads end at once)."""
        with self._lock:
            late = [conn for conn, due in self._due.items() if now >= due]
        for conn in late:
            _shut(conn)

    def abort(self) -> None:
        """Shut every connection in flight (the update was superseded)."""
        with self._lock:
            conns = list(self._due)
        for conn in conns:
            _shut(conn)

    def close(self) -> None:
        with self._lock:
            conns, self._open = self._open, []
        for conn in conns:
            conn.close()


def _shut(conn: http.client.HTTPConnection) -> None:
    """End a connection another thread may be blocked reading (close() alone does not wake it)."""
    sock = conn.sock
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _seconds(value: str | None) -> float:
    try:
        return min(60.0, max(0.1, float(value or "1")))
    except ValueError:
        return 1.0


def _check(
    resp: http.client.HTTPResponse, step: PieceStep, holds: Callable[[str], bool] | None
) -> tuple[str | None, PieceEncoding, int, int]:
    """Why an answer's body must not be read (or None), its encoding, element width and length."""
    name = resp.getheader("X-Edgeglm-Encoding") or ""
    try:
        encoding = PieceEncoding[name]
    except KeyError:
        return f"encoding: {name[:20]!r} is not one this agent decodes", PieceEncoding.RAW, 0, 0
    try:
        width = int(resp.getheader("X-Edgeglm-Element-Width") or "")
        piece_size = int(resp.getheader("X-Edgeglm-Piece-Size") or "")
        length = int(resp.getheader("Content-Length") or "")
    except ValueError:
        return "a size header is missing or not a number", encoding, 0, 0
    if width not in (0, 1, 2, 4, 8) or (width == 0) != (encoding in _UNPLANED):
        return f"element width {width} does not fit {encoding.name}", encoding, width, length
    if piece_size != step.size:
        return f"piece size {piece_size} is not the manifest's {step.size}", encoding, width, length
    limit = max_encoded_size(encoding, step.size)
    if length > limit or length < 0 or (encoding is PieceEncoding.RAW and length != step.size):
        return f"length {length} does not fit {encoding.name} of {step.size} bytes", encoding, width, length
    base = resp.getheader("X-Edgeglm-Base")
    if (base is not None) != (encoding in DELTA_ENCODINGS):
        return "a base comes with a delta encoding, and only with one", encoding, width, length
    if base is not None and base != step.base_id and not (holds is not None and holds(base)):
        return f"base {base[:16]} is not a base this device holds", encoding, width, length
    return None, encoding, width, length


class HttpFirstFetcher:
    """The daemon's fetcher when ``update.http = "auto"``: HTTP when offered, MQTT otherwise."""

    def __init__(
        self,
        mqtt: MqttFetcher,
        http: HttpPieces,
        *,
        window: int = 8,
        on_bytes: OnBytes | None = None,
        on_fallback: OnFallback | None = None,
    ) -> None:
        self.mqtt = mqtt
        self.http = http
        self.window = min(window, PIECES_IN_FLIGHT)  # the hub answers 429 past it
        self.on_bytes = on_bytes or (lambda _t, _n: None)
        self.on_fallback = on_fallback or (lambda _r: None)
        self._offer: HttpOffer | None = None
        self._refused: HttpOffer | None = None  # its credential was refused: wait for another
        self._lock = threading.Lock()
        self._target: tuple[str, str, str] | None = None
        self._via_http: set[str] = set()  # pieces of the target HTTP delivered (the machine verifies them)

    def offer(self, desired: Desired) -> None:
        """What the newest accepted desired state offers (UpdateWorker calls this)."""
        offer = HttpOffer(desired.pieces_url, desired.pieces_token or "") if desired.pieces_url else None
        with self._lock:
            if offer != self._offer:
                where = f"HTTP from {offer.url}" if offer else "MQTT only (no HTTP offered)"
                log.info("pieces over %s", where)
            self._offer = offer

    def manifest(self, model: str, version: str, profile: str) -> bytes:
        return self.mqtt.manifest(model, version, profile)

    def pieces(
        self,
        target: Manifest,
        steps: Sequence[PieceStep],
        have: Sequence[str],
        *,
        cancelled: Callable[[], bool] | None = None,
    ) -> Iterator[tuple[PieceStep, Encoded, str | None]]:
        stop = cancelled or (lambda: False)
        with self._lock:
            offer = self._offer if self._offer != self._refused else None
        key = (target.model, target.version, target.profile)
        if key != self._target:
            self._target, self._via_http = key, set()
        later: list[PieceStep] = []
        todo: list[PieceStep] = []
        for step in steps:
            if step.piece_id in self._via_http:  # HTTP delivered it and it did not verify
                self._fallback(step, "corrupt", "delivered a piece that failed verification")
                later.append(step)
            else:
                todo.append(step)
        if offer is not None and todo:
            yield from self._over_http(offer, target, todo, have, later, stop)
        else:
            later.extend(todo)
        if later and not stop():
            yield from self.mqtt.pieces(target, later, have, cancelled=stop)

    def _fallback(self, step: PieceStep, kind: str, reason: str) -> None:
        log.info("piece %s over MQTT: HTTP %s", step.piece_id[:16], reason)
        self.on_fallback(kind)

    def _over_http(
        self,
        offer: HttpOffer,
        target: Manifest,
        todo: list[PieceStep],
        have: Sequence[str],
        later: list[PieceStep],
        cancelled: Callable[[], bool],
    ) -> Iterator[tuple[PieceStep, Encoded, str | None]]:
        bucket = self.mqtt.bucket
        queue = list(reversed(todo))  # pop() from the end: in the machine's order
        waits: dict[str, int] = {}
        pending: dict[Future[tuple[Encoded, str | None]], PieceStep] = {}
        broken, link_failures, paused_until = False, 0, 0.0
        pool = ThreadPoolExecutor(self.window, thread_name_prefix="http-pieces")
        try:
            while queue or pending:
                if cancelled():  # superseded: stop now, nothing goes to MQTT
                    log.info("HTTP download stopped: the update was superseded")
                    self.http.abort()
                    return
                self.http.reap(time.monotonic())
                window = 1 if bucket.rate else self.window
                while not broken and queue and len(pending) < window and bucket.ready():
                    if time.monotonic() < paused_until:
                        break
                    step = queue.pop()
                    pending[pool.submit(self.http.get, offer, target, step, have)] = step
                if broken and queue:
                    later.extend(reversed(queue))
                    queue.clear()
                if not pending:
                    time.sleep(0.05)
                    continue
                done, _ = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                for future in done:
                    step = pending.pop(future)
                    try:
                        encoded, base = future.result()
                    except _Failed as exc:
                        if exc.wait_s and waits.get(step.piece_id, 0) < _MAX_WAITS:
                            waits[step.piece_id] = waits.get(step.piece_id, 0) + 1
                            paused_until = max(paused_until, time.monotonic() + exc.wait_s)
                            queue.append(step)
                            continue
                        link_failures = link_failures + 1 if exc.link else 0
                        if exc.auth:
                            with self._lock:
                                self._refused = offer
                            log.warning("the hub refused this box's HTTP credential (%s)", exc.reason)
                        broken = broken or exc.auth or link_failures >= _BROKEN_AFTER
                        self._fallback(step, exc.kind, exc.reason)
                        later.append(step)
                        continue
                    link_failures = 0
                    bucket.spend(len(encoded.payload))
                    self.on_bytes("http", len(encoded.payload))
                    self._via_http.add(step.piece_id)
                    yield step, encoded, base
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            self.http.close()
