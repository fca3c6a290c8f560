"""``edgectl deploy``, ``edgectl rollouts ...`` and ``edgectl rollback``, through the hub's API.

``rollouts status N --watch`` ends as ``kubectl rollout status`` does: exit 0 once the rollout
completed, exit 1 (the state and reason on stderr) once it reverted, aborted, failed or was rolled
back; a paused rollout is waited on (``-o json`` stops there, exit 1). ``rollback`` when there is
nothing left to send back (the hub reverted it already) says so, with when and why, and exits 0.
"""

from __future__ import annotations

import re
import time
from typing import Any

import click

from edgectl.output import emit, output_option, render_table
from edgectl.remote import client_from, hub_options
from edgeglm.contracts import ROLLOUT_ID_MAX, name_problem, version_problem
from edgeglm.errors import EdgeError, UsageError
from edgeglm.hub_api import API_PREFIX, DryRunView, RollbackView, RolloutDetail, RolloutView
from edgeglm.lifecycle import FINAL_ROLLOUT, RolloutState
from edgeglm.rollout_params import DEFAULTS, OnFailure

ROLLOUTS = f"{API_PREFIX}/rollouts"
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")
_ROLLOUT_ID = click.IntRange(1, ROLLOUT_ID_MAX)


class Duration(click.ParamType):
    """``60s``, ``5m``, ``1h``, ``250ms`` or plain seconds."""

    name = "duration"

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        if isinstance(value, int | float):
            return float(value)
        m = _DURATION.match(str(value).strip())
        if not m:
            self.fail(f"{value!r}: write 60s, 5m, 1h or 250ms", param, ctx)
        scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m[2]]
        return float(m[1]) * scale


def _duration_text(seconds: float) -> str:
    """A ``Duration`` text for ``seconds``: 900 -> ``15m``, 60 -> ``60s``."""
    for unit, scale in (("h", 3600), ("m", 60)):
        if seconds >= 2 * scale and seconds % scale == 0:
            return f"{seconds / scale:g}{unit}"
    return f"{seconds:g}s"


class Ratio(click.ParamType):
    """``5%`` or ``0.05``."""

    name = "ratio"

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        text = str(value).strip()
        try:
            v = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            self.fail(f"{value!r}: write 5% or 0.05", param, ctx)
        if not 0 <= v <= 1:
            self.fail(f"{value!r} is not between 0 and 100%", param, ctx)
        return v


class ReleaseRef(click.ParamType):
    """``MODEL@VERSION``, e.g. ``glm-tiny@1.1.0``."""

    name = "release"

    def convert(self, value: Any, param: Any, ctx: Any) -> str:
        text = str(value)
        model, at, version = text.rpartition("@")
        problem = "no @VERSION" if not at else name_problem(model) or version_problem(version)
        if problem:
            self.fail(f"{text[:80]!r}: write MODEL@VERSION, e.g. glm-tiny@1.1.0 ({problem})", param, ctx)
        return text


