"""The content-addressed piece store: verified writes and reads, refs, garbage collection."""

from __future__ import annotations

import pytest

from edgeglm.errors import IntegrityError, NotFoundError, UsageError
from edgeglm.piece_store import PieceStore
from edgeglm.pieces import piece_id


def test_put_get_verifies(tmp_path):
    store = PieceStore(tmp_path)
    pid = piece_id(b"hello")
    assert store.put(pid, b"hello") is True
    assert store.put(pid, b"hello") is False
    assert store.get(pid) == b"hello" and pid in store
    with pytest.raises(IntegrityError):
        store.put(piece_id(b"other"), b"hello")
    with pytest.raises(NotFoundError):
        store.get(piece_id(b"missing"))


@pytest.mark.parametrize("bad", ["", "ABC", "../../etc/passwd", "a" * 63, "g" * 64, "a" * 65])
def test_bad_ids_are_refused(tmp_path, bad):
    store = PieceStore(tmp_path)
    with pytest.raises(IntegrityError):
        store.get(bad)
    assert bad not in store


def test_corrupt_object_is_removed_on_read(tmp_path):
    store = PieceStore(tmp_path)
    pid = piece_id(b"payload")
    store.put(pid, b"payload")
    path = tmp_path / "objects" / pid[:2] / pid
    path.write_bytes(b"paylaod")
    with pytest.raises(IntegrityError, match="corrupt"):
        store.get(pid)
    assert not store.has(pid)
    store.put(pid, b"payload")  # can be fetched again
    assert store.get(pid) == b"payload"


def test_gc_keeps_named_versions_only(tmp_path):
    store = PieceStore(tmp_path, durable=False)
    ids = {name: piece_id(name.encode()) for name in ("a", "b", "c")}
    for name, pid in ids.items():
        store.put(pid, name.encode())
    store.keep("m@1.0.0", {"files": [{"pieces": [[ids["a"], 1]]}]})
    store.keep("m@1.1.0", {"files": [{"pieces": [[ids["a"], 1], [ids["b"], 1]]}]})
    (tmp_path / "tmp" / "stale").write_bytes(b"x")
    stats = store.gc(tmp_age_s=0)
    assert (stats.kept, stats.removed) == (2, 1)
    assert store.has(ids["a"]) and store.has(ids["b"]) and not store.has(ids["c"])
    assert not (tmp_path / "tmp" / "stale").exists()
    store.release("m@1.1.0")
    store.gc()
    assert not store.has(ids["b"]) and store.has(ids["a"])
    assert list(store.refs()) == ["m@1.0.0"]


def test_young_temp_files_survive_gc(tmp_path):
    store = PieceStore(tmp_path)
    (tmp_path / "tmp" / "in-progress").write_bytes(b"x")
    store.gc()
    assert (tmp_path / "tmp" / "in-progress").exists()


@pytest.mark.parametrize("name", ["../x", "", "a/b", ".hidden"])
def test_ref_names_cannot_escape(tmp_path, name):
    with pytest.raises(UsageError):
        PieceStore(tmp_path).keep(name, {})
