"""A bounded fuzz of every decoder the agent and the hub expose to the network (issue 22).

Each decoder below is fed generated payloads of three kinds: arbitrary bytes; arbitrary JSON
(deep nesting, huge and extreme numbers, NaN/Infinity written as text, long strings, NUL and
control characters, duplicate keys written as raw text, other encodings); and structure-aware
mutations of a valid payload (a field dropped, a type changed, an extreme number, a wrong version,
an unknown field), re-signed where the decoder checks a signature so that the checks behind it
run too. A decoder may answer or raise one of the project's own errors (``edgeglm.errors``);
anything else fails the test, naming the decoder and the payload.

    side   network input                         decoder (what the process calls)
    agent  MQTT .../dev/{id}/infer, site infer   InferService._handle: decode(InferRequest), the
                                                 reply salvage of a bad request, the reply topic
    agent  MQTT .../dev/{id}/desired             desired_signing.check_desired
    agent  MQTT edgeglm/v1/fleet/root            trust_root.parse_chain, then advance (parse_root)
    agent  a root document (chain element)       trust_root.parse_root
    agent  MQTT .../dev/{id}/data                MqttFetcher._on_data (Frame.unpack, frame checks),
                                                 then _take / _refused (FrameAssembler, ErrorBody)
    agent  a fetched piece's payload             tensor_delta.decode
    agent  a fetched manifest                    bundle.parse_manifest (trusted keys)
    both   every JSON wire message               protocol.decode of Status, Heartbeat, Desired,
                                                 Report, FetchRequest, InferRequest, InferReply,
                                                 ErrorBody (str, bytes, bytearray, memoryview)
    both   an MQTT topic                         protocol.parse_device_topic, check_reply_topic
    hub    MQTT .../dev/+/status, hb, report     Ingest.on_message
    hub    MQTT .../dev/+/fetch                  Gateway.on_fetch (and the rate-limited answer)
    hub    HTTP bodies (FastAPI validates them)  hub_api PinBody, LabelsBody, TokenBody,
                                                 DeployBody (then DeploySpec), RollbackBody;
                                                 then the routes' parse_selector
    hub    HTTP ?selector= and label pairs       inventory.parse_selector
    hub    HTTP POST /uploads body               bundle.parse_manifest (trusted keys)
    hub    HTTP POST /trust/roots body           trust_root.parse_root
    hub    HTTP path parameters                  the Name, SemVer and PieceId patterns (contracts)

Not here yet: the agent's OpenAI-compatible HTTP body mapping (edge_agent/http_api.py) is being
rebuilt on starlette; its pure mapping function joins this table once it has one.

FastAPI answers a body it cannot parse or validate itself (400 / 422): for the hub's bodies the
framework's ``pydantic.ValidationError`` and JSON errors are typed refusals too; an exception
raised past them (a validator's own) would be a 500, and fails here.

Every decoder has a budget of payloads; each test checks that its decoder was fed at least its
budget, and the budgets add up to at least 10,000. Hypothesis runs derandomized, without a
database and without deadlines, so CI runs the same payloads every time.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import pydantic
import pytest
import zstandard
from blake3 import blake3
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud_hub.db import Database, make_engine, migrate
from cloud_hub.encoder import PieceEncoder
from cloud_hub.fetch_limit import Refusal
from cloud_hub.gateway import Gateway
from cloud_hub.ingest import Ingest
from cloud_hub.inventory import parse_selector
from cloud_hub.metrics import HubMetrics
from cloud_hub.rollouts import DeploySpec
from edge_agent.fetch import MqttFetcher
from edge_agent.metrics import Metrics
from edge_agent.serving import InferService
from edgeglm import contracts
from edgeglm.bundle import canonical_bytes, parse_manifest
from edgeglm.desired_signing import Accepted, check_desired, desired_digest, sign_desired
from edgeglm.errors import EdgeError
from edgeglm.hub_api import DeployBody, LabelsBody, PinBody, RollbackBody, TokenBody
from edgeglm.keys import key_id
from edgeglm.mqtt import Incoming
from edgeglm.piece_store import PieceStore
from edgeglm.planner import PieceStep
from edgeglm.protocol import (
    Desired,
    ErrorBody,
    FetchRequest,
    Heartbeat,
    InferReply,
    InferRequest,
    Report,
    Status,
    check_reply_topic,
    decode,
    parse_device_topic,
)
from edgeglm.rollout_params import RolloutParams
from edgeglm.tensor_delta import decode as decode_piece
from edgeglm.tensor_delta import encode as encode_piece
from edgeglm.trust_root import advance, parse_chain, parse_root, root_body, sign_root

# decoder -> payloads it must be fed; the total is the floor of 10,000
BUDGET: dict[str, int] = {
    "agent.infer_request": 1000,
    "agent.desired_state": 1000,
    "agent.root_chain": 500,
    "both.root_document": 600,
    "agent.data_frame": 1200,
    "agent.piece_payload": 500,
    "both.manifest": 800,
    "both.wire_message": 1600,
    "both.topic": 400,
    "hub.ingest": 1000,
    "hub.fetch_request": 600,
    "hub.http_body": 1000,
    "hub.selector": 300,
    "hub.path_param": 300,
}
FED: dict[str, int] = dict.fromkeys(BUDGET, 0)
ANSWERED: dict[str, int] = dict.fromkeys(BUDGET, 0)  # the decoder returned
REFUSED: dict[str, int] = dict.fromkeys(BUDGET, 0)  # it raised one of our errors
TOTAL_FLOOR = 10_000


def _settings(name: str) -> settings:
    return settings(
        max_examples=BUDGET[name],
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )


def feed(
    name: str, call: Callable[[], object], payload: object, also: tuple[type[BaseException], ...] = ()
) -> None:
    """Call one decoder on one payload: an answer or an EdgeError (or ``also``) is fine.

    ``call`` returns False when the handler refused the payload without raising (dropped it, or
    answered with an error); anything else counts as an answer."""
    FED[name] += 1
    try:
        answered = call()
    except EdgeError:
        REFUSED[name] += 1
    except also:
        REFUSED[name] += 1
    except Exception as exc:  # the finding: a foreign exception escaped the decoder
        raise AssertionError(
            f"{name}: {type(exc).__module__}.{type(exc).__name__}: {str(exc)[:300]}\n"
            f"payload: {_show(payload)}"
        ) from exc
    else:
        if answered is False:  # a handler that drops bad input itself says so
            REFUSED[name] += 1
        else:
            ANSWERED[name] += 1


def _show(payload: object) -> str:
    text = repr(payload)
    return text if len(text) <= 600 else f"{text[:600]}... ({len(text)} chars)"


def _fed_at_least_budget(name: str, *, refuses: bool = True) -> None:
    """The decoder had its payloads, and they reached both its answers and its refusals."""
    print(f"{name}: {FED[name]} payloads, {ANSWERED[name]} answered, {REFUSED[name]} refused")
    assert FED[name] >= BUDGET[name], f"{name}: fed {FED[name]} payloads, budget {BUDGET[name]}"
    assert ANSWERED[name] > 0, f"{name}: no payload got past the decoder's checks"
    assert REFUSED[name] > 0 or not refuses, f"{name}: no payload was refused"


# ------------------------------------------------------------------ JSON, written by hand
@dataclass(frozen=True)
class Raw:
    """JSON text written as is: a numeral Python cannot write, an escape, a broken token."""

    text: str


@dataclass(frozen=True)
class Pairs:
    """A JSON object written from its pairs, so that a key may come twice."""

    pairs: tuple[tuple[str, Any], ...]


def write(value: Any, *, raw_strings: bool = False) -> str:
    """JSON text of ``value``; NaN and Infinity as Python's json writes them."""
    if isinstance(value, Raw):
        return value.text
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return repr(value)
    if isinstance(value, str):
        return f'"{value}"' if raw_strings else json.dumps(value, ensure_ascii=False)
    if isinstance(value, Pairs):
        items = value.pairs
    elif isinstance(value, dict):
        items = tuple(value.items())
    elif isinstance(value, list | tuple):
        return "[" + ",".join(write(v, raw_strings=raw_strings) for v in value) + "]"
    else:
        raise TypeError(type(value))
    return "{" + ",".join(f"{json.dumps(k)}:{write(v, raw_strings=raw_strings)}" for k, v in items) + "}"


