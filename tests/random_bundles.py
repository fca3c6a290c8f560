"""Random-weight int4 bundles with flat logits, and a golden prompt a benign numeric path flips.

A random-weight GLM (``bench.infer.QUICK`` dimensions, fused int4 as ``cpu-x86-int4`` builds it)
has the flat next-token logits of a real model wherever two candidates are close: top-2 gaps of a
few thousandths, where the prefix cache's path (the prompt's head from the cache, the last token
prefilled alone: M = 1 instead of M = n in MatMulNBits) moves logits by about 0.02.

:func:`find_flipping_prompt` looks for a golden prompt on which that path changes the greedy
tokens, with ONNX Runtime itself: it runs the prompt's prefill once, keeps the KV of all but the
last token (exactly what the prefix cache hands back) and runs the last token alone. It returns
the prompt with the earliest flip and the logit margin there, so a test can show that the flip is
a near-tie smaller than the kernels' difference, not a broken model or a hunted seed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SMOKE_TOKENS = 16


@dataclass(frozen=True)
class Flip:
    prompt: str
    position: int  # first golden position whose greedy token differs on the cached path
    margin: float  # golden path: logit of its token minus the cached path's choice there
    path_diff: float  # max |Δlogit| between the two paths at that position


@dataclass(frozen=True)
class RandomBundles:
    v1: Path
    v11: Path
    profile: Path
    public: Path
    key: Any
    flip: Flip
    legacy: bool  # smoke records without reference logits


def _greedy_rows(dec: Any, logits: np.ndarray, past: Any, total: int, n: int) -> np.ndarray:
    rows = [logits[0, -1]]
    while len(rows) < n:
        total += 1
        logits, past = dec.step(np.array([[int(rows[-1].argmax())]], np.int64), past, total)
        rows.append(logits[0, -1])
    return np.stack(rows)


def find_flipping_prompt(model: Path, tokenizer: Path, candidates: int = 200) -> Flip:
    """The candidate prompt whose greedy tokens the prefix cache's path flips earliest."""
    from tokenizers import Tokenizer

    from export.ort_runner import OrtDecoder

    dec = OrtDecoder(model)
    tok = Tokenizer.from_file(str(tokenizer))
    best: Flip | None = None
    for k in range(candidates):
        prompt = f"Sensor {k} on line {k % 7} reported a pressure of {k * 13 % 97} bar"
        ids = tok.encode(prompt).ids
        n = len(ids)
        logits, past = dec.step(np.array([ids], np.int64), dec.empty_past(1), n)
        golden = _greedy_rows(dec, logits, past, n, SMOKE_TOKENS)
        head = {name: kv[:, :, : n - 1] for name, kv in past.items()}
        logits, past = dec.step(np.array([ids[-1:]], np.int64), head, n)
        cached = _greedy_rows(dec, logits, past, n, SMOKE_TOKENS)
        a, b = golden.argmax(-1), cached.argmax(-1)
        if (a == b).all():
            continue
        i = int(np.flatnonzero(a != b)[0])
        if best is None or i < best.position:
            margin = float(golden[i, a[i]] - golden[i, b[i]])
            diff = float(np.abs(golden[i] - cached[i]).max())
            best = Flip(prompt, i, margin, diff)
    if best is None:
        raise AssertionError(f"none of {candidates} prompts flips on the cached path: logits not flat?")
    return best


def build_random_bundles(root: Path, *, legacy: bool = False) -> RandomBundles:
    """1.0.0 and its fine-tune 1.1.0, golden prompt = the earliest flip; ``legacy``: old smoke records.

    A legacy bundle is what boxes hold from before reference logits: the same golden prompt and
    tokens, no ``reference`` / ``logit_tolerance`` (resealed without them).
    """
    from bench.infer import QUICK, write_checkpoint
    from bench.serve import write_profile
    from bench.update import build_v1, fine_tune, seal_with_smoke
    from edgeglm.bundle import load_manifest
    from edgeglm.keys import create_keypair, load_private_key

    root.mkdir(parents=True, exist_ok=True)
    private, public, _ = create_keypair(root / "keys", "release", overwrite=True)
    key = load_private_key(private)
    profile = write_profile(root / "bench-cpu-x86-int4.toml", 512)
    ckpt = write_checkpoint(root / "ckpt", QUICK)
    v1 = build_v1(ckpt, root / "1.0.0", key, profile, 512)
    flip = find_flipping_prompt(v1 / "model.onnx", v1 / "tokenizer.json")
    seal_with_smoke(v1, key, "1.0.0", profile, dict(load_manifest(v1, None)[0].runtime), flip.prompt)
    v11 = fine_tune(v1, root / "1.1.0", key, profile)
    if legacy:
        for folder in (v1, v11):
            _strip_reference(folder, key)
    return RandomBundles(v1, v11, profile, public, key, flip, legacy)


def _strip_reference(folder: Path, key: Any) -> None:
    from edgeglm.bundle import load_manifest
    from edgeglm.bundle_files import seal_folder

    m, _ = load_manifest(folder, None)
    assert m.smoke_test is not None
    smoke = {k: v for k, v in json.loads(m.smoke_test.model_dump_json()).items() if k in _LEGACY_KEYS}
    (folder / "manifest.json").unlink()
    seal_folder(
        folder,
        key,
        model=m.model,
        version=m.version,
        profile=m.profile,
        runtime=m.runtime,
        quality=m.quality,
        smoke_test=smoke,
    )


_LEGACY_KEYS = ("prompt", "prompt_tokens", "expected_tokens", "max_new_tokens", "stop_tokens")