def _selector(fleet: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for pair in fleet:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UsageError("--fleet", f"{pair!r}: write key=value")
        out[key] = value
    return out


def _rollout_table(r: RolloutView) -> str:
    waves = " ".join(f"[{w.wave}:{w.size} {w.state}]" for w in r.waves)
    devices = ", ".join(f"{k} {v}" for k, v in sorted(r.devices.items()))
    lines = [
        f"rollout {r.id}  {r.release}  {r.state.upper()}  wave {r.current_wave}",
        f"waves    {waves}",
        f"devices  {devices}",
    ]
    if r.gates:
        lines.append(f"gates    {', '.join(r.gates)} (after {r.min_requests} request(s) per wave)")
    if r.reason:
        lines.append(f"reason   {r.reason}")
    if isinstance(r, RolloutDetail) and r.history:
        lines.append("history")
        for e in r.history:
            after = e.after or {}
            note = after.get("reason") or after.get("detail") or after.get("nothing") or ""
            at = e.at.isoformat(timespec="seconds")
            lines.append(f"  {at}  {e.actor:<12} {e.action:<20} {note}".rstrip())
    return "\n".join(lines)


def _dry_run_table(d: DryRunView) -> str:
    lines = [f"dry run: {d.release} to {d.devices} device(s) in {len(d.waves)} wave(s)"]
    for w in d.waves:
        lines.append(f"wave {w.wave}: {len(w.devices)} device(s), {w.bytes} bytes")
        lines += [f"  {m.device:<24} from {m.from_}  {m.bytes} bytes ({m.mode})" for m in w.devices]
    for reason, ids in d.skipped.items():
        lines.append(f"skipped ({reason}): {', '.join(ids)}")
    if d.quality_failed:
        lines.append(
            f"quality gate: FAILED for {', '.join(d.quality_failed)} (published with --force);"
            " deploying it needs an admin token and --force"
        )
    else:
        lines.append("quality gate: passed")
    return "\n".join(lines)


@click.command("deploy")
@click.argument("release", metavar="MODEL@VERSION", type=ReleaseRef())
@click.option(
    "--fleet", multiple=True, metavar="KEY=VALUE", help="Label selector (repeatable; all must match)."
)
@click.option(
    "--waves",
    default=",".join(DEFAULTS.waves),
    show_default=True,
    help="Cumulative percent; 3n = a count of devices.",
)
@click.option(
    "--soak",
    type=Duration(),
    default=_duration_text(DEFAULTS.soak_s),
    show_default=True,
    help="Soak time per wave.",
)
@click.option(
    "--max-failure",
    type=Ratio(),
    default=f"{DEFAULTS.max_failure_ratio * 100:g}%",
    show_default=True,
    help="Failed devices per wave.",
)
@click.option(
    "--success-threshold", type=Ratio(), default=f"{DEFAULTS.success_threshold * 100:g}%", show_default=True
)
@click.option(
    "--gate",
    "gates",
    multiple=True,
    help="p95_ms<=250, error_rate<=0.02, smoke_agreement>=0.9, or p95_ratio<=1.2 against devices"
    " still on the old version (refused where there are none, e.g. a first deploy).",
)
@click.option(
    "--gate-min-requests",
    "min_requests",
    type=click.IntRange(1),
    default=DEFAULTS.min_requests,
    show_default=True,
    help="Requests a wave's updated devices must serve before a gate is judged (an idle wave waits).",
)
@click.option(
    "--device-timeout", type=Duration(), default=_duration_text(DEFAULTS.device_timeout_s), show_default=True
)
@click.option(
    "--min-samples",
    type=click.IntRange(1),
    default=DEFAULTS.min_samples,
    show_default=True,
    help="Health samples a gate needs.",
)
@click.option(
    "--on-failure",
    type=click.Choice([f.value for f in OnFailure]),
    default=DEFAULTS.on_failure.value,
    show_default=True,
)
@click.option(
    "--dry-run", is_flag=True, help="Print waves, devices and bytes each would download; change nothing."
)
@click.option(
    "--force",
    is_flag=True,
    help="Deploy a release whose bundle failed its quality gate (admin token; audited).",
)
@hub_options
@output_option
def deploy(
    release: str,
    fleet: tuple[str, ...],
    waves: str,
    soak: float,
    max_failure: float,
    success_threshold: float,
    gates: tuple[str, ...],
    min_requests: int,
    device_timeout: float,
    min_samples: int,
    on_failure: str,
    dry_run: bool,
    force: bool,
    hub_url: str,
    token: str | None,
    output: str,
) -> None:
    """Start a staged rollout of MODEL@VERSION to the devices --fleet selects."""
    body = {
        "release": release,
        "selector": _selector(fleet),
        "waves": [w for w in waves.split(",") if w.strip()],
        "soak_s": soak,
        "max_failure_ratio": max_failure,
        "success_threshold": success_threshold,
        "gates": list(gates),
        "min_requests": min_requests,
        "device_timeout_s": device_timeout,
        "min_samples": min_samples,
        "on_failure": on_failure,
        "dry_run": dry_run,
        "force": force,
    }
    client = client_from(hub_url, token)
    if dry_run:
        emit(client.call("POST", ROLLOUTS, DryRunView, json_body=body), output, _dry_run_table)
    else:
        emit(client.call("POST", ROLLOUTS, RolloutView, json_body=body), output, _rollout_table)


@click.group("rollouts")
def rollouts() -> None:
    """Rollouts: list, status (--watch), pause, resume, abort."""


@rollouts.command("list")
@click.option("--state", type=click.Choice([s.value for s in RolloutState]), default=None)
@hub_options
@output_option
def rollouts_list(state: str | None, hub_url: str, token: str | None, output: str) -> None:
    rows = client_from(hub_url, token).get(ROLLOUTS, list[RolloutView], state=state)
    emit(
        rows,
        output,
        lambda rs: render_table(
            ["ID", "RELEASE", "STATE", "WAVE", "DEVICES", "CREATED BY", "UPDATED"],
            [
                [
                    r.id,
                    r.release,
                    r.state,
                    f"{r.current_wave + 1}/{len(r.waves)}",
                    sum(r.devices.values()),
                    r.created_by,
                    r.updated_at.isoformat(),
                ]
                for r in rs
            ],
        ),
    )


@rollouts.command("status")
@click.argument("rollout_id", type=_ROLLOUT_ID)
@click.option(
    "--watch",
    is_flag=True,
    help="Redraw every second until the rollout ends: exit 0 if it completed, 1 if it reverted,"
    " aborted, failed or was rolled back (Ctrl-C leaves).",
)
@click.option("--interval", type=Duration(), default="1s", show_default=True)
@hub_options
@output_option
def rollouts_status(
    rollout_id: int, watch: bool, interval: float, hub_url: str, token: str | None, output: str
) -> None:
    client = client_from(hub_url, token)
    detail = not watch  # the per-device list and the history, once; a watch redraws the summary
    shape: type[RolloutView] = RolloutDetail if detail else RolloutView
    while True:
        data = client.get(f"{ROLLOUTS}/{rollout_id}", shape, devices=detail)
        if watch and output == "table":
            click.clear()
        emit(data, output, _rollout_table)
        if not watch:
            return
        if data.state is RolloutState.COMPLETED:
            return
        if data.state in FINAL_ROLLOUT or (data.state is RolloutState.PAUSED and output == "json"):
            raise EdgeError(
                f"rollout {data.id}",
                f"{data.state}" + (f": {data.reason}" if data.reason else ""),
                hint=f"edgectl rollouts status {data.id} shows each device and the rollout's history.",
            )
        time.sleep(interval)


def _control(action: str) -> click.Command:
    @click.command(action, help=f"{action.capitalize()} a rollout.")
    @click.argument("rollout_id", type=_ROLLOUT_ID)
    @hub_options
    @output_option
    def command(rollout_id: int, hub_url: str, token: str | None, output: str) -> None:
        data = client_from(hub_url, token).call("POST", f"{ROLLOUTS}/{rollout_id}/{action}", RolloutView)
        emit(data, output, _rollout_table)

    return command


for _action in ("pause", "resume", "abort"):
    rollouts.add_command(_control(_action))


@click.command("rollback")
@click.argument("model")
@click.option("--fleet", multiple=True, metavar="KEY=VALUE", help="Only these devices (label selector).")
@hub_options
@output_option
def rollback(model: str, fleet: tuple[str, ...], hub_url: str, token: str | None, output: str) -> None:
    """Send the devices MODEL's latest rollout moved back to the version they ran before.

    Exits 0 when there is nothing left to send back (the hub reverted the rollout already),
    saying when and why; 1 when none of the moved devices matches --fleet."""
    data = client_from(hub_url, token).call(
        "POST",
        f"{API_PREFIX}/rollbacks",
        RollbackView,
        json_body={"model": model, "selector": _selector(fleet)},
    )
    emit(data, output, _rollback_text)


def _rollback_text(d: RollbackView) -> str:
    if d.nothing:
        return f"rollout {d.rollout}: nothing to roll back: {d.nothing}"
    return (
        f"rollout {d.rollout}: {len(d.reverted)} device(s) sent back to the version each ran before;"
        f" the rollout is {d.state}"
    )
