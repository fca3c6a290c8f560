"""``edge-agent run`` as a process: its own data folder, an ``agent.toml`` of our making, its log.

Started, stopped, killed with SIGKILL and started again at will; the update state and the active
slot are read back from its data folder, as ``edge-agent status`` does. The default pace is quick
(heartbeats every 0.5 s, a fetch re-asked after 3 s): the demo passes its own.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgectl.demo.procs import Proc, toml_text, tool, wait_for

__all__ = ["AgentBox"]


class AgentBox:
    """``edge-agent run`` for ``device_id`` on the broker at ``broker_port``.

    ``config`` overrides the generated ``agent.toml``: a dict value updates that section
    (``cloud={"url": ...}``), a plain value sets a top-level key, ``None`` leaves the key out.
    """

    def __init__(self, root: Path, device_id: str, broker_port: int, trusted: Path, **config: Any) -> None:
        self.root = root
        self.device_id = device_id
        self.data = root / "data"
        self.config_path = root / "agent.toml"
        sections: dict[str, dict[str, Any]] = {
            "cloud": {
                "url": f"mqtt://127.0.0.1:{broker_port}",
                "reconnect_min_s": 0.2,
                "reconnect_max_s": 1.0,
            },
            "telemetry": {"heartbeat_s": 0.5},
            "update": {"request_timeout_s": 3.0},
        }
        top: dict[str, Any] = {
            "device_id": device_id,
            "profile": "cpu-x86-int8",
            "data_dir": str(self.data),
            "trusted_keys": [str(trusted)],
            "log_level": "debug",
        }
        for key, value in config.items():
            if key in sections or isinstance(value, Mapping):
                sections.setdefault(key, {}).update(value)
            elif value is None:
                top.pop(key, None)
            else:
                top[key] = value
        root.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(toml_text(top, sections))
        argv = [tool("edge-agent"), "run", "--config", str(self.config_path)]
        self.proc = Proc(f"edge-agent {device_id}", argv, root / "agent.log")

    def start(self, env: Mapping[str, str] | None = None) -> AgentBox:
        self.proc.start(env)
        return self

    def stop(self) -> int | None:
        return self.proc.stop()

    def kill9(self) -> None:
        self.proc.kill9()

    def wait_exit(self, timeout: float = 60.0) -> int:
        assert self.proc.popen is not None, "start() first"
        return self.proc.popen.wait(timeout)

    def log(self) -> str:
        return self.proc.log()

    def wait_log(self, pattern: str, timeout: float = 60.0, after: int = 0) -> re.Match[str]:
        """The first match of ``pattern`` in the log past offset ``after``."""
        rx = re.compile(pattern)
        found: re.Match[str] = wait_for(
            lambda: rx.search(self.log()[after:]), timeout, f"agent log line /{pattern}/"
        )
        return found

    def verified_pieces(self) -> list[str]:
        """Every piece the agent verified into its store, across all its runs (from its debug log)."""
        return re.findall(r"piece ([0-9a-f]{64}) verified", self.log())

    def status(self) -> dict[str, Any]:
        """``edge-agent status -o json``: slots and the last update, read from the data folder."""
        out = subprocess.run(
            [tool("edge-agent"), "status", "--config", str(self.config_path), "--output", "json"],
            capture_output=True,
            text=True,
            check=True,
        )
        return dict(json.loads(out.stdout))

    def state(self) -> Any:
        """The update's last recorded step (the agent's state database)."""
        from edge_agent.entry import last_update

        return last_update(self.data)

    def active_version(self) -> str | None:
        from edge_agent.entry import active_manifest

        m = active_manifest(self.data)
        return m.version if m is not None else None
