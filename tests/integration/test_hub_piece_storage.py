"""The hub's piece store, every backend held to one contract (cloud_hub.piece_storage): the folder,
the database on SQLite and the database on the real PostgreSQL. Publishing and repair through the
registry, two "replicas" writing the same piece at once, two encoders sharing their work, and
garbage collection (``edgectl hub gc``) with a publish racing it."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from cloud_hub.database_storage import DatabaseStorage
from cloud_hub.db import Database, open_db
from cloud_hub.encoder import PieceEncoder
from cloud_hub.metrics import HubMetrics
from cloud_hub.piece_gc import collect
from cloud_hub.piece_storage import EncodingKey, FolderStorage, PieceStorage
from cloud_hub.registry import Registry, UploadState
from edgectl import root
from edgeglm.bundle import MANIFEST_NAME, load_manifest
from edgeglm.bundle_files import FolderSource
from edgeglm.errors import IntegrityError, NotFoundError
from edgeglm.keys import load_public_keys
from edgeglm.piece_store import PieceStore
from edgeglm.pieces import piece_id
from edgeglm.planner import PieceStep
from edgeglm.tensor_delta import decode
from tests.hub_storage import rot, rot_encoding

pytestmark = pytest.mark.integration

BACKENDS = pytest.mark.parametrize(
    ("kind", "hub_db_url"),
    [
        pytest.param("folder", "sqlite", id="folder"),
        pytest.param("database", "sqlite", id="database-sqlite"),
        pytest.param("database", "postgresql", id="database-postgresql"),
    ],
    indirect=["hub_db_url"],
)


@pytest.fixture
def db(hub_db_url: str) -> Iterator[Database]:
    database = open_db(hub_db_url)
    yield database
    database.dispose()


def _store(kind: str, db: Database, folder: Path) -> PieceStorage:
    return FolderStorage(folder, durable=False) if kind == "folder" else DatabaseStorage(db)


@pytest.fixture
def store(kind: str, db: Database, tmp_path: Path) -> PieceStorage:
    return _store(kind, db, tmp_path / "pieces")


@pytest.fixture
def replica(kind: str, hub_db_url: str, tmp_path: Path) -> Iterator[PieceStorage]:
    """A second hub process's view of the same store: its own engine (or its own folder handle)."""
    database = open_db(hub_db_url)
    yield _store(kind, database, tmp_path / "pieces")
    database.dispose()


def _piece(n: int, size: int = 4096) -> tuple[str, bytes]:
    data = np.random.default_rng(n).integers(0, 256, size, dtype=np.uint8).tobytes()
    return piece_id(data), data


# ------------------------------------------------------------------------------ the contract