EXTREME_NUMBERS = [
    0,
    -1,
    1,
    2**31 - 1,
    2**31,
    2**53,
    2**63 - 1,
    2**63,
    2**64,
    -(2**63) - 1,
    10**30,
    -(10**30),
    0.0,
    -0.0,
    1e-320,
    -1e-320,
    5e-324,
    1e308,
    -1e308,
    float("nan"),
    float("inf"),
    float("-inf"),
    0.5,
    1.0000000000000002,
    Raw("1" * 4400),  # past Python's int-string limit
    Raw("-" + "9" * 400),
    Raw("1e400"),
    Raw("-1e400"),
    Raw("1E-400"),
    Raw("0.1e99999"),
    Raw("01"),
    Raw("1."),
    Raw(".5"),
    Raw("+1"),
    Raw("0x10"),
    Raw("NaN"),
    Raw("-Infinity"),
]
NASTY_STRINGS = [
    "",
    "\x00",
    "a\x00b",
    "\x01\x1f\x7f",
    "\n",
    " ",
    "\u2028\u2029",
    "\ufeff",
    "é",
    "🙂",
    "٣",
    "edgeglm/v1/dev/x/desired",
    "$SYS/x",
    "+/#",
    "../../etc/passwd",
    "a" * 70,
    "x" * 5000,
    "1.0.0",
    "0.0.0-",
    "999999999.0.0",
    "blake3:" + "0" * 64,
    "0" * 64,
    "NaN",
    "true",
]
RAW_STRINGS = [
    Raw('"\\ud800"'),
    Raw('"\\udfff\\ud800"'),
    Raw('"\\u0000"'),
    Raw('"ok\\ud800"'),
    Raw('"\\ud83d\\ude00"'),
    Raw('"\\x41"'),
    Raw('"tab\there"'),
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(EXTREME_NUMBERS),
    st.sampled_from(NASTY_STRINGS),
    st.sampled_from(RAW_STRINGS),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6),
        st.dictionaries(st.text(max_size=12), inner, max_size=6),
        st.builds(
            lambda pairs: Pairs(tuple(pairs)),
            st.lists(st.tuples(st.sampled_from(["v", "a", "id", "device_id", "model"]), inner), max_size=5),
        ),
    ),
    max_leaves=25,
)


@st.composite
def nested(draw: st.DrawFn) -> str:
    """Deep nesting, written directly (a recursive writer would itself run out of stack)."""
    depth = draw(st.sampled_from([10, 500, 999, 1001, 2000, 10_000, 50_000]))
    open_, close = draw(st.sampled_from([("[", "]"), ('{"a":', "}"), ('{"v":[', "]}")]))
    inner = draw(st.sampled_from(["1", '"x"', "null", "[]", "{}"]))
    closed = draw(st.booleans())
    return open_ * depth + inner + (close * depth if closed else "")


def as_bytes(text: str, how: str) -> bytes:
    if how == "utf-16":
        return text.encode("utf-16")
    if how == "utf-32-le":
        return text.encode("utf-32-le", "surrogatepass")
    if how == "bom":
        return b"\xef\xbb\xbf" + text.encode("utf-8", "surrogatepass")
    return text.encode("utf-8", "surrogatepass")


encodings = st.sampled_from(["utf-8"] * 8 + ["utf-16", "utf-32-le", "bom"])


@st.composite
def json_payloads(draw: st.DrawFn) -> bytes:
    """Arbitrary JSON values as text (occasionally not UTF-8), or deep nesting."""
    if draw(st.integers(0, 9)) == 0:
        return draw(nested()).encode()
    text = write(draw(json_values), raw_strings=draw(st.integers(0, 9)) == 0)
    return as_bytes(text, draw(encodings))


# ------------------------------------------------------------ structure-aware mutations
def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


def _plain(doc: Any) -> Any:
    """A JSON document as dicts and lists (tuples become lists), so that it can be edited."""
    return json.loads(json.dumps(doc))


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    parent = doc
    for p in path[:-1]:
        parent = parent[p]
    parent[path[-1]] = value
    return doc


def _drop(doc: Any, path: tuple[Any, ...]) -> Any:
    if not path:
        return {}
    parent = doc
    for p in path[:-1]:
        parent = parent[p]
    del parent[path[-1]]
    return doc


MUTATIONS = [
    "drop",
    "value",
    "extreme",
    "extreme",
    "string",
    "string",
    "string",
    "version",
    "unknown",
    "wrap",
]
MUTATIONS += ["duplicate", "empty"]


