"""The smoke test's rule and its manifest records, position by position, without a model."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from edge_agent.smoke import judge_position
from edgeglm.bundle import SmokePosition, SmokeTest, manifest_digest
from edgeglm.errors import IntegrityError

VOCAB = 32


def _ref(ids: list[int], logits: list[float]) -> SmokePosition:
    return SmokePosition(ids=tuple(ids), logits=tuple(logits))


def _logits(values: dict[int, float], rest: float = -5.0) -> np.ndarray:
    out = np.full(VOCAB, rest, np.float32)
    for i, v in values.items():
        out[i] = v
    return out


REF = _ref([3, 7, 1], [2.0, 1.99, 0.5])


@pytest.mark.parametrize(
    ("box", "passes", "why"),
    [
        ({3: 2.0, 7: 1.99, 1: 0.5}, True, "the export's own logits"),
        ({3: 2.03, 7: 1.97, 1: 0.52}, True, "within the tolerance"),
        ({3: 1.98, 7: 2.01, 1: 0.5}, True, "a near-tie flipped within the tolerance"),
        ({3: 2.2, 7: 1.99, 1: 0.5}, False, "the top logit moved by 0.2"),
        ({3: 1.0, 7: 1.99, 1: 0.5}, False, "another model: the golden token fell by a whole unit"),
        ({3: 2.0, 7: 1.99, 1: 0.5, 9: 2.5}, False, "an id the export ranked low is now on top"),
    ],
)
def test_a_position_passes_within_the_tolerance_and_near_ties_may_flip(
    box: dict[int, float], passes: bool, why: str
) -> None:
    ok, delta = judge_position(_logits(box), 3, REF, tolerance=0.05)
    assert ok is passes, why
    assert delta is not None


def test_a_flip_passes_only_as_far_as_the_tolerance_allows() -> None:
    ref = _ref([3, 7, 1], [2.0, 1.85, 0.5])  # margin 0.15
    flipped = _logits({3: 1.92, 7: 1.93, 1: 0.5})  # both moved 0.08: 7 on top
    assert judge_position(flipped, 3, ref, tolerance=0.1)[0]
    assert not judge_position(flipped, 3, ref, tolerance=0.05)[0]


def test_an_unranked_top_passes_only_when_the_export_saw_a_near_tie_to_its_last_id() -> None:
    box = _logits({3: 2.0, 7: 1.99, 1: 1.98, 20: 2.01})  # 20: not among the export's ids
    assert not judge_position(box, 3, _ref([3, 7, 1], [2.0, 1.99, 1.9]), tolerance=0.02)[0]
    assert judge_position(box, 3, _ref([3, 7, 1], [2.0, 1.99, 1.98]), tolerance=0.02)[0]


def test_a_legacy_position_passes_on_its_top_token_only() -> None:
    assert judge_position(_logits({3: 1.0}), 3, None, None) == (True, None)
    assert judge_position(_logits({3: 1.0, 4: 1.001}), 3, None, None) == (False, None)


def test_reference_ids_outside_the_box_vocabulary_fail() -> None:
    ref = _ref([3, VOCAB + 5], [2.0, 1.0])
    ok, delta = judge_position(_logits({3: 2.0}), 3, ref, tolerance=0.05)
    assert not ok and delta == float("inf")


def _smoke(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "prompt": "p",
        "prompt_tokens": [5, 6],
        "expected_tokens": [3, 9],
        "max_new_tokens": 2,
        "stop_tokens": [9],
        "reference": [{"ids": [3, 7], "logits": [2.0, 1.0]}, {"ids": [9, 3], "logits": [4.0, -1.0]}],
        "logit_tolerance": 0.05,
        "path_logit_diff": 0.01,
    }
    doc.update(changes)
    return doc


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"reference": [{"ids": [3, 7], "logits": [2.0, 1.0]}]}, "one position per expected token"),
        ({"expected_tokens": [7, 9]}, "top id is not the expected token"),
        ({"logit_tolerance": None}, "need a logit_tolerance"),
        ({"reference": [], "path_logit_diff": None}, "needs reference logits"),
        ({"reference": [{"ids": [3, 7], "logits": [1.0, 2.0]}] * 2}, "descending"),
        ({"reference": [{"ids": [3, 3], "logits": [2.0, 1.0]}] * 2}, "distinct"),
        ({"logit_tolerance": 0.0}, "greater than 0"),
    ],
)
def test_bad_smoke_records_are_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SmokeTest.model_validate(_smoke(**changes))


def test_smoke_records_outside_the_bounds_are_refused_in_a_manifest() -> None:
    from edgeglm.bundle import parse_manifest

    doc = {
        "model": "m",
        "version": "1.0.0",
        "profile": "cpu-x86-int4",
        "files": [],
        "smoke_test": _smoke(logit_tolerance=float("nan")),
    }
    with pytest.raises(IntegrityError):
        parse_manifest(json.dumps(doc).replace("NaN", "1e999"), None)


def test_a_manifest_without_reference_logits_keeps_its_digest() -> None:
    """A bundle in the field was signed without the new fields: re-serialising must not add them."""
    from edgeglm.bundle import Manifest

    legacy = {
        "format_version": 1,
        "model": "m",
        "version": "1.0.0",
        "profile": "cpu-x86-int4",
        "created_at": "",
        "source_digest": None,
        "dataset_version": None,
        "quality": {},
        "runtime": {},
        "smoke_test": {
            "prompt": "p",
            "prompt_tokens": [5],
            "expected_tokens": [3],
            "max_new_tokens": 1,
            "stop_tokens": [],
        },
        "files": [],
        "signature": None,
    }
    again = Manifest.model_validate(legacy).to_json_dict()
    assert again == legacy
    assert manifest_digest(again) == manifest_digest(legacy)
    with_ref = Manifest.model_validate({**legacy, "smoke_test": _smoke()}).to_json_dict()
    assert with_ref["smoke_test"]["reference"][0] == {"ids": [3, 7], "logits": [2.0, 1.0]}
