"""mosquitto credentials and ACLs so that each device may use only its own topics.

``write_acl(out, devices, hub_users, sensors=..., sites=..., owner=...)`` writes three files into
``out``:

    passwd            mosquitto password file: PBKDF2-SHA512 ($7$, as mosquitto_passwd writes)
    acl               hub users: all of edgeglm/v1; devices (username = device id): their own
                      topics; sensors: the infer topics and their own reply topics
    credentials.json  0600: the generated password of every user, to provision the boxes

A device may publish its status, heartbeats and reports and ask the hub for manifests and pieces,
all on its own topics (``edgeglm/v1/dev/{id}/...``); it may read only its own desired state, data
and inference requests, its sites' shared inference topics, and the root-of-trust chain
(``edgeglm/v1/fleet/root``) every device reads. Another device's topics are denied by the broker
itself, so the hub, which takes the asking device from the fetch topic, answers a fetch only to
the device that sent it.

Inference replies go to the topic the sensor names (MQTT 5 response topic, or ``reply_to``). The
broker lets devices publish under ``sensors/`` only (:data:`REPLY_ROOT`), and a sensor read only
``sensors/{its name}/...``: a device can never write into the fleet's topics, and a sensor never
reads another sensor's replies. Every user has a block of its own (no ``pattern`` lines, which
would apply to sensors and hub users too and let a sensor post status as a device of its name).

``owner`` (user id, group id) hands ``passwd`` and ``acl`` to the broker's user or group (0640):
mosquitto drops to its own user before it reads them. Existing passwords in ``credentials.json``
are kept, so running it again adds new users only.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import pwd
import secrets
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path

from edgeglm.errors import ConflictError, EdgeError, UsageError
from edgeglm.protocol import PREFIX, check_device_id, check_site, root_topic, site_infer_topic

__all__ = ["REPLY_ROOT", "acl_text", "password_line", "write_acl"]

_ITERATIONS = 101  # mosquitto 2.x's own default for $7$
REPLY_ROOT = "sensors"  # sensors name response topics sensors/{sensor}/...; devices may write there


def password_line(user: str, password: str, *, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, _ITERATIONS)
    return f"{user}:$7${_ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def acl_text(
    hub_users: Iterable[str],
    devices: Iterable[str] = (),
    *,
    sensors: Iterable[str] = (),
    sites: Mapping[str, Iterable[str]] | None = None,
) -> str:
    """The ACL file: one block per user. ``sites`` maps a site to the devices serving its topic."""
    member_of: dict[str, list[str]] = {}
    for site, members in (sites or {}).items():
        for device in members:
            member_of.setdefault(device, []).append(site)
    lines = ["# EdgeGLM broker ACL (edgectl hub acl). Devices log in with their device id.", ""]
    for user in hub_users:
        lines += [f"user {user}", f"topic readwrite {PREFIX}/#", ""]
    for device in devices:
        own = f"{PREFIX}/dev/{device}"
        lines += [
            f"user {device}",
            f"topic write {own}/status",
            f"topic write {own}/hb",
            f"topic write {own}/report",
            f"topic write {own}/fetch",
            f"topic read {own}/desired",
            f"topic read {own}/data",
            f"topic read {own}/infer",
            *(f"topic read {site_infer_topic(site)}" for site in sorted(member_of.get(device, ()))),
            f"topic read {root_topic()}",
            f"topic write {REPLY_ROOT}/#",
            "",
        ]
    for sensor in sensors:
        lines += [
            f"user {sensor}",
            f"topic write {PREFIX}/dev/+/infer",
            f"topic write {PREFIX}/site/+/infer",
            f"topic read {REPLY_ROOT}/{sensor}/#",
            "",
        ]
    return "\n".join(lines)


def write_acl(
    out: Path,
    devices: Iterable[str],
    hub_users: Iterable[str],
    *,
    sensors: Iterable[str] = (),
    sites: Mapping[str, Iterable[str]] | None = None,
    owner: tuple[int, int] | None = None,
) -> dict[str, int]:
    """Write ``passwd``, ``acl`` and ``credentials.json`` into ``out``; ``owner`` (uid, gid; -1
    keeps one) is given ``passwd`` and ``acl``. Nothing is replaced unless every file could be
    written and handed over."""
    hubs = [check_device_id(u, "hub user") for u in hub_users]
    site_map = {check_site(s): sorted({check_device_id(d) for d in m}) for s, m in (sites or {}).items()}
    members = {d for m in site_map.values() for d in m}
    boxes = sorted(({check_device_id(d) for d in devices} | members) - set(hubs))
    watchers = sorted({check_device_id(s, "sensor name") for s in sensors})
    clash = sorted(set(watchers) & (set(hubs) | set(boxes)))
    if clash:
        raise ConflictError("sensor name", f"{clash[0]!r} is also a device or hub user's name")
    created = not out.exists()
    if owner is not None:  # before anything is made: the part of the path that exists
        _check_reachable(next(p for p in [out, *out.absolute().parents] if p.exists()), *owner)
    out.mkdir(parents=True, exist_ok=True)
    if owner is not None:
        if created:  # ours: the broker's group may enter it, nobody else
            try:
                _chown(out, -1, owner[1])
            except EdgeError:
                out.rmdir()
                raise
            out.chmod(0o750)
        _check_reachable(out, *owner)  # and the folders just made (a umask of 077 closes them)
    creds_path = out / "credentials.json"
    creds: dict[str, str] = json.loads(creds_path.read_text()) if creds_path.is_file() else {}
    added = 0
    users = [*hubs, *boxes, *watchers]
    for user in users:
        if user not in creds:
            creds[user] = secrets.token_urlsafe(24)
            added += 1
    passwd = "\n".join(password_line(u, creds[u]) for u in users) + "\n"
    acl = acl_text(hubs, boxes, sensors=watchers, sites=site_map)
    staged: list[tuple[Path, Path]] = []
    try:
        for name, text in (("passwd", passwd), ("acl", acl)):
            staged.append(_stage(out / name, text, owner))
    except EdgeError:
        for tmp, _ in staged:
            tmp.unlink()
        raise
    fd = _create(creds_path.with_suffix(".tmp"), 0o600, None)
    with os.fdopen(fd, "w") as fh:
        json.dump(creds, fh, indent=1, sort_keys=True)
    creds_path.with_suffix(".tmp").replace(creds_path)
    for tmp, path in staged:
        tmp.replace(path)
    return {"hub_users": len(hubs), "devices": len(boxes), "sensors": len(watchers), "new_users": added}


def _stage(path: Path, text: str, owner: tuple[int, int] | None) -> tuple[Path, Path]:
    """``path``'s new content in a temporary file beside it (0640, handed to ``owner``)."""
    tmp = path.with_suffix(".tmp")
    try:
        fd = _create(tmp, 0o640, owner)
    except EdgeError:
        tmp.unlink()
        raise
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    return tmp, path


