"""The dashboard's long lists come a page at a time (cloud_hub.ui.paging): the fleet page by
device id with its total counted in SQL, a label selector matched over a bounded scan with a
"continue" link, checked ``after`` / ``limit``; and a wave's own page, which lists a past wave's
devices after the rollout moved on."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import insert

from cloud_hub.models import Device, DeviceDeployment
from tests.unit.ui_hub import add_release, add_rollout, add_token, client_of, new_hub, sign_in

N = 21_000  # past the 20,000 rows one fleet page may scan for a label selector
RARE = 20_500  # the only device labelled line=rare: beyond the first scan
WAVE0 = 250  # wave 0 of the rollout: more than a page


def _device(i: int) -> dict[str, Any]:
    labels = {"site": "p7"} if i % 10 == 0 else {"site": "p8"}
    if i == RARE:
        labels["line"] = "rare"
    return {
        "id": f"box-{i:05d}",
        "profile": "cpu-x86-int4",
        "labels": labels,
        "online": i % 3 != 0,
        "health": {"latency_p95_ms": 120, "error_rate": 0.02, "requests": 5},
    }


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, int]]:
    from cloud_hub.auth import Role

    ctx = new_hub(tmp_path_factory.mktemp("ui-paging"))
    with ctx.db.session() as s:
        secret = add_token(s, "viewer-p", Role.viewer)
        s.execute(insert(Device), [_device(i) for i in range(N)])
        r = add_rollout(
            s,
            add_release(s),
            waves=[{"count": WAVE0}, {"count": 10}],
            state="completed",
            current_wave=1,
            wave_rows=[(WAVE0, "passed"), (10, "passed")],
        )
        rows = [
            {
                "rollout_id": r.id,
                "device_id": f"box-{i:05d}",
                "wave": 0 if i < WAVE0 else 1,
                "from_version": "1.0.0",
                "to_version": "1.1.0",
                "state": "failed" if i == 7 else "succeeded",
                "last_step": "healthy",
                "detail": "<script>alert(1)</script>" if i == 7 else "",
            }
            for i in range(WAVE0 + 10)
        ]
        s.execute(insert(DeviceDeployment), rows)
        rid = int(r.id)
    with client_of(ctx) as client:
        sign_in(client, secret)
        yield client, rid
    ctx.db.dispose()


def _ids(html: str, table: str = "devices") -> list[str]:
    body = html.split(f'id="{table}"', 1)[1].split("</table>", 1)[0]
    return re.findall(r'<th scope="row"><a href="/ui/devices/([^"]+)"', body)


def _next(html: str) -> str:
    return re.search(r'href="([^"]+)" rel="next"', html)[1].replace("&amp;", "&")  # type: ignore[index]


def test_the_fleet_comes_200_a_page_by_id_with_its_total(hub: tuple[Any, int]) -> None:
    client, _ = hub
    first = client.get("/ui/")
    assert first.status_code == 200
    assert _ids(first.text) == [f"box-{i:05d}" for i in range(200)]
    assert f"{N} devices; showing 200, box-00000 to box-00199" in first.text
    assert _next(first.text) == "/ui/?after=box-00199"
    second = client.get(_next(first.text))
    assert _ids(second.text)[0] == "box-00200" and len(_ids(second.text)) == 200
    assert 'href="/ui/?">First page' in second.text
    last = client.get(f"/ui/?after=box-{N - 51:05d}")
    assert len(_ids(last.text)) == 50 and 'rel="next"' not in last.text
    assert len(_ids(client.get("/ui/?limit=500").text)) == 500


def test_the_online_filter_is_counted_in_sql_and_kept_in_the_next_link(hub: tuple[Any, int]) -> None:
    client, _ = hub
    page = client.get("/ui/?online=no")
    ids = _ids(page.text)
    assert len(ids) == 200 and all(int(i[4:]) % 3 == 0 for i in ids)
    assert f"{N // 3} devices;" in page.text
    assert _next(page.text) == f"/ui/?online=no&after={ids[-1]}"


def test_a_label_selector_pages_by_id_and_keeps_the_selector(hub: tuple[Any, int]) -> None:
    client, _ = hub
    page = client.get("/ui/?selector=site%3Dp7&limit=50")
    ids = _ids(page.text)
    assert ids == [f"box-{i:05d}" for i in range(0, 500, 10)]
    assert "50 matching devices on this page" in page.text
    assert _next(page.text) == "/ui/?selector=site%3Dp7&limit=50&after=box-00490"
    after = client.get(_next(page.text))
    assert _ids(after.text)[0] == "box-00500"
    # reserved keys match device fields through the same test as the API's listing
    one = client.get("/ui/?selector=id%3Dbox-00042")
    assert _ids(one.text) == ["box-00042"] and 'rel="next"' not in one.text


def test_a_selector_scan_stops_at_20000_rows_and_offers_to_continue(hub: tuple[Any, int]) -> None:
    client, _ = hub
    page = client.get("/ui/?selector=line%3Drare")
    assert page.status_code == 200 and _ids(page.text) == []
    assert 'id="scan-stopped"' in page.text and "20000 devices (up to box-19999)" in page.text
    more = re.search(r'<a href="([^"]+)">Continue scanning after box-19999', page.text)
    assert more is not None
    rest = client.get(more[1].replace("&amp;", "&"))
    assert _ids(rest.text) == [f"box-{RARE:05d}"]
    assert 'id="scan-stopped"' not in rest.text and 'rel="next"' not in rest.text


@pytest.mark.parametrize(
    "query",
    ["after=..%2Fetc", "after=" + "a" * 65, "after=%3Cb%3E", "limit=0", "limit=501", "limit=ten", "limit=-1"],
)
def test_bad_paging_parameters_are_a_400_page(hub: tuple[Any, int], query: str) -> None:
    client, _ = hub
    page = client.get(f"/ui/?{query}")
    assert page.status_code == 400
    assert "<b>" not in page.text and ("after" in page.text or "limit" in page.text)


def test_a_past_wave_has_its_own_page_of_devices(hub: tuple[Any, int]) -> None:
    client, rid = hub
    live = client.get(f"/ui/rollouts/{rid}")
    assert live.status_code == 200
    assert f'href="/ui/rollouts/{rid}/waves/0"' in live.text  # wave 0 is over: a link, no rows
    assert 'href="/ui/devices/box-00000"' not in live.text
    wave = client.get(f"/ui/rollouts/{rid}/waves/0")
    assert wave.status_code == 200
    ids = _ids(wave.text, "wave-devices")
    assert ids == [f"box-{i:05d}" for i in range(200)]
    assert f"{WAVE0} devices in wave 0; showing 200" in wave.text
    assert "1.0.0 → 1.1.0" in wave.text and "120 ms" in wave.text and "2.00 %" in wave.text
    assert "<script>alert(1)</script>" not in wave.text and "&lt;script&gt;alert(1)" in wave.text
    rest = client.get(_next(wave.text))
    assert _ids(rest.text, "wave-devices") == [f"box-{i:05d}" for i in range(200, WAVE0)]
    failed = client.get(f"/ui/rollouts/{rid}/waves/0?state=failed")
    assert _ids(failed.text, "wave-devices") == ["box-00007"] and "1 device failed in wave 0" in failed.text
    assert _ids(client.get(f"/ui/rollouts/{rid}/waves/1").text, "wave-devices")[0] == f"box-{WAVE0:05d}"


@pytest.mark.parametrize(
    ("path", "status"), [("waves/2", 404), ("waves/x", 404), ("waves/0?state=nope", 400)]
)
def test_a_wave_that_does_not_exist_is_a_404_page(hub: tuple[Any, int], path: str, status: int) -> None:
    client, rid = hub
    page = client.get(f"/ui/rollouts/{rid}/{path}")
    assert page.status_code == status and "<html" in page.text.lower()
    if path == "waves/2":
        assert "its waves are 0 to 1" in page.text  # the wave page's own refusal, not a stray path
    assert client.get("/ui/rollouts/999/waves/0").status_code == 404
