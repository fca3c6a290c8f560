"""Suite-wide fixtures: nothing reaches the network; tiny trained GLM checkpoints built on demand."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# Set before transformers is imported anywhere: a test that tries the hub fails instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TinyCheckpoint = Callable[..., Path]


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoint:
    """``build(name, **opts) -> Path``: a trained tiny GLM folder, built once per (name, opts).

    ``opts`` are ``export.tiny_glm.build_checkpoint``'s keywords (steps, seed, save_dtype,
    shard_bytes, ...). Shapes are built lazily, only when a test asks for them.
    """
    import torch

    from export.tiny_glm import build_checkpoint

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("checkpoints")
    built: dict[tuple[str, tuple[tuple[str, Any], ...]], Path] = {}

    def build(name: str, **opts: Any) -> Path:
        key = (name, tuple(sorted(opts.items())))
        if key not in built:
            digest = hashlib.sha256(repr(key[1]).encode()).hexdigest()[:10]
            built[key] = build_checkpoint(root / f"{name}-{digest}", name, **opts)
        return built[key]

    return build


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_checkpoints: TinyCheckpoint) -> TinyCheckpoint:
    """Singular spelling of :func:`tiny_checkpoints` (the same memoized builder)."""
    return tiny_checkpoints
