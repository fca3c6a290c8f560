"""Running ``edgectl hub serve`` as a real process for the tests, on a free loopback port."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def is_up(url: str) -> bool:
    try:
        urllib.request.urlopen(url + "/healthz", timeout=2).close()
        return True
    except OSError:
        return False


def start_hub(*args: str, timeout: float = 60.0) -> tuple[subprocess.Popen[bytes], str]:
    """``edgectl hub serve --listen 127.0.0.1:PORT ARGS...``, once its /healthz answers."""
    port = free_port()
    edgectl = Path(sys.executable).with_name("edgectl")
    proc = subprocess.Popen(
        [str(edgectl), "hub", "serve", "--listen", f"127.0.0.1:{port}", *args], stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while not is_up(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"hub did not start (exit {proc.poll()})")
        time.sleep(0.2)
    return proc, url
