"""Describe, store, plan and assemble stream: memory is bounded by a few pieces, not the file."""

from __future__ import annotations

import tracemalloc

import numpy as np

from edgeglm.assembler import assemble_file
from edgeglm.bundle import Manifest
from edgeglm.bundle_files import FolderSource, describe_file, ingest_folder
from edgeglm.piece_store import PieceStore
from edgeglm.pieces import TensorSpan
from edgeglm.planner import plan

MIB = 1 << 20


def test_peak_memory_is_a_few_pieces(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "bundle"
    folder.mkdir()
    spans = []
    with open(folder / "w.data", "wb") as fh:
        for i in range(12):  # 12 tensors of 4 MiB: 48 MiB
            spans.append(TensorSpan(f"t{i}", "float32", i * 4 * MIB, 4 * MIB))
            fh.write(rng.bytes(4 * MIB))

    tracemalloc.start()
    try:
        entry = describe_file(folder / "w.data", "w.data", spans)
        manifest = Manifest(model="m", version="1.0.0", profile="p", files=(entry,))
        store = PieceStore(tmp_path / "store", durable=False)
        ingest_folder(folder, manifest, store)
        plan(manifest, [], source=FolderSource.of(folder, manifest))
        out = assemble_file(entry, store, tmp_path / "out")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.stat().st_size == 48 * MIB
    assert peak < 8 * MIB, f"peak {peak / MIB:.1f} MiB for a 48 MiB file"
