"""The export wing's entry points for the composition root (``edgectl export`` and ``edgectl demo``).

One export run (:class:`ExportSpec` in, :class:`ExportResult` out), and the tiny trained GLM
checkpoints the demo tells its story with. Nothing above the wings imports another module of it.
"""

from __future__ import annotations

from export.pipeline import ExportResult, run_export
from export.spec import ExportSpec
from export.tiny_glm import build_checkpoint, finetune_checkpoint, heldout_prompts

__all__ = [
    "ExportResult",
    "ExportSpec",
    "build_checkpoint",
    "finetune_checkpoint",
    "heldout_prompts",
    "run_export",
]
