"""The whole EdgeGLM story, for real, on one machine: what ``edgectl demo`` runs and tests check.

    1. a managed mosquitto and the hub (``edgectl hub serve``, SQLite unless a database URL is given)
    2. a tiny GLM trained here; 1.0.0 and its fine-tune 1.1.0 exported for cpu-x86-int8 through the
       quality gate and signed; 1.2.0 deliberately broken (see ``models``); all three published
    3. three ``edge-agent run`` processes, empty; the hub registers them; the operator labels them
    4. deploy 1.0.0 (a full download to each), then sensor requests over MQTT 5 and the answers
    5. a dry run of 1.1.0 (what each device will download), then 1.1.0 in waves 1, 2, 3 devices:
       delta sync, bytes the hub sent against the full size
    6. deploy 1.2.0: the canary's smoke test fails, it rolls back by itself, the hub reverts the
       rollout and the fleet stays on 1.1.0, answering
    7. the audit log, then every process stopped (or, with ``keep``, left running: see ``kept``)

``run_story`` returns a JSON-able dict with every measured number and a ``checks`` list of
(name, passed) pairs; the story stops at the first step that does not happen as it should.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from edgectl.demo.fleet import LocalFleet
from edgectl.demo.models import MODEL, build_versions
from edgectl.demo.procs import require_mosquitto, wait_for

DEVICES = ["demo-box-1", "demo-box-2", "demo-box-3"]
SENSOR_PROMPT = "Sensor report 7. Sensor P-12 on the pump in the north bay reads 9 bar."


class StoryFailed(RuntimeError):
    """A step of the story did not happen as it should; ``result`` holds what did."""

    def __init__(self, why: str, result: dict[str, Any]) -> None:
        super().__init__(why)
        self.result = result


def _bundle_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def run_story(
    work: Path,
    say: Callable[[str], None] = lambda _line: None,
    *,
    db_url: str | None = None,
    broker_port: int | None = None,
    steps: int = 300,
    keep: bool = False,
) -> dict[str, Any]:
    """The story's result; with ``keep``, a story that ends well leaves the broker (if it is the
    demo's own), the hub and the agents running and ``result["kept"]`` says who and where they are.
    """
    t0 = time.perf_counter()
    result: dict[str, Any] = {"checks": [], "devices": DEVICES}

    def check(name: str, ok: bool) -> None:
        result["checks"].append([name, bool(ok)])
        if not ok:
            raise StoryFailed(f"the demo did not end as it should: {name}", result)

    if broker_port is None:
        require_mosquitto()  # before minutes of training, not after
    versions = build_versions(work, say, steps=steps)
    result.update(
        key_id=versions.key_id,
        quality=versions.quality,
        train_s=round(versions.train_s, 1),
        export_s=round(versions.export_s, 1),
        bundle_bytes={v: _bundle_bytes(f) for v, f in versions.folders.items()},
    )
    ended = False
    fleet = LocalFleet(work / "run", versions.public_key, db_url=db_url, broker_port=broker_port, say=say)
    try:
        fleet.start_hub()
        published = {}
        for version, folder in versions.folders.items():
            out = fleet.publish(folder)
            published[version] = {"sent": out["bytes_sent"], "total": out["bytes_total"]}
            say(f"published {MODEL}@{version}: {out['bytes_sent']:,} of {out['bytes_total']:,} bytes sent")
        result["published"] = published

        fleet.start_agents(DEVICES)
        for device_id in DEVICES:
            fleet.label(device_id, site="demo")
        say(f"labelled {', '.join(DEVICES)} site=demo")

        # --- 1.0.0 to an empty fleet: a full download each
        sent0, t_v1 = fleet.bytes_sent(), time.perf_counter()
        first = fleet.wait_rollout(fleet.deploy(f"{MODEL}@1.0.0")["id"])
        result["v1"] = {
            "rollout": first["id"],
            "state": first["state"],
            "bytes_sent": int(fleet.bytes_sent() - sent0),
            "seconds": round(time.perf_counter() - t_v1, 1),
        }
        say(f"rollout {first['id']} of 1.0.0: {first['state']}, {result['v1']['bytes_sent']:,} bytes sent")
        check("1.0.0 rolled out to every device", first["state"] == "completed")

        sensor = fleet.connect_sensor()
        answers = {}
        for device_id in DEVICES:
            reply = sensor.ask(device_id, SENSOR_PROMPT)
            answers[device_id] = {
                "text": reply.text.strip(),
                "error": reply.error.model_dump() if reply.error else None,
                "tokens": len(reply.tokens),
                "decode_ms": reply.timings.decode_ms if reply.timings else None,
            }
        result.update(prompt=SENSOR_PROMPT, answers=answers)
        say(f"sensor asks {DEVICES[0]}: {SENSOR_PROMPT!r}")
        say(f"  answer: {answers[DEVICES[0]]['text']!r}")
        check(
            "every device answers the sensor", all(a["error"] is None and a["text"] for a in answers.values())
        )
        check("the same model gives the same greedy answer", len({a["text"] for a in answers.values()}) == 1)

        # --- 1.1.0 in waves, delta sync
        dry = fleet.deploy(f"{MODEL}@1.1.0", waves=["1n", "2n", "100"], dry_run=True)
        planned = {m["device"]: m["bytes"] for w in dry["waves"] for m in w["devices"]}
        modes = {m["device"]: m["mode"] for w in dry["waves"] for m in w["devices"]}
        say(
            f"dry run of 1.1.0: waves {[len(w['devices']) for w in dry['waves']]}, bytes per device {planned}"
        )
        sent0 = fleet.bytes_sent()
        t1 = time.perf_counter()
        second = fleet.wait_rollout(
            fleet.deploy(f"{MODEL}@1.1.0", waves=["1n", "2n", "100"], soak_s=2.0)["id"]
        )
        sent = int(fleet.bytes_sent() - sent0)
        full = result["bundle_bytes"]["1.1.0"] * len(DEVICES)
        result["v11"] = {
            "rollout": second["id"],
            "state": second["state"],
            "waves": [{"wave": w["wave"], "size": w["size"], "state": w["state"]} for w in second["waves"]],
            "planned_bytes": planned,
            "modes": modes,
            "bytes_sent": sent,
            "full_bytes": full,
            "ratio": round(sent / full, 4),
            "seconds": round(time.perf_counter() - t1, 1),
        }
        say(
            f"rollout {second['id']} of 1.1.0 in {len(second['waves'])} waves: {second['state']}; "
            f"{sent:,} bytes sent for 3 devices vs {full:,} as full bundles ({sent / full:.1%})"
        )
        check("1.1.0 rolled out in three waves", second["state"] == "completed" and len(second["waves"]) == 3)
        check("1.1.0 went as deltas", all(m == "delta" for m in modes.values()) and sent < full / 2)
        check("every device runs 1.1.0", _all_on(fleet, "1.1.0"))

        # --- 1.2.0, broken: the canary catches it, the hub reverts
        t2 = time.perf_counter()
        third = fleet.wait_rollout(fleet.deploy(f"{MODEL}@1.2.0", waves=["1n", "100"], soak_s=2.0)["id"])
        deployments = third.get("deployments", [])
        first_wave = min((d["wave"] for d in deployments), default=0)
        canary = next((d for d in deployments if d["wave"] == first_wave), None)
        result["v12"] = {
            "rollout": third["id"],
            "state": third["state"],
            "reason": third["reason"],
            "canary": canary,
            "devices": third["devices"],
            "seconds": round(time.perf_counter() - t2, 1),
        }
        say(f"rollout {third['id']} of 1.2.0: {third['state']} ({third['reason']})")
        check("the broken 1.2.0 was reverted", third["state"] == "reverted")
        check("every device is back on (or stayed on) 1.1.0", _all_on(fleet, "1.1.0"))
        after = {d: sensor.ask(d, SENSOR_PROMPT) for d in DEVICES}
        check("every device still answers", all(r.error is None and r.text for r in after.values()))

        audit = fleet.audit()
        actions = [e["action"] for e in audit]
        result["audit"] = {"entries": len(audit), "actions": sorted(set(actions))}
        needed = {"release.publish", "device.label", "rollout.start", "rollout.completed", "rollout.reverted"}
        check("the audit log holds every operator action and the revert", needed <= set(actions))
        ended = True
    except TimeoutError as exc:
        raise StoryFailed(f"the demo did not end as it should: {exc}", result) from exc
    finally:
        if keep and ended:
            assert fleet.hub is not None
            result["kept"] = {
                "hub_url": fleet.hub.url,
                "hub_port": fleet.hub.port,
                "broker_port": fleet.broker_port,
                "own_broker": fleet.broker is not None,
                "db_url": fleet.db_url,
                "processes": [asdict(p) for p in fleet.detach()],
            }
            result["stopped"] = []
        else:
            codes = fleet.close()
            result["stopped"] = [[name, code] for name, code in codes]
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def _all_on(fleet: LocalFleet, version: str) -> bool:
    want = f"{MODEL}@{version}"
    try:
        return bool(wait_for(lambda: all(d["current"] == want for d in fleet.devices().values()), 30, want))
    except TimeoutError:
        return False
