"""New versions of a real exported bundle: some float tensors changed, resealed and signed.

``derive(src, dst, key, version, scale)`` copies the bundle at ``src``, multiplies the chosen
float tensors of its external data by ``scale`` (plus ``noise`` x N(0, 1) per element: bytes
that do not compress away) (a fine-tune: 1.001 keeps greedy tokens; 0.0 on
the final norm breaks the model, so its smoke test fails), and seals it as ``version`` with the
source's quality and runtime fields. The smoke test is its own (``smoke="own"``: recorded on the
derived graph, as a re-export after a fine-tune records it) or the source's (``smoke="source"``:
a bundle broken after export, which only a device's smoke test can tell). Piece layout stays
per tensor, so an update between two versions fetches only the changed tensors (as tensor
deltas).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np

_FLOAT = {"float32": np.float32, "float16": np.float16}


def float_tensors(folder: Path) -> list[Any]:
    from edgeglm.onnx_tensors import read_external_tables

    return [t for ts in read_external_tables(folder).values() for t in ts if t.dtype in _FLOAT]


def derive(
    src: Path,
    dst: Path,
    key: Any,
    version: str,
    *,
    scale: float = 1.001,
    fraction: float = 0.1,
    names: tuple[str, ...] | None = None,
    noise: float = 0.0,
    smoke: Literal["own", "source"] = "own",
) -> Path:
    from edgectl.demo.models import reseal_as
    from edgeglm.bundle import load_manifest
    from edgeglm.onnx_tensors import read_external_tables

    if dst.exists():
        return dst
    shutil.copytree(src, dst)
    (dst / "manifest.json").unlink()
    manifest, _ = load_manifest(src, None)
    tables = read_external_tables(dst)
    rng = np.random.default_rng(len(version))
    for rel, tensors in tables.items():
        floats = [t for t in tensors if t.dtype in _FLOAT]
        if names is not None:
            chosen = [t for t in floats if any(n in t.name for n in names)]
        else:
            step = max(1, round(1 / fraction))
            chosen = floats[::step]
        with open(dst / rel, "r+b") as fh:
            for t in chosen:
                fh.seek(t.offset)
                arr = np.frombuffer(fh.read(t.length), dtype=_FLOAT[t.dtype]).copy()
                factor = scale + noise * rng.standard_normal(arr.shape) if noise else scale
                arr = (arr * factor).astype(_FLOAT[t.dtype])
                fh.seek(t.offset)
                fh.write(arr.tobytes())
    if smoke == "own" and manifest.smoke_test is not None:
        manifest = manifest.model_copy(update={"smoke_test": _own_smoke(dst, manifest.smoke_test)})
    reseal_as(manifest, dst, key, version)
    return dst


def _own_smoke(folder: Path, source: Any) -> Any:
    from edgeglm.bundle import SmokeTest
    from export.ort_runner import OrtDecoder
    from export.smoke import golden_smoke_test

    decoder = OrtDecoder(folder / "model.onnx")
    stop = set(source.stop_tokens)
    ids = list(source.prompt_tokens)
    return SmokeTest.model_validate(
        golden_smoke_test(decoder, source.prompt, ids, source.max_new_tokens, stop)
    )
