"""mosquitto credentials and ACLs so that each device may use only its own topics.

``write_acl(out, devices, hub_users)`` writes three files into ``out``:

    passwd            mosquitto password file: PBKDF2-SHA512 ($7$, as mosquitto_passwd writes)
    acl               hub users: all of edgeglm/v1; devices (username = device id): their own topics
    credentials.json  0600: the generated password of every user, to provision the boxes

A device may publish its status, heartbeats and reports and ask the hub for manifests and pieces,
all on its own topics (``edgeglm/v1/dev/%u/...``); it may read only its own desired state and
data, and the root-of-trust chain (``edgeglm/v1/fleet/root``) every device reads. Another
device's topics are denied by the broker itself, so the hub, which takes the asking
device from the fetch topic, answers a fetch only to the device that sent it.
Existing passwords in ``credentials.json`` are kept, so running it again adds new devices only.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

from edgeglm.protocol import PREFIX, check_device_id

__all__ = ["acl_text", "password_line", "write_acl"]

_ITERATIONS = 101  # mosquitto 2.x's own default for $7$


def password_line(user: str, password: str, *, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, _ITERATIONS)
    return f"{user}:$7${_ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def acl_text(hub_users: Iterable[str]) -> str:
    lines = ["# EdgeGLM broker ACL (edgectl hub acl). Devices log in with their device id.", ""]
    for user in hub_users:
        lines += [f"user {user}", f"topic readwrite {PREFIX}/#", ""]
    lines += [
        "# every device: only its own topics (%u is the username, which is the device id)",
        f"pattern write {PREFIX}/dev/%u/status",
        f"pattern write {PREFIX}/dev/%u/hb",
        f"pattern write {PREFIX}/dev/%u/report",
        f"pattern read {PREFIX}/dev/%u/desired",
        f"pattern read {PREFIX}/dev/%u/data",
        f"pattern write {PREFIX}/dev/%u/fetch",
        "# every device: the root-of-trust chain the hub publishes (edgeglm.trust_root)",
        f"pattern read {PREFIX}/fleet/root",
        "",
    ]
    return "\n".join(lines)


def write_acl(out: Path, devices: Iterable[str], hub_users: Iterable[str]) -> dict[str, int]:
    out.mkdir(parents=True, exist_ok=True)
    hubs = [check_device_id(u, "hub user") for u in hub_users]
    boxes = sorted({check_device_id(d) for d in devices} - set(hubs))
    creds_path = out / "credentials.json"
    creds: dict[str, str] = json.loads(creds_path.read_text()) if creds_path.is_file() else {}
    added = 0
    for user in [*hubs, *boxes]:
        if user not in creds:
            creds[user] = secrets.token_urlsafe(24)
            added += 1
    fd = os.open(creds_path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(creds, fh, indent=1, sort_keys=True)
    creds_path.with_suffix(".tmp").replace(creds_path)
    passwd = "\n".join(password_line(u, creds[u]) for u in [*hubs, *boxes]) + "\n"
    _write_private(out / "passwd", passwd)
    _write_private(out / "acl", acl_text(hubs))
    return {"hub_users": len(hubs), "devices": len(boxes), "new_users": added}


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    tmp.replace(path)