@st.composite
def mutated(draw: st.DrawFn, valid: dict[str, Any], *, versioned: bool = False) -> Any:
    """``valid`` with up to three edits (none: the happy path's own checks still run, e.g. on a
    re-signed document); the result may hold Raw and Pairs (not JSON-able)."""
    doc = _plain(valid)
    for _ in range(draw(st.sampled_from([0, 1, 1, 1, 1, 2, 3]))):
        if not isinstance(doc, dict | list):
            break
        paths = _paths(doc)
        op = draw(st.sampled_from(MUTATIONS))
        # the typed edits go where they bite: strings get nasty strings, numbers extreme numbers
        typed = {"string": str, "extreme": int | float}.get(op)
        fitting = [p for p in paths if typed is not None and isinstance(_get(doc, p), typed)]
        path = draw(st.sampled_from(fitting or paths))
        if op == "drop" and path:
            doc = _drop(doc, path)
        elif op == "value":
            doc = _set(doc, path, draw(json_values))
        elif op == "extreme":
            doc = _set(doc, path, draw(st.sampled_from(EXTREME_NUMBERS)))
        elif op == "string":
            doc = _set(doc, path, draw(st.sampled_from(NASTY_STRINGS) | st.sampled_from(RAW_STRINGS)))
        elif op == "version" and isinstance(doc, dict):
            key = "v" if versioned else draw(st.sampled_from(["v", "format_version", "version", "type"]))
            doc[key] = draw(st.sampled_from([0, 2, -1, "1", 1.0, True, None, 2**64, Raw("1e400"), [1]]))
        elif op == "unknown" and isinstance(doc, dict):
            doc[draw(st.sampled_from(["zz", "__proto__", "", "\x00"]))] = draw(json_values)
        elif op == "wrap":
            doc = _set(doc, path, [_get(doc, path)] if draw(st.booleans()) else {"x": _get(doc, path)})
        elif op == "duplicate" and isinstance(doc, dict) and doc:
            key = draw(st.sampled_from(sorted(doc)))
            doc = Pairs((*doc.items(), (key, draw(json_values))))
            break
        elif op == "empty" and path:
            doc = _set(doc, path, draw(st.sampled_from([{}, [], "", 0, None])))
    return doc


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        doc = doc[p]
    return doc


def payloads(valid: dict[str, Any], *, versioned: bool = False) -> st.SearchStrategy[bytes]:
    """The three kinds: arbitrary bytes, arbitrary JSON, and mutations of ``valid``."""
    mutants = st.builds(
        lambda doc, how, cut: as_bytes(write(doc), how)[: cut or None],
        mutated(valid, versioned=versioned),
        encodings,
        st.sampled_from([0] * 12 + [1, 7, -1, -2]),
    )
    return st.one_of(st.binary(max_size=600), json_payloads(), mutants, mutants, mutants)


# ---------------------------------------------------------------------------- keys, docs
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
KID = key_id(KEY.public_key())
TRUSTED = {KID: KEY.public_key()}
DEVICE = "box-1"
HEX = blake3(b"piece").hexdigest()
NOW = 1_800_000_000.0


def signed(doc: Any, private: Ed25519PrivateKey, field: str, *, many: bool = False) -> Any:
    """``doc`` with a signature over its canonical form, when it has one (else as it is)."""
    if not isinstance(doc, dict):
        return doc
    body = {k: v for k, v in doc.items() if k not in ("signature", "signatures")}
    try:
        data = canonical_bytes(body, "fuzz")
    except (EdgeError, TypeError):  # NaN, Raw or Pairs inside: cannot be signed; sent unsigned
        return doc
    sig = {
        "alg": "ed25519",
        "key_id": key_id(private.public_key()),
        "value": base64.b64encode(private.sign(data)).decode(),
    }
    return {**body, field: [sig] if many else sig}


def maybe_signed(
    valid: dict[str, Any],
    private: Ed25519PrivateKey,
    field: str,
    *,
    many: bool = False,
    versioned: bool = False,
) -> st.SearchStrategy[bytes]:
    """Mutations of ``valid``, most re-signed so that the checks after the signature run too."""
    resigned = st.builds(
        lambda doc, how: as_bytes(write(signed(doc, private, field, many=many)), how),
        mutated(valid, versioned=versioned),
        encodings,
    )
    return st.one_of(payloads(valid, versioned=versioned), resigned, resigned, resigned)


WIRE_SAMPLES: dict[type[Any], dict[str, Any]] = {
    Status: {
        "v": 1,
        "device_id": DEVICE,
        "state": "online",
        "profile": "jetson-orin",
        "model": "glm",
        "version": "1.2.0",
        "slot": "a",
        "agent_version": "0.9.0",
        "ts": 1700000000.5,
    },
    Heartbeat: {
        "v": 1,
        "device_id": DEVICE,
        "ts": 1700000000.5,
        "model": "glm",
        "version": "1.2.0",
        "seq": 4,
        "health": {
            "latency_p50_ms": 12.5,
            "latency_p95_ms": 40,
            "tokens_per_s": 33.3,
            "error_rate": 0.01,
            "queue_depth": 2,
            "rss_mb": 812.0,
            "requests": 120,
            "errors": 1,
            "smoke_agreement": 1.0,
        },
    },
    Desired: {
        "v": 1,
        "model": "glm",
        "version": "1.2.0",
        "manifest_digest": "blake3:" + HEX,
        "rollout_id": "7",
        "profile": "jetson-orin",
        "issued_at": NOW - 10,
        "device_id": DEVICE,
        "sequence": 6,
        "expires_at": NOW + 3600,
    },
    Report: {
        "v": 1,
        "device_id": DEVICE,
        "rollout_id": "7",
        "step": "downloading",
        "seq": 3,
        "ok": True,
        "reason": "fine",
        "progress": {"bytes_done": 10, "bytes_total": 20, "pieces_done": 1, "pieces_total": 2},
        "version": "1.2.0",
        "ts": 1700000000.5,
    },
    FetchRequest: {
        "v": 1,
        "device_id": DEVICE,
        "request_id": "r1",
        "kind": "pieces",
        "model": "glm",
        "version": "1.2.0",
        "profile": "jetson-orin",
        "have": ["1.1.0"],
        "pieces": [HEX],
        "window": 8,
    },
    InferRequest: {
        "v": 1,
        "messages": [{"role": "user", "content": "hi"}],
        "model": "glm",
        "max_tokens": 16,
        "temperature": 0.7,
        "top_k": 40,
        "top_p": 0.9,
        "repetition_penalty": 1.1,
        "stop": ["\n\n"],
        "seed": 1,
        "stream": False,
        "id": "req-1",
        "reply_to": "sensors/1/reply",
    },
    InferReply: {
        "v": 1,
        "id": "req-1",
        "seq": 0,
        "text": "hello",
        "tokens": [1, 2],
        "done": True,
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "cached_tokens": 0},
        "timings": {"queue_ms": 0.1, "prefill_ms": 1.0, "decode_ms": 2.0, "total_ms": 3.1},
    },
    ErrorBody: {"v": 1, "code": "rate_limited", "message": "rate limited (burst): retry after 2.0 s"},
}


