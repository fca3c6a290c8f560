"""``edgectl publish`` and ``edgectl releases``: the registry, through the hub's API."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from edgectl.hub_client import HubClient
from edgectl.output import emit, output_option, render_table
from edgectl.remote import client_from, hub_options
from edgeglm.hub_api import (
    API_PREFIX,
    PieceView,
    PublishedView,
    ReleaseDetail,
    ReleaseView,
    UploadStatus,
    UploadView,
)


def publish_bundle(
    client: HubClient, folder: Path, *, force: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Send a bundle: begin (the hub verifies the signature and says what it lacks), pieces, commit.

    Running it again after an interruption sends only what the hub still lacks.
    """
    from edgeglm.bundle import MANIFEST_NAME, parse_manifest
    from edgeglm.bundle_files import FolderSource

    raw = (folder / MANIFEST_NAME).read_bytes()
    manifest, _ = parse_manifest(raw, None)  # the hub checks the signature against its trusted keys
    uploads = f"{API_PREFIX}/uploads"
    state = client.call(
        "POST",
        uploads,
        UploadView,
        params={"force": force or None},
        data=raw,
        content_type="application/json",
    )
    sent = 0
    done: PublishedView | None = None
    if state.state is UploadStatus.OPEN:
        source = FolderSource.of(folder, manifest)
        with click.progressbar(
            length=state.missing_bytes,
            label=f"publishing {manifest.ref_name}",
            file=click.get_text_stream("stderr") if progress else _Null(),
        ) as bar:
            for pid, size in state.missing:
                client.call(
                    "PUT", f"{uploads}/{state.upload_id}/pieces/{pid}", PieceView, data=source.read(pid)
                )
                sent += size
                bar.update(size)
        done = client.call("POST", f"{uploads}/{state.upload_id}/commit", PublishedView)
    return {
        "model": manifest.model,
        "version": manifest.version,
        "profile": manifest.profile,
        "manifest_digest": state.manifest_digest,
        "bytes_sent": sent,
        "bytes_total": state.total_bytes,
        "already_published": done is None,
        "quality_passed": done.bundle.quality_passed if done else None,
    }


class _Null:
    def write(self, _text: str) -> int:
        return 0

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


@click.command("publish")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Register a bundle whose quality gate failed (admin only).")
@hub_options
@output_option
def publish(bundle: Path, force: bool, hub_url: str, token: str | None, output: str) -> None:
    """Publish BUNDLE (a signed bundle folder) to the hub's registry; resumes where it stopped."""
    data = publish_bundle(client_from(hub_url, token), bundle, force=force, progress=output == "table")

    def table(d: dict[str, Any]) -> str:
        ref = f"{d['model']}@{d['version']} ({d['profile']})"
        if d["already_published"]:
            return f"{ref} is published already (same manifest)"
        return f"published {ref}: sent {d['bytes_sent']} of {d['bytes_total']} bytes"

    emit(data, output, table)


@click.group("releases")
def releases() -> None:
    """Releases in the registry: model + version, one bundle per profile."""


@releases.command("list")
@click.option("--model", default=None, help="Only this model.")
@hub_options
@output_option
def releases_list(model: str | None, hub_url: str, token: str | None, output: str) -> None:
    rows = client_from(hub_url, token).get(f"{API_PREFIX}/releases", list[ReleaseView], model=model)
    emit(
        rows,
        output,
        lambda rs: render_table(
            ["MODEL", "VERSION", "PROFILES", "DATASET", "CREATED"],
            [
                [r.model, r.version, ",".join(r.profiles), r.dataset_version, r.created_at.isoformat()]
                for r in rs
            ],
        ),
    )


@releases.command("show")
@click.argument("ref", metavar="MODEL@VERSION")
@hub_options
@output_option
def releases_show(ref: str, hub_url: str, token: str | None, output: str) -> None:
    from edgeglm.errors import UsageError

    model, sep, version = ref.rpartition("@")
    if not sep or not model:
        raise UsageError("release", f"{ref!r}: write MODEL@VERSION")
    data = client_from(hub_url, token).get(f"{API_PREFIX}/releases/{model}/{version}", ReleaseDetail)

    def table(d: ReleaseDetail) -> str:
        head = f"{d.model}@{d.version}  dataset {d.dataset_version}  by {d.created_by}\n"
        return head + render_table(
            ["PROFILE", "BYTES", "PIECES", "QUALITY", "KEY", "DIGEST"],
            [
                [
                    b.profile,
                    b.total_bytes,
                    b.pieces,
                    "pass" if b.quality_passed else "FORCED",
                    b.key_id,
                    b.manifest_digest[:23],
                ]
                for b in d.bundles
            ],
        )

    emit(data, output, table)
