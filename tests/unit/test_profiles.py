"""Device profiles: the shipped files, the schema's error messages, and ``edgectl profiles``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from edgectl import root
from edgeglm.errors import ConfigError, NotFoundError
from edgeglm.profiles import DeviceProfile, load_profile, profiles_dir, shipped_profiles

SHIPPED = ["cpu-arm-int4", "cpu-x86-int4", "cpu-x86-int8", "cuda-fp16", "orin-agx-fp16", "orin-nano-int4"]

CPU: dict[str, Any] = {
    "schema_version": 1,
    "name": "test-cpu",
    "description": "test profile",
    "runtime": "onnxruntime",
    "execution_providers": ["CPUExecutionProvider"],
    "graph": "fused",
    "weights": "int4",
    "block_size": 32,
    "accuracy_level": 4,
    "memory_budget_mb": 4096,
    "quality": {
        "max_abs_logit_diff": 8.0,
        "min_cosine": 0.97,
        "min_top1_agreement": 0.85,
        "max_kl": 0.3,
        "min_greedy_prefix_agreement": 0.5,
        "smoke_min_agreement": 0.9,
    },
}
TRT_TABLE = {"precision": "int4-weight-only", "max_batch": 1, "opt_seq": 256, "max_seq": 2048}
TRT: dict[str, Any] = {
    **CPU,
    "runtime": "tensorrt",
    "execution_providers": ["TensorrtExecutionProvider", "CPUExecutionProvider"],
    "graph": "standard",
    "accuracy_level": 0,
    "tensorrt": TRT_TABLE,
}
DROP = object()  # an override value that removes the key

# (id, base, overrides by dotted key, dotted key the error must name)
BAD: list[tuple[str, dict[str, Any], dict[str, Any], str]] = [
    ("unknown top-level key", CPU, {"max_ctx": 1}, "max_ctx"),
    ("unknown quality key", CPU, {"quality.min_cosin": 0.9}, "quality.min_cosin"),
    ("wrong type", CPU, {"block_size": "32"}, "block_size"),
    ("bool is not int", CPU, {"memory_budget_mb": True}, "memory_budget_mb"),
    ("table expected", CPU, {"quality": 3}, "quality"),
    ("out of range", CPU, {"quality.min_cosine": 1.5}, "quality.min_cosine"),
    ("below minimum", CPU, {"max_context": 8}, "max_context"),
    ("not finite", CPU, {"quality.max_kl": float("nan")}, "quality.max_kl"),
    ("bad enum", CPU, {"graph": "fast"}, "graph"),
    ("bad provider", CPU, {"execution_providers": ["CPUExecutionProvider", "X"]}, "execution_providers[1]"),
    (
        "cpu not last",
        CPU,
        {"execution_providers": ["CPUExecutionProvider", "CUDAExecutionProvider"]},
        "execution_providers",
    ),
    ("no providers", CPU, {"execution_providers": []}, "execution_providers"),
    ("bad name", CPU, {"name": "Test_CPU"}, "name"),
    ("block not power of two", CPU, {"block_size": 48}, "block_size"),
    ("int4 without block", CPU, {"block_size": DROP}, "block_size"),
    ("symmetric not a bool", CPU, {"symmetric_quant": "yes"}, "symmetric_quant"),
    ("symmetric on the standard graph", TRT, {"symmetric_quant": True}, "symmetric_quant"),
    ("prefix cache on the standard graph", TRT, {"prefix_cache_mb": 64}, "prefix_cache_mb"),
    ("negative prefix cache", CPU, {"prefix_cache_mb": -1}, "prefix_cache_mb"),
    ("fp16 on cpu", CPU, {"weights": "fp16", "block_size": DROP, "accuracy_level": DROP}, "weights"),
    (
        "fp32 with fp16 kv",
        CPU,
        {"weights": "fp32", "block_size": DROP, "accuracy_level": DROP, "kv_cache_dtype": "fp16"},
        "kv_cache_dtype",
    ),
    ("quality key missing", CPU, {"quality.max_kl": DROP}, "quality.max_kl"),
    ("chunk threshold zero", CPU, {"chunk": {"full_threshold": 0.0}}, "chunk.full_threshold"),
    ("tensorrt table on onnxruntime", CPU, {"tensorrt": TRT_TABLE}, "tensorrt"),
    ("tensorrt with fused graph", TRT, {"graph": "fused"}, "graph"),
    (
        "tensorrt provider not first",
        TRT,
        {"execution_providers": ["CPUExecutionProvider"]},
        "execution_providers",
    ),
    ("tensorrt table missing", TRT, {"tensorrt": DROP}, "tensorrt"),
    ("tensorrt precision mismatch", TRT, {"tensorrt.precision": "fp16"}, "tensorrt.precision"),
    ("tensorrt max_seq below context", TRT, {"tensorrt.max_seq": 1024}, "tensorrt.max_seq"),
    ("tensorrt unknown key", TRT, {"tensorrt.max_sequence": 4096}, "tensorrt.max_sequence"),
    ("missing schema_version", CPU, {"schema_version": DROP}, "schema_version"),
    ("wrong schema_version", CPU, {"schema_version": 2}, "schema_version"),
]


def _toml(data: dict[str, Any]) -> str:
    """Render a profile (scalars, lists, one level of tables) as TOML."""

    def value(v: Any) -> str:
        return "nan" if v != v else json.dumps(v)

    lines = [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for table, items in ((k, v) for k, v in data.items() if isinstance(v, dict)):
        lines += ["", f"[{table}]", *(f"{k} = {value(v)}" for k, v in items.items())]
    return "\n".join(lines) + "\n"


def _edit(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for dotted, v in overrides.items():
        *tables, key = dotted.split(".")
        target = data[tables[0]] if tables else data
        if v is DROP:
            del target[key]
        else:
            target[key] = v
    return data


def _write(tmp_path: Path, data: dict[str, Any] | str, name: str = "bad.toml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else _toml(data), encoding="utf-8")
    return path


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profile_loads_and_matches_its_file(name: str) -> None:
    profile = load_profile(name)
    assert profile.name == name and profiles_dir().joinpath(f"{name}.toml").is_file()
    assert DeviceProfile.from_dict(profile.to_dict()) == profile


def test_shipped_profiles_lists_the_six() -> None:
    assert shipped_profiles() == SHIPPED


def test_shipped_profiles_are_package_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """They are read through importlib.resources from inside the package, not from a checkout's
    root (tests/integration/test_wheel_install.py checks an installed wheel)."""
    from importlib.resources import files

    monkeypatch.delenv("EDGEGLM_PROFILES_DIR", raising=False)
    assert profiles_dir() == files("edgeglm").joinpath("device_profiles")
    assert not (Path(__file__).resolve().parents[2] / "device_profiles").exists()
    monkeypatch.chdir(tmp_path)  # nothing depends on the working directory
    assert shipped_profiles() == SHIPPED and load_profile("cpu-x86-int8").name == "cpu-x86-int8"


def test_a_shipped_file_named_by_its_path_must_match_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEGLM_PROFILES_DIR", str(tmp_path))
    path = _write(tmp_path, CPU, "other.toml")
    with pytest.raises(ConfigError, match=r"other\.toml: name: must match the file name 'other'"):
        load_profile(path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert load_profile(_write(elsewhere, CPU, "other.toml")).name == "test-cpu"  # not shipped: any name


def test_shipped_tensorrt_profiles_use_standard_graph() -> None:
    nano = load_profile("orin-nano-int4")
    assert nano.graph == "standard" and nano.block_size == 128 and nano.tensorrt is not None
    assert nano.execution_providers == (
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    )


def test_defaults_fill_optional_fields(tmp_path: Path) -> None:
    profile = load_profile(_write(tmp_path, CPU))
    assert profile.kv_cache_dtype == "fp32"
    assert profile.chunk.tensor_piece_bytes == 1 << 20
    assert profile.chunk.full_threshold == 0.65
    assert profile.chunk.message_max_bytes == 131072
    assert profile.tensorrt is None


def test_trt_base_is_valid(tmp_path: Path) -> None:
    assert load_profile(_write(tmp_path, TRT)).runtime == "tensorrt"


@pytest.mark.parametrize(("base", "overrides", "key"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_profile_names_file_and_key(
    tmp_path: Path, base: dict[str, Any], overrides: dict[str, Any], key: str
) -> None:
    path = _write(tmp_path, _edit(base, overrides))
    with pytest.raises(ConfigError) as caught:
        load_profile(path)
    message = str(caught.value)
    assert message.startswith(f"device profile {path}: {key}: "), message


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, _toml(CPU).replace("block_size = 32", "block_size = = 32"))
    with pytest.raises(ConfigError, match=r"invalid TOML: .*line 8") as caught:
        load_profile(path)
    assert str(caught.value).startswith(f"device profile {path}: ")


def test_shipped_name_must_match_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEGLM_PROFILES_DIR", str(tmp_path))
    _write(tmp_path, CPU, "other.toml")
    assert shipped_profiles() == ["other"]
    with pytest.raises(ConfigError, match=r"other\.toml: name: must match the file name 'other'"):
        load_profile("other")


def test_missing_name_and_missing_file_are_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no shipped profile"):
        load_profile("no-such-profile")
    with pytest.raises(NotFoundError, match="no such file"):
        load_profile(tmp_path / "absent.toml")


def test_cli_list_table() -> None:
    result = CliRunner().invoke(root, ["profiles", "list"])
    assert result.exit_code == 0, result.output
    header = result.stdout.splitlines()[0].split()
    assert header[:3] == ["name", "runtime", "graph"] and header[-1] == "description"
    for name in SHIPPED:
        assert name in result.stdout


def test_cli_list_json() -> None:
    result = CliRunner().invoke(root, ["profiles", "list", "--output", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [item["name"] for item in data] == SHIPPED


def test_cli_show_json() -> None:
    result = CliRunner().invoke(root, ["profiles", "show", "cpu-x86-int4", "--output", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["name"] == "cpu-x86-int4" and data["weights"] == "int4" and data["accuracy_level"] == 4
    assert data["quality"]["min_cosine"] <= 1 and data["chunk"]["full_threshold"] == 0.65


def test_cli_show_table_has_dotted_keys() -> None:
    result = CliRunner().invoke(root, ["profiles", "show", "orin-nano-int4"])
    assert result.exit_code == 0, result.output
    assert "tensorrt.precision" in result.stdout and "quality.min_cosine" in result.stdout


def test_cli_show_bad_file_is_config_error(tmp_path: Path) -> None:
    path = _write(tmp_path, _edit(CPU, {"quality.min_cosine": 1.5}))
    result = CliRunner().invoke(root, ["profiles", "show", str(path)])
    assert result.exit_code == 78
    first = result.stderr.splitlines()[0]
    assert first.startswith("Error: ") and str(path) in first and "quality.min_cosine" in first


def test_cli_show_unknown_name_is_usage_error() -> None:
    result = CliRunner().invoke(root, ["profiles", "show", "no-such-profile"])
    assert result.exit_code == 2
    assert "no-such-profile" in result.stderr and "cpu-x86-int4" in result.stderr