WIRE_PAYLOADS = {cls: payloads(doc, versioned=True) for cls, doc in WIRE_SAMPLES.items()}


def _valid_root(version: int = 1) -> dict[str, Any]:
    body = root_body(
        version,
        root=[KEY.public_key()],
        release=[KEY.public_key()],
        fleet=[OTHER.public_key()],
        expires_at=NOW + 86400,
    )
    return json.loads(sign_root(body, [KEY]))


ROOT_1 = parse_root(json.dumps(_valid_root(1)).encode())
ROOT_2_DOC = _valid_root(2)


def _valid_manifest() -> dict[str, Any]:
    data = b"0123456789" * 3
    tensors = [{"name": "w", "dtype": "float32", "offset": 4, "length": 16}]
    pieces_t = [[blake3(data[0:4]).hexdigest(), 4], [blake3(data[4:12]).hexdigest(), 8]]
    pieces_t += [[blake3(data[12:20]).hexdigest(), 8], [blake3(data[20:28]).hexdigest(), 8]]
    pieces_t += [[blake3(data[28:30]).hexdigest(), 2]]
    doc = {
        "format_version": 1,
        "model": "glm",
        "version": "1.2.0",
        "profile": "jetson-orin",
        "created_at": "2026-01-01T00:00:00+00:00",
        "quality": {"passed": True, "top1_agreement": 0.99},
        "smoke_test": {
            "prompt": "hi",
            "prompt_tokens": [1, 2],
            "expected_tokens": [5],
            "max_new_tokens": 1,
            "reference": [{"ids": [5, 6], "logits": [2.0, 1.0]}],
            "logit_tolerance": 0.5,
            "path_logit_diff": 0.1,
        },
        "files": [
            {
                "path": "model.onnx.data",
                "size": 30,
                "digest": "blake3:" + blake3(data).hexdigest(),
                "layout": "tensors",
                "piece_bytes": 8,
                "tensors": tensors,
                "pieces": pieces_t,
            },
            {
                "path": "tokenizer/tokenizer.json",
                "size": 5,
                "digest": "blake3:" + blake3(b"token").hexdigest(),
                "layout": "cdc",
                "piece_bytes": 1 << 20,
                "pieces": [[blake3(b"token").hexdigest(), 5]],
            },
        ],
    }
    parse_manifest(json.dumps(doc), None)  # the sample itself is valid
    return doc


MANIFEST_DOC = _valid_manifest()


# ---------------------------------------------------------------------- fakes for links
class FakeLink:
    """What InferService and MqttFetcher use of an MQTT link; published messages are kept."""

    connected = True

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    def subscribe(self, topic: str, qos: int, handler: Any) -> None:
        pass

    def publish(self, topic: str, payload: bytes, **_: Any) -> None:
        self.published.append((topic, payload))

    def wait_connected(self, timeout: float) -> bool:
        return True


class BugNet(logging.Handler):
    """Catches a log record with a traceback: a decoder's foreign exception swallowed by a
    process's last-resort handler (the gateway's ``except Exception``) still fails the test."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.caught: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.caught.append(record)


def topics_for(kind: str) -> st.SearchStrategy[str]:
    good = f"edgeglm/v1/dev/{DEVICE}/{kind}"
    return st.one_of(
        st.just(good),
        st.just(good),
        st.just(good),
        st.sampled_from(
            [
                f"edgeglm/v1/dev/other/{kind}",
                f"edgeglm/v1/dev/{DEVICE}/zz",
                f"edgeglm/v1/dev//{kind}",
                f"edgeglm/v1/dev/{DEVICE}/{kind}/x",
                f"edgeglm/v1/dev/{'a' * 65}/{kind}",
                f"edgeglm/v1/dev/\x00/{kind}",
                f"edgeglm/v1/dev/\ud800/{kind}",
                "/" * 9,
                "",
            ]
        ),
        st.text(max_size=80),
    )


# ================================================================================ agent
@pytest.mark.slow  # the file runs about 30 s on one core
def test_fuzz_agent_infer_request() -> None:
    """An inference request on the agent's infer topic, with no model installed yet (every
    request is answered: ``bad_request`` or ``unavailable``), through the service's own handler
    (not ``handle``, whose last-resort ``except`` would hide a foreign exception)."""
    name = "agent.infer_request"
    link = FakeLink()
    service = InferService(None, None, link, Metrics(), device_id=DEVICE)  # type: ignore[arg-type]
    reply_topics = st.one_of(
        st.none(),
        st.just("sensors/1/reply"),
        st.sampled_from(NASTY_STRINGS),
        st.text(max_size=40),
    )

    @_settings(name)
    @given(
        payload=WIRE_PAYLOADS[InferRequest],
        response_topic=reply_topics,
        correlation=st.one_of(st.none(), st.binary(max_size=40)),
        expiry=st.one_of(st.none(), st.integers(0, 2**32)),
    )
    def run(
        payload: bytes, response_topic: str | None, correlation: bytes | None, expiry: int | None
    ) -> None:
        msg = Incoming(
            f"edgeglm/v1/dev/{DEVICE}/infer", payload, response_topic, correlation, expiry, time.monotonic()
        )

        def handle() -> bool:
            service._handle(msg)
            # what the agent answers is itself a valid reply (a pydantic error here fails the test)
            replies = [InferReply.model_validate_json(body) for _, body in link.published]
            link.published.clear()
            # a request that passed validation is answered "unavailable" (no model installed)
            return any(r.error is not None and r.error.code == "unavailable" for r in replies)

        feed(name, handle, (payload, response_topic))

    run()
    _fed_at_least_budget(name)


@pytest.mark.slow
def test_fuzz_agent_desired_state() -> None:
    """A desired state on the device's desired topic, checked against the fleet key."""
    name = "agent.desired_state"
    fleet = Ed25519PrivateKey.from_private_bytes(bytes(range(2, 34)))
    trusted = {key_id(fleet.public_key()): fleet.public_key()}
    valid = json.loads(sign_desired(Desired.model_validate(WIRE_SAMPLES[Desired]), fleet))
    accepted = Accepted(6, desired_digest(json.dumps(valid).encode()))

    @_settings(name)
    @given(
        payload=maybe_signed(valid, fleet, "signature", versioned=True),
        held=st.sampled_from([None, accepted]),
    )
    def run(payload: bytes, held: Accepted | None) -> None:
        def check() -> None:
            d = check_desired(payload, trusted, device_id=DEVICE, accepted=held, now=NOW)
            desired_digest(payload)  # what the worker keeps of an accepted one
            assert d.device_id == DEVICE

        feed(name, check, payload)

    run()
    _fed_at_least_budget(name)


