"""The agent's update state machine on real files: crash at every persisted step, resume, roll back."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from edge_agent.update.machine import MAX_ENTRIES, TRANSITIONS, UpdateMachine
from edge_agent.update.slots import Slots
from edge_agent.update.state import StateStore
from edgeglm.assembler import assemble_bundle
from edgeglm.bundle import Manifest, load_manifest, manifest_digest
from edgeglm.bundle_files import ingest_folder
from edgeglm.errors import UpdateError
from edgeglm.keys import create_keypair, key_id, load_private_key
from edgeglm.piece_store import PieceStore
from edgeglm.planner import PieceStep, encode_step
from edgeglm.tensor_delta import Encoded
from tests.tensor_bundles import tensor_bundle

SHAPE = (128, 512)


class Crash(BaseException):
    """A kill -9 at this point: nothing after it runs (not an Exception, so nothing catches it)."""


def _bundle(root: Path, key: Any, version: str, tweak: float) -> Path:
    return tensor_bundle(root, key, version, tweak, shape=SHAPE, piece_bytes=64 * 1024)


class Hub:
    """The hub's side, locally: manifests and encoded pieces from its store; counts what it sends."""

    def __init__(self, folders: dict[str, Path]) -> None:
        self.folders = folders
        self.store = PieceStore(next(iter(folders.values())).parent / "hub-store")
        for folder in folders.values():
            ingest_folder(folder, load_manifest(folder, None)[0], self.store)
        self.sent: Counter[str] = Counter()
        self.corrupt: set[str] = set()  # piece ids whose next delivery has a flipped byte
        self.crash_after: int | None = None  # pieces delivered before a crash
        self.raw_override: bytes | None = None
        self.stall = False
        self.stopped_by_cancel = False

    def manifest(self, model: str, version: str, profile: str) -> bytes:
        if self.raw_override is not None:
            return self.raw_override
        return (self.folders[version] / "manifest.json").read_bytes()

    def pieces(
        self,
        target: Manifest,
        steps: Sequence[PieceStep],
        have: Sequence[str],
        *,
        cancelled: Callable[[], bool] | None = None,
    ) -> Iterator[tuple[PieceStep, Encoded, str | None]]:
        if self.stall:  # a link that delivers nothing: only ``cancelled`` ends the wait
            self.stopped_by_cancel = cancelled is not None and cancelled()
            return
        for step in steps:
            if self.crash_after is not None and sum(self.sent.values()) >= self.crash_after:
                self.crash_after = None
                raise Crash("killed mid-download")
            enc = encode_step(step, self.store)
            self.sent[step.piece_id] += 1
            payload = enc.payload
            if step.piece_id in self.corrupt:
                self.corrupt.discard(step.piece_id)
                payload = bytes([payload[0] ^ 0xFF]) + payload[1:]
            yield step, Encoded(enc.encoding, enc.width, payload), step.base_id if enc.is_delta else None


class Device:
    def __init__(self, root: Path, hub: Hub, trusted: dict[str, Any], v1: Path) -> None:
        self.root, self.hub, self.trusted = root, hub, trusted
        self.reports: list[tuple[str, bool, str | None]] = []
        self.smoke_fails: set[str] = set()
        self.loaded: list[str] = []
        slots = Slots(root / "slots")
        m, doc = load_manifest(v1, None)
        store = PieceStore(root / "pieces")
        ingest_folder(v1, m, store)
        assemble_bundle(m, doc, store, slots.clear("b"))
        slots.switch("b")

    def activate(self, folder: Path) -> None:
        m, _ = load_manifest(folder, self.trusted)  # the engine loads only a verified bundle
        (folder / "model.onnx.data").read_bytes()
        if m.version in self.smoke_fails:
            raise UpdateError("smoke test", f"{m.version} disagreed with its golden tokens")
        self.loaded.append(m.version)

    def machine(self, crash_at: Any = None, superseded: Any = None) -> UpdateMachine:
        return UpdateMachine(
            StateStore(self.root / "agent.db"),
            PieceStore(self.root / "pieces"),
            Slots(self.root / "slots"),
            self.hub,
            self.trusted,
            self.activate,
            lambda step, ok, reason, _p: self.reports.append((step, ok, reason)),
            crash_at=crash_at,
            superseded=superseded,
        )

    def serving(self) -> str:
        slots = Slots(self.root / "slots")
        m, _ = load_manifest(slots.active, self.trusted)
        return m.version


@pytest.fixture
def world(tmp_path: Path) -> tuple[Device, Hub, dict[str, str]]:
    priv, _, _ = create_keypair(tmp_path / "keys", "release")
    key = load_private_key(priv)
    v1 = _bundle(tmp_path / "hub", key, "1.0.0", 0.0)
    v2 = _bundle(tmp_path / "hub", key, "1.1.0", 1e-3)
    hub = Hub({"1.0.0": v1, "1.1.0": v2})
    trusted = {key_id(key.public_key()): key.public_key()}
    digests = {v: manifest_digest(load_manifest(f, None)[1]) for v, f in hub.folders.items()}
    return Device(tmp_path / "device", hub, trusted, v1), hub, digests


def _update(dev: Device, version: str, digests: dict[str, str], crash_at: Any = None) -> str:
    return dev.machine(crash_at).start(
        model="glm-tiny", version=version, profile="cpu-x86-int4", digest=digests[version], rollout_id=7
    )


