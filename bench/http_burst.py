"""HTTP burst benchmark: many clients at once against the agent's OpenAI-compatible front.

    python -m bench.http_burst --json FILE [--clients 1000] [--quick]

A tiny random-weight GLM with a chat template (the front is the point, not the model) is exported
with the fused int4 route and sealed as a bundle; ``edgectl agent serve BUNDLE --broker none
--http 127.0.0.1:PORT`` serves it in its own process, with its defaults (64 requests in flight,
the scheduler's queue of 32). Then ``--clients`` clients (``--quick``: 300) each open their own
TCP connection at the same time, in this process on asyncio, and POST one
``/v1/chat/completions`` (4 new tokens). Each client's outcome: its HTTP status (200, 429 or 503
expected), ``reset`` (the connection was reset or closed before a complete answer) or ``hang``
(no complete answer within 30 s); and its latency from the start of its connect to the end of its
answer.

Measured (JSON keys):
    counts                  clients per outcome
    reject_p50_s/_p99_s     latency of the 429 and 503 answers
    ok_p50_s/_p99_s         latency of the 200 answers
    wall_s                  the whole burst
Exit status 1 when any client was reset or hung, got another status, or p99 time to a rejection
exceeded 1 s. The stdlib front this replaced, on the same burst of 1000 (issue 22): 312 clients
hung 108-120 s and were then reset (``old_front`` in the JSON, quoted, not re-measured).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.infer import write_checkpoint
from bench.serve import build_bundle, write_profile

TINY = dict(
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    intermediate_size=256,
    vocab_size=4096,
)
HANG_S = 30.0
REJECTIONS = {429, 503}
OLD_FRONT = {"clients": 1000, "hung_then_reset": 312, "hang_s": [108, 120], "source": "issue 22"}
BODY = json.dumps(
    {"messages": [{"role": "user", "content": "The pump in hall two reads 4.2 bar."}], "max_tokens": 4}
).encode()


async def one_client(port: int, start: asyncio.Event) -> tuple[str, float]:
    """(outcome, seconds): outcome is the status as text, ``reset`` or ``hang``."""
    await start.wait()
    t0 = time.perf_counter()
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(HANG_S):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            head = (
                "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n"
            )
            writer.write(head.encode() + BODY)
            await writer.drain()
            status_line = await reader.readuntil(b"\r\n")
            length, chunked = None, False
            while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
                chunked |= name.strip().lower() == "transfer-encoding" and "chunked" in value.lower()
            if length is not None:
                await reader.readexactly(length)
            elif chunked:
                while (size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)) > 0:
                    await reader.readexactly(size + 2)
                await reader.readuntil(b"\r\n")
            else:
                await reader.read()  # to the end of the connection
            status = status_line.split()[1].decode()
    except TimeoutError:
        return "hang", time.perf_counter() - t0
    except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError):
        return "reset", time.perf_counter() - t0
    finally:
        if writer is not None:
            writer.close()
    return status, time.perf_counter() - t0


async def burst(port: int, clients: int) -> list[tuple[str, float]]:
    start = asyncio.Event()
    tasks = [asyncio.create_task(one_client(port, start)) for _ in range(clients)]
    await asyncio.sleep(0.1)  # every task waits at the start line
    start.set()
    return await asyncio.gather(*tasks)


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def summarize(results: list[tuple[str, float]], wall_s: float) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for outcome, _ in results:
        counts[outcome] = counts.get(outcome, 0) + 1
    rejected = [s for o, s in results if o.isdigit() and int(o) in REJECTIONS]
    ok = [s for o, s in results if o == "200"]
    return {
        "clients": len(results),
        "counts": dict(sorted(counts.items())),
        "reject_p50_s": _quantile(rejected, 0.5),
        "reject_p99_s": _quantile(rejected, 0.99),
        "ok_p50_s": _quantile(ok, 0.5),
        "ok_p99_s": _quantile(ok, 0.99),
        "wall_s": wall_s,
    }


def failures(summary: dict[str, Any]) -> list[str]:
    out = [f"{n} clients: {o}" for o, n in summary["counts"].items() if o not in ("200", "429", "503")]
    if (p99 := summary["reject_p99_s"]) is not None and p99 > 1.0:
        out.append(f"p99 time to a rejection {p99:.2f} s > 1 s")
    return out


def serve_front(work: Path) -> tuple[Any, int]:
    """A tiny bundle served by ``edgectl agent serve --http``; the process and its port."""
    from edgectl.demo.procs import Proc, free_port, healthy, tool, wait_for
    from export.tiny_glm import CHAT_TEMPLATE

    t = time.perf_counter()
    ckpt = write_checkpoint(work / "ckpt", TINY)
    (ckpt / "chat_template.jinja").write_text(CHAT_TEMPLATE)  # the bundle takes chat messages
    bundle = build_bundle(ckpt, work / "bundle", 256)
    profile = write_profile(work / "profile.toml", 256)
    print(f"bundle built in {time.perf_counter() - t:.0f}s", file=sys.stderr)
    port = free_port()
    argv = [
        tool("edgectl"), "agent", "serve", str(bundle), "--device-id", "bench", "--broker", "none",
        "--http", f"127.0.0.1:{port}", "--profile", str(profile),
        "--trust", str(work / "keys" / "bench.pub"),
    ]  # fmt: skip
    proc = Proc("edgectl agent serve", argv, work / "agent.log").start()
    wait_for(lambda: healthy(port) or not proc.alive(), 300, "the agent's HTTP front")
    if not proc.alive():
        raise SystemExit(f"the agent did not start:\n{proc.log()[-2000:]}")
    return proc, port


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.http_burst", description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=None, help="concurrent clients [default: 1000]")
    ap.add_argument("--quick", action="store_true", help="300 clients unless --clients says otherwise")
    ap.add_argument("--json", type=Path, required=False)
    args = ap.parse_args(argv)
    clients = args.clients or (300 if args.quick else 1000)
    with tempfile.TemporaryDirectory(prefix="bench-http-burst-") as tmp:
        proc, port = serve_front(Path(tmp))
        try:
            t = time.perf_counter()
            results = asyncio.run(burst(port, clients))
            wall = time.perf_counter() - t
            from edgectl.demo.procs import healthy

            healthy_after = healthy(port)
        finally:
            code = proc.stop()
    result = summarize(results, wall) | {
        "front": "uvicorn + starlette (edge_agent.http_api)",
        "healthy_after": healthy_after,
        "agent_exit": code,
        "old_front": OLD_FRONT,
    }
    problems = failures(result) + ([] if healthy_after else ["the front did not answer /healthz after"])
    result["failures"] = problems
    text = json.dumps(result, indent=2, sort_keys=True)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
