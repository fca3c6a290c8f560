"""``edgectl deploy``, ``edgectl rollouts ...`` and ``edgectl rollback``, through the hub's API."""

from __future__ import annotations

import re
import time
from typing import Any

import click

from edgectl.output import emit, output_option, render_table
from edgectl.remote import client_from, hub_options
from edgeglm.contracts import ROLLOUT_ID_MAX
from edgeglm.errors import UsageError
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
    if r.reason:
        lines.append(f"reason   {r.reason}")
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
@click.argument("release", metavar="MODEL@VERSION")
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
    "--gate", "gates", multiple=True, help="p95_ratio<=1.2, error_rate<=0.02, smoke_agreement>=0.9."
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
@click.option("--watch", is_flag=True, help="Redraw every second until the rollout ends (Ctrl-C leaves).")
@click.option("--interval", type=Duration(), default="1s", show_default=True)
@hub_options
@output_option
def rollouts_status(
    rollout_id: int, watch: bool, interval: float, hub_url: str, token: str | None, output: str
) -> None:
    client = client_from(hub_url, token)
    detail = output == "json" and not watch  # the per-device list, only where it is printed
    shape: type[RolloutView] = RolloutDetail if detail else RolloutView
    while True:
        data = client.get(f"{ROLLOUTS}/{rollout_id}", shape, devices=detail)
        if watch and output == "table":
            click.clear()
        emit(data, output, _rollout_table)
        if (
            not watch
            or data.state in FINAL_ROLLOUT
            or (data.state is RolloutState.PAUSED and output == "json")
        ):
            return
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
    """Send the devices MODEL's latest rollout moved back to the version they ran before."""
    data = client_from(hub_url, token).call(
        "POST",
        f"{API_PREFIX}/rollbacks",
        RollbackView,
        json_body={"model": model, "selector": _selector(fleet)},
    )
    emit(data, output, lambda d: f"rollout {d.rollout}: {len(d.reverted)} device(s) sent back")
