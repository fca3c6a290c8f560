"""systemd integration of the daemon: READY=1 once serving, WATCHDOG=1 only while the engine answers."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from edgectl.demo.agent_box import AgentBox
from edgectl.demo.procs import ManagedBroker

pytestmark = pytest.mark.integration


def test_the_daemon_says_ready_and_pets_the_watchdog(tiny_bundle: Any, tmp_path: Path) -> None:
    folder, _profile, public = tiny_bundle("fused-int8")
    broker = ManagedBroker(tmp_path).start()
    sock_path = Path("/tmp") / f"edge-notify-{time.monotonic_ns()}.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(str(sock_path))
    srv.settimeout(30)
    (tmp_path / "box").mkdir()
    agent = AgentBox(tmp_path / "box", "box-wd", broker.port, public, bootstrap_bundle=str(folder))
    try:
        agent.start(env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"})
        got: list[str] = []
        while "READY=1" not in got:
            got.append(srv.recv(4096).decode())
        pets = 0
        deadline = time.monotonic() + 5
        while pets < 3 and time.monotonic() < deadline:
            if srv.recv(4096) == b"WATCHDOG=1":
                pets += 1
        assert pets == 3
        agent.stop()
        rest = []
        srv.settimeout(0.5)
        try:
            while True:
                rest.append(srv.recv(4096).decode())
        except TimeoutError:
            pass
        assert "STOPPING=1" in rest
    finally:
        agent.stop()
        srv.close()
        sock_path.unlink(missing_ok=True)
        broker.stop()


def test_front_is_unhealthy_while_the_engine_is_stuck_and_when_its_thread_dies(tiny_bundle: Any) -> None:
    from edge_agent.front import Front
    from edge_agent.inference.engine import Engine
    from edge_agent.inference.generation import Prompt
    from edge_agent.metrics import Metrics
    from edgeglm.mqtt import BrokerSettings, MqttLink

    folder, profile, _public = tiny_bundle("fused-int8")
    engine = Engine.load(folder, profile=profile)
    front = Front(MqttLink(BrokerSettings(), "unused"), Metrics(), device_id="box-h", stall_s=0.5)
    assert front.healthy()  # no model yet: waiting for one is healthy
    front.serve(engine)
    current = front.current()
    assert current is not None
    _, scheduler = current
    assert front.healthy()
    release = threading.Event()
    real_decode = engine.graph.decode

    def stuck(*args: Any, **kwargs: Any) -> Any:
        release.wait(30)
        return real_decode(*args, **kwargs)

    engine.graph.decode = stuck  # type: ignore[method-assign]
    done = threading.Event()
    scheduler.submit(Prompt(ids=(1, 2, 3), max_tokens=4), on_done=lambda _r: done.set())
    time.sleep(0.1)
    assert front.healthy()  # stuck, but not for long yet
    time.sleep(0.8)
    assert not front.healthy()  # a request runs and no decode step for longer than stall_s
    release.set()
    assert done.wait(10)
    engine.graph.decode = real_decode  # type: ignore[method-assign]
    assert front.healthy()
    scheduler.stop()
    assert not front.healthy()  # the scheduler thread is gone


def test_a_replaced_engine_is_forgotten_once_it_has_retired(tiny_bundle: Any) -> None:
    """Every switch retires the old engine on a thread; done, it leaves nothing behind."""
    from edge_agent.front import Front
    from edge_agent.inference.engine import Engine
    from edge_agent.metrics import Metrics
    from edgeglm.mqtt import BrokerSettings, MqttLink

    folder, profile, _public = tiny_bundle("fused-int8")
    one, two = Engine.load(folder, profile=profile), Engine.load(folder, profile=profile)
    front = Front(MqttLink(BrokerSettings(), "unused"), Metrics(), device_id="box-r")
    front.serve(one)
    for _ in range(5):  # switch back and forth, as updates and reverts do
        old = front.serve(two if front.current()[0] is one else one)  # type: ignore[index]
        assert old is not None
        front.quiesce(old)
    deadline = time.monotonic() + 10
    while front.retiring() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert front.retiring() == 0
    front.stop()
