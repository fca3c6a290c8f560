"""Which device profile a box serves a bundle with: the one recorded at export, an explicit
override of the same name, or (a bundle from before profiles were recorded) the shipped one."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.inference.engine import effective_profile
from edgeglm.bundle import Manifest
from edgeglm.errors import ConfigError
from edgeglm.profiles import load_profile
from tests.derived_profiles import derived_profile

HERE = Path("bundle")


def _manifest(profile: str, recorded: object = None) -> Manifest:
    doc = {"model": "m", "version": "1.0.0", "profile": profile, "files": []}
    if recorded is not None:
        doc["device_profile"] = recorded
    return Manifest.model_validate(doc)


def test_the_recorded_profile_wins_over_the_shipped_one_of_the_same_name() -> None:
    gated = derived_profile("cpu-x86-int8", "cpu-x86-int8", max_context=384)
    m = _manifest("cpu-x86-int8", gated.to_dict())
    assert effective_profile(m, None, HERE) == gated
    assert effective_profile(m, None, HERE).max_context == 384 != load_profile("cpu-x86-int8").max_context


def test_an_explicit_override_applies_when_its_name_matches() -> None:
    acme = derived_profile("cpu-x86-int8", "acme-gateway")
    box = derived_profile("cpu-x86-int8", "acme-gateway", intra_op_threads=1)
    m = _manifest("acme-gateway", acme.to_dict())
    assert effective_profile(m, box, HERE) == box
    with pytest.raises(ConfigError, match="was built for profile 'acme-gateway', not 'cpu-x86-int8'"):
        effective_profile(m, load_profile("cpu-x86-int8"), HERE)


def test_an_older_bundle_is_served_with_the_shipped_profile_or_refused_by_name() -> None:
    assert effective_profile(_manifest("cpu-x86-int4"), None, HERE) == load_profile("cpu-x86-int4")
    with pytest.raises(
        ConfigError, match="records no device profile and 'acme-gateway' is not a profile here"
    ):
        effective_profile(_manifest("acme-gateway"), None, HERE)


def test_a_recorded_profile_must_be_the_bundles_and_absent_ones_leave_the_digest_alone() -> None:
    with pytest.raises(ValueError, match="device_profile is 'cpu-x86-int8' but the bundle is for"):
        _manifest("acme-gateway", load_profile("cpu-x86-int8").to_dict())
    old = {
        "model": "m",
        "version": "1.0.0",
        "profile": "p",
        "files": [],
        "quality": {"passed": True, "note": "x"},
    }
    # exactly what the untyped manifest wrote: a bundle sealed again keeps its digest
    assert Manifest.model_validate(old).to_json_dict() == {
        "format_version": 1,
        "model": "m",
        "version": "1.0.0",
        "profile": "p",
        "created_at": "",
        "source_digest": None,
        "dataset_version": None,
        "quality": {"passed": True, "note": "x"},
        "runtime": {},
        "smoke_test": None,
        "files": [],
        "signature": None,
    }