def _create(tmp: Path, mode: int, owner: tuple[int, int] | None) -> int:
    """A new file at ``tmp`` (a stale one removed first, never followed if it is a symlink: the
    folder may be writable by someone else), with exactly ``mode`` whatever the umask, handed to
    ``owner`` through its descriptor; returns the descriptor, open for writing."""
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        if owner is not None:
            _chown(tmp, *owner, fd=fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _chown(path: Path, uid: int, gid: int, *, fd: int | None = None) -> None:
    try:
        if fd is not None:
            os.fchown(fd, uid, gid)
        else:
            os.chown(path, uid, gid, follow_symlinks=False)
    except PermissionError as exc:
        raise EdgeError(
            "--owner",
            f"may not hand {path} to uid {uid}, gid {gid}: {exc.strerror}",
            hint="Run it as root (or with CAP_CHOWN), or leave out --owner and chown the files yourself.",
        ) from exc


def _check_reachable(folder: Path, uid: int, gid: int) -> None:
    """Refuse a folder the broker's user (``uid``, -1: not changed) or group cannot enter:
    mosquitto would fail to open the files in it after dropping privileges."""
    gids = {gid}
    if uid != -1:
        with contextlib.suppress(KeyError):  # a uid without a name has no supplementary groups
            gids.update(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
    for place in [folder.resolve(), *folder.resolve().parents]:
        st = place.stat()
        if st.st_mode & stat.S_IXOTH:
            continue
        if uid != -1 and st.st_uid == uid and st.st_mode & stat.S_IXUSR:
            continue
        if st.st_gid in gids and st.st_mode & stat.S_IXGRP:
            continue
        mode = stat.filemode(st.st_mode)
        raise UsageError(
            "--out",
            f"the broker's user cannot enter {place} ({mode}, uid {st.st_uid}, gid {st.st_gid})",
            hint="Write the files where the broker can reach them (e.g. /etc/mosquitto/edgeglm),"
            f" or let it in: chmod o+x {place}.",
        )
