"""``edgectl bundle``: look at bundles on disk — what an update between two of them costs, and
whether one verifies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from edgectl.output import emit, output_option, render_table
from edgectl.params import ProfileParam
from edgeglm.bundle import MANIFEST_NAME, Manifest, load_manifest, verify_files
from edgeglm.bundle_files import FolderSource, describe_file, describe_folder, describe_onnx
from edgeglm.keys import load_public_keys
from edgeglm.pieces import DEFAULT_CDC_AVG_BYTES, DEFAULT_PIECE_BYTES
from edgeglm.planner import DEFAULT_FULL_THRESHOLD, SourceChain, plan
from edgeglm.profiles import DeviceProfile

_PATH = click.Path(exists=True, path_type=Path)


@click.group()
def bundle() -> None:
    """Inspect bundles: update cost between two versions, signature and digests."""


def _side(path: Path, version: str, piece_bytes: int, cdc_avg_bytes: int) -> tuple[Manifest, FolderSource]:
    if path.is_dir():
        if (path / MANIFEST_NAME).is_file():
            manifest, _ = load_manifest(path, trusted=None)
        else:
            entries = describe_folder(path, piece_bytes=piece_bytes, cdc_avg_bytes=cdc_avg_bytes)
            manifest = Manifest(model="diff", version=version, profile="none", files=tuple(entries))
        return manifest, FolderSource.of(path, manifest)
    if path.suffix == ".onnx":
        entries = describe_onnx(path, piece_bytes=piece_bytes, cdc_avg_bytes=cdc_avg_bytes)
    else:
        entries = [describe_file(path, path.name, None, piece_bytes=piece_bytes, cdc_avg_bytes=cdc_avg_bytes)]
    manifest = Manifest(model="diff", version=version, profile="none", files=tuple(entries))
    return manifest, FolderSource.of(path.parent, manifest)


def _table(data: dict[str, Any]) -> str:
    rows = [
        [f["path"], f["size"], f["pieces"], f["have"], f["delta"], f["raw"], f["bytes_to_send"]]
        for f in data["files"]
    ]
    rows.append(["TOTAL", data["new_bytes"], "", "", "", "", data["bytes_to_send"]])
    table = render_table(["file", "size", "pieces", "have", "delta", "raw", "bytes to send"], rows)
    return (
        f"{table}\n\nmode {data['mode']}: send {data['bytes_to_send']:,} bytes, "
        f"{data['ratio_to_new']:.2%} of the new version ({data['new_bytes']:,} bytes; "
        f"full compressed download {data['full_bytes']:,} bytes)"
    )


@bundle.command("diff")
@click.argument("old", type=_PATH)
@click.argument("new", type=_PATH)
@click.option(
    "--profile",
    type=ProfileParam(),
    default=None,
    help="Take piece size, CDC size and full-download threshold from this profile.",
)
@output_option
def diff(old: Path, new: Path, profile: DeviceProfile | None, output: str) -> None:
    """What updating a device from OLD to NEW costs: pieces and bytes to send, per file and in total.

    OLD and NEW are bundle folders (with or without a manifest), two ONNX models with external
    data, or two plain files. Costs are real encoded sizes (tensor deltas where they pay).
    """
    if old.is_dir() != new.is_dir():
        raise click.UsageError("OLD and NEW must both be folders or both be files")
    piece_bytes, cdc_avg, threshold = DEFAULT_PIECE_BYTES, DEFAULT_CDC_AVG_BYTES, DEFAULT_FULL_THRESHOLD
    if profile is not None:
        piece_bytes, cdc_avg = profile.chunk.tensor_piece_bytes, profile.chunk.cdc_avg_bytes
        threshold = profile.chunk.full_threshold
    m_old, src_old = _side(old, "0.0.0", piece_bytes, cdc_avg)
    m_new, src_new = _side(new, "0.0.1", piece_bytes, cdc_avg)
    result = plan(m_new, [m_old], source=SourceChain(src_new, src_old), full_threshold=threshold).to_dict()
    result["new_bytes"] = m_new.total_bytes()
    result["old_bytes"] = m_old.total_bytes()
    result["ratio_to_new"] = result["bytes_to_send"] / result["new_bytes"] if result["new_bytes"] else 0.0
    emit(result, output, _table)


@bundle.command("verify")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--trust",
    "trusted",
    multiple=True,
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="A trusted public key (repeatable).",
)
@output_option
def verify(folder: Path, trusted: tuple[Path, ...], output: str) -> None:
    """Check a bundle's signature against trusted keys and every file's size and digest."""
    manifest, _ = load_manifest(folder, load_public_keys(list(trusted)))
    verify_files(manifest, folder)
    data = {
        "bundle": str(folder),
        "model": manifest.model,
        "version": manifest.version,
        "profile": manifest.profile,
        "key_id": manifest.signature.key_id if manifest.signature else None,
        "files": len(manifest.files),
        "bytes": manifest.total_bytes(),
        "verified": True,
    }
    emit(data, output, lambda d: render_table(["field", "value"], list(d.items())))
