"""Topic names: the per-device and hub topics, how each is published, and the checks on them.

The table of topics is in the package docstring (:mod:`edgeglm.protocol`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

from edgeglm.contracts import NAME_PATTERN
from edgeglm.errors import ProtocolError

__all__ = [
    "MAX_TOPIC_SLASHES",
    "PREFIX",
    "TOPIC_SPECS",
    "TopicKind",
    "TopicSpec",
    "check_device_id",
    "check_reply_topic",
    "check_site",
    "check_topic",
    "data_topic",
    "desired_topic",
    "device_filter",
    "fetch_topic",
    "heartbeat_topic",
    "hub_subscriptions",
    "infer_topic",
    "parse_device_topic",
    "report_topic",
    "root_topic",
    "shared",
    "site_infer_topic",
    "status_topic",
]

PREFIX = "edgeglm/v1"
MAX_TOPIC_SLASHES = 7
_MAX_TOPIC_BYTES = 65535  # MQTT's own limit on a topic name
_NAME = NAME_PATTERN
_NAME_RE = re.compile(_NAME)


class TopicKind(StrEnum):
    """The last level of a device topic: ``edgeglm/v1/dev/{id}/{kind}``."""

    STATUS = "status"
    HEARTBEAT = "hb"
    DESIRED = "desired"
    REPORT = "report"
    DATA = "data"
    INFER = "infer"
    FETCH = "fetch"


@dataclass(frozen=True)
class TopicSpec:
    """How a kind of message is published, so that no caller hard-codes it."""

    qos: int
    retain: bool
    content_type: str = "application/json"


TOPIC_SPECS: Mapping[TopicKind, TopicSpec] = MappingProxyType(
    {
        TopicKind.STATUS: TopicSpec(qos=1, retain=True),
        TopicKind.HEARTBEAT: TopicSpec(qos=0, retain=False),
        TopicKind.DESIRED: TopicSpec(qos=1, retain=True),
        TopicKind.REPORT: TopicSpec(qos=1, retain=False),
        TopicKind.DATA: TopicSpec(qos=1, retain=False, content_type="application/vnd.edgeglm.frame"),
        TopicKind.INFER: TopicSpec(qos=1, retain=False),
        TopicKind.FETCH: TopicSpec(qos=1, retain=False),
    }
)
_DEVICE_KINDS = frozenset(TopicKind)


def _clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_device_id(value: object, what: str = "device id") -> str:
    """Return ``value`` if it is a valid device id (also used for site and group names)."""
    if not isinstance(value, str) or _NAME_RE.fullmatch(value) is None:
        raise ProtocolError(what, f"{_clip(repr(value), 80)} must match {_NAME}")
    return value


def check_site(value: object) -> str:
    """Return ``value`` if it is a valid site name."""
    return check_device_id(value, "site name")


def check_topic(topic: object, *, max_slashes: int | None = MAX_TOPIC_SLASHES) -> str:
    """Return ``topic`` if a client may publish to it: no wildcards, no NUL, not ``$...``."""
    if not isinstance(topic, str) or not topic:
        raise ProtocolError("topic", "must be a non-empty string")
    if any(c in topic for c in "+#\0"):
        raise ProtocolError("topic", f"{_clip(repr(topic))} contains a wildcard or NUL")
    if topic.startswith("$"):
        raise ProtocolError("topic", f"{_clip(repr(topic))} is reserved for the broker")
    try:
        size = len(topic.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise ProtocolError("topic", "is not valid UTF-8") from exc
    if size > _MAX_TOPIC_BYTES:
        raise ProtocolError("topic", f"is {size} bytes, the limit is {_MAX_TOPIC_BYTES}")
    if max_slashes is not None and topic.count("/") > max_slashes:
        raise ProtocolError("topic", f"{_clip(repr(topic))} has more than {max_slashes} slashes")
    return topic


def check_reply_topic(topic: object) -> str:
    """Return ``topic`` if the agent may publish an inference reply to it.

    Applies to the MQTT 5 response topic and to ``InferRequest.reply_to``. Our own namespace is
    refused so that a sensor cannot make an agent publish into the hub's topics.
    """
    topic = check_topic(topic, max_slashes=None)
    if topic == "edgeglm" or topic.startswith("edgeglm/"):
        raise ProtocolError("reply topic", f"{_clip(repr(topic))} is inside the edgeglm/ namespace")
    return topic


def _device_topic(device_id: str, kind: TopicKind) -> str:
    return check_topic(f"{PREFIX}/dev/{check_device_id(device_id)}/{kind}")


def status_topic(device_id: str) -> str:
    return _device_topic(device_id, TopicKind.STATUS)


def heartbeat_topic(device_id: str) -> str:
    return _device_topic(device_id, TopicKind.HEARTBEAT)


def desired_topic(device_id: str) -> str:
    return _device_topic(device_id, TopicKind.DESIRED)


def report_topic(device_id: str) -> str:
    return _device_topic(device_id, TopicKind.REPORT)


def data_topic(device_id: str) -> str:
    return _device_topic(device_id, TopicKind.DATA)


def infer_topic(device_id: str) -> str:
    return _device_topic(device_id, TopicKind.INFER)


def fetch_topic(device_id: str) -> str:
    """Where a device asks the hub for manifests and pieces: its own topic, so that the broker's
    ACL (``%u``) and the hub (which takes the device from the topic, never from the body) agree
    on who asks."""
    return _device_topic(device_id, TopicKind.FETCH)


def site_infer_topic(site: str) -> str:
    """Inference topic shared by a site's agents: subscribe ``shared(..., group="agents")``."""
    return check_topic(f"{PREFIX}/site/{check_site(site)}/infer")


