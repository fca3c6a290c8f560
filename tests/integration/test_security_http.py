"""The agent's HTTP front attacked as a network neighbour would, against real agent processes
(issue 22: finding 6, and the lower finding on unsigned bundles).

    300 clients at once                 each answered 200, 429 or 503: none reset, none hung
    a token is configured               the OpenAI SDK gets 401 invalid_api_key without it, 200 with it
    --http 0.0.0.0 without the flag     refused (exit 78) before any model loads; the daemon too
    no --trust                          refused (exit 2); --insecure-unsigned serves, with a warning
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from edgectl.demo.agent_box import AgentBox
from edgectl.demo.procs import Proc, free_port, healthy, tool

pytestmark = [pytest.mark.integration, pytest.mark.security]

EDGECTL = tool("edgectl")
TOKEN = "security-http-token-0123456789abcdef"
CHAT = [{"role": "user", "content": "The pump in hall two reads 4.2 bar."}]
HANG_S = 30.0


def _serve_argv(bundle: Path, *extra: str) -> list[str]:
    device = f"sec-{uuid.uuid4().hex[:6]}"
    return [EDGECTL, "-v", "agent", "serve", str(bundle), "--device-id", device, "--broker", "none", *extra]


@contextlib.contextmanager
def serving(bundle: Path, root: Path, *extra: str) -> Iterator[tuple[Proc, int]]:
    """``edgectl agent serve BUNDLE --http 127.0.0.1:PORT`` (no MQTT) until its /healthz answers."""
    port = free_port()
    argv = _serve_argv(bundle, "--http", f"127.0.0.1:{port}", *extra)
    proc = Proc("edgectl agent serve", argv, root / f"serve-{port}.log")
    proc.start_until(lambda: healthy(port), 120, "the agent's HTTP front")
    try:
        yield proc, port
    finally:
        assert proc.stop(grace=30) == 0, proc.log()[-2000:]


async def _client(port: int, body: bytes, start: asyncio.Event) -> str:
    """One client on its own connection: the answer's status, ``reset`` or ``hang``."""
    await start.wait()
    writer = None
    try:
        async with asyncio.timeout(HANG_S):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            await writer.drain()
            answer = await reader.read()  # the whole answer: the server closes after it
    except TimeoutError:
        return "hang"
    except ConnectionError:
        return "reset"
    finally:
        if writer is not None:
            writer.close()
    if not answer.startswith(b"HTTP/1.1 ") or b"\r\n\r\n" not in answer:
        return "reset"  # closed before a complete status line and headers
    return answer.split()[1].decode()


async def _burst(port: int, clients: int) -> list[str]:
    body = json.dumps({"messages": CHAT, "max_tokens": 4}).encode()
    start = asyncio.Event()
    tasks = [asyncio.create_task(_client(port, body, start)) for _ in range(clients)]
    await asyncio.sleep(0.1)
    start.set()
    return list(await asyncio.gather(*tasks))


def test_a_burst_of_300_clients_is_answered_without_resets_or_hangs(tiny_bundle: Any, tmp_path: Path) -> None:
    """The old stdlib front (listen backlog 5, a thread per connection) reset clients from 40 on."""
    folder, _profile, public = tiny_bundle("fused-int8")
    with serving(folder, tmp_path, "--trust", str(public)) as (_proc, port):
        outcomes = asyncio.run(_burst(port, 300))
        assert healthy(port)  # and it carries on
    counts = {o: outcomes.count(o) for o in set(outcomes)}
    assert set(counts) <= {"200", "429", "503"}, counts
    assert counts.get("200", 0) >= 1 and counts.get("503", 0) >= 1, counts  # served some, shed the rest


def test_a_configured_token_is_required_by_every_route_but_healthz(tiny_bundle: Any, tmp_path: Path) -> None:
    folder, _profile, public = tiny_bundle("fused-int8")
    token_file = tmp_path / "http.token"
    token_file.write_text(TOKEN + "\n")
    extra = ("--trust", str(public), "--http-token-file", str(token_file))
    with serving(folder, tmp_path, *extra) as (proc, port):
        base = f"http://127.0.0.1:{port}/v1"
        for key in ("not-the-token-0123456789abcdef", TOKEN[:-1]):
            intruder = openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=60)
            with pytest.raises(openai.AuthenticationError) as refused:
                intruder.chat.completions.create(model="tiny-edge", messages=CHAT, max_tokens=4)
            assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"
            with pytest.raises(openai.AuthenticationError):
                intruder.models.list()
        client = openai.OpenAI(base_url=base, api_key=TOKEN, max_retries=0, timeout=60)
        reply = client.chat.completions.create(model="tiny-edge", messages=CHAT, max_tokens=4)
        assert reply.choices[0].finish_reason == "length" and reply.usage is not None
        assert reply.usage.completion_tokens == 4
        assert client.models.retrieve("tiny-edge").id == "tiny-edge"
        stream = client.chat.completions.create(model="tiny-edge", messages=CHAT, max_tokens=4, stream=True)
        assert (
            "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            == reply.choices[0].message.content
        )
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/metrics")
        assert conn.getresponse().status == 401
        conn.close()
        assert healthy(port)  # liveness needs no token
    assert TOKEN not in proc.log()


def test_a_non_loopback_address_is_refused_without_the_explicit_setting(
    tiny_bundle: Any, tmp_path: Path, private_broker: int
) -> None:
    folder, _profile, public = tiny_bundle("fused-int8")
    argv = _serve_argv(folder, "--trust", str(public), "--http", f"0.0.0.0:{free_port()}")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 78, done.stderr
    assert "Error: --http-allow-remote: 0.0.0.0:" in done.stderr
    assert "is reachable beyond this box" in done.stderr
    # the daemon: serving.http_listen beyond loopback without serving.http_allow_remote
    box = AgentBox(
        tmp_path / "box",
        "sec-remote",
        private_broker,
        public,
        serving={"http_listen": f"0.0.0.0:{free_port()}"},
    )
    box.start()
    try:
        assert box.wait_exit(60) == 78
    finally:
        box.stop()
    assert "serving.http_allow_remote: 0.0.0.0:" in box.log()
    # allowed explicitly: it serves, and says loudly that it has no token
    port = free_port()
    argv = _serve_argv(folder, "--trust", str(public), "--http", f"0.0.0.0:{port}", "--http-allow-remote")
    proc = Proc("edgectl agent serve", argv, tmp_path / "remote.log")
    proc.start_until(lambda: healthy(port), 120, "the agent's HTTP front on 0.0.0.0")
    assert proc.stop(grace=30) == 0
    assert "reachable beyond this box" in proc.log()
    assert "NEEDS NO TOKEN" in proc.log()


def test_agent_serve_refuses_an_unsigned_bundle_without_the_explicit_flag(
    tiny_bundle: Any, tmp_path: Path
) -> None:
    folder, _profile, _public = tiny_bundle("fused-int8")
    port = free_port()
    done = subprocess.run(
        _serve_argv(folder, "--http", f"127.0.0.1:{port}"), capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2, done.stderr
    assert "Error: --trust: give the release key BUNDLE must be signed with" in done.stderr
    assert not healthy(port)
    with serving(folder, tmp_path, "--insecure-unsigned") as (proc, port):
        assert healthy(port)
    assert "UNSIGNED: its signature and file digests are not checked" in proc.log()
