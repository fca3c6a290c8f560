"""Names and versions, defined once: what every part (export, wire, hub, agent, CLI) accepts.

    Name      model, profile, device and site names: 1-64 of ``A-Z a-z 0-9 . _ -``, starting
              with a letter or digit (a topic level, a DB column, a folder name)
    SemVer    a semantic version (semver.org 2.0.0) of at most 64 characters, each of MAJOR,
              MINOR and PATCH at most 9 digits (the hub stores them as 32-bit integers)
    Digest    ``blake3:`` and 64 lowercase hex digits: a manifest's or a file's digest
    PieceId   64 lowercase hex digits: a piece's BLAKE3-256 (what the piece store files it under)
    RolloutId a rollout's number, 1 to 2**31-1 (the hub's 32-bit key); an ``int`` in Python, the
              decimal string ``"42"`` in a wire message's JSON (what agents have always sent)
    LABEL_KEY_PATTERN / LABEL_VALUE_PATTERN   a device label and a fleet selector's ``key=value``
    TOKEN_NAME_PATTERN      an API token's name (the actor the audit log records): 1-128 of
                            ``A-Z a-z 0-9 . _ @ -``, starting with a letter or digit
    PiecesUrl ``http(s)://HOST[:PORT][/PATH]`` of at most 256 characters, no query, no fragment,
              no credentials: where a box fetches piece bytes over HTTP (the hub, or a proxy or
              CDN in front of it); the hub's ``--pieces-url`` and the desired state's
              ``pieces_url``

A value one part cannot carry is refused where it enters the system (``edgectl export``, publish,
deploy, a pin, a wire message) with the same one-line reason, :func:`name_problem` /
:func:`version_problem`; pydantic models use the annotated types :data:`Name` and :data:`SemVer`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, Strict, StringConstraints

__all__ = [
    "DIGEST_PATTERN",
    "KEY_ID_PATTERN",
    "LABEL_KEY_PATTERN",
    "LABEL_VALUE_PATTERN",
    "NAME_MAX",
    "NAME_PATTERN",
    "PIECES_URL_MAX",
    "PIECES_URL_PATTERN",
    "PIECE_ID_PATTERN",
    "ROLLOUT_ID_MAX",
    "SEMVER_MAX",
    "SEMVER_PATTERN",
    "TOKEN_NAME_PATTERN",
    "Digest",
    "Name",
    "PieceId",
    "PiecesUrl",
    "RolloutId",
    "SemVer",
    "Signature",
    "name_problem",
    "semver_key",
    "version_problem",
]

NAME_MAX = 64
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
SEMVER_MAX = 64
_NUM = r"(?:0|[1-9][0-9]{0,8})"
_IDS = r"[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*"  # dot-separated identifiers, none empty
SEMVER_PATTERN = rf"({_NUM})\.({_NUM})\.({_NUM})(?:-({_IDS}))?(?:\+{_IDS})?"

DIGEST_PATTERN = r"blake3:[0-9a-f]{64}"
PIECE_ID_PATTERN = r"[0-9a-f]{64}"
ROLLOUT_ID_MAX = 2**31 - 1
LABEL_KEY_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}"
LABEL_VALUE_PATTERN = r"[A-Za-z0-9._-]{0,63}"
TOKEN_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}"
PIECES_URL_MAX = 256
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST = rf"(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9A-Fa-f:.]{{2,45}}\])"
_PORT = r"(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})"  # 1-65535
PIECES_URL_PATTERN = rf"https?://{_HOST}(?::{_PORT})?(?:/[A-Za-z0-9._~%/-]*)?"

_NAME_RE = re.compile(NAME_PATTERN)
_SEMVER_RE = re.compile(SEMVER_PATTERN)
_DECIMAL_RE = re.compile(r"[0-9]{1,19}")

Name = Annotated[str, StringConstraints(strict=True, pattern=f"^{NAME_PATTERN}$")]
SemVer = Annotated[str, StringConstraints(strict=True, max_length=SEMVER_MAX, pattern=f"^{SEMVER_PATTERN}$")]
Digest = Annotated[str, StringConstraints(strict=True, pattern=f"^{DIGEST_PATTERN}$")]
PieceId = Annotated[str, StringConstraints(strict=True, pattern=f"^{PIECE_ID_PATTERN}$")]
PiecesUrl = Annotated[
    str, StringConstraints(strict=True, max_length=PIECES_URL_MAX, pattern=f"^{PIECES_URL_PATTERN}$")
]


def _rollout_id_in(value: Any) -> Any:
    """The wire's decimal string to its number; anything else goes on to the strict int check."""
    if isinstance(value, str) and _DECIMAL_RE.fullmatch(value):
        return int(value)
    return value


RolloutId = Annotated[
    int,
    BeforeValidator(_rollout_id_in),
    Strict(),
    Field(ge=1, le=ROLLOUT_ID_MAX),
    PlainSerializer(str, return_type=str, when_used="json"),
]


def _clip(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def name_problem(value: object) -> str | None:
    """Why ``value`` is not a :data:`Name`, or None when it is one."""
    if not isinstance(value, str):
        return f"{_clip(value)} is not a string"
    if len(value) > NAME_MAX:
        return f"{_clip(value)} is {len(value)} characters; a name has at most {NAME_MAX}"
    if _NAME_RE.fullmatch(value) is None:
        return f"{_clip(value)}: use letters, digits, '.', '_' and '-', starting with a letter or digit"
    return None


def version_problem(value: object) -> str | None:
    """Why ``value`` is not a :data:`SemVer`, or None when it is one."""
    if not isinstance(value, str):
        return f"{_clip(value)} is not a string"
    if len(value) > SEMVER_MAX:
        return f"{_clip(value)} is {len(value)} characters; a version has at most {SEMVER_MAX}"
    if _SEMVER_RE.fullmatch(value) is None:
        return (
            f"{_clip(value)} is not a semantic version like 1.4.0 or 1.4.0-rc.1"
            " (MAJOR.MINOR.PATCH of at most 9 digits each, no empty pre-release part)"
        )
    return None


def semver_key(version: str) -> tuple[int, int, int, str]:
    """(major, minor, patch, pre-release) of a valid version; ValueError on an invalid one."""
    problem = version_problem(version)
    if problem is not None:
        raise ValueError(problem)
    m = _SEMVER_RE.fullmatch(version)
    assert m is not None
    return int(m[1]), int(m[2]), int(m[3]), m[4] or ""


KEY_ID_PATTERN = r"^[0-9a-f]{16}$"  # edgeglm.keys.key_id: the start of the public key's BLAKE3


class Signature(BaseModel):
    """An Ed25519 signature over a document's canonical form, and the id of the key that made it
    (a bundle's manifest: the release key; a device's desired state: the hub's fleet key)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    alg: Literal["ed25519"] = "ed25519"
    key_id: str = Field(pattern=KEY_ID_PATTERN)
    value: str = Field(max_length=128)
