"""``edgectl agent``: try a bundle locally (``infer``), serve one (``serve``), or run the daemon.

``run`` is the systemd daemon (also installed as ``edge-agent run``): config file + environment,
A/B slots, updates from the hub. ``status`` reads a box's data directory: slots, last update.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from edgectl.output import emit, output_option, render_table
from edgectl.params import ProfileParam
from edgeglm.errors import UsageError


@click.group()
def agent() -> None:
    """Run bundles the way an edge box does."""


def _trusted(keys: tuple[Path, ...]) -> dict[str, Any] | None:
    if not keys:
        return None
    from edgeglm.keys import load_public_keys

    return dict(load_public_keys(list(keys)))


_bundle_arg = click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
_profile_opt = click.option(
    "--profile", type=ProfileParam(), default=None, help="Profile name or file [default: the bundle's]."
)
_trust_opt = click.option(
    "--trust",
    "trust",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Verify the manifest signature and file digests against this public key (repeatable).",
)


@agent.command("infer")
@_bundle_arg
@click.option("--prompt", default=None, help="Raw prompt text.")
@click.option("--chat", "chat", default=None, help="A user message, run through the chat template.")
@click.option("--max-tokens", type=click.IntRange(1, 8192), default=64, show_default=True)
@click.option("--temperature", type=click.FloatRange(0), default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=click.IntRange(0), default=0, show_default=True)
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True)
@click.option("--repetition-penalty", type=click.FloatRange(0, min_open=True), default=1.0)
@click.option("--seed", type=click.IntRange(0), default=None)
@click.option("--stop", "stop", multiple=True, help="Stop string (repeatable).")
@click.option("--stream/--no-stream", default=True, help="Print text as it is generated (table output).")
@_profile_opt
@_trust_opt
@output_option
def infer(
    bundle: Path,
    prompt: str | None,
    chat: str | None,
    profile: Any,
    trust: tuple[Path, ...],
    stream: bool,
    output: str,
    **knobs: Any,
) -> None:
    """Load BUNDLE and answer one prompt, as the agent would; prints the text and timings."""
    if (prompt is None) == (chat is None):
        raise UsageError("--prompt / --chat", "give exactly one of them")
    from edge_agent.entry import load_engine
    from edgeglm.protocol import ChatMessage, InferRequest

    engine = load_engine(bundle, profile=profile, trusted=_trusted(trust))
    live = stream and output == "table"
    request = InferRequest(
        prompt=prompt,
        messages=None if chat is None else (ChatMessage(role="user", content=chat),),
        stop=tuple(knobs.pop("stop")),
        stream=live,
        **knobs,
    )
    on_text = (lambda text, _ids: (sys.stdout.write(text), sys.stdout.flush())) if live else None
    result = engine.generate(engine.prepare(request), on_text)  # type: ignore[arg-type]
    if live:
        click.echo()
    decode_s = result.decode_ms / 1000
    data = {
        "model": engine.model,
        "version": engine.version,
        "provider": engine.graph.provider,
        "text": result.text,
        "tokens": list(result.tokens),
        "finish_reason": result.finish_reason,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "ttft_ms": round(result.ttft_ms or 0.0, 2),
        "decode_tok_s": round((result.completion_tokens - 1) / decode_s, 2) if decode_s > 0 else None,
    }
    if output == "json":
        emit(data, output, str)
        return
    if not live:
        click.echo(result.text)
    rows = [
        (k, data[k])
        for k in ("finish_reason", "prompt_tokens", "completion_tokens", "ttft_ms", "decode_tok_s")
    ]
    click.echo(render_table(["", ""], rows), err=True)


@agent.command("serve")
@_bundle_arg
@click.option("--device-id", required=True, help="This box's id: requests arrive on edgeglm/v1/dev/ID/infer.")
@click.option(
    "--broker", default="127.0.0.1:1883", show_default=True, help="MQTT broker HOST:PORT; 'none' for no MQTT."
)
@click.option(
    "--username", default=None, help="MQTT user name (the password comes from $EDGEGLM_MQTT_PASSWORD)."
)
@click.option(
    "--ca-file", type=click.Path(exists=True, dir_okay=False), default=None, help="CA bundle: MQTT over TLS."
)
@click.option(
    "--site", default=None, help="Also take requests from the site's shared topic (split between agents)."
)
@click.option(
    "--http", "http", default=None, help="Serve the OpenAI-compatible API on HOST:PORT (e.g. 127.0.0.1:8080)."
)
@click.option(
    "--http-token-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="A file holding a bearer token every HTTP route but /healthz then requires.",
)
@click.option(
    "--http-allow-remote", is_flag=True, help="Let --http listen beyond loopback (0.0.0.0, a LAN address)."
)
@click.option(
    "--http-max-concurrency",
    type=click.IntRange(1, 10_000),
    default=None,
    help="HTTP requests served at once; more get 503 at once [default: 64].",
)
@click.option("--queue-size", type=click.IntRange(0), default=None, help="Requests held before 'busy'.")
@_profile_opt
@_trust_opt
@click.option(
    "--insecure-unsigned",
    is_flag=True,
    help="Serve BUNDLE without verifying its signature and file digests (instead of --trust).",
)
def serve(
    bundle: Path,
    device_id: str,
    broker: str,
    username: str | None,
    ca_file: str | None,
    site: str | None,
    http: str | None,
    http_token_file: Path | None,
    http_allow_remote: bool,
    http_max_concurrency: int | None,
    queue_size: int | None,
    profile: Any,
    trust: tuple[Path, ...],
    insecure_unsigned: bool,
) -> None:
    """Serve BUNDLE to MQTT sensors (and optionally HTTP) until interrupted.

    BUNDLE is verified against the --trust keys; --insecure-unsigned serves it unverified.
    """
    import os

    from edge_agent.entry import serve_bundle
    from edgeglm.mqtt import BrokerSettings
    from edgeglm.protocol import check_device_id

    check_device_id(device_id)
    if trust and insecure_unsigned:
        raise UsageError("--insecure-unsigned", "contradicts --trust: give one of them")
    broker_settings = None
    if broker != "none":
        host, port = _host_port(broker, "--broker")
        password = os.environ.get("EDGEGLM_MQTT_PASSWORD")
        broker_settings = BrokerSettings(
            host=host, port=port, username=username, password=password, ca_file=ca_file
        )
    http_address = _host_port(http, "--http") if http else None
    if http_address is None:
        for flag, given in (
            ("--http-token-file", http_token_file is not None),
            ("--http-allow-remote", http_allow_remote),
            ("--http-max-concurrency", http_max_concurrency is not None),
        ):
            if given:
                raise UsageError(flag, "needs --http HOST:PORT")
    click.echo(json.dumps({"serving": str(bundle), "device_id": device_id}), err=True)
    serve_bundle(
        bundle,
        device_id=device_id,
        broker=broker_settings,
        site=site,
        http=http_address,
        profile=profile,
        trusted=_trusted(trust),
        insecure_unsigned=insecure_unsigned,
        queue_size=queue_size,
        http_token_file=http_token_file,
        http_allow_remote=http_allow_remote,
        http_max_concurrency=http_max_concurrency,
    )


def _host_port(value: str, flag: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(flag, f"{value!r} is not HOST:PORT")
    return host, int(port)


_config_opt = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Agent config (TOML) [default: $EDGE_AGENT_CONFIG, else /etc/edge-agent/agent.toml].",
)


@agent.command("run")
@_config_opt
def run(config_path: Path | None) -> None:
    """Run the edge agent daemon: serve the active slot and follow the hub (until SIGTERM)."""
    from edge_agent.entry import load_config, run_daemon

    run_daemon(load_config(config_path))


@agent.command("status")
@_config_opt
@output_option
def status(config_path: Path | None, output: str) -> None:
    """What this box holds: the active slot, both slots' versions, the last update."""
    from edge_agent.entry import box_status, load_config

    rows = box_status(load_config(config_path))
    emit(rows, output, lambda d: render_table(["", ""], [(k, v) for k, v in d.items()]))


def agent_main() -> None:
    """The ``edge-agent`` console script: the daemon's own name for ``edgectl agent``."""
    from edgectl import EdgeGroup

    group = EdgeGroup(
        name="edge-agent", commands={"run": run, "status": status}, help="The EdgeGLM edge agent."
    )
    group(prog_name="edge-agent")
