"""Why a request failed: the body of a failed :class:`~edgeglm.protocol.inference.InferReply` and
the payload of an ERROR :class:`~edgeglm.protocol.frames.Frame`.
"""

from __future__ import annotations

from typing import Literal

from edgeglm.protocol.message import Message, _Reason

__all__ = [
    "ErrorBody",
    "ErrorCode",
]

ErrorCode = Literal[
    "bad_request",
    "busy",
    "too_long",
    "unknown_model",
    "not_found",
    "unavailable",
    "internal",
    "timeout",
    "forbidden",  # a fetch of a release (or profile) the hub has not targeted at the device
    "rate_limited",  # a device over its fetch rate; the message says how long to wait
]


class ErrorBody(Message):
    """Why a request failed; in :class:`InferReply` and as the payload of an ERROR frame."""

    code: ErrorCode
    message: _Reason
