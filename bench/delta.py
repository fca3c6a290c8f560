"""Delta-sync benchmark: bytes to send for realistic model updates, ours against generic tools.

    python -m bench.delta [--quick] --json FILE

For fp32 and int8 weight files laid out like ONNX external data (see ``bench.synth_weights``) and
the update pairs A-D, every method turns OLD into NEW, and the rebuilt files are compared byte for
byte with NEW. Methods (all measured in this run, on the same files):

    ours             tensor-aware pieces + tensor delta, as the hub would plan and send them
                     (payloads + the zstd-compressed new manifest)
    full-zstd        every new file, zstd -3
    rsync            rsync --no-whole-file --only-write-batch, batch file zstd -3 (as over -z)
    xdelta3          xdelta3 -e -s OLD with a source window covering the file (zstd -3 if smaller)
    zstd-patch-from  zstd -3 --patch-from=OLD --long
    fastcdc-64k      FastCDC 64 KiB chunks missing from OLD, zstd -3
    floor            the tensors that changed (and the graph, if it did), zstd -3: where generic
                     tools land at best. A bound, not a tool: it rebuilds nothing.

Each run writes JSON rows ``{case, dtype, method, bytes, encode_s, apply_s, identical}`` and prints
per pair ours / best tool and ours / floor.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3
import zstandard
from fastcdc import fastcdc

from bench.synth_weights import CASES, Dims, base_model, make_pair, quantize_int8, write_model
from edgeglm.bundle import Manifest
from edgeglm.bundle_files import FolderSource, describe_folder, ingest_folder
from edgeglm.piece_store import PieceStore
from edgeglm.planner import PieceStep, plan, receive
from edgeglm.tensor_delta import Encoded

TOOLS = {"rsync": "rsync", "xdelta3": "xdelta3", "zstd": "zstd"}
FILES = ("model.onnx", "model.onnx.data")
Row = dict[str, Any]


def ensure_tools() -> None:
    missing = [pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        sys.exit(f"bench.delta needs {', '.join(missing)}: apt-get install -y {' '.join(missing)}")
    print(f"installing {' '.join(missing)} ...", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if subprocess.run(["apt-get", "install", "-y", *missing], env=env, capture_output=True).returncode:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, check=True)
        subprocess.run(["apt-get", "install", "-y", *missing], env=env, capture_output=True, check=True)


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def zsize(path: Path) -> int:
    """zstd -3 size of a file (streamed)."""
    out = 0
    cctx = zstandard.ZstdCompressor(level=3)
    with open(path, "rb") as fh:
        reader = cctx.stream_reader(fh)
        while chunk := reader.read(1 << 20):
            out += len(chunk)
    return out


def same(a: Path, b: Path) -> bool:
    return all(filecmp.cmp(a / f, b / f, shallow=False) for f in FILES)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t


def copy_old(old: Path, dest: Path) -> Path:
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(old, dest)
    return dest


# -- methods: each returns (bytes, encode_s, apply_s, identical) -------------------------------


def m_ours(old: Path, new: Path, work: Path) -> tuple[int, float, float, bool]:
    payloads: dict[str, tuple[PieceStep, Encoded, Encoded]] = {}

    def encode() -> tuple[Any, Manifest]:
        m_old = Manifest(model="bench", version="1.0.0", profile="bench", files=describe_folder(old))
        m_new = Manifest(model="bench", version="1.1.0", profile="bench", files=describe_folder(new))
        src_new, src_old = FolderSource.of(new, m_new), FolderSource.of(old, m_old)

        class Both:
            def read(self, pid: str) -> bytes:
                return src_new.read(pid) if pid in src_new else src_old.read(pid)

        the_plan = plan(
            m_new,
            [m_old],
            source=Both(),
            on_encoded=lambda s, c, r: payloads.__setitem__(s.piece_id, (s, c, r)),
        )
        return the_plan, m_new, m_old

    (the_plan, m_new, m_old), enc_s = timed(encode)
    doc = m_new.to_json_dict()
    manifest_bytes = len(zstandard.ZstdCompressor(level=3).compress(json.dumps(doc).encode()))
    sent = [
        (s, payloads[s.piece_id][1] if s.action == "delta" else payloads[s.piece_id][2])
        for s in the_plan.steps()
    ]
    total = sum(len(e.payload) for _, e in sent) + manifest_bytes
    assert total - manifest_bytes == the_plan.bytes_to_send

    store = PieceStore(work / "store", durable=False)
    ingest_folder(old, m_old, store)  # what the receiver already holds: not timed

    def apply() -> None:
        from edgeglm.assembler import assemble_bundle

        for step, enc in sent:
            receive(store, step.piece_id, step.size, enc, step.base_id)
        assemble_bundle(m_new, doc, store, work / "out")

    _, app_s = timed(apply)
    return total, enc_s, app_s, same(work / "out", new)


def m_full_zstd(old: Path, new: Path, work: Path) -> tuple[int, float, float, bool]:
    work.mkdir(parents=True, exist_ok=True)
    _, enc = timed(
        lambda: [sh("zstd", "-q", "-3", "-f", str(new / f), "-o", str(work / f"{f}.zst")) for f in FILES]
    )
    out = work / "out"
    out.mkdir()
    _, app = timed(
        lambda: [sh("zstd", "-q", "-d", "-f", str(work / f"{f}.zst"), "-o", str(out / f)) for f in FILES]
    )
    return sum((work / f"{f}.zst").stat().st_size for f in FILES), enc, app, same(out, new)


def m_rsync(old: Path, new: Path, work: Path) -> tuple[int, float, float, bool]:
    work.mkdir(parents=True, exist_ok=True)
    dest = copy_old(old, work / "out")
    batch = work / "batch"

    def encode() -> None:
        sh(
            "rsync",
            "-r",
            "--ignore-times",
            "--no-whole-file",
            f"--only-write-batch={batch}",
            f"{new}/",
            f"{dest}/",
        )
        sh("zstd", "-q", "-3", "-f", str(batch), "-o", f"{batch}.zst")

    _, enc = timed(encode)

    def apply() -> None:
        sh("zstd", "-q", "-d", "-f", f"{batch}.zst", "-o", str(batch))
        sh("rsync", "-r", "--ignore-times", f"--read-batch={batch}", f"{dest}/")

    _, app = timed(apply)
    return Path(f"{batch}.zst").stat().st_size, enc, app, same(dest, new)


def _window(path: Path) -> int:
    size, w = path.stat().st_size, 1 << 20
    while w < size:
        w <<= 1
    return w


def m_xdelta3(old: Path, new: Path, work: Path) -> tuple[int, float, float, bool]:
    work.mkdir(parents=True, exist_ok=True)
    out = work / "out"
    out.mkdir()
    sizes = {}

    def encode() -> None:
        for f in FILES:
            d = work / f"{f}.xd"
            sh("xdelta3", "-e", "-f", "-B", str(_window(old / f)), "-s", str(old / f), str(new / f), str(d))
            sizes[f] = min(d.stat().st_size, zsize(d))

    _, enc = timed(encode)
    _, app = timed(
        lambda: [
            sh(
                "xdelta3",
                "-d",
                "-f",
                "-B",
                str(_window(old / f)),
                "-s",
                str(old / f),
                str(work / f"{f}.xd"),
                str(out / f),
            )
            for f in FILES
        ]
    )
    return sum(sizes.values()), enc, app, same(out, new)


def _long(path: Path) -> str:
    return f"--long={max(_window(path).bit_length() - 1, 10)}"


def m_patch_from(old: Path, new: Path, work: Path) -> tuple[int, float, float, bool]:
    work.mkdir(parents=True, exist_ok=True)
    out = work / "out"
    out.mkdir()
    _, enc = timed(
        lambda: [
            sh(
                "zstd",
                "-q",
                "-3",
                "-f",
                _long(new / f),
                f"--patch-from={old / f}",
                str(new / f),
                "-o",
                str(work / f"{f}.patch"),
            )
            for f in FILES
        ]
    )
    _, app = timed(
        lambda: [
            sh(
                "zstd",
                "-q",
                "-d",
                "-f",
                _long(new / f),
                f"--patch-from={old / f}",
                str(work / f"{f}.patch"),
                "-o",
                str(out / f),
            )
            for f in FILES
        ]
    )
    return sum((work / f"{f}.patch").stat().st_size for f in FILES), enc, app, same(out, new)


def _chunks(path: Path) -> list[tuple[int, int, str]]:
    data = path.read_bytes()
    return [
        (c.offset, c.length, blake3.blake3(data[c.offset : c.offset + c.length]).hexdigest())
        for c in fastcdc(data, avg_size=64 << 10)
    ]


def m_fastcdc(old: Path, new: Path, work: Path) -> tuple[int, float, float, bool]:
    work.mkdir(parents=True, exist_ok=True)
    out = work / "out"
    out.mkdir()
    recipes: dict[str, tuple[list[tuple[int, int, str]], dict[str, tuple[int, int]], bytes]] = {}

    def encode() -> int:
        total = 0
        for f in FILES:
            have = {h: (o, n) for o, n, h in _chunks(old / f)}
            data = (new / f).read_bytes()
            recipe = _chunks(new / f)
            missing = b"".join(data[o : o + n] for o, n, h in recipe if h not in have)
            blob = zstandard.ZstdCompressor(level=3).compress(missing)
            recipes[f] = (recipe, have, blob)
            total += len(blob) + 32 * len(recipe)  # + the recipe: one id per chunk
        return total

    size, enc = timed(encode)

    def apply() -> None:
        for f, (recipe, have, blob) in recipes.items():
            missing = zstandard.ZstdDecompressor().stream_reader(blob).read()
            src = (old / f).read_bytes()
            pos = 0
            with open(out / f, "wb") as fh:
                for _, n, h in recipe:
                    if h in have:
                        o, _ = have[h]
                        fh.write(src[o : o + n])
                    else:
                        fh.write(missing[pos : pos + n])
                        pos += n

    _, app = timed(apply)
    return size, enc, app, same(out, new)


def floor_bytes(old_model: list[Any], new_model: list[Any], old: Path, new: Path) -> tuple[int, float]:
    def compute() -> int:
        before = {name: arr.tobytes() for name, arr in old_model}
        changed = b"".join(a.tobytes() for name, a in new_model if before.get(name) != a.tobytes())
        total = len(zstandard.ZstdCompressor(level=3).compress(changed)) if changed else 0
        if not filecmp.cmp(old / "model.onnx", new / "model.onnx", shallow=False):
            total += zsize(new / "model.onnx")
        return total

    return timed(compute)


METHODS: dict[str, Callable[[Path, Path, Path], tuple[int, float, float, bool]]] = {
    "ours": m_ours,
    "full-zstd": m_full_zstd,
    "rsync": m_rsync,
    "xdelta3": m_xdelta3,
    "zstd-patch-from": m_patch_from,
    "fastcdc-64k": m_fastcdc,
}


def run(quick: bool, workdir: Path) -> list[Row]:
    dims = Dims.quick() if quick else Dims.full()
    base = base_model(dims)
    rows: list[Row] = []
    for dtype in ("fp32", "int8"):
        for case in CASES:
            fp32_new = make_pair(base, case)
            if dtype == "int8":
                old_model = quantize_int8(base)
                new_model = quantize_int8(fp32_new, percentile=99.9 if case == "D" else None)
            else:
                old_model, new_model = base, fp32_new
            pair = workdir / f"{dtype}-{case}"
            old, new = write_model(old_model, pair / "old"), write_model(new_model, pair / "new")
            for method, fn in METHODS.items():
                size, enc, app, ok = fn(old, new, pair / method)
                rows.append(
                    {
                        "case": case,
                        "dtype": dtype,
                        "method": method,
                        "bytes": size,
                        "encode_s": round(enc, 3),
                        "apply_s": round(app, 3),
                        "identical": ok,
                    }
                )
                shutil.rmtree(pair / method, ignore_errors=True)
            fl, fl_s = floor_bytes(old_model, new_model, old, new)
            rows.append(
                {
                    "case": case,
                    "dtype": dtype,
                    "method": "floor",
                    "bytes": fl,
                    "encode_s": round(fl_s, 3),
                    "apply_s": None,
                    "identical": None,
                }
            )
            full = sum((new / f).stat().st_size for f in FILES)
            print(summary_line(rows, case, dtype, full), flush=True)
            shutil.rmtree(pair, ignore_errors=True)
    return rows


def ratios(rows: list[Row], case: str, dtype: str) -> dict[str, Any]:
    mine = [r for r in rows if r["case"] == case and r["dtype"] == dtype]
    ours = next(r["bytes"] for r in mine if r["method"] == "ours")
    tools = [r for r in mine if r["method"] not in ("ours", "floor")]
    best = min(tools, key=lambda r: r["bytes"])
    floor = next(r["bytes"] for r in mine if r["method"] == "floor")
    return {
        "ours": ours,
        "best_tool": best["method"],
        "best_bytes": best["bytes"],
        "floor": floor,
        "vs_best": ours / best["bytes"],
        "vs_floor": ours / floor if floor else float("inf"),
    }


def summary_line(rows: list[Row], case: str, dtype: str, full: int) -> str:
    r = ratios(rows, case, dtype)
    return (
        f"{dtype:5} {case}  full {full / 1e6:8.2f} MB  ours {r['ours'] / 1e6:8.3f} MB  "
        f"best tool {r['best_tool']:>15} {r['best_bytes'] / 1e6:8.3f} MB  floor {r['floor'] / 1e6:8.3f} MB  "
        f"ours/best {r['vs_best']:.3f}  ours/floor {r['vs_floor']:.3f}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.delta", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="~70 MB fp32 files instead of ~290 MB")
    ap.add_argument("--json", type=Path, required=True, help="where to write the result rows")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    args = ap.parse_args(argv)
    ensure_tools()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-delta-", dir=args.workdir) as tmp:
        rows = run(args.quick, Path(tmp))
    args.json.write_text(json.dumps(rows, indent=1) + "\n")
    bad = [r for r in rows if r["identical"] is False]
    print(f"\n{len(rows)} rows in {time.perf_counter() - t0:.0f} s -> {args.json}")
    print("all rebuilt files byte-identical" if not bad else f"NOT IDENTICAL: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
