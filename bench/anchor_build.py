"""Build llama.cpp (the speed anchor) from the llama-cpp-python sdist on PyPI, cached outside the repo.

The sdist vendors llama.cpp; we build its `llama-bench`, `llama-quantize` and `llama-batched-bench`
with CMake. Two flavours:

- ``native``: ``-DGGML_NATIVE=ON``, the fastest build where its kernels run on this CPU.
- ``avx512``: ``GGML_NATIVE=OFF`` with explicit AVX-512/VNNI/BF16 flags and AMX off, for machines whose
  CPU advertises AMX but whose VM grants no AMX tiles (the native build then dies with SIGILL on any
  batched matmul). Built only when the native build fails a tiny batched run (see bench/llamacpp.py).

Each build lives in ``~/.cache/edgeglm-bench/llamacpp/<sdist version>-<flavour>-<flags hash>`` and is
rebuilt only when its binaries are missing. ``python -m bench.anchor_build [--flavour avx512]``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("EDGEGLM_BENCH_CACHE", Path.home() / ".cache" / "edgeglm-bench")) / "llamacpp"
TARGETS = ("llama-bench", "llama-quantize", "llama-batched-bench")
_COMMON = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
)
FLAVOURS: dict[str, tuple[str, ...]] = {
    "native": ("-DGGML_NATIVE=ON",),
    "avx512": (
        "-DGGML_NATIVE=OFF",
        "-DGGML_AVX512=ON",
        "-DGGML_AVX512_VNNI=ON",
        "-DGGML_AVX512_BF16=ON",
        "-DGGML_AVX512_VBMI=ON",
        "-DGGML_AVX_VNNI=ON",
        "-DGGML_AVX2=ON",
        "-DGGML_FMA=ON",
        "-DGGML_F16C=ON",
        "-DGGML_AMX_TILE=OFF",
        "-DGGML_AMX_INT8=OFF",
        "-DGGML_AMX_BF16=OFF",
    ),
}


@dataclass(frozen=True)
class Build:
    """One built llama.cpp: where its binaries and its source tree (for the converter) are."""

    flavour: str
    version: str
    src: Path  # the vendored llama.cpp tree (convert_hf_to_gguf.py, gguf-py)
    bin: Path

    def tool(self, name: str) -> Path:
        return self.bin / name

    @property
    def label(self) -> str:
        return f"llama.cpp (llama-cpp-python {self.version} sdist, {self.flavour} build)"


def flags_hash(flavour: str) -> str:
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown llama.cpp build flavour {flavour!r}; known: {sorted(FLAVOURS)}")
    return hashlib.sha256(" ".join((*_COMMON, *FLAVOURS[flavour])).encode()).hexdigest()[:10]


def _sdist() -> tuple[str, Path]:
    """The newest llama-cpp-python sdist, downloaded once into the cache; returns (version, tarball)."""
    dl = CACHE / "sdist"
    found = sorted(dl.glob("llama_cpp_python-*.tar.gz"))
    if not found:
        dl.mkdir(parents=True, exist_ok=True)
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        subprocess.run([*pip, "llama-cpp-python", "-d", str(dl)], check=True)
        found = sorted(dl.glob("llama_cpp_python-*.tar.gz"))
    if not found:
        raise RuntimeError(f"pip download left no llama-cpp-python sdist in {dl}")
    tarball = found[-1]
    return tarball.name.removeprefix("llama_cpp_python-").removesuffix(".tar.gz"), tarball


def _source(version: str, tarball: Path) -> Path:
    src = CACHE / f"src-{version}"
    tree = src / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if not (tree / "CMakeLists.txt").exists():
        src.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tarball) as tf:
            tf.extractall(src, filter="data")
    if not (tree / "convert_hf_to_gguf.py").exists():
        raise RuntimeError(f"the sdist has no vendored llama.cpp at {tree}")
    return tree


def ensure(flavour: str = "native", jobs: int | None = None) -> Build:
    """Return the cached build of this flavour, building it first when a binary is missing."""
    version, tarball = _sdist()
    src = _source(version, tarball)
    out = CACHE / f"{version}-{flavour}-{flags_hash(flavour)}"
    build = Build(flavour, version, src, out / "bin")
    if all(build.tool(t).exists() for t in TARGETS):
        return build
    if shutil.which("cmake") is None:
        raise RuntimeError("cmake is needed to build llama.cpp (apt-get install cmake)")
    subprocess.run(["cmake", "-S", str(src), "-B", str(out), *_COMMON, *FLAVOURS[flavour]], check=True)
    subprocess.run(
        ["cmake", "--build", str(out), "-j", str(jobs or os.cpu_count() or 2), "--target", *TARGETS],
        check=True,
    )
    if not all(build.tool(t).exists() for t in TARGETS):
        raise RuntimeError(f"llama.cpp build in {out} left no {TARGETS} in {build.bin}")
    return build


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flavour", choices=sorted(FLAVOURS), default="native")
    ap.add_argument("-j", "--jobs", type=int)
    args = ap.parse_args()
    b = ensure(args.flavour, args.jobs)
    print(f"{b.label}: {b.bin}")


if __name__ == "__main__":
    main()
