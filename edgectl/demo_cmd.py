"""``edgectl demo``: the whole EdgeGLM story, for real, on one machine, in a few minutes.

It starts its own mosquitto (generated config, TCP_NODELAY), the hub on SQLite and three
``edge-agent run`` processes; trains and exports a tiny GLM in three versions; deploys, answers
sensors over MQTT, rolls an update out in waves as deltas, catches a broken version on the canary
and reverts it; prints a summary table and stops every process it started. The story itself is
:mod:`edgectl.demo.story`; the end-to-end test runs the same code on PostgreSQL.

``--keep`` leaves the hub, the demo's broker and the agents running once the story ends well, so a
person can look (the dashboard at ``<hub>/ui/``, signed in with a viewer token made for the
purpose); ``--stop`` stops them again. The state between the two is :mod:`edgectl.demo.kept`.
"""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from edgectl.output import emit, output_option, render_table
from edgeglm.errors import ConflictError

VIEWER_TOKEN_NAME = "demo-dashboard-viewer"


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
    kept = r.get("kept")
    if kept:
        rows[-2] = ["processes left running", _pids(kept)]
        return render_table(["demo", "result"], rows) + "\n\n" + _kept_text(kept)
    return render_table(["demo", "result"], rows)


def _pids(kept: dict[str, Any]) -> str:
    return ", ".join(f"{p['name']} (PID {p['pid']})" for p in kept["processes"])


def _kept_text(k: dict[str, Any]) -> str:
    rows = [
        ["dashboard", f"{k['dashboard_url']}  (sign in with the viewer token)"],
        ["viewer token", f"{k['viewer_token']}  (shown only this once; the hub stores only its hash)"],
        ["hub API", k["api_url"]],
        ["broker", f"mqtt://127.0.0.1:{k['broker_port']}"],
        ["workdir", f"{k['workdir']}  (logs under run/, state in {Path(k['state_file']).name})"],
        ["PIDs", _pids(k)],
    ]
    return (
        "The demo is still running:\n"
        + render_table(["kept", "where"], rows)
        + f"\nstop with: {k['stop_command']}  (or SIGTERM to each PID above)"
    )


def _stop_table(r: dict[str, Any]) -> str:
    rows = [[p["name"], p["pid"], p["outcome"]] for p in r["processes"]]
    return render_table(["process", "PID", "outcome"], rows) + f"\nthe kept demo in {r['workdir']} is stopped"


def _exit(code: int | None) -> str:
    if code is None or code >= 0:
        return f"exit {code}"
    import signal

    return signal.Signals(-code).name  # uvicorn re-raises SIGTERM after its graceful shutdown


def default_keep_dir() -> Path:
    """Where ``--keep`` without ``--workdir`` puts the demo: ``$XDG_STATE_HOME/edgeglm/demo``."""
    base = os.environ.get("XDG_STATE_HOME", "")
    state = Path(base) if os.path.isabs(base) else Path.home() / ".local" / "state"
    return state / "edgeglm" / "demo"


def _refuse_if_running(work: Path, stop_command: str) -> None:
    """ConflictError while a kept demo runs in ``work``; a stale state file (nothing alive) goes."""
    from edgectl.demo.kept import STATE_FILE, load_state, running

    state = load_state(work)
    if state is None:
        return
    if running(work):
        raise ConflictError(
            "demo",
            f"a kept demo is already running in {work} (hub {state.get('hub_url')})",
            hint=f"Stop it first: {stop_command}",
        )
    (work / STATE_FILE).unlink()


