"""The agent's configuration: ``/etc/edge-agent/agent.toml``, overridden by ``EDGE_AGENT_*`` variables.

    device_id = "box-17"                 # required: this box's id on the wire
    profile = "cpu-x86-int4"             # the device profile's name; see "Profiles" below
    data_dir = "/var/lib/edge-agent"     # state DB, outbox, piece store, slots
    trusted_keys = ["/etc/edge-agent/release.pub"]   # manifests must be signed by one of these
    fleet_keys = ["/etc/edge-agent/fleet.pub"]       # the hub's fleet key: signs desired states
    # or, instead of both: the fleet's root of trust (edgeglm.trust_root), which names the valid
    # release and fleet keys and is rotated through the hub without touching the box
    # trust_root = "/etc/edge-agent/root.json"
    bootstrap_bundle = "/opt/edgeglm/factory-bundle" # optional: installed when no slot holds a model
    log_format = "kv"                    # or "json"

    [cloud]                              # the hub's broker: updates, reports, telemetry
    url = "mqtts://hub.example.com:8883" # mqtt:// or mqtts:// (TLS)
    ca_file = "/etc/edge-agent/ca.pem"   # TLS: the broker's CA; cert_file + key_file: client cert
    username = "box-17"                  # password: EDGE_AGENT_CLOUD_PASSWORD or password_file

    [local]                              # optional: the sensors' broker (default: the cloud one)
    url = "mqtt://127.0.0.1:1883"

    [serving]   site, queue_size, threads, http_listen, http_token_file, http_allow_remote,
                http_max_concurrency (see "HTTP API" below)
    [telemetry] heartbeat_s, outbox_max_rows
    [update]    window, batch, request_timeout_s, bandwidth_bytes_s (0: no cap), keep_previous_loaded,
                http ("auto": pieces over HTTP when the desired state offers them, MQTT for the rest;
                "off": MQTT only), http_ca_file (the CA of an https pieces URL; default: the system's)

Profiles: a bundle carries the device profile it was exported and quality-gated with, and the
agent serves it with that one. ``profile`` is the box's profile name (the hub picks bundles by it);
it may be left out when ``bootstrap_bundle`` or an installed slot says it. A *path* instead
(``profile = "/etc/edge-agent/my-box.toml"``) is an explicit box-local override: every bundle,
which must be for a profile of that name, is then served with this file's settings.

HTTP API: ``http_listen = "127.0.0.1:8080"`` serves the OpenAI-compatible API and /metrics. An
address beyond loopback needs ``http_allow_remote = true``; ``http_token_file`` names a file that
holds a bearer token (at least 16 printable characters; the file, never the token itself, is
configured, so it stays out of the environment and process lists) that every route but /healthz
then requires; ``http_max_concurrency`` requests are served at once, more get 503 at once.

An environment variable ``EDGE_AGENT_<KEY>`` sets a top-level key, ``EDGE_AGENT_<SECTION>_<KEY>``
a key of a section (``EDGE_AGENT_CLOUD_PASSWORD``, ``EDGE_AGENT_UPDATE_BANDWIDTH_BYTES_S``); lists
are comma-separated. The environment wins over the file; a variable that replaces a value the file
sets differently is logged as a warning (the shipped unit sets none). Anything wrong is a
:class:`ConfigError` naming the key (exit 78, so systemd does not restart a box into the same bad
config). Secrets never appear in ``repr``.
"""

from __future__ import annotations

import logging
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from edgeglm.bundle import Manifest, load_manifest
from edgeglm.errors import ConfigError, EdgeError
from edgeglm.mqtt import BrokerSettings
from edgeglm.profiles import DeviceProfile
from edgeglm.protocol import check_device_id, check_site

__all__ = ["DEFAULT_PATH", "AgentConfig", "BrokerConfig", "load_config", "read_token", "resolve_profile"]

DEFAULT_PATH = Path("/etc/edge-agent/agent.toml")
_ENV = "EDGE_AGENT_"
log = logging.getLogger(__name__)


