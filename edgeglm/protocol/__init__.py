"""What goes over the wire: every MQTT topic, message and data frame of EdgeGLM (PRODUCT.md §6).

The protocol has one module per part, all re-exported here (``from edgeglm.protocol import X``):

    topics      topic names, how each is published (``TOPIC_SPECS``), and the checks on them
    message     ``Message``, the base of every JSON message: field bounds, ``decode``, ``encode``
    control     the control plane: Status, Heartbeat, Desired, Report and FetchRequest
    inference   the inference API: InferRequest (with its sampling parameters) and InferReply
    error_body  ErrorBody, why a request failed: in an InferReply or in an ERROR frame
    frames      the binary data Frame, split_payload, error_frame and FrameAssembler

Topics (``{id}`` a device id, ``{site}`` a site name, both ``[A-Za-z0-9][A-Za-z0-9._-]{0,63}``;
at most 7 slashes per topic, the limit of cloud IoT brokers):

    topic                          direction        QoS retain payload
    edgeglm/v1/dev/{id}/status     agent -> hub     1   yes    Status (also the LWT, state=offline)
    edgeglm/v1/dev/{id}/hb         agent -> hub     0   no     Heartbeat
    edgeglm/v1/dev/{id}/desired    hub -> agent     1   yes    Desired
    edgeglm/v1/dev/{id}/report     agent -> hub     1   no     Report
    edgeglm/v1/dev/{id}/fetch      agent -> hub     1   no     FetchRequest (replicas: $share/hub/...)
    edgeglm/v1/dev/{id}/data       hub -> agent     1   no     Frame (binary); correlation = request_id
    edgeglm/v1/dev/{id}/infer      sensor -> agent  1   no     InferRequest
    edgeglm/v1/site/{site}/infer   sensor -> agents 1   no     InferRequest (agents: $share/agents/...)
    edgeglm/v1/fleet/root          hub -> agents    1   yes    the root-of-trust chain (edgeglm.trust_root)

The hub takes the asking device from the fetch topic (a body naming another device is dropped)
and answers only releases it targeted at that device, for its profile (else ERROR ``forbidden``),
within a per-device rate (else ERROR ``rate_limited``, once per burst, then silence).

An InferReply goes to the request's MQTT 5 response topic with its correlation data (MQTT 3.1.1
clients put ``reply_to`` and ``id`` in the request instead). ``TOPIC_SPECS`` holds QoS and retain.

JSON messages are pydantic models with a protocol version ``v``; unknown fields are ignored, every
string and list is bounded and each class has a ``MAX_BYTES``. :func:`decode` turns *any* input into
a message or a :class:`~edgeglm.errors.ProtocolError`; :func:`encode` writes compact UTF-8 JSON.

Data messages are binary :class:`Frame` s: a 140-byte little-endian header, then the payload:

    offset size field
    0      3    magic b"EGF"
    3      1    format version (1)
    4      1    kind           FrameKind
    5      1    encoding       PieceEncoding
    6      1    element_width  0, or 1/2/4/8 for byte-plane encodings
    7      1    flags          bit 0: base_id present; other bits 0
    8      4    part           u32, < parts
    12     4    parts          u32, >= 1
    16     8    piece_size     u64, decoded size of the whole piece
    24     8    encoded_size   u64, size of the whole encoded payload stream
    32     8    offset         u64, where this part's payload starts in that stream
    40     4    payload_len    u32, == len(payload)
    44     32   piece_id       BLAKE3-256 of the decoded piece (or manifest)
    76     32   base_id        BLAKE3-256 of the delta base; zeros when absent
    108    32   digest         BLAKE3-256 of header bytes 0..108 + payload: any flipped bit is caught
    140    ...  payload
"""

from __future__ import annotations

from edgeglm.protocol.control import (
    UPDATE_FAILED,
    UPDATE_SUCCEEDED,
    Desired,
    FetchRequest,
    Health,
    Heartbeat,
    Progress,
    Report,
    Status,
)
from edgeglm.protocol.error_body import ErrorBody, ErrorCode
from edgeglm.protocol.frames import (
    DELTA_ENCODINGS,
    FRAME_HEADER_SIZE,
    MAX_PIECE_SIZE,
    Frame,
    FrameAssembler,
    FrameKind,
    PieceEncoding,
    error_frame,
    max_encoded_size,
    split_payload,
)
from edgeglm.protocol.inference import (
    ChatMessage,
    FunctionCall,
    FunctionSpec,
    InferReply,
    InferRequest,
    JsonSchemaSpec,
    NamedToolChoice,
    ResponseFormat,
    Timings,
    TokenLogprob,
    ToolCall,
    ToolSpec,
    TopLogprob,
    Usage,
)
from edgeglm.protocol.message import DEFAULT_MAX_MESSAGE_BYTES, PROTOCOL_VERSION, Message, decode, encode
from edgeglm.protocol.topics import (
    MAX_TOPIC_SLASHES,
    PREFIX,
    TOPIC_SPECS,
    TopicKind,
    TopicSpec,
    check_device_id,
    check_reply_topic,
    check_site,
    check_topic,
    data_topic,
    desired_topic,
    device_filter,
    fetch_topic,
    heartbeat_topic,
    hub_subscriptions,
    infer_topic,
    parse_device_topic,
    report_topic,
    root_topic,
    shared,
    site_infer_topic,
    status_topic,
)

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DELTA_ENCODINGS",
    "FRAME_HEADER_SIZE",
    "MAX_PIECE_SIZE",
    "MAX_TOPIC_SLASHES",
    "PREFIX",
    "PROTOCOL_VERSION",
    "TOPIC_SPECS",
    "UPDATE_FAILED",
    "UPDATE_SUCCEEDED",
    "ChatMessage",
    "Desired",
    "ErrorBody",
    "ErrorCode",
    "FetchRequest",
    "Frame",
    "FrameAssembler",
    "FrameKind",
    "FunctionCall",
    "FunctionSpec",
    "Health",
    "Heartbeat",
    "InferReply",
    "InferRequest",
    "JsonSchemaSpec",
    "Message",
    "NamedToolChoice",
    "PieceEncoding",
    "Progress",
    "Report",
    "ResponseFormat",
    "Status",
    "Timings",
    "TokenLogprob",
    "ToolCall",
    "ToolSpec",
    "TopLogprob",
    "TopicKind",
    "TopicSpec",
    "Usage",
    "check_device_id",
    "check_reply_topic",
    "check_site",
    "check_topic",
    "data_topic",
    "decode",
    "desired_topic",
    "device_filter",
    "encode",
    "error_frame",
    "fetch_topic",
    "heartbeat_topic",
    "hub_subscriptions",
    "infer_topic",
    "max_encoded_size",
    "parse_device_topic",
    "report_topic",
    "root_topic",
    "shared",
    "site_infer_topic",
    "split_payload",
    "status_topic",
]