@pytest.mark.slow
def test_fuzz_agent_root_chain() -> None:
    """The retained root-of-trust chain, walked from the root the box holds (as on_root does)."""
    name = "agent.root_chain"
    whole = payloads({"roots": [_valid_root(1), ROOT_2_DOC]})
    root2 = mutated(ROOT_2_DOC)

    @st.composite
    def chains(draw: st.DrawFn) -> bytes:
        kind = draw(st.integers(0, 3))
        if kind == 0:
            return draw(whole)
        roots = [draw(root2) for _ in range(draw(st.integers(1, 3)))]
        roots = [signed(r, KEY, "signatures", many=True) if draw(st.booleans()) else r for r in roots]
        return as_bytes(write({"roots": [_valid_root(1), *roots]}), draw(encodings))

    @_settings(name)
    @given(payload=chains())
    def run(payload: bytes) -> None:
        feed(name, lambda: advance(ROOT_1, parse_chain(payload)), payload)

    run()
    _fed_at_least_budget(name)


@pytest.mark.slow
def test_fuzz_both_root_document() -> None:
    """One root document: a chain element on the agent, ``POST /trust/roots`` on the hub."""
    name = "both.root_document"

    @_settings(name)
    @given(payload=maybe_signed(ROOT_2_DOC, KEY, "signatures", many=True))
    def run(payload: bytes) -> None:
        feed(name, lambda: parse_root(payload), payload)

    run()
    _fed_at_least_budget(name)


# frames: the header packed by hand, so that any field may hold any value with a valid digest
_HEAD = struct.Struct("<3sBBBBBIIQQQI32s32s")
_U32, _U64 = 2**32 - 1, 2**64 - 1


def pack_frame(fields: dict[str, Any], payload: bytes) -> bytes:
    head = _HEAD.pack(
        fields.get("magic", b"EGF"),
        fields.get("version", 1),
        fields["kind"],
        fields["encoding"],
        fields["width"],
        fields["flags"],
        fields["part"],
        fields["parts"],
        fields["piece_size"],
        fields["encoded_size"],
        fields["offset"],
        fields.get("payload_len", len(payload)),
        fields["piece_id"],
        fields["base_id"],
    )
    digest = blake3(head)
    digest.update(payload)
    return head + digest.digest() + payload


PIECE_DATA = bytes(range(256)) * 4
PIECE_ID = blake3(PIECE_DATA).digest()
BASE_ID = blake3(b"base").digest()
MANIFEST_RAW = json.dumps(signed(MANIFEST_DOC, KEY, "signature")).encode()
MANIFEST_ID = blake3(MANIFEST_RAW).digest()