def test_the_transition_table_covers_every_step_and_event() -> None:
    steps = {s for s, _ in TRANSITIONS}
    assert steps == {
        "fetching_manifest",
        "downloading",
        "assembling",
        "verifying",
        "activating",
        "rolling_back",
    }
    assert all((s, e) in TRANSITIONS for s in steps for e in ("ok", "error"))


def test_an_update_fetches_only_the_changed_tensor_and_keeps_the_old_slot(world: Any) -> None:
    dev, hub, digests = world
    assert _update(dev, "1.1.0", digests) == "committed"
    assert dev.serving() == "1.1.0"
    old = Slots(dev.root / "slots").manifest(Slots(dev.root / "slots").inactive_name())
    assert old is not None and old.version == "1.0.0"
    new, _ = load_manifest(hub.folders["1.1.0"], None)
    tensor_b = {pid for f in new.files for pid, _ in f.pieces} & set(
        p for f in load_manifest(hub.folders["1.0.0"], None)[0].files for p, _ in f.pieces
    )
    assert tensor_b and not (tensor_b & set(hub.sent))  # held pieces never travel
    assert max(hub.sent.values()) == 1
    assert [r[0] for r in dev.reports][-1] == "committed" and all(ok for _, ok, _ in dev.reports)


STEPS = ["fetching_manifest", "downloading", "assembling", "verifying", "activating", "activating:switch"]


@pytest.mark.parametrize("where", [*STEPS, "downloading:mid"])
def test_a_crash_at_every_persisted_step_resumes_to_committed(world: Any, where: str) -> None:
    dev, hub, digests = world
    fired = []

    def crash(step: str) -> None:
        if step == where and not fired:
            fired.append(step)
            raise Crash(step)

    if where == "downloading:mid":
        hub.crash_after = 3
    with pytest.raises(Crash):
        _update(dev, "1.1.0", digests, crash_at=crash)
    assert dev.serving() in ("1.0.0", "1.1.0")  # whatever is active loads and answers
    dev.activate(Slots(dev.root / "slots").active)
    assert dev.machine().resume() == "committed"
    assert dev.serving() == "1.1.0"
    assert max(hub.sent.values()) == 1, "a verified piece was fetched twice"
    assert dev.machine().resume() is None  # nothing left to do


def test_a_failed_smoke_test_rolls_back_and_the_old_model_serves(world: Any) -> None:
    dev, _hub, digests = world
    dev.smoke_fails.add("1.1.0")
    assert _update(dev, "1.1.0", digests) == "failed"
    assert dev.serving() == "1.0.0"
    steps = [(s, ok) for s, ok, _ in dev.reports]
    assert ("failed", False) in steps and "disagreed" in dev.reports[-1][2]


def test_a_flipped_byte_is_rejected_and_fetched_again(world: Any) -> None:
    dev, hub, digests = world
    new, _ = load_manifest(hub.folders["1.1.0"], None)
    victim = next(p for f in new.files for p, _ in f.pieces if f.path == "model.onnx.data")
    hub.corrupt.add(victim)
    assert _update(dev, "1.1.0", digests) == "committed"
    assert hub.sent[victim] == 2  # once corrupt (rejected, never stored), once intact


@pytest.mark.parametrize("case", ["bad signature", "path traversal"])
def test_a_bad_manifest_is_refused_and_the_current_model_keeps_serving(world: Any, case: str) -> None:
    dev, hub, digests = world
    doc = json.loads((hub.folders["1.1.0"] / "manifest.json").read_text())
    if case == "bad signature":
        doc["dataset_version"] = "tampered"  # changed after signing
    else:
        doc["files"][1]["path"] = "../../etc/evil"
    hub.raw_override = json.dumps(doc).encode()
    assert _update(dev, "1.1.0", digests) == "failed"
    assert dev.serving() == "1.0.0"
    assert dev.reports[-1][0] == "failed" and not dev.reports[-1][1]
    assert not (dev.root / "etc").exists()


def test_a_revert_to_the_other_slot_downloads_nothing(world: Any) -> None:
    dev, hub, digests = world
    assert _update(dev, "1.1.0", digests) == "committed"
    before = sum(hub.sent.values())
    assert _update(dev, "1.0.0", digests) == "committed"
    assert dev.serving() == "1.0.0"
    assert sum(hub.sent.values()) == before  # every piece was held; the slot was not re-assembled


def test_the_loop_guard_stops_an_activation_that_keeps_crashing(world: Any) -> None:
    dev, _hub, digests = world

    def always(step: str) -> None:
        if step == "activating:switch":
            raise Crash(step)

    with pytest.raises(Crash):
        _update(dev, "1.1.0", digests, crash_at=always)
    for _ in range(MAX_ENTRIES - 1):
        with pytest.raises(Crash):
            dev.machine(always).resume()
    assert dev.machine(always).resume() == "failed"
    assert dev.serving() == "1.0.0"
    assert "loop guard" in dev.reports[-1][2]


def test_a_superseded_update_reaches_the_fetcher_waiting_on_a_silent_link(world: Any) -> None:
    """The machine hands the fetcher ``cancelled``: a revert ends a wait no piece would end."""
    dev, hub, digests = world
    hub.stall = True
    machine = dev.machine(superseded=lambda _rec: True)
    step = machine.start(
        model="glm-tiny", version="1.1.0", profile="cpu-x86-int4", digest=digests["1.1.0"], rollout_id=7
    )
    assert step == "failed" and hub.stopped_by_cancel
    assert dev.reports[-1] == ("failed", False, "download: superseded by a newer desired state")
