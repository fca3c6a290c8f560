"""Names and versions are one contract: every entry point takes or refuses a value the same way.

The entry points: ``edgectl export`` (ExportSpec), a bundle's manifest (what publish parses), the
hub's deploy body and pin body, and the wire (a desired state). A value one of them cannot carry
must be refused by all of them, with the same reason, before anything is built or stored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from edgeglm.contracts import NAME_MAX, name_problem, semver_key, version_problem

NAMES = {
    "64 characters": ("m" * 64, True),
    "65 characters": ("m" * 65, False),
    "200 characters": ("m" * 200, False),
    "a slash": ("glm/edge", False),
    "a leading dot": (".glm", False),
}
VERSIONS = {
    "plain": ("1.4.0", True),
    "pre-release": ("1.4.0-rc.1", True),
    "build": ("1.4.0+build.7", True),
    "an empty pre-release part": ("1.0.0-rc..1", False),
    "two parts": ("1.0", False),
    "leading zero": ("01.0.0", False),
    "10 digits": ("1234567890.0.0", False),  # the hub keeps MAJOR in a 32-bit column
    "65 characters": ("1.0.0-" + "a" * 59, False),
}


def _export_spec(model: str, version: str) -> Any:
    from edgeglm.profiles import load_profile
    from export.spec import ExportSpec

    return ExportSpec(
        checkpoint=Path("ckpt"),
        profile=load_profile("cpu-x86-int4"),
        version=version,
        model_name=model,
        out_dir=Path("out"),
        key_path=Path("k"),
    )


def _manifest(model: str, version: str) -> Any:
    from edgeglm.bundle import Manifest

    return Manifest.model_validate(
        {"model": model, "version": version, "profile": "cpu-x86-int4", "files": []}
    )


def _deploy(model: str, version: str) -> Any:
    from edgeglm.hub_api import DeployBody

    return DeployBody.model_validate({"release": f"{model}@{version}"})


def _desired(model: str, version: str) -> Any:
    from edgeglm.protocol import Desired

    return Desired(
        model=model,
        version=version,
        manifest_digest="blake3:" + "0" * 64,
        profile="cpu-x86-int4",
        issued_at=1.0,
    )


ENTRIES = {"export": _export_spec, "manifest": _manifest, "deploy": _deploy, "wire": _desired}


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("case", NAMES)
def test_a_name_is_taken_or_refused_alike_everywhere(entry: str, case: str) -> None:
    from edgeglm.errors import UsageError

    name, ok = NAMES[case]
    assert (name_problem(name) is None) is ok
    if ok:
        ENTRIES[entry](name, "1.0.0")
        return
    with pytest.raises((UsageError, ValidationError)) as err:
        ENTRIES[entry](name, "1.0.0")
    if entry in ("export", "manifest"):  # our own message, the contract's words
        assert name_problem(name) in str(err.value)


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("case", VERSIONS)
def test_a_version_is_taken_or_refused_alike_everywhere(entry: str, case: str) -> None:
    from edgeglm.errors import UsageError

    version, ok = VERSIONS[case]
    assert (version_problem(version) is None) is ok
    if ok:
        ENTRIES[entry]("glm-edge", version)
        return
    with pytest.raises((UsageError, ValidationError)) as err:
        ENTRIES[entry]("glm-edge", version)
    if entry in ("export", "manifest"):
        assert version_problem(version) in str(err.value)


@pytest.mark.parametrize("case", VERSIONS)
def test_a_pin_takes_the_same_versions(case: str) -> None:
    from edgeglm.hub_api import PinBody

    version, ok = VERSIONS[case]
    if ok:
        assert PinBody(version=version).version == version
    else:
        with pytest.raises(ValidationError):
            PinBody(version=version)


def test_the_hub_orders_versions_by_their_numbers() -> None:
    assert semver_key("1.10.0") > semver_key("1.9.3")
    assert semver_key("1.4.0-rc.1") == (1, 4, 0, "rc.1")
    with pytest.raises(ValueError, match="not a semantic version"):
        semver_key("1.0.0-rc..1")


def test_the_cli_refuses_a_long_model_name_before_reading_anything(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from edgectl import root

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    result = CliRunner().invoke(
        root,
        [
            "export",
            str(ckpt),
            "--profile",
            "cpu-x86-int4",
            "--version",
            "1.0.0",
            "--key",
            "k",
            "--model",
            "m" * (NAME_MAX + 1),
        ],
    )
    assert result.exit_code == 2, result.output
    assert f"a name has at most {NAME_MAX}" in result.output
