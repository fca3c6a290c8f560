"""``edgectl keys``: Ed25519 keys that sign bundle manifests."""

from __future__ import annotations

import os
from pathlib import Path

import click

from edgectl.output import emit, output_option, render_table
from edgeglm.keys import create_keypair, key_id, load_public_key


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
