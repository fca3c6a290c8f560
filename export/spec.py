"""One frozen object drives an export: what to read, for which profile, and where to write."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgeglm.contracts import name_problem, version_problem
from edgeglm.errors import UsageError
from edgeglm.profiles import DeviceProfile

__all__ = ["DEFAULT_SMOKE_PROMPT", "ExportSpec"]

DEFAULT_SMOKE_PROMPT = "The pressure sensor on line three reported"


@dataclass(frozen=True)
class ExportSpec:
    checkpoint: Path
    profile: DeviceProfile
    version: str
    model_name: str
    out_dir: Path
    key_path: Path
    eval_prompts: Path | None = None
    calibration: Path | None = None  # GPTQ profiles: a JSON list of texts; None: self-generated
    force: bool = False
    dataset_version: str | None = None
    new_tokens: int = 32
    smoke_prompt: str = DEFAULT_SMOKE_PROMPT
    smoke_tokens: int = 16
    build_engine: bool = True  # TensorRT profiles: False ships the ONNX graph only (--no-engine)
    rotary_interleaved: bool = True  # only tests turn this off, to prove the gate catches it

    def __post_init__(self) -> None:
        if (problem := version_problem(self.version)) is not None:
            raise UsageError("--version", problem)
        if (problem := name_problem(self.model_name)) is not None:
            raise UsageError("--model", problem)