def _checked(check: Any, value: str) -> str:
    try:
        return str(check(value))
    except EdgeError as exc:
        raise ValueError(exc.why) from None


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BrokerConfig(_Section):
    url: str = "mqtt://127.0.0.1:1883"
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    keepalive: int = Field(default=30, ge=5, le=3600)
    reconnect_min_s: float = Field(default=1.0, gt=0, le=60)
    reconnect_max_s: float = Field(default=30.0, gt=0, le=3600)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError(f"{v!r} is not mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError as exc:
            raise ValueError(f"{v!r}: {exc}") from None
        return v

    def settings(self) -> BrokerSettings:
        """The link settings; reads ``password_file`` now (a missing file is a config error)."""
        parts = urlsplit(self.url)
        tls = parts.scheme == "mqtts"
        if tls and self.ca_file is None:
            raise ConfigError("cloud/local ca_file", f"{self.url} is TLS: give the broker's CA file")
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("cert_file / key_file", "a client certificate needs both")
        for f in (self.ca_file, self.cert_file, self.key_file):
            if f is not None and not f.is_file():
                raise ConfigError(str(f), "does not exist")
        password = self.password.get_secret_value() if self.password is not None else None
        if password is None and self.password_file is not None:
            try:
                password = self.password_file.read_text().strip()
            except OSError as exc:
                raise ConfigError(f"password_file {self.password_file}", str(exc)) from exc
        return BrokerSettings(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or (8883 if tls else 1883),
            username=self.username,
            password=password,
            ca_file=str(self.ca_file) if tls and self.ca_file else None,
            cert_file=str(self.cert_file) if self.cert_file else None,
            key_file=str(self.key_file) if self.key_file else None,
            keepalive=self.keepalive,
            reconnect_min_s=self.reconnect_min_s,
            reconnect_max_s=max(self.reconnect_max_s, self.reconnect_min_s),
        )


class ServingConfig(_Section):
    site: str | None = None
    queue_size: int | None = Field(default=None, ge=0, le=100_000)
    threads: int | None = Field(default=None, ge=1, le=256)
    # OpenAI-compatible API and Prometheus /metrics: "127.0.0.1:8080" (loopback unless you mean it)
    http_listen: str | None = None
    http_allow_remote: bool = False  # http_listen may be beyond loopback (0.0.0.0, a LAN address)
    http_token_file: Path | None = None  # a file holding the bearer token the API then requires
    http_max_concurrency: int = Field(default=64, ge=1, le=10_000)  # more in flight: 503 at once

    @field_validator("http_listen")
    @classmethod
    def _listen(cls, v: str | None) -> str | None:
        if v is None:
            return None
        host, _, port = v.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"{v!r}: write host:port, e.g. 127.0.0.1:8080")
        return v

    def http_address(self) -> tuple[str, int] | None:
        if self.http_listen is None:
            return None
        host, _, port = self.http_listen.rpartition(":")
        return host.strip("[]"), int(port)

    def http_token(self) -> str | None:
        """The bearer token in ``http_token_file`` (read now), or None."""
        if self.http_token_file is None:
            return None
        return read_token(self.http_token_file, "config serving.http_token_file")

    @field_validator("site")
    @classmethod
    def _site(cls, v: str | None) -> str | None:
        return None if v is None else _checked(check_site, v)


_TOKEN = re.compile(r"[\x21-\x7e]{16,4096}")  # printable ASCII, no spaces: a header-safe token


def read_token(path: Path, setting: str) -> str:
    """The bearer token in ``path`` (surrounding whitespace dropped); never put in an error."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{setting} {path}", f"cannot be read: {exc}") from None
    if not _TOKEN.fullmatch(token):
        raise ConfigError(
            f"{setting} {path}",
            "must hold one token of at least 16 printable characters, no spaces",
            hint="Write one with: openssl rand -hex 32 > FILE",
        )
    return token


class TelemetryConfig(_Section):
    heartbeat_s: float = Field(default=30.0, gt=0, le=3600)
    outbox_max_rows: int = Field(default=10_000, ge=10, le=10_000_000)


class UpdateConfig(_Section):
    window: int = Field(default=8, ge=1, le=256)
    batch: int = Field(default=32, ge=1, le=1024)
    request_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    bandwidth_bytes_s: int = Field(default=0, ge=0)  # 0: no cap
    keep_previous_loaded: bool = True  # instant revert, when two models fit the memory budget
    http: Literal["auto", "off"] = "auto"  # pieces over HTTP when the hub offers them (edge_agent.fetch_http)
    http_ca_file: Path | None = None  # the CA an https pieces URL is checked against (None: the system's)


class AgentConfig(_Section):
    device_id: str
    profile: str | None = None  # a name, or the path of an overriding profile file
    data_dir: Path = Path("/var/lib/edge-agent")
    trusted_keys: tuple[Path, ...] = ()
    # the hub's fleet keys: a desired state signed by none of them is refused (and reported)
    fleet_keys: tuple[Path, ...] = ()
    # the root of trust the box is provisioned with; replaces trusted_keys and fleet_keys
    trust_root: Path | None = None
    bootstrap_bundle: Path | None = None
    log_format: Literal["kv", "json"] = "kv"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    cloud: BrokerConfig = BrokerConfig()
    local: BrokerConfig | None = None
    serving: ServingConfig = ServingConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    update: UpdateConfig = UpdateConfig()

    @field_validator("device_id")
    @classmethod
    def _device(cls, v: str) -> str:
        return _checked(check_device_id, v)

    @field_validator("profile")
    @classmethod
    def _profile(cls, v: str | None) -> str | None:
        from edgeglm.contracts import name_problem
        from edgeglm.profiles import is_profile_path

        if v is not None and not is_profile_path(v) and (problem := name_problem(v)) is not None:
            raise ValueError(f"a profile name or a profile file's path: {problem}")
        return v

    @field_validator("trusted_keys", "fleet_keys", mode="before")
    @classmethod
    def _keys(cls, v: Any) -> Any:
        return [p for p in v.split(",") if p] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _one_source_of_trust(self) -> AgentConfig:
        if self.trust_root is not None and (self.trusted_keys or self.fleet_keys):
            raise ValueError(
                "trust_root names the valid release and fleet keys: leave trusted_keys and fleet_keys out"
            )
        if self.trust_root is None and not self.trusted_keys:
            raise ValueError("set trust_root (the fleet's root of trust) or trusted_keys (release keys)")
        return self


_SECTIONS = {"cloud", "local", "serving", "telemetry", "update"}


def _as_env(value: Any) -> str:
    """A TOML value as its ``EDGE_AGENT_*`` spelling (true, comma-separated lists), to compare."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(_as_env(v) for v in value)
    return str(value)


