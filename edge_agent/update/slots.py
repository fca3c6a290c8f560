"""A/B model slots: two folders and one symlink that names the active one.

    ROOT/slots/a/           a bundle (manifest.json + files), or empty
    ROOT/slots/b/
    ROOT/current -> slots/a the active slot; switched by rename(2) of a fresh symlink, so a power
                            cut leaves either the old or the new link, never none

The inactive slot is where an update assembles; the previous version stays in it after a switch,
so a revert to it downloads nothing and switches back at once.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from edgeglm.bundle import MANIFEST_NAME, Manifest, load_manifest

__all__ = ["Slots"]

_NAMES = ("a", "b")


class Slots:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._manifests: dict[str, tuple[tuple[int, int, int], Manifest | None]] = {}
        self.dir = self.root / "slots"
        self.link = self.root / "current"
        for name in _NAMES:
            (self.dir / name).mkdir(parents=True, exist_ok=True)
        if not self.link.is_symlink():
            self._point("a")

    def active_name(self) -> str:
        target = os.readlink(self.link)
        name = Path(target).name
        return name if name in _NAMES else "a"

    def inactive_name(self) -> str:
        return "b" if self.active_name() == "a" else "a"

    def path(self, name: str) -> Path:
        return self.dir / name

    @property
    def active(self) -> Path:
        return self.path(self.active_name())

    @property
    def inactive(self) -> Path:
        return self.path(self.inactive_name())

    def manifest(self, name: str) -> Manifest | None:
        """The manifest a slot holds (unverified: for deciding, never for activating).

        Parsed once per version of the file (keyed by its inode, size and mtime): at GLM-Edge-1.5B
        size a manifest is ~160 KB of JSON, and the update worker asks for it many times.
        """
        path = self.path(name) / MANIFEST_NAME
        try:
            st = path.stat()
        except OSError:
            return None
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        hit = self._manifests.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        try:
            manifest: Manifest | None = load_manifest(self.path(name), None)[0]
        except Exception:  # a half-written or corrupt slot holds nothing usable
            manifest = None
        self._manifests[name] = (key, manifest)
        return manifest

    def clear(self, name: str) -> Path:
        """Empty a slot (never the active one) for a new assembly."""
        if name == self.active_name():
            raise RuntimeError("refusing to clear the active slot")
        folder = self.path(name)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        return folder

    def switch(self, name: str) -> None:
        """Make ``name`` the active slot atomically (rename of a new symlink, then fsync)."""
        self._point(name)

    def _point(self, name: str) -> None:
        tmp = self.root / ".current.tmp"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(Path("slots") / name, tmp)
        os.replace(tmp, self.link)
        fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
