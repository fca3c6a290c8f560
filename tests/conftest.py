"""Suite-wide fixtures: nothing reaches the network; tiny trained GLM checkpoints built on demand."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.derived_profiles import STANDARD_GRAPH, derived_profile

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


# ------------------------------------------------------------------------------ agent bundles

AGENT_BUNDLES: dict[str, tuple[str, dict[str, Any]]] = {
    # name -> (shipped profile, changes): bundles the edge agent's tests serve.
    "fused-int8": ("cpu-x86-int8", {}),
    "fused-int4": ("cpu-x86-int4", {}),
    # MatMulNBits on its fp32 path: a row's result moves continuously with its input (see
    # tests/engine_state.py: the engine-state harness needs that to tell a leak from rounding)
    "fused-int4-fp32": ("cpu-x86-int4", {"accuracy_level": 0}),
    "standard-int8": ("cpu-x86-int8", STANDARD_GRAPH),
}


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoints: TinyCheckpoint, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``bundle(name) -> (folder, profile, public_key_path)``: a signed tiny-glm-edge export.

    Names are the keys of ``AGENT_BUNDLES``; each is exported once per session, through the full
    ``run_export`` pipeline (quality gate included), from the trained glm-edge checkpoint.
    """
    import json

    from edgeglm.keys import create_keypair
    from edgeglm.profiles import load_profile
    from export.pipeline import run_export
    from export.spec import ExportSpec
    from export.tiny_glm import heldout_prompts

    root = tmp_path_factory.mktemp("agent-bundles")
    private, public, _ = create_keypair(root / "keys", "release")
    prompts = root / "prompts.json"
    prompts.write_text(json.dumps(heldout_prompts()))
    built: dict[str, tuple[Path, Any, Path]] = {}

    def bundle(name: str) -> tuple[Path, Any, Path]:
        if name not in built:
            base, changes = AGENT_BUNDLES[name]
            profile = derived_profile(base, f"t-{name}", **changes) if changes else load_profile(base)
            spec = ExportSpec(
                checkpoint=tiny_checkpoints("glm-edge"),
                profile=profile,
                version="1.0.0",
                model_name="tiny-edge",
                out_dir=root / name,
                key_path=private,
                eval_prompts=prompts,
            )
            run_export(spec)
            built[name] = (spec.out_dir, profile, public)
        return built[name]

    return bundle
