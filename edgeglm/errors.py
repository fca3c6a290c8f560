"""The one exception tree of EdgeGLM.

Every expected failure is an :class:`EdgeError`. Each class carries an exit code (used by the
CLI, see PRODUCT.md section 9) and each instance a one-line ``hint`` saying what to do next.
Foreign library errors are mapped to the most specific class here at the seam that calls the
library, and re-raised with ``raise ... from exc``.

    EdgeError                      exit 1   anything expected that went wrong
    ├── UsageError                 exit 2   a flag or argument is wrong
    ├── ConfigError                exit 78  a config file or profile is invalid
    ├── UnavailableError           exit 69  a dependency (broker, DB, binary, GPU) is not there
    ├── NotFoundError              exit 1   a model, release, device, key or piece does not exist
    ├── ConflictError              exit 1   the request conflicts with current state
    ├── AccessError                exit 1   no valid credentials (HTTP 401)
    │   └── PermissionDenied                valid credentials, but the role may not do this (403)
    ├── IntegrityError             exit 1   a digest, signature or size does not match
    │   ├── SignatureError                  an Ed25519 signature does not verify
    │   └── ReplayError                     a signed message older than one already accepted
    ├── ProtocolError              exit 1   a wire message is malformed (never crashes a process)
    ├── RequestError               exit 1   an inference request is refused (``code``: busy, too_long, ...)
    ├── UpdateError                exit 1   an update step failed on a device
    └── ExportError                exit 1   an export could not produce a valid bundle
        ├── UnsupportedModel                the checkpoint's architecture is not supported
        └── ToleranceExceeded               the exported graph drifted past the quality gate
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "AccessError",
    "ConfigError",
    "ConflictError",
    "EdgeError",
    "ExportError",
    "IntegrityError",
    "NotFoundError",
    "PermissionDenied",
    "ProtocolError",
    "ReplayError",
    "RequestError",
    "SignatureError",
    "ToleranceExceeded",
    "UnavailableError",
    "UnsupportedModel",
    "UpdateError",
    "UsageError",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 69
EXIT_CONFIG = 78


class EdgeError(Exception):
    """Base of every expected EdgeGLM error.

    ``what`` names the thing that failed, ``why`` says why; ``str(err)`` is ``"what: why"``.
    Extra keyword arguments are kept as attributes so callers can inspect them.
    """

    exit_code: ClassVar[int] = EXIT_FAILED
    default_hint: ClassVar[str] = ""

    def __init__(self, what: str, why: str = "", *, hint: str | None = None, **data: Any) -> None:
        self.what = what
        self.why = why
        self.hint = self.default_hint if hint is None else hint
        self.data = data
        for key, value in data.items():
            setattr(self, key, value)
        super().__init__(f"{what}: {why}" if why else what)


class UsageError(EdgeError):
    exit_code = EXIT_USAGE
    default_hint = "Run the command with --help to see its usage."


class ConfigError(EdgeError):
    exit_code = EXIT_CONFIG
    default_hint = "Fix the file named above; unknown keys are rejected."


class UnavailableError(EdgeError):
    exit_code = EXIT_UNAVAILABLE
    default_hint = "Check that the service named above runs and is reachable, then retry."


class NotFoundError(EdgeError):
    default_hint = "Check the name; the matching list command shows what exists."


class ConflictError(EdgeError):
    default_hint = "See the current state (the matching show or status command); retry if it still applies."


class AccessError(EdgeError):
    default_hint = "Pass a valid API token (--token or EDGEGLM_TOKEN); 'edgectl hub token create' makes one."


class PermissionDenied(AccessError):
    default_hint = "Ask an admin for a token with a role that allows this."


class IntegrityError(EdgeError):
    default_hint = "The data is corrupt or was tampered with; fetch it again from a trusted source."


class SignatureError(IntegrityError):
    default_hint = "Check that the manifest was signed with a key this device trusts."


class ReplayError(IntegrityError):
    default_hint = "Nothing to do: a newer message has been accepted already."


class ProtocolError(EdgeError):
    default_hint = "The sender must follow the wire contract (PRODUCT.md section 6)."


class RequestError(EdgeError):
    """An inference request the agent refuses; ``code`` is an ``edgeglm.protocol.ErrorCode``."""

    def __init__(self, code: str, why: str, *, hint: str | None = None) -> None:
        super().__init__("request", why, hint=hint, code=code)
        self.code = code


class UpdateError(EdgeError):
    default_hint = "The box keeps serving its active slot; the agent's log names the step that failed."


class ExportError(EdgeError):
    default_hint = "Run it again with -v to see the export's log."


class UnsupportedModel(ExportError):
    pass


class ToleranceExceeded(ExportError):
    default_hint = "The export drifted from the reference; use --force only to inspect the bundle."
