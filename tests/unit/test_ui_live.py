"""A rollout page's live part is a summary, and 304 while nothing changed
(cloud_hub.ui.rollout_pages.live_fragment): each wave's counts, the current wave's first 200
devices and "and N more", an ETag the next poll sends back; a change (a pause) is a new one."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from cloud_hub.models import Device, DeviceDeployment
from tests.unit.ui_hub import (
    ORIGIN,
    add_release,
    add_rollout,
    add_token,
    client_of,
    csrf_of,
    new_hub,
    sign_in,
)

WAVES = (10, 440)  # the current wave (the second) has more devices than a page shows


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, int, str]]:
    from cloud_hub.auth import Role

    ctx = new_hub(tmp_path_factory.mktemp("ui-live"))
    with ctx.db.session() as s:
        secret = add_token(s, "operator-l", Role.operator)
        r = add_rollout(
            s,
            add_release(s),
            waves=[{"count": WAVES[0]}, {"percent": 100.0}],
            gates=["error_rate<=0.05"],
            state="running",
            current_wave=1,
            wave_rows=[(WAVES[0], "passed"), (WAVES[1], "pending")],
        )
        n = 0
        for wave, size in enumerate(WAVES):
            for _ in range(size):
                device = f"box-{n:04d}"
                s.add(Device(id=device, profile="cpu-x86-int4", labels={}, online=True, health={}))
                s.add(
                    DeviceDeployment(
                        rollout_id=r.id,
                        device_id=device,
                        wave=wave,
                        to_version="1.1.0",
                        state="succeeded" if wave == 0 else "pending",
                    )
                )
                n += 1
        rid = int(r.id)
    with client_of(ctx) as client:
        sign_in(client, secret)
        yield client, rid, csrf_of(client.get("/ui/").text)
    ctx.db.dispose()


def test_the_live_part_shows_counts_and_the_current_wave_capped(live: tuple[Any, int, str]) -> None:
    client, rid, _ = live
    for path in (f"/ui/rollouts/{rid}", f"/ui/rollouts/{rid}/live"):
        page = client.get(path)
        assert page.status_code == 200
        devices = set(re.findall(r'href="/ui/devices/(box-\d+)"', page.text))
        assert len(devices) == 200, path  # the current wave's first 200 by id, no other wave's
        assert min(devices) == f"box-{WAVES[0]:04d}" and "box-0000" not in devices
        assert f"and {WAVES[1] - 200} more devices in this wave" in page.text
        assert f"{WAVES[0]} succeeded" in page.text and f"{WAVES[1]} pending" in page.text


def test_an_unchanged_live_part_is_a_304_and_a_change_is_not(live: tuple[Any, int, str]) -> None:
    client, rid, csrf = live
    first = client.get(f"/ui/rollouts/{rid}/live")
    etag = first.headers["etag"]
    assert etag.startswith('W/"')
    same = client.get(f"/ui/rollouts/{rid}/live", headers={"If-None-Match": etag})
    assert same.status_code == 304 and same.content == b"" and same.headers["etag"] == etag
    paused = client.post(f"/ui/rollouts/{rid}/pause", data={"csrf": csrf, "confirm": "pause"}, headers=ORIGIN)
    assert paused.status_code == 303
    after = client.get(f"/ui/rollouts/{rid}/live", headers={"If-None-Match": etag})
    assert after.status_code == 200 and after.headers["etag"] != etag
    assert 'id="rollout-state">paused<' in after.text