def _stop_command(workdir: Path | None) -> str:
    return "edgectl demo --stop" + (f" --workdir {shlex.quote(str(workdir))}" if workdir else "")


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
@click.option(
    "--keep",
    is_flag=True,
    help="When the story ends well, leave the hub, the demo's broker and the agents running (detached, "
    "logs in the workdir) and print the dashboard URL, a new viewer token, the hub's API URL and the "
    "PIDs; --output json includes the token too. Without --workdir the files go to "
    "$XDG_STATE_HOME/edgeglm/demo (~/.local/state/edgeglm/demo), emptied first.",
)
@click.option(
    "--stop",
    is_flag=True,
    help="Stop what 'edgectl demo --keep' left running in --workdir (or the default folder) and exit; "
    "exit 1 when nothing is recorded there.",
)
@output_option
@click.pass_context
def demo(ctx: click.Context, workdir: Path | None, steps: int, keep: bool, stop: bool, output: str) -> None:
    """Run the whole EdgeGLM story for real and print a summary table."""
    from edgectl.demo.story import StoryFailed, run_story

    if keep and stop:
        raise click.UsageError(
            "--keep and --stop cannot be used together: --keep runs a demo and leaves it running, "
            "--stop stops one that runs",
            ctx,
        )
    if stop:
        if ctx.get_parameter_source("steps") is click.core.ParameterSource.COMMANDLINE:
            raise click.UsageError("--steps has no meaning with --stop (it stops a demo, it runs none)", ctx)
        _stop(workdir or default_keep_dir(), output)
        return

    def say(line: str) -> None:
        if output == "table":
            click.echo(f"  {line}", err=True)

    def run(work: Path) -> dict[str, Any]:
        try:
            return run_story(work, say, steps=steps, keep=keep)
        except StoryFailed as exc:
            emit(exc.result, output, _table)
            hint = (
                f" (logs under {work / 'run'})"
                if workdir is not None or keep
                else " (rerun with --workdir to keep the logs)"
            )
            raise click.ClickException(str(exc) + hint) from None

    if keep:
        work = workdir or default_keep_dir()
        _refuse_if_running(work, _stop_command(workdir))
        if workdir is None and work.exists():
            say(f"emptying {work}, the default folder of a kept demo")
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        result = run(work)
        result["kept"] = _leave_running(work, result.pop("kept"), _stop_command(workdir))
    elif workdir is not None:
        _refuse_if_running(workdir, _stop_command(workdir))
        workdir.mkdir(parents=True, exist_ok=True)
        result = run(workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="edgeglm-demo-") as tmp:
            result = run(Path(tmp))
    emit(result, output, _table)


def _leave_running(work: Path, kept: dict[str, Any], stop_command: str) -> dict[str, Any]:
    """Record what the story left running, then make the viewer token (stopping it all if that fails)."""
    from edgectl.demo.kept import STATE_FILE, KeptProcess, stop_processes, write_state
    from edgectl.demo.procs import create_token

    hub = kept["hub_url"]
    info = {
        "hub_url": hub,
        "api_url": f"{hub}/api/v1",
        "dashboard_url": f"{hub}/ui/",
        "hub_port": kept["hub_port"],
        "broker_port": kept["broker_port"],
        "own_broker": kept["own_broker"],
        "db_url": kept["db_url"],
    }
    procs = [KeptProcess(**p) for p in kept["processes"]]
    try:
        state_file = write_state(work, procs, **info)
        token = create_token(kept["db_url"], VIEWER_TOKEN_NAME, "viewer")
    except BaseException:  # Ctrl-C included: a demo is left running whole and recorded, or not at all
        stop_processes(procs)
        (work / STATE_FILE).unlink(missing_ok=True)
        raise
    return {
        **{k: v for k, v in info.items() if k != "db_url"},
        "viewer_token": token,
        "workdir": str(work),
        "state_file": str(state_file),
        "stop_command": stop_command,
        "processes": [{"name": p.name, "pid": p.pid, "log": p.log} for p in procs],
    }


def _stop(work: Path, output: str) -> None:
    from edgectl.demo.kept import stop

    outcomes = stop(work)
    emit({"workdir": str(work), "processes": [asdict(o) for o in outcomes]}, output, _stop_table)