def _env_overrides(doc: dict[str, Any], env: Mapping[str, str], source: str) -> dict[str, Any]:
    """``doc`` with the ``EDGE_AGENT_*`` variables applied: the environment wins over the file.

    A variable that replaces a value the file sets differently is logged (a warning naming the
    variable, the key and both values), so that an operator who edits the file and sees no change
    is told why; ``data_dir`` is where this bit (a unit's ``Environment=`` line) before.
    """
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in doc.items()}
    for name, value in sorted(env.items()):
        if not name.startswith(_ENV) or name == "EDGE_AGENT_CONFIG":
            continue
        key = name[len(_ENV) :].lower()
        section, _, rest = key.partition("_")
        if section in _SECTIONS and rest:
            out.setdefault(section, {})
            if not isinstance(out[section], dict):
                raise ConfigError(name, f"[{section}] in the config file is not a table")
            table, field, dotted = out[section], rest, f"{section}.{rest}"
        else:
            table, field, dotted = out, key, key
        if field in table and _as_env(table[field]) != value:
            secret = "password" in field or "token" in field
            was, now = ("(hidden)", "(hidden)") if secret else (repr(table[field]), repr(value))
            log.warning("config %s: %s=%s overrides %s from %s", dotted, name, now, was, source)
        table[field] = value
    return out


def load_config(path: Path | None, env: Mapping[str, str] | None = None) -> AgentConfig:
    """Read ``path`` (None: environment only), apply ``EDGE_AGENT_*`` overrides, validate."""
    env = os.environ if env is None else env
    doc: dict[str, Any] = {}
    if path is not None:
        try:
            doc = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"config {path}", exc.strerror or str(exc)) from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config {path}", f"is not valid TOML: {exc}") from exc
    try:
        config = AgentConfig.model_validate(_env_overrides(doc, env, str(path or "the defaults")))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "config"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ConfigError(f"config {where}", f"{first['msg']}{more}") from None
    resolve_profile(config)
    for broker in (config.cloud, config.local):
        if broker is not None:
            broker.settings()  # TLS files, client certificate pair, password file: checked now
    config.serving.http_token()  # the token file: checked now
    if config.update.http_ca_file is not None and not config.update.http_ca_file.is_file():
        raise ConfigError(f"config update.http_ca_file {config.update.http_ca_file}", "does not exist")
    for field in ("trusted_keys", "fleet_keys"):
        for key in getattr(config, field):
            if not key.is_file():
                raise ConfigError(f"config {field} {key}", "does not exist")
    if config.trust_root is not None and not config.trust_root.is_file():
        raise ConfigError(f"config trust_root {config.trust_root}", "does not exist")
    return config


def resolve_profile(config: AgentConfig) -> tuple[str, DeviceProfile | None]:
    """This box's profile name, and its explicit override (``profile`` is a file's path) or None.

    A name may be left out when the installed bundle (or the bootstrap bundle) says it; it must be
    shipped here or recorded by such a bundle, so that a typo is caught at start (exit 78).
    """
    from edgeglm.profiles import is_profile_path, load_profile, shipped_profiles

    given = config.profile
    if given is not None and is_profile_path(given):
        try:
            override = load_profile(given)
        except EdgeError as exc:
            raise ConfigError(f"config profile {given!r}", exc.why) from None
        return override.name, override
    held = [m for m in (_held(Path(config.data_dir) / "current"), _held(config.bootstrap_bundle)) if m]
    name = given or next((m.profile for m in held), None)
    if name is None:
        raise ConfigError(
            "config profile",
            "is not set and no bundle is installed to take it from",
            hint="Set profile = NAME (or a profile file's path), or bootstrap_bundle.",
        )
    if name not in shipped_profiles() and not any(m.profile == name and m.device_profile for m in held):
        raise ConfigError(
            f"config profile {name!r}",
            "is not a shipped profile and no installed bundle records it",
            hint="Give the profile file's path instead, or a bootstrap_bundle exported with it.",
        )
    return name, None


def _held(folder: Path | None) -> Manifest | None:
    """The manifest of a bundle folder, unverified (read for its profile only), or None."""
    if folder is None:
        return None
    try:
        return load_manifest(folder, None)[0]
    except (EdgeError, OSError):
        return None
