"""One frozen object drives an export: what to read, for which profile, and where to write."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from edgeglm.errors import UsageError
from edgeglm.profiles import DeviceProfile

__all__ = ["DEFAULT_SMOKE_PROMPT", "ExportSpec"]

DEFAULT_SMOKE_PROMPT = "The pressure sensor on line three reported"
_SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")


@dataclass(frozen=True)
class ExportSpec:
    checkpoint: Path
    profile: DeviceProfile
    version: str
    model_name: str
    out_dir: Path
    key_path: Path
    eval_prompts: Path | None = None
    force: bool = False
    dataset_version: str | None = None
    new_tokens: int = 32
    smoke_prompt: str = DEFAULT_SMOKE_PROMPT
    smoke_tokens: int = 16
    build_engine: bool = True  # TensorRT profiles: False ships the ONNX graph only (--no-engine)
    rotary_interleaved: bool = True  # only tests turn this off, to prove the gate catches it

    def __post_init__(self) -> None:
        if not _SEMVER.match(self.version):
            raise UsageError("--version", f"{self.version!r} is not a semantic version like 1.4.0")
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", self.model_name):
            raise UsageError("--model", f"{self.model_name!r}: use letters, digits, '.', '_' and '-'")
