"""A local Hugging Face checkpoint folder, read tensor by tensor.

Weights come straight from the safetensors files (single or sharded with
``model.safetensors.index.json``), memory-mapped: a tensor is read when asked for and converted
to float32 then (bf16 and fp16 included), so building a graph never holds the whole model. No
torch, no hub: the folder given is all there is.
"""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import numpy as np

from edgeglm.errors import ExportError, NotFoundError

__all__ = ["Checkpoint", "TensorRef"]

_DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,  # widened to float32 by shifting into the high half
    "F64": np.float64,
    "I64": np.int64,
    "I32": np.int32,
    "I8": np.int8,
    "U8": np.uint8,
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "tokenizer.model",
    "chat_template.jinja",  # transformers >= 4.47 writes the chat template here
    "added_tokens.json",
)


@dataclass(frozen=True)
class TensorRef:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


class Checkpoint:
    """``config.json`` + safetensors + tokenizer files of one local folder."""

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)
        config_path = self.folder / "config.json"
        if not config_path.is_file():
            raise NotFoundError(
                f"checkpoint {self.folder}",
                "has no config.json",
                hint="Give the path of a local Hugging Face model folder (no hub downloads).",
            )
        try:
            self.config: dict[str, Any] = json.loads(config_path.read_text())
        except ValueError as exc:
            raise ExportError(f"checkpoint {self.folder}", f"config.json is not valid JSON: {exc}") from exc
        self._index = self._read_index()
        self._maps: dict[Path, mmap.mmap] = {}

    def _files(self) -> list[Path]:
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise ExportError(f"checkpoint {self.folder}", f"bad safetensors index: {exc}") from exc
            return sorted({self.folder / name for name in weight_map.values()})
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise NotFoundError(f"checkpoint {self.folder}", "has no *.safetensors weights")
        return files

    def _read_index(self) -> dict[str, TensorRef]:
        index: dict[str, TensorRef] = {}
        for path in self._files():
            try:
                with open(path, "rb") as fh:
                    (n,) = struct.unpack("<Q", fh.read(8))
                    header = json.loads(fh.read(n))
            except (OSError, ValueError, struct.error) as exc:
                raise ExportError(f"safetensors file {path.name}", f"unreadable header: {exc}") from exc
            base = 8 + n
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                start, end = info["data_offsets"]
                index[name] = TensorRef(path, info["dtype"], tuple(info["shape"]), base + start, base + end)
        return index

    def names(self) -> list[str]:
        return sorted(self._index)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def ref(self, name: str) -> TensorRef:
        try:
            return self._index[name]
        except KeyError as exc:
            raise ExportError(f"checkpoint {self.folder}", f"weight {name!r} is missing") from exc

    def tensor(self, name: str) -> np.ndarray:
        """The weight as a float32 (or its integer type) numpy array, copied out of the map."""
        ref = self.ref(name)
        if ref.dtype not in _DTYPES:
            raise ExportError(f"weight {name}", f"unsupported safetensors dtype {ref.dtype}")
        mm = self._maps.get(ref.file)
        if mm is None:
            with open(ref.file, "rb") as fh:
                mm = self._maps[ref.file] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        raw = np.frombuffer(
            mm, dtype=_DTYPES[ref.dtype], count=int(np.prod(ref.shape, dtype=np.int64)), offset=ref.start
        ).reshape(ref.shape)
        if ref.dtype == "BF16":
            return (raw.astype(np.uint32) << 16).view(np.float32)
        if raw.dtype.kind == "f":
            return raw.astype(np.float32)
        return raw.copy()

    def close(self) -> None:
        for mm in self._maps.values():
            mm.close()
        self._maps.clear()

    def stop_tokens(self) -> frozenset[int]:
        """The ids that end generation: ``eos_token_id`` of generation_config.json, else config.json."""
        for name in ("generation_config.json", "config.json"):
            path = self.folder / name
            try:
                eos = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
            except ValueError as exc:
                raise ExportError(f"checkpoint {self.folder}", f"{name} is not valid JSON: {exc}") from exc
            if eos is not None:
                ids = eos if isinstance(eos, list) else [eos]
                if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                    raise ExportError(f"checkpoint {self.folder}", f"{name}: bad eos_token_id {eos!r}")
                return frozenset(ids)
        return frozenset()

    def fp32_bytes(self) -> int:
        """Size of all weights in float32: the reference for the export's memory use."""
        return sum(4 * int(np.prod(r.shape, dtype=np.int64)) for r in self._index.values())

    def tokenizer_files(self) -> Iterator[Path]:
        for name in TOKENIZER_FILES:
            if (self.folder / name).is_file():
                yield self.folder / name

    def digest(self) -> str:
        """BLAKE3 over config, tokenizer files and weight files: identifies the source exactly."""
        hasher = blake3.blake3()
        for path in [self.folder / "config.json", *self.tokenizer_files(), *self._files()]:
            hasher.update(path.name.encode() + b"\0")
            with open(path, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    hasher.update(chunk)
        return "blake3:" + hasher.hexdigest()
