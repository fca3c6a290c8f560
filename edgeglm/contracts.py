"""Names and versions, defined once: what every part (export, wire, hub, agent, CLI) accepts.

    Name      model, profile, device and site names: 1-64 of ``A-Z a-z 0-9 . _ -``, starting
              with a letter or digit (a topic level, a DB column, a folder name)
    SemVer    a semantic version (semver.org 2.0.0) of at most 64 characters, each of MAJOR,
              MINOR and PATCH at most 9 digits (the hub stores them as 32-bit integers)

A value one part cannot carry is refused where it enters the system (``edgectl export``, publish,
deploy, a pin, a wire message) with the same one-line reason, :func:`name_problem` /
:func:`version_problem`; pydantic models use the annotated types :data:`Name` and :data:`SemVer`.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import StringConstraints

__all__ = [
    "NAME_MAX",
    "NAME_PATTERN",
    "SEMVER_MAX",
    "SEMVER_PATTERN",
    "Name",
    "SemVer",
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

_NAME_RE = re.compile(NAME_PATTERN)
_SEMVER_RE = re.compile(SEMVER_PATTERN)

Name = Annotated[str, StringConstraints(strict=True, pattern=f"^{NAME_PATTERN}$")]
SemVer = Annotated[str, StringConstraints(strict=True, max_length=SEMVER_MAX, pattern=f"^{SEMVER_PATTERN}$")]


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
