"""``edgectl keys``: Ed25519 keys that sign bundle manifests, and the fleet's root of trust."""

from __future__ import annotations

import os
import time
from pathlib import Path

import click
from pydantic import ValidationError

from edgectl.output import emit, output_option, render_table
from edgectl.remote import client_from, hub_options
from edgeglm.hub_api import API_PREFIX, RootView
from edgeglm.keys import create_keypair, key_id, load_private_key, load_public_key
from edgeglm.trust_root import Root, parse_root, root_body, sign_root


def default_key_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "edgeglm" / "keys"


@click.group()
def keys() -> None:
    """Create and inspect the keys that sign bundles."""


@keys.command("create")
@click.argument("name")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where to write NAME.key and NAME.pub [default: ~/.config/edgeglm/keys].",
)
@click.option("--force", is_flag=True, help="Overwrite an existing key of that name.")
@output_option
def create(name: str, directory: Path | None, force: bool, output: str) -> None:
    """Create an Ed25519 key pair NAME.key (private, mode 0600) and NAME.pub.

    Give NAME.pub to every agent that must trust bundles signed with NAME.key.
    """
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise click.BadParameter("use letters, digits, '-', '_' and '.' only", param_hint="NAME")
    priv, pub, kid = create_keypair(directory or default_key_dir(), name, overwrite=force)
    data = {"name": name, "key_id": kid, "private_key": str(priv), "public_key": str(pub)}
    emit(data, output, lambda d: render_table(["key", "value"], list(d.items())))


@keys.command("show")
@click.argument("public_key", type=click.Path(dir_okay=False, path_type=Path))
@output_option
def show(public_key: Path, output: str) -> None:
    """Print the key id of a public key (the id manifests name their signer by)."""
    data = {"public_key": str(public_key), "key_id": key_id(load_public_key(public_key))}
    emit(data, output, lambda d: render_table(["key", "value"], list(d.items())))


# ---------------------------------------------------------------------------- the root of trust
@keys.group("root")
def root() -> None:
    """The fleet's root of trust: which release and fleet keys boxes accept (docs/security.md).

    \b
    Offline, where the root key lives:
      edgectl keys create root-1 --dir /media/offline
      edgectl keys root sign --sign-with /media/offline/root-1.key --version 1 \\
          --release release.pub --fleet fleet.pub --out root-1.json
    Boxes get root-1.json as `trust_root = ...` in agent.toml. To rotate or revoke a key, sign the next
    version with the previous root keys (and the new ones, if the root key changes), then
    `edgectl keys root push root-2.json`: the hub hands the chain to every box.
    """


@root.command("sign")
@click.option(
    "--sign-with",
    "signers",
    multiple=True,
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="A root private key to sign with (repeat: the previous version's and the new root keys).",
)
@click.option("--version", "version", type=click.IntRange(1, 2**53 - 1), required=True)
@click.option(
    "--root-key",
    "root_keys",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="A public key of this version's root role [default: the public halves of --sign-with].",
)
@click.option("--threshold", type=click.IntRange(1, 64), default=1, show_default=True)
@click.option(
    "--release",
    "release",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="A release key's public half: bundles signed by it are accepted (repeat).",
)
@click.option(
    "--fleet",
    "fleet",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="A hub fleet key's public half: desired states signed by it are accepted (repeat).",
)
@click.option(
    "--expires-days", type=click.FloatRange(min=0.0, min_open=True), default=365.0, show_default=True
)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@output_option
def root_sign(
    signers: tuple[Path, ...],
    version: int,
    root_keys: tuple[Path, ...],
    threshold: int,
    release: tuple[Path, ...],
    fleet: tuple[Path, ...],
    expires_days: float,
    out: Path,
    output: str,
) -> None:
    """Write a signed root of trust naming the valid release and fleet keys."""
    privates = [load_private_key(p) for p in signers]
    roles = [load_public_key(p) for p in root_keys] or [p.public_key() for p in privates]
    releases = [load_public_key(p) for p in release]
    fleets = [load_public_key(p) for p in fleet]
    body = root_body(
        version,
        root=roles,
        release=releases,
        fleet=fleets,
        expires_at=round(time.time() + expires_days * 86400.0, 3),
        threshold=threshold,
    )
    try:
        raw = sign_root(body, privates)
    except ValidationError as exc:  # a threshold above the number of root keys, ...
        raise click.UsageError(f"the root would be invalid: {exc.errors()[0]['msg']}") from exc
    signed = parse_root(raw)  # the signatures of this version's own root keys suffice
    out.write_bytes(raw)
    data = {"out": str(out), **_summary(signed)}
    emit(data, output, lambda d: render_table(["field", "value"], [(k, _cell(v)) for k, v in d.items()]))


@root.command("show")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@output_option
def root_show(file: Path, output: str) -> None:
    """Check a root's own signatures and print the key ids it makes valid."""
    data = _summary(parse_root(file.read_bytes()))
    emit(data, output, lambda d: render_table(["field", "value"], [(k, _cell(v)) for k, v in d.items()]))


@root.command("push")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@hub_options
@output_option
def root_push(file: Path, hub_url: str, token: str | None, output: str) -> None:
    """Give the hub the next root version (admin); it publishes the chain to every box."""
    raw = file.read_bytes()
    view = client_from(hub_url, token).call(
        "POST", f"{API_PREFIX}/trust/roots", RootView, data=raw, content_type="application/json"
    )
    emit(view, output, lambda v: f"root version {v.version} added: release {v.release}, fleet {v.fleet}")


def _summary(root: Root) -> dict[str, object]:
    return {
        "version": root.version,
        "expires_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(root.expires_at)),
        "root": sorted(root.role("root")),
        "threshold": root.doc.root.threshold,
        "release": sorted(root.role("release")),
        "fleet": sorted(root.role("fleet")),
    }


def _cell(value: object) -> str:
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)
