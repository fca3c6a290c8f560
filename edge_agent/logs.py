"""The agent's log lines: ``key=value`` (journald-friendly) or one JSON object per line.

    ts=2026-12-02T09:41:07.120Z level=info logger=edge_agent.daemon msg="now serving glm@1.1.0"
    {"ts": "...", "level": "info", "logger": "edge_agent.daemon", "msg": "now serving glm@1.1.0"}

Secrets never reach a log line: the config keeps passwords as ``SecretStr`` and nothing logs a
payload.
"""

from __future__ import annotations

import json
import logging
import sys
import time

__all__ = ["setup_logging"]


def _ts(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class _KeyValue(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        quoted = json.dumps(msg, ensure_ascii=False)
        return f"ts={_ts(record)} level={record.levelname.lower()} logger={record.name} msg={quoted}"


class _Json(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": _ts(record), "level": record.levelname.lower(), "logger": record.name}
        doc["msg"] = record.getMessage()
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def setup_logging(fmt: str = "kv", level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Json() if fmt == "json" else _KeyValue())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("sqlalchemy", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