def device_filter(kind: TopicKind) -> str:
    """Wildcard filter matching ``kind`` for every device, e.g. ``edgeglm/v1/dev/+/status``."""
    if not isinstance(kind, str) or kind not in _DEVICE_KINDS:
        raise ProtocolError("topic kind", f"{_clip(repr(kind), 40)} is not a per-device kind")
    return f"{PREFIX}/dev/+/{kind}"


def shared(topic_filter: str, group: str = "hub") -> str:
    """MQTT 5 shared subscription: ``$share/{group}/{topic_filter}``; replicas split the traffic."""
    check_device_id(group, "share group")
    if (
        not isinstance(topic_filter, str)
        or not topic_filter
        or "\0" in topic_filter
        or topic_filter.startswith("$")
    ):
        raise ProtocolError("topic filter", f"{_clip(repr(topic_filter))} cannot be shared")
    if topic_filter.count("/") > MAX_TOPIC_SLASHES:
        raise ProtocolError("topic filter", f"has more than {MAX_TOPIC_SLASHES} slashes")
    return f"$share/{group}/{topic_filter}"


def hub_subscriptions(group: str = "hub") -> tuple[tuple[str, int], ...]:
    """``(filter, qos)`` for every topic a hub replica consumes, shared between replicas.

    Brokers send no retained messages to shared subscriptions: the hub learns state from the
    database, heartbeats and reports, never from a retained status alone.
    """
    kinds = (TopicKind.STATUS, TopicKind.HEARTBEAT, TopicKind.REPORT, TopicKind.FETCH)
    return tuple((shared(device_filter(k), group), TOPIC_SPECS[k].qos) for k in kinds)


def parse_device_topic(topic: object) -> tuple[str, TopicKind]:
    """``edgeglm/v1/dev/{id}/{kind}`` -> ``(id, kind)``; anything else is a ProtocolError."""
    if not isinstance(topic, str) or topic.count("/") > MAX_TOPIC_SLASHES:
        raise ProtocolError("topic", f"{_clip(repr(topic))} is not a device topic")
    levels = topic.split("/")
    if len(levels) != 5 or "/".join(levels[:3]) != f"{PREFIX}/dev":
        raise ProtocolError("topic", f"{_clip(repr(topic))} is not a device topic")
    device_id = check_device_id(levels[3])
    if levels[4] not in {k.value for k in _DEVICE_KINDS}:
        raise ProtocolError("topic", f"unknown device topic kind {_clip(repr(levels[4]), 40)}")
    return device_id, TopicKind(levels[4])


def root_topic() -> str:
    """The fleet's root-of-trust chain (:mod:`edgeglm.trust_root`): the hub publishes it retained
    (QoS 1); every device reads it."""
    return f"{PREFIX}/fleet/root"