@BACKENDS
def test_pieces_are_written_once_and_read_verified(
    store: PieceStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("cloud_hub.database_storage._SEGMENT", 1000)  # a piece is read in 5 segments
    (a, da), (b, db_), (c, _) = _piece(1), _piece(2), _piece(3)
    assert store.put(a, da) is True and store.put(a, da) is False
    assert store.put(b, db_) is True
    assert store.get(a) == da and store.has(a) and not store.has(c)
    assert store.missing([a, b, c, c]) == {c}
    assert sorted(store.ids()) == sorted([a, b])
    with pytest.raises(IntegrityError, match="hash to"):
        store.put(c, da)
    assert not store.has(c)
    with pytest.raises(NotFoundError):
        store.get(c)
    assert store.remove([a, c]) == len(da)  # an absent id is skipped
    assert list(store.ids()) == [b]


@BACKENDS
def test_a_rotten_piece_is_removed_and_reported_then_stored_again(store: PieceStorage) -> None:
    pid, data = _piece(4)
    store.put(pid, data)
    rot(store, pid)
    with pytest.raises(IntegrityError, match="corrupt; removed"):
        store.get(pid)
    assert not store.has(pid)
    assert store.put(pid, data) is True and store.get(pid) == data


@BACKENDS
def test_encodings_round_trip_exactly_and_a_rotten_one_reads_as_absent(
    store: PieceStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("cloud_hub.database_storage._SEGMENT", 1000)
    from edgeglm.tensor_delta import encode_delta, encode_raw

    base = np.random.default_rng(5).standard_normal(2048).astype(np.float32)
    new = base + np.float32(1e-3)
    (pb, db_), (pn, dn) = (piece_id(base.tobytes()), base.tobytes()), (piece_id(new.tobytes()), new.tobytes())
    raw, delta = encode_raw(dn, dtype="float32"), encode_delta(dn, db_, dtype="float32")
    assert delta.is_delta and delta.width == 4
    raw_key, delta_key = EncodingKey(pn), EncodingKey(pn, pb)
    assert store.encoding(raw_key) is None
    assert store.put_encoding(raw_key, raw) is True and store.put_encoding(delta_key, delta) is True
    assert store.put_encoding(delta_key, raw) is False  # the first writer's stays
    assert store.encoding(raw_key) == raw and store.encoding(delta_key) == delta
    assert decode(delta.encoding, delta.width, delta.payload, len(dn), db_) == dn
    assert set(store.encoding_keys()) == {raw_key, delta_key}
    rot_encoding(store, delta_key)
    assert store.encoding(delta_key) is None
    assert list(store.encoding_keys()) == [raw_key]
    # the digest covers the encoding and its width too: a header flipped to another valid width
    # would decode to wrong bytes; it reads as absent and is made again
    assert store.put_encoding(delta_key, delta) is True
    rot_encoding(store, delta_key, width=2)
    assert store.encoding(delta_key) is None
    assert store.remove_encodings([raw_key, delta_key]) == len(raw.payload)
    assert list(store.encoding_keys()) == []


@BACKENDS
def test_two_replicas_putting_the_same_pieces_at_once_store_each_once(
    kind: str, store: PieceStorage, replica: PieceStorage
) -> None:
    pieces = [_piece(100 + n, 64 << 10) for n in range(12)]
    start = threading.Barrier(2)
    told: dict[str, list[bool]] = {pid: [] for pid, _ in pieces}
    errors: list[BaseException] = []

    def put_all(target: PieceStorage) -> None:
        try:
            for pid, data in pieces:
                start.wait(10)  # both writers on the same piece at the same moment
                told[pid].append(target.put(pid, data))
        except BaseException as exc:
            errors.append(exc)
            start.abort()

    threads = [
        threading.Thread(target=put_all, args=(s,), name=f"put-{i}") for i, s in enumerate((store, replica))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    for pid, data in pieces:
        assert store.get(pid) == data and replica.get(pid) == data
        if kind == "database":  # ON CONFLICT DO NOTHING: exactly one writer is told it stored it
            assert sorted(told[pid]) == [False, True]
    assert sorted(store.ids()) == sorted(pid for pid, _ in pieces)


@BACKENDS
def test_two_replicas_encode_a_piece_against_a_base_once(
    store: PieceStorage, replica: PieceStorage, db: Database
) -> None:
    base = np.random.default_rng(6).standard_normal(8192).astype(np.float32)
    new = base.copy()
    new[::7] += np.float32(0.01)
    pb, pn = piece_id(base.tobytes()), piece_id(new.tobytes())
    store.put(pb, base.tobytes())
    store.put(pn, new.tobytes())
    step = PieceStep(pn, new.nbytes, "delta", 0, base_id=pb, dtype="float32")
    raw_step = PieceStep(pn, new.nbytes, "raw", 0, dtype="float32")
    one, two = HubMetrics(), HubMetrics()
    first, second = PieceEncoder(db, store, one), PieceEncoder(db, replica, two)

    def count(result: str) -> float:
        return sum(m.value("edgeglm_hub_encode_cache_total", result=result) for m in (one, two))

    made = first.encoded(step)
    assert made.is_delta and len(made.payload) < new.nbytes // 2
    assert second.encoded(step) == made and first.encoded(step) == made
    assert (count("miss"), count("store"), count("hit")) == (1, 1, 1)
    assert decode(made.encoding, made.width, made.payload, new.nbytes, base.tobytes()) == new.tobytes()
    raw = second.encoded(raw_step)  # a raw encoding is shared the same way
    assert first.encoded(raw_step) == raw and not raw.is_delta
    assert (count("miss"), count("store")) == (2, 2)


@BACKENDS
def test_a_delta_whose_base_is_gone_is_stored_as_the_raw_encoding(store: PieceStorage, db: Database) -> None:
    (pn, dn), (pb, _) = _piece(7), _piece(8)
    store.put(pn, dn)
    made = PieceEncoder(db, store, HubMetrics()).encoded(PieceStep(pn, len(dn), "delta", 0, base_id=pb))
    assert not made.is_delta
    assert list(store.encoding_keys()) == [EncodingKey(pn)]


# ------------------------------------------------------------------------------ the registry


def _publish(db: Database, store: PieceStorage, folder: Path, trusted: Any) -> UploadState:
    """begin, each missing piece, commit: each its own transaction, as over HTTP."""
    manifest, _ = load_manifest(folder, None)
    source = FolderSource.of(folder, manifest)
    with db.session() as s:
        up = Registry(s, store, trusted).begin((folder / MANIFEST_NAME).read_bytes(), "test")
    for pid, _size in up.missing:
        with db.session() as s:
            Registry(s, store, trusted).put_piece(up.upload_id, pid, source.read(pid))
    if up.state == "open":
        with db.session() as s:
            Registry(s, store, trusted).commit(up.upload_id, "test")
    return up


@BACKENDS
def test_publishing_again_repairs_a_rotten_piece(store: PieceStorage, db: Database, publisher: Any) -> None:
    trusted = dict(load_public_keys([publisher.public_path]))
    folder = publisher.bundle("1.0.0", size=300_000)
    first = _publish(db, store, folder, trusted)
    manifest, _ = load_manifest(folder, None)
    assert store.missing(manifest.piece_ids()) == set() and len(first.missing) == len(manifest.piece_ids())
    pid = sorted(manifest.piece_ids())[1]
    rot(store, pid)
    with pytest.raises(IntegrityError):
        store.get(pid)
    repair = _publish(db, store, folder, trusted)
    assert repair.state == "open" and [m[0] for m in repair.missing] == [pid]
    assert store.get(pid) == FolderSource.of(folder, manifest).read(pid)
    assert _publish(db, store, folder, trusted).state == "committed"  # whole again: nothing to do


# ---------------------------------------------------------------------------- garbage collection


@BACKENDS
def test_gc_removes_what_no_bundle_or_open_upload_names(
    store: PieceStorage, db: Database, publisher: Any
) -> None:
    trusted = dict(load_public_keys([publisher.public_path]))
    published = publisher.bundle("1.0.0", seed=1)
    _publish(db, store, published, trusted)
    pending = publisher.bundle("1.1.0", seed=2)  # an upload in progress: half its pieces sent
    p_manifest, _ = load_manifest(pending, None)
    with db.session() as s:
        up = Registry(s, store, trusted).begin((pending / MANIFEST_NAME).read_bytes(), "test")
    source = FolderSource.of(pending, p_manifest)
    for pid, _ in up.missing[: len(up.missing) // 2]:
        with db.session() as s:
            Registry(s, store, trusted).put_piece(up.upload_id, pid, source.read(pid))
    orphan, data = _piece(9)
    store.put(orphan, data)
    kept = sorted(load_manifest(published, None)[0].piece_ids())[0]
    store.put_encoding(EncodingKey(orphan), _raw(data))
    store.put_encoding(EncodingKey(kept, orphan), _raw(store.get(kept)))  # its base goes
    store.put_encoding(EncodingKey(kept), _raw(store.get(kept)))
    held = set(store.ids())

    dry = collect(db, store, dry_run=True)
    assert (dry.pieces_removed, dry.encodings_removed, dry.bytes_removed) == (1, 2, 0)
    assert set(store.ids()) == held

    report = collect(db, store)
    assert (report.pieces_removed, report.bytes_removed, report.encodings_removed) == (1, len(data), 2)
    assert set(store.ids()) == held - {orphan}
    assert list(store.encoding_keys()) == [EncodingKey(kept)]
    assert report.incomplete == {} and report.lost == ()
    assert collect(db, store).pieces_removed == 0


def _raw(data: bytes) -> Any:
    from edgeglm.tensor_delta import encode_raw

    return encode_raw(data)


class _Racing:
    """A store whose removal is raced by a publish that adopts the pieces being removed."""

    def __init__(self, store: PieceStorage, adopt: Any) -> None:
        self._store, self._adopt = store, adopt

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def remove(self, pids: Any) -> int:
        self._adopt()
        return self._store.remove(pids)


@BACKENDS
def test_gc_reports_a_piece_a_publish_adopted_while_it_was_removed(
    store: PieceStorage, db: Database, publisher: Any
) -> None:
    trusted = dict(load_public_keys([publisher.public_path]))
    folder = publisher.bundle("2.0.0", seed=3)
    manifest, _ = load_manifest(folder, None)
    source = FolderSource.of(folder, manifest)
    for pid in manifest.piece_ids():  # held, but nothing names them yet
        store.put(pid, source.read(pid))

    def adopt() -> None:
        with db.session() as s:  # begin sees every piece held and asks for none
            assert (
                Registry(s, store, trusted).begin((folder / MANIFEST_NAME).read_bytes(), "test").missing == ()
            )

    report = collect(db, _Racing(store, adopt))  # type: ignore[arg-type]
    assert set(report.lost) == manifest.piece_ids()
    up = _publish(db, store, folder, trusted)  # the commit finds them gone: publishing again repairs
    assert store.missing(manifest.piece_ids()) == set() and len(up.missing) == len(manifest.piece_ids())


@BACKENDS
def test_gc_lists_published_bundles_the_store_lacks_pieces_of(
    store: PieceStorage, db: Database, publisher: Any
) -> None:
    trusted = dict(load_public_keys([publisher.public_path]))
    folder = publisher.bundle("3.0.0", seed=4)
    _publish(db, store, folder, trusted)
    manifest, _ = load_manifest(folder, None)
    store.remove(sorted(manifest.piece_ids())[:2])
    report = collect(db, store, dry_run=True)
    assert report.incomplete == {"glm-tiny@3.0.0+cpu-x86-int4": 2}


# ---------------------------------------------------------------------------------- the CLI


def test_gc_and_store_import_from_the_command_line(tmp_path: Path, publisher: Any) -> None:
    """A SQLite hub's folder store copied into the database store, then collected, by edgectl."""
    from cloud_hub.db import migrate

    url = f"sqlite:///{tmp_path / 'hub.db'}"
    migrate(url)
    old = PieceStore(tmp_path / "old-pieces")
    pieces = [_piece(200 + n) for n in range(3)]
    for pid, data in pieces:
        old.put(pid, data)
    rotten = pieces[2][0]
    path = old._path(rotten)
    path.write_bytes(b"x" + path.read_bytes()[1:])

    def cli(*args: str) -> Any:
        return CliRunner().invoke(root, ["hub", *args, "--db", url, "--store", "database", "-o", "json"])

    r = cli("store", "import", str(old.root))
    assert r.exit_code == 0, r.output
    imported = json.loads(r.output)
    assert (imported["copied"], imported["held_already"], imported["corrupt"]) == (2, 0, [rotten])
    assert json.loads(cli("store", "import", str(old.root)).output)["held_already"] == 2

    r = cli("gc", "--dry-run")
    assert r.exit_code == 0, r.output
    assert (json.loads(r.output)["pieces_removed"], json.loads(r.output)["dry_run"]) == (2, True)
    r = cli("gc")
    assert r.exit_code == 0 and json.loads(r.output)["pieces_removed"] == 2
    database = open_db(url)
    try:
        assert list(DatabaseStorage(database).ids()) == []
    finally:
        database.dispose()

    r = CliRunner().invoke(root, ["hub", "gc", "--db", url, "--store", "s3"])
    assert r.exit_code == 2 and "'s3' is not one of" in r.output


# ------------------------------------------------------------------------------ choosing one


def test_auto_is_the_database_on_postgresql_the_folder_on_sqlite_and_a_left_folder_is_named(
    hub_db_url: str, db: Database, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from cloud_hub.piece_storage import StoreKind
    from cloud_hub.server import open_store
    from cloud_hub.settings import HubSettings
    from edgeglm.errors import ConfigError

    settings = HubSettings(data_dir=tmp_path / "hub", db_url=hub_db_url)
    PieceStore(settings.pieces_dir).put(*_piece(10))  # a folder store from before
    with caplog.at_level(logging.INFO, logger="cloud_hub.server"):
        store = open_store(settings, db)
    expected = DatabaseStorage if db.dialect == "postgresql" else FolderStorage
    assert isinstance(store, expected)
    assert f"piece store: {store.description} (--store auto)" in caplog.text
    assert ("edgectl hub store import" in caplog.text) == (db.dialect == "postgresql")
    assert isinstance(
        open_store(HubSettings.from_env({"EDGEGLM_HUB_STORE": "database"}), db), DatabaseStorage
    )
    assert HubSettings.from_env({"EDGEGLM_HUB_STORE": "folder"}).store_kind("postgresql") is StoreKind.FOLDER
    with pytest.raises(ConfigError, match="EDGEGLM_HUB_STORE: 's3' is not one of auto, folder, database"):
        HubSettings.from_env({"EDGEGLM_HUB_STORE": "s3"})


def test_a_piece_twice_in_a_bundle_is_planned_by_its_first_travelling_step(tmp_path: Path) -> None:
    """Two equal tensors give one piece id twice: the step kept is the one that fetches it (the
    second place is a "have" step, which the delta route would answer 404)."""
    from edgeglm.bundle import Manifest
    from edgeglm.bundle_files import describe_file
    from edgeglm.pieces import TensorSpan

    same = np.random.default_rng(3).standard_normal(4096).astype(np.float32)
    (tmp_path / "model.onnx.data").write_bytes(same.tobytes() * 2)
    spans = [TensorSpan("a", "float32", 0, same.nbytes), TensorSpan("b", "float32", same.nbytes, same.nbytes)]
    files = (describe_file(tmp_path / "model.onnx.data", "model.onnx.data", spans),)
    target = Manifest(model="m", version="1.0.0", profile="p", files=files, quality={"passed": True})
    (first, _), (second, _) = files[0].pieces
    assert first == second
    step = PieceEncoder(None, FolderStorage(tmp_path / "store"), HubMetrics()).steps(target, ())[first]  # type: ignore[arg-type]
    assert step.action == "raw"


@pytest.mark.parametrize(("kind", "hub_db_url"), [("folder", "sqlite")], indirect=["hub_db_url"])
def test_a_bundle_is_read_and_parsed_once_and_the_cache_is_bounded(
    store: PieceStorage, db: Database, publisher: Any
) -> None:
    """Every HTTP piece request asks for its bundle's plan: the manifest is parsed once, not per piece."""
    trusted = dict(load_public_keys([publisher.public_path]))
    folders = {v: publisher.bundle(v, size=4096) for v in ("1.0.0", "1.1.0")}
    for folder in folders.values():
        _publish(db, store, folder, trusted)
    model, profile = (
        load_manifest(folders["1.0.0"], None)[0].model,
        load_manifest(folders["1.0.0"], None)[0].profile,
    )
    encoder = PieceEncoder(db, store, HubMetrics(), bundles=1)
    raw, first = encoder.bundle(model, "1.0.0", profile)
    assert raw == (folders["1.0.0"] / MANIFEST_NAME).read_bytes()  # exactly as signed
    assert encoder.bundle(model, "1.0.0", profile)[1] is first  # not read nor parsed again
    encoder.bundle(model, "1.1.0", profile)
    assert encoder.bundle(model, "1.0.0", profile)[1] is not first  # one kept at most


@pytest.mark.parametrize(("kind", "hub_db_url"), [("folder", "sqlite")], indirect=["hub_db_url"])
def test_requests_for_one_uncached_piece_at_once_read_and_encode_it_once(store: PieceStorage) -> None:
    """A wave asks for the same piece at the same moment: one read and encode, shared."""
    data = np.random.default_rng(9).standard_normal(1 << 16).astype(np.float32).tobytes()
    pid = piece_id(data)
    store.put(pid, data)

    class Slow:  # the store, read slowly enough that every request arrives while one is reading
        reads = 0

        def __getattr__(self, name: str) -> Any:
            return getattr(store, name)

        def get(self, p: str) -> bytes:
            Slow.reads += 1
            time.sleep(0.05)
            return store.get(p)

    metrics = HubMetrics()
    encoder = PieceEncoder(None, Slow(), metrics)  # type: ignore[arg-type]
    step = PieceStep(pid, len(data), "raw", len(data), dtype="float32")
    start = threading.Barrier(20)
    got: list[Any] = []

    def ask() -> None:
        start.wait()
        got.append(encoder.encoded(step))

    threads = [threading.Thread(target=ask) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert Slow.reads == 1 and len(got) == 20 and all(g == got[0] for g in got)
    assert metrics.value("edgeglm_hub_encode_cache_total", result="miss") == 1
