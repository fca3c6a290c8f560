"""``edgectl demo``: the whole EdgeGLM story, for real, on one machine, in a few minutes.

It starts its own mosquitto (generated config, TCP_NODELAY), the hub on SQLite and three
``edge-agent run`` processes; trains and exports a tiny GLM in three versions; deploys, answers
sensors over MQTT, rolls an update out in waves as deltas, catches a broken version on the canary
and reverts it; prints a summary table and stops every process it started. The story itself is
:mod:`edgectl.demo.story`; the end-to-end test runs the same code on PostgreSQL.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import click

from edgectl.output import emit, output_option, render_table


def _table(r: dict[str, Any]) -> str:
    q = r.get("quality", {})
    gates = " / ".join(f"{v}: top-1 {m['top1_agreement']:.3f}, KL {m['kl']:.4f}" for v, m in q.items())
    first: dict[str, Any] = next(iter(r.get("answers", {}).values()), {})
    v11, v12 = r.get("v11", {}), r.get("v12", {})
    canary = v12.get("canary") or {}
    rows = [
        ["train + export", f"{r.get('train_s')} s training, {r.get('export_s')} s for two gated exports"],
        ["quality gate (cpu-x86-int8)", gates],
        ["published", ", ".join(f"{v}: {p['sent']:,} B sent" for v, p in r.get("published", {}).items())],
        [
            "deploy 1.0.0 (empty boxes)",
            f"{r.get('v1', {}).get('state')}, {r.get('v1', {}).get('bytes_sent', 0):,} B on the wire, "
            f"{r.get('v1', {}).get('seconds')} s",
        ],
        ["sensor prompt", r.get("prompt", "")],
        ["answer (MQTT 5, each box)", first.get("text", "")],
        [
            "1.1.0 in waves",
            f"{v11.get('state')}: waves of {[w['size'] for w in v11.get('waves', [])]} devices, "
            f"{v11.get('seconds')} s",
        ],
        [
            "delta sync",
            f"{v11.get('bytes_sent', 0):,} B on the wire for 3 devices: {v11.get('ratio', 0):.1%} of the "
            f"bundles ({v11.get('full_bytes', 0):,} B); the full 1.0.0 download was "
            f"{r.get('v1', {}).get('bytes_sent', 0):,} B",
        ],
        ["broken 1.2.0", f"{v12.get('state')} in {v12.get('seconds')} s: {v12.get('reason')}"],
        ["canary", f"{canary.get('device')}: {canary.get('state')} ({canary.get('detail', '')[:110]})"],
        ["audit log", f"{r.get('audit', {}).get('entries', 0)} entries"],
        ["checks", f"{sum(ok for _, ok in r['checks'])} of {len(r['checks'])} passed"],
        ["processes stopped", ", ".join(f"{n} ({_exit(c)})" for n, c in r.get("stopped", []))],
        ["seconds", r.get("seconds")],
    ]
    return render_table(["demo", "result"], rows)


def _exit(code: int | None) -> str:
    if code is None or code >= 0:
        return f"exit {code}"
    import signal

    return signal.Signals(-code).name  # uvicorn re-raises SIGTERM after its graceful shutdown


@click.command()
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep the demo's files (bundles, logs, databases) here instead of a temporary folder.",
)
@click.option(
    "--steps", type=click.IntRange(50, 5000), default=300, show_default=True, help="Training steps."
)
@output_option
def demo(workdir: Path | None, steps: int, output: str) -> None:
    """Run the whole EdgeGLM story for real and print a summary table."""
    from edgectl.demo.story import StoryFailed, run_story

    def say(line: str) -> None:
        if output == "table":
            click.echo(f"  {line}", err=True)

    def run(work: Path) -> dict[str, Any]:
        try:
            return run_story(work, say, steps=steps)
        except StoryFailed as exc:
            emit(exc.result, output, _table)
            hint = (
                f" (logs under {work / 'run'})"
                if workdir is not None
                else " (rerun with --workdir to keep the logs)"
            )
            raise click.ClickException(str(exc) + hint) from None

    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        result = run(workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="edgeglm-demo-") as tmp:
            result = run(Path(tmp))
    emit(result, output, _table)