@st.composite
def frame_payloads(draw: st.DrawFn) -> tuple[str, bytes]:
    """(which request it answers, the packed frame): valid frames with one field changed,
    random headers with a good digest, ERROR frames with mutated bodies, and plain bytes."""
    target = draw(st.sampled_from(["manifest", "pieces"]))
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return target, draw(st.binary(max_size=400))
    zstd = zstandard.ZstdCompressor().compress
    if target == "manifest":
        body, fk, enc, pid = MANIFEST_RAW, 1, 0, MANIFEST_ID
    else:
        enc = draw(st.integers(0, 5))
        body = {0: PIECE_DATA, 1: zstd(PIECE_DATA)}.get(enc, zstd(draw(st.binary(max_size=200))))
        fk, pid = 0, PIECE_ID
    parts = draw(st.integers(1, 3))
    size = len(body)
    cut = [size * i // parts for i in range(parts + 1)]
    part = draw(st.integers(0, parts - 1))
    fields: dict[str, Any] = {
        "kind": fk,
        "encoding": enc,
        "width": 0 if enc in (0, 1) else draw(st.sampled_from([1, 2, 4, 8])),
        "flags": 1 if enc >= 3 else 0,
        "part": part,
        "parts": parts,
        "piece_size": len(PIECE_DATA) if target == "pieces" else size,
        "encoded_size": size,
        "offset": cut[part],
        "piece_id": pid,
        "base_id": BASE_ID if enc >= 3 else bytes(32),
    }
    payload = body[cut[part] : cut[part + 1]]
    if kind == 1:  # an ERROR frame with any body
        error = draw(WIRE_PAYLOADS[ErrorBody])[:512]
        fields |= {"kind": 2, "encoding": 0, "width": 0, "flags": 0, "part": 0, "parts": 1, "offset": 0}
        fields |= {"piece_size": len(error), "encoded_size": len(error)}
        fields["piece_id"] = draw(st.sampled_from([bytes(32), pid, BASE_ID]))
        payload = error
    elif kind >= 2:  # one to three header fields set to anything that fits
        numeric = {
            "version": 255,
            "kind": 255,
            "encoding": 255,
            "width": 255,
            "flags": 255,
            "part": _U32,
            "parts": _U32,
            "piece_size": _U64,
            "encoded_size": _U64,
            "offset": _U64,
        }
        for _ in range(draw(st.integers(0 if kind == 2 else 1, 3))):
            key = draw(st.sampled_from([*numeric, "magic", "piece_id", "base_id", "payload_len", "payload"]))
            if key in numeric:
                high = numeric[key]
                fields[key] = draw(
                    st.one_of(
                        st.integers(0, min(high, 70_000)),
                        st.sampled_from([0, 1, high, high - 1, min(high, 2**31)]),
                    )
                )
            elif key == "magic":
                fields[key] = draw(st.binary(min_size=3, max_size=3))
            elif key in ("piece_id", "base_id"):
                fields[key] = draw(st.sampled_from([bytes(32), PIECE_ID, BASE_ID, MANIFEST_ID, b"\xff" * 32]))
            elif key == "payload_len":
                fields[key] = draw(st.sampled_from([0, 1, _U32, len(payload) + 1]))
            else:
                payload = draw(st.binary(max_size=300))
    return target, pack_frame(fields, payload)


@pytest.mark.slow
def test_fuzz_agent_data_frame() -> None:
    """Data frames answering the agent's fetches: the arrival checks on paho's thread, then the
    download's own handling of each frame that passed (assembly, ERROR bodies, refusals)."""
    name = "agent.data_frame"
    link = FakeLink()
    fetcher = MqttFetcher(link, DEVICE, timeout_s=30)  # type: ignore[arg-type]
    step = PieceStep(
        PIECE_ID.hex(), len(PIECE_DATA), "delta", len(PIECE_DATA), base_id=BASE_ID.hex(), dtype="float32"
    )

    @_settings(name)
    @given(frames=st.lists(frame_payloads(), min_size=1, max_size=4))
    def run(frames: list[tuple[str, bytes]]) -> None:
        from edge_agent.fetch import _Request  # the download's per-request state

        manifest_rid = fetcher._send("manifest", "1.2.0", "glm", "jetson-orin")
        pieces_rid = fetcher._send("pieces", "1.2.0", "glm", "jetson-orin", {step.piece_id: step})
        request = _Request(pieces_rid, {step.piece_id: step}, time.monotonic())
        open_ = {pieces_rid: request}
        from edgeglm.protocol import FrameAssembler, FrameKind

        assembler = FrameAssembler()

        def deliver(target: str, packed: bytes) -> bool:
            rid = manifest_rid if target == "manifest" else pieces_rid
            fetcher._on_data(Incoming(f"edgeglm/v1/dev/{DEVICE}/data", packed, None, rid.encode(), None, 0.0))
            passed = not fetcher._events.empty()  # else dropped on arrival
            while not fetcher._events.empty():
                got, frame = fetcher._events.get_nowait()
                if got == manifest_rid:
                    if frame.kind is FrameKind.ERROR:
                        decode(ErrorBody, frame.payload)
                    elif (whole := assembler.add(frame)) is not None:
                        parse_manifest(whole, TRUSTED)
                elif frame.kind is FrameKind.ERROR and not any(frame.piece_id):
                    fetcher._refused(request, frame, open_, [])
                elif (done := fetcher._take(request, frame)) is not None:
                    _, encoded, base = done
                    base_bytes = PIECE_DATA if base is not None else None
                    decode_piece(encoded.encoding, encoded.width, encoded.payload, step.size, base_bytes)
            return passed

        try:
            for target, packed in frames:
                feed(name, lambda target=target, packed=packed: deliver(target, packed), packed)
        finally:
            fetcher._forget(manifest_rid)
            fetcher._forget(pieces_rid)
            fetcher._paused_until = 0.0
            link.published.clear()

    run()
    _fed_at_least_budget(name)


@pytest.mark.slow
def test_fuzz_agent_piece_payload() -> None:
    """A fetched piece's payload, decoded against its base: every encoding and element width;
    random ones, and real encodings (raw, zstd, byte planes, deltas) with one part changed."""
    name = "agent.piece_payload"
    zc = zstandard.ZstdCompressor()
    bomb = zc.compress(bytes(8 << 20))  # 8 MiB of zeros in a few hundred bytes
    Piece = tuple[int, int, bytes, int, bytes | None]  # encoding, width, payload, size, base

    random_pieces = st.tuples(
        st.integers(-1, 7),
        st.sampled_from([-1, 0, 1, 2, 3, 4, 8, 16]),
        st.one_of(
            st.binary(max_size=300),
            st.binary(max_size=300).map(zc.compress),
            st.just(bomb),
            st.binary(max_size=300).map(lambda b: zc.compress(b)[:-3]),
        ),
        st.one_of(st.integers(0, 4096), st.integers(0, 4096), st.sampled_from([8 << 20, 64 << 20])),
        st.one_of(st.none(), st.binary(max_size=300)),
    )

    @st.composite
    def real_pieces(draw: st.DrawFn) -> Piece:
        data = draw(st.binary(min_size=0, max_size=512))
        base = draw(st.binary(min_size=len(data), max_size=len(data)))
        dtype = draw(st.sampled_from([None, "float16", "float32", "int8", "int4", "int64"]))
        enc = encode_piece(data, dtype=dtype, base=base if draw(st.booleans()) else None)
        piece: list[Any] = [int(enc.encoding), enc.width, enc.payload, len(data), base]
        if draw(st.booleans()):  # one part changed
            i = draw(st.integers(0, 4))
            piece[i] = draw(
                [
                    st.integers(-1, 7),
                    st.sampled_from([0, 1, 2, 3, 4, 8]),
                    st.binary(max_size=300),
                    st.integers(0, 1024),
                    st.one_of(st.none(), st.binary(max_size=600)),
                ][i]
            )
        return tuple(piece)  # type: ignore[return-value]

    @_settings(name)
    @given(piece=st.one_of(random_pieces, real_pieces()))
    def run(piece: Piece) -> None:
        encoding, width, body, size, base = piece
        feed(
            name,
            lambda: decode_piece(encoding, width, body, size, base),
            (encoding, width, body[:40], size, base and base[:40]),
        )

    run()
    _fed_at_least_budget(name)


@pytest.mark.slow
def test_fuzz_both_manifest() -> None:
    """A manifest: fetched by the agent, ``POST /uploads`` on the hub (trusted keys), and read
    back unchecked by the hub (``trusted=None``)."""
    name = "both.manifest"

    @_settings(name)
    @given(payload=maybe_signed(MANIFEST_DOC, KEY, "signature"), trusted=st.booleans(), as_text=st.booleans())
    def run(payload: bytes, trusted: bool, as_text: bool) -> None:
        def parse() -> None:
            raw: bytes | str = payload
            if as_text:  # the hub decodes the body as UTF-8 first
                try:
                    raw = payload.decode("utf-8")
                except UnicodeDecodeError:
                    return
            parse_manifest(raw, TRUSTED if trusted else None)

        feed(name, parse, payload)

    run()
    _fed_at_least_budget(name)


# ================================================================================= both
@pytest.mark.slow
def test_fuzz_both_wire_message() -> None:
    """Every JSON wire message, as bytes, str, bytearray and memoryview."""
    name = "both.wire_message"
    classes = list(WIRE_SAMPLES)

    @st.composite
    def messages(draw: st.DrawFn) -> tuple[type[Any], Any]:
        cls = draw(st.sampled_from(classes))
        payload = draw(WIRE_PAYLOADS[cls])
        form = draw(st.sampled_from(["bytes"] * 6 + ["str", "bytearray", "memoryview"]))
        if form == "str":
            return cls, payload.decode("utf-8", "surrogateescape")
        if form == "bytearray":
            return cls, bytearray(payload)
        if form == "memoryview":
            return cls, memoryview(payload)
        return cls, payload

    @_settings(name)
    @given(sample=messages())
    def run(sample: tuple[type[Any], Any]) -> None:
        cls, payload = sample
        feed(name, lambda: decode(cls, payload), sample)

    run()
    _fed_at_least_budget(name)


@pytest.mark.slow
def test_fuzz_both_topic() -> None:
    """Topics a message arrives on (the hub takes the device from it) and reply topics."""
    name = "both.topic"

    @_settings(name)
    @given(topic=st.one_of(topics_for("status"), topics_for("fetch"), st.sampled_from(NASTY_STRINGS)))
    def run(topic: str) -> None:
        feed(name, lambda: parse_device_topic(topic), topic)
        feed(name, lambda: check_reply_topic(topic), topic)

    run()
    _fed_at_least_budget(name)


# ================================================================================== hub
@pytest.mark.slow
def test_fuzz_hub_ingest() -> None:
    """Status, heartbeats and reports as the hub takes them off the broker."""
    name = "hub.ingest"
    ingest = Ingest(None, HubMetrics(), max_queue=64)  # type: ignore[arg-type]  # on_message only queues

    @st.composite
    def messages(draw: st.DrawFn) -> tuple[str, bytes]:
        kind, cls = draw(
            st.sampled_from(
                [("status", Status), ("hb", Heartbeat), ("report", Report), ("fetch", FetchRequest)]
            )
        )
        return draw(topics_for(kind)), draw(WIRE_PAYLOADS[cls])

    @_settings(name)
    @given(msg=messages())
    def run(msg: tuple[str, bytes]) -> None:
        topic, payload = msg

        def take() -> bool:
            ingest.on_message(Incoming(topic, payload, None, None, None, 0.0))
            queued = not ingest._queue.empty()  # else dropped as malformed
            while not ingest._queue.empty():
                ingest._queue.get_nowait()
            return queued

        feed(name, take, msg)

    run()
    _fed_at_least_budget(name)


@pytest.fixture(scope="module")
def hub_db(tmp_path_factory: pytest.TempPathFactory) -> Database:
    url = f"sqlite:///{tmp_path_factory.mktemp('hub') / 'hub.db'}"
    migrate(url)
    return Database(make_engine(url), url)


@pytest.mark.slow
def test_fuzz_hub_fetch_request(hub_db: Database, tmp_path: Path) -> None:
    """Fetch requests on a device's fetch topic, answered by a gateway on a real (SQLite) hub
    database; also the answer to a rate-limited request, which decodes it for its id."""
    name = "hub.fetch_request"
    sent: list[tuple[str, bytes, bytes]] = []
    metrics = HubMetrics()
    encoder = PieceEncoder(hub_db, PieceStore(tmp_path / "pieces"), metrics)
    gateway = Gateway(hub_db, encoder, lambda *a: sent.append(a), metrics, workers=1)
    net = BugNet()
    logging.getLogger("cloud_hub.gateway").addHandler(net)

    @_settings(name)
    @given(topic=topics_for("fetch"), payload=WIRE_PAYLOADS[FetchRequest])
    def run(topic: str, payload: bytes) -> None:
        msg = Incoming(topic, payload, None, None, None, 0.0)

        def limited() -> bool:
            gateway._rate_limited(DEVICE, msg, Refusal(1.5, True, "burst"))
            return bool(sent)  # answered rate_limited, else dropped

        feed(name, lambda: gateway.on_fetch(msg) > 0, (topic, payload))  # 0 bytes sent: dropped
        sent.clear()
        feed(name, limited, (topic, payload))
        assert not net.caught, (
            f"the gateway's last resort caught {net.caught[0].getMessage()} on {_show(payload)}"
        )
        sent.clear()

    try:
        run()
    finally:
        logging.getLogger("cloud_hub.gateway").removeHandler(net)
        gateway.close()
    _fed_at_least_budget(name)


HUB_BODIES: dict[type[pydantic.BaseModel], dict[str, Any]] = {
    PinBody: {"version": "1.2.0"},
    LabelsBody: {"set": {"site": "plant-7", "line": "3"}, "remove": ["old"]},
    TokenBody: {"name": "ci@example", "role": "operator"},
    DeployBody: {
        "release": "glm@1.2.0",
        "dry_run": True,
        "selector": {"site": "plant-7"},
        "waves": ["5", "25%", "3n", "100"],
        "soak_s": 60,
        "success_threshold": 1.0,
        "max_failure_ratio": 0.05,
        "gates": ["p95_ratio<=1.2", "smoke_agreement>=0.9"],
        "device_timeout_s": 900,
        "on_failure": "pause",
        "min_samples": 3,
    },
    RollbackBody: {"model": "glm", "selector": {"site": "plant-7"}},
}


HUB_PAYLOADS = {model: payloads(doc) for model, doc in HUB_BODIES.items()}


def fastapi_body(model: type[pydantic.BaseModel], raw: bytes) -> None:
    """A body as FastAPI takes it (``await request.json()``, then the model in Python mode),
    then what the route does with it before touching the database."""
    body = model.model_validate(json.loads(raw), from_attributes=True)
    if isinstance(body, DeployBody):
        name, _, version = body.release.partition("@")
        params = RolloutParams.model_validate(body.model_dump(exclude={"release", "dry_run"}))
        DeploySpec(model=name, version=version, params=params)
    elif isinstance(body, LabelsBody):
        parse_selector(f"{k}={v}" for k, v in body.set.items())
    elif isinstance(body, RollbackBody):
        parse_selector(f"{k}={v}" for k, v in body.selector.items())


@pytest.mark.slow
def test_fuzz_hub_http_body() -> None:
    """The hub's JSON request bodies; FastAPI's own refusals (invalid JSON, a validation error:
    400 / 422) count as typed refusals, anything past them would be a 500."""
    name = "hub.http_body"
    models = list(HUB_BODIES)

    @st.composite
    def bodies(draw: st.DrawFn) -> tuple[type[pydantic.BaseModel], bytes]:
        model = draw(st.sampled_from(models))
        return model, draw(HUB_PAYLOADS[model])

    @_settings(name)
    @given(sample=bodies())
    def run(sample: tuple[type[pydantic.BaseModel], bytes]) -> None:
        model, raw = sample
        feed(
            name,
            lambda: fastapi_body(model, raw),
            sample,
            also=(pydantic.ValidationError, ValueError, RecursionError),
        )

    run()
    _fed_at_least_budget(name)


@pytest.mark.slow
def test_fuzz_hub_selector() -> None:
    """``GET /devices?selector=...`` as the route splits it."""
    name = "hub.selector"
    pair = st.one_of(
        st.text(max_size=20), st.sampled_from(NASTY_STRINGS), st.just("site=plant-7"), st.just("a=b=c")
    )

    @_settings(name)
    @given(selector=st.one_of(st.text(max_size=200), st.lists(pair, max_size=6).map(",".join)))
    def run(selector: str) -> None:
        feed(name, lambda: parse_selector(p for p in selector.split(",") if p), selector)

    run()
    _fed_at_least_budget(name)


PATH_PATTERNS = {  # as FastAPI checks a path parameter: pydantic's pattern constraint
    kind: pydantic.TypeAdapter(Annotated[str, pydantic.StringConstraints(pattern=f"^{pattern}$")])
    for kind, pattern in (
        ("name", contracts.NAME_PATTERN),
        ("version", contracts.SEMVER_PATTERN),
        ("piece", contracts.PIECE_ID_PATTERN),
    )
}


@pytest.mark.slow
def test_fuzz_hub_path_param() -> None:
    """Path parameters as the hub checks them (device and model names, versions, piece ids):
    FastAPI matches the contracts' patterns; what passes is one the contracts accept."""
    name = "hub.path_param"

    @_settings(name)
    @given(
        kind=st.sampled_from(sorted(PATH_PATTERNS)),
        value=st.one_of(st.text(max_size=80), st.sampled_from(NASTY_STRINGS)),
    )
    def run(kind: str, value: str) -> None:
        def check() -> bool:
            try:
                PATH_PATTERNS[kind].validate_python(value)
            except pydantic.ValidationError:
                return False  # FastAPI answers 422
            if kind == "name":
                assert contracts.name_problem(value) is None, value
            elif kind == "version":
                assert contracts.version_problem(value) is None, value
                contracts.semver_key(value)
            return True

        feed(name, check, (kind, value))

    run()
    _fed_at_least_budget(name)


def test_budgets_cover_every_decoder_and_reach_the_floor() -> None:
    """The table above is the list of decoders; its budgets add up to the issue's 10,000."""
    tests = {n for n in globals() if n.startswith("test_fuzz_")}
    assert tests == {"test_fuzz_" + name.replace(".", "_") for name in BUDGET}
    assert sum(BUDGET.values()) >= TOTAL_FLOOR, sum(BUDGET.values())


# ------------------------------------------------------------- what this fuzz found, kept
def test_found_a_refused_request_with_a_lone_surrogate_id_is_answered() -> None:
    """A bad request whose ``id`` is the JSON escape of a lone surrogate: the agent salvaged that
    id for its error reply, and encoding the reply raised PydanticSerializationError."""
    link = FakeLink()
    service = InferService(None, None, link, Metrics(), device_id=DEVICE)  # type: ignore[arg-type]
    payload = b'{"v":1,"id":"\\ud800","reply_to":"sensors/1/reply"}'
    service._handle(Incoming(f"edgeglm/v1/dev/{DEVICE}/infer", payload, None, None, None, 0.0))
    [(topic, body)] = link.published
    reply = decode(InferReply, body)
    assert topic == "sensors/1/reply" and reply.id is None and reply.error is not None
    assert reply.error.code == "bad_request"


@pytest.mark.parametrize(
    "raw",
    [
        # a validator's message quoting the key id made pydantic raise UnicodeEncodeError
        write({**ROOT_2_DOC, "fleet": [Raw('"\\ud800"')]}).encode(),
        json.dumps(ROOT_2_DOC).replace('"edgeglm-root"', '"edgeglm-root\\udfff"').encode(),
    ],
    ids=["surrogate-key-id", "surrogate-type"],
)
def test_found_a_root_with_a_lone_surrogate_is_an_integrity_error(raw: bytes) -> None:
    with pytest.raises(EdgeError, match="not valid Unicode"):
        parse_root(raw)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32", "utf-8-sig"])
def test_found_a_signed_root_in_another_encoding_is_refused(encoding: str) -> None:
    """json.loads(bytes) reads UTF-16, UTF-32 and a BOM: such a root passed every check, then
    the hub's ``raw.decode()`` (POST /trust/roots) failed, or stored a BOM it could not read back."""
    text = json.dumps(ROOT_2_DOC)
    parse_root(text.encode())  # the same document in UTF-8 is fine
    with pytest.raises(EdgeError, match="UTF-8"):
        parse_root(text.encode(encoding))


@pytest.mark.parametrize(
    ("kind", "cls", "field"),
    [("status", Status, "agent_version"), ("report", Report, "reason")],
)
def test_found_a_nul_in_a_stored_text_field_is_dropped_at_ingest(
    kind: str, cls: type[Any], field: str
) -> None:
    """``agent_version`` and ``reason`` take any text; a NUL in one passed decoding, then PostgreSQL
    refused the batch (``DataError: text fields cannot contain NUL``), which ingest put back and
    retried at every turn: one status message stopped every device's registration and heartbeats."""
    metrics = HubMetrics()
    ingest = Ingest(None, metrics)  # type: ignore[arg-type]  # on_message only queues
    payload = json.dumps({**WIRE_SAMPLES[cls], field: "0.9\x00"}).encode()
    decode(cls, payload)  # the wire contract itself takes it
    ingest.on_message(Incoming(f"edgeglm/v1/dev/{DEVICE}/{kind}", payload, None, None, None, 0.0))
    assert ingest._queue.empty()
    assert "malformed" in metrics.render()
