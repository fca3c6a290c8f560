"""``edgectl export``: a local GLM checkpoint to a signed, validated bundle for one profile.

The export wing (torch, transformers, onnx) is imported only when the command runs, so the rest
of ``edgectl`` works on boxes without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from edgectl import EdgeGroup
from edgectl.output import emit, output_option, render_table
from edgectl.params import ProfileParam
from edgeglm.bundle import load_manifest
from edgeglm.errors import UnavailableError
from edgeglm.profiles import DeviceProfile


class _DefaultGroup(EdgeGroup):
    """``edgectl export CHECKPOINT ...`` runs the export; ``edgectl export inspect ...`` inspects."""

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args.insert(0, "run")
        return super().resolve_command(ctx, args)


@click.group(cls=_DefaultGroup)
def export() -> None:
    """Export a GLM checkpoint to a signed bundle (``export CHECKPOINT``), or inspect a bundle."""


def _result_table(r: dict[str, Any]) -> str:
    q = r["quality"]
    rows = [
        ["bundle", r["bundle"]],
        ["model", f"{r['model']}@{r['version']} for {r['profile']}"],
        ["quality gate", "passed" if r["passed"] else "FAILED (written with --force, marked failed)"],
        ["max |Δlogit|", q["max_abs_logit_diff"]],
        ["cosine (mean / min)", f"{q['cosine']} / {q['cosine_min']}"],
        ["top-1 agreement", q["top1_agreement"]],
        ["KL divergence", q["kl"]],
        ["greedy prefix agreement", q["greedy_prefix_agreement"]],
        ["weights / with KV cache", f"{r['weights_mb']:,.1f} MB / {r['memory_mb']:,.1f} MB"],
        ["time / peak RSS", f"{r['seconds']:.1f} s / {r['peak_rss_mb']:,.0f} MB"],
    ]
    return render_table(["export", "result"], rows)


@export.command("run")
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--profile", "profile", type=ProfileParam(), required=True, help="Shipped profile name or TOML path."
)
@click.option("--version", "version", required=True, help="Semantic version of this release, e.g. 1.4.0.")
@click.option(
    "--key",
    "key",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Ed25519 private key that signs the manifest (edgectl keys create).",
)
@click.option("--model", "model", default=None, help="Model name [default: the checkpoint folder's name].")
@click.option(
    "--out",
    "out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Bundle folder to create [default: ./MODEL-VERSION-PROFILE].",
)
@click.option(
    "--eval-prompts",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="JSON list of prompts for the quality gate [default: the shipped set].",
)
@click.option(
    "--calibration",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="GPTQ profiles: JSON list of texts to calibrate on [default: text the model samples itself].",
)
@click.option("--dataset-version", default=None, help="Version of the data the model was trained on.")
@click.option("--force", is_flag=True, help="Write the bundle even if the quality gate fails, marked failed.")
@click.option(
    "--no-engine",
    is_flag=True,
    help="TensorRT profiles: ship the ONNX graph without an engine (build machine has no GPU).",
)
@output_option
def run(
    checkpoint: Path,
    profile: DeviceProfile,
    version: str,
    key: Path,
    model: str | None,
    out: Path | None,
    eval_prompts: Path | None,
    calibration: Path | None,
    dataset_version: str | None,
    force: bool,
    no_engine: bool,
    output: str,
) -> None:
    """Export CHECKPOINT (a local Hugging Face GLM folder) for one device profile."""
    try:
        from export.entry import ExportSpec, run_export
    except ImportError as exc:
        raise UnavailableError(
            "export",
            f"needs the export extra ({exc.name} is missing)",
            hint="pip install 'edgeglm[export]' (torch==2.13.0 first)",
        ) from exc
    name = model or checkpoint.resolve().name
    spec = ExportSpec(
        checkpoint=checkpoint,
        profile=profile,
        version=version,
        model_name=name,
        out_dir=out or Path(f"{name}-{version}-{profile.name}"),
        key_path=key,
        eval_prompts=eval_prompts,
        calibration=calibration,
        force=force,
        dataset_version=dataset_version,
        build_engine=not no_engine,
    )

    def say(line: str) -> None:
        click.echo(line, err=True)

    emit(run_export(spec, say).to_dict(), output, _result_table)


def _smoke_summary(smoke: dict[str, Any] | None) -> str:
    if not smoke:
        return "none"
    n = len(smoke.get("expected_tokens", []))
    if smoke.get("logit_tolerance") is None:
        return f"{n} golden tokens (tokens rule: no reference logits)"
    return (
        f"{n} positions, logit tolerance {smoke['logit_tolerance']:g}"
        f" (kernel paths differ by {smoke.get('path_logit_diff', 0):g})"
    )


@export.command("inspect")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@output_option
def inspect(bundle: Path, output: str) -> None:
    """Show a bundle's manifest: model, profile, quality metrics, files and sizes (no key needed)."""
    manifest, doc = load_manifest(bundle, trusted=None)
    data = {
        "model": manifest.model,
        "version": manifest.version,
        "profile": manifest.profile,
        "signed_by": manifest.signature.key_id if manifest.signature else None,
        "source_digest": manifest.source_digest,
        "quality": doc.get("quality", {}),
        "runtime": doc.get("runtime", {}),
        "device_profile": manifest.device_profile.to_dict() if manifest.device_profile else None,
        "smoke_test": doc.get("smoke_test"),
        "files": [
            {"path": f.path, "size": f.size, "layout": f.layout, "pieces": len(f.pieces)}
            for f in manifest.files
        ],
        "bytes": manifest.total_bytes(),
    }

    def table(d: dict[str, Any]) -> str:
        q = d["quality"]
        head = render_table(
            ["field", "value"],
            [
                ["model", f"{d['model']}@{d['version']}"],
                ["profile", d["profile"] + ("" if d["device_profile"] else " (not recorded: older bundle)")],
                ["signed by", d["signed_by"]],
                ["quality gate", "passed" if q.get("passed") else "FAILED"],
                ["max |Δlogit|", q.get("max_abs_logit_diff")],
                ["top-1 agreement", q.get("top1_agreement")],
                ["greedy prefix agreement", q.get("greedy_prefix_agreement")],
                ["smoke test", _smoke_summary(d["smoke_test"])],
                ["bytes", f"{d['bytes']:,}"],
            ],
        )
        files = render_table(
            ["file", "size", "layout", "pieces"],
            [[f["path"], f"{f['size']:,}", f["layout"], f["pieces"]] for f in d["files"]],
        )
        return f"{head}\n\n{files}"

    emit(data, output, table)
