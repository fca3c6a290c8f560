"""Device profiles: what a bundle is built for and how the agent runs it (PRODUCT.md section 3).

A profile is a TOML file with ``schema_version = 1``; every table rejects unknown keys. Shipped
profiles are package data, ``edgeglm/device_profiles/<name>.toml``, read through
:mod:`importlib.resources` (so a wheel install has them too); ``EDGEGLM_PROFILES_DIR`` points
elsewhere. :func:`load_profile` takes a shipped name or a path (anything with a ``/`` or ending in
``.toml``).

Errors: a file that cannot be read, is not TOML or is not a valid profile raises
:class:`ConfigError` whose message names the file, the dotted key and the problem, e.g.
``device profile /x/y.toml: quality.min_cosine: must be <= 1 (got 1.5)``. A name that is not
shipped, or a path that does not exist, raises :class:`NotFoundError` (the CLI reports it as a
usage error: the argument is wrong, not a file).
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Mapping
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails, PydanticCustomError

from edgeglm.contracts import NAME_MAX
from edgeglm.errors import ConfigError, NotFoundError

__all__ = [
    "EXPORT_ONLY",
    "ChunkSettings",
    "DeviceProfile",
    "QualityGate",
    "TensorRTSettings",
    "is_profile_path",
    "load_profile",
    "profiles_dir",
    "shipped_profiles",
]

SCHEMA_VERSION = 1
PROFILES_DIR_ENV = "EDGEGLM_PROFILES_DIR"
PROFILES_PACKAGE_DIR = "device_profiles"  # inside the edgeglm package (package data)

Runtime = Literal["onnxruntime", "tensorrt"]
ExecutionProvider = Literal["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
Graph = Literal["fused", "standard"]
Weights = Literal["fp32", "fp16", "int8", "int4"]
KvCacheDtype = Literal["fp32", "fp16"]
Quantizer = Literal["rtn", "search", "gptq"]
TensorRTPrecision = Literal["fp32", "fp16", "int8-weight-only", "int4-weight-only"]
Fraction = Annotated[float, Field(ge=0, le=1)]

_NAME = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
_TRT_PRECISION: dict[str, str] = {
    "fp32": "fp32",
    "fp16": "fp16",
    "int8": "int8-weight-only",
    "int4": "int4-weight-only",
}


def _rule(key: str, problem: str) -> PydanticCustomError:
    """A cross-field problem at ``key`` (relative to the table whose validator raises it)."""
    return PydanticCustomError("profile_rule", "{key}: {problem}", {"key": key, "problem": problem})


class _Table(BaseModel):
    # strict: TOML is typed, so "32" is not an integer and true is not 1.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class QualityGate(_Table):
    """Pass/fail thresholds of the export quality gate and of the on-device smoke test."""

    max_abs_logit_diff: float = Field(gt=0)
    min_cosine: Fraction
    min_top1_agreement: Fraction
    max_kl: float = Field(ge=0)
    min_greedy_prefix_agreement: Fraction
    smoke_min_agreement: Fraction  # share of golden positions a box must pass (edge_agent/smoke.py)


class ChunkSettings(_Table):
    """How a bundle is cut into pieces and sent (PRODUCT.md section 5)."""

    tensor_piece_bytes: int = Field(default=1 << 20, ge=4096, le=64 << 20)
    cdc_avg_bytes: int = Field(default=16 << 10, ge=256, le=4 << 20)
    full_threshold: float = Field(default=0.65, gt=0, le=1)
    message_max_bytes: int = Field(default=128 << 10, ge=4096, le=268_435_455)


class TensorRTSettings(_Table):
    """How the TensorRT engine is built: precision and optimisation-profile shapes."""

    precision: TensorRTPrecision
    min_batch: int = Field(default=1, ge=1)
    opt_batch: int = Field(default=1, ge=1)
    max_batch: int = Field(ge=1)
    opt_seq: int = Field(ge=1)
    max_seq: int = Field(ge=16)
    workspace_mb: int = Field(default=1024, gt=0)

    @model_validator(mode="after")
    def _shapes(self) -> TensorRTSettings:
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise _rule("opt_batch", "need min_batch <= opt_batch <= max_batch")
        if self.opt_seq > self.max_seq:
            raise _rule("opt_seq", f"must be <= max_seq ({self.max_seq}) (got {self.opt_seq})")
        return self


# Keys only the exporter reads: a manifest's profile copy leaves them out (DeviceProfile.serving).
EXPORT_ONLY = frozenset({"quantizer", "int8_layers"})


class DeviceProfile(_Table):
    """One device profile. Construct with :func:`load_profile` or :meth:`from_dict`."""

    schema_version: Literal[1]
    name: str
    description: str = Field(min_length=1)
    runtime: Runtime
    # Ordered: the runtime tries each provider in turn. Lax so that a TOML list becomes a tuple.
    execution_providers: tuple[ExecutionProvider, ...] = Field(min_length=1, strict=False)
    graph: Graph
    weights: Weights
    block_size: int | None = None
    accuracy_level: int = Field(default=0, ge=0, le=4)
    symmetric_quant: bool = False  # fused int4/int8: no zero points (MatMulNBits' faster kernel)
    # fused symmetric: how weights are rounded. rtn: round to nearest; search: least-squares scale
    # per block (the default there); gptq: GPTQ on calibration inputs, with the search's scales
    quantizer: Quantizer | None = None
    # fused symmetric int4: the first N decoder layers' linears at 8 bits (errors there grow
    # through every later layer; llama.cpp's k-quants give early layers more bits too)
    int8_layers: int = Field(default=0, ge=0, le=1024)
    kv_cache_dtype: KvCacheDtype  # default: fp16 for fp16 weights, else fp32 (see _defaults)
    max_context: int = Field(default=2048, ge=16, le=1 << 20)
    max_batch_size: int = Field(default=1, ge=1, le=1024)
    batch_wait_ms: int = Field(default=0, ge=0, le=10_000)
    intra_op_threads: int = Field(default=0, ge=0, le=1024)
    prefix_cache_mb: int = Field(default=0, ge=0, le=65536)  # fused: prompt KV kept for reuse; 0 = off
    memory_budget_mb: int = Field(gt=0)
    quality: QualityGate
    chunk: ChunkSettings = Field(default_factory=ChunkSettings)
    tensorrt: TensorRTSettings | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "device profile") -> DeviceProfile:
        """Validate parsed TOML/JSON; problems raise :class:`ConfigError` naming ``source``."""
        if "schema_version" not in data:
            raise ConfigError(
                source,
                f"schema_version: required key is missing (expected {SCHEMA_VERSION})",
                hint=f"Start the file with 'schema_version = {SCHEMA_VERSION}'.",
            )
        version = data["schema_version"]
        if type(version) is not int or version != SCHEMA_VERSION:
            raise ConfigError(
                source,
                f"schema_version: must be {SCHEMA_VERSION} (got {version!r})",
                hint=f"This edgectl reads device profiles with schema_version = {SCHEMA_VERSION}.",
            )
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            problems = [_describe(err) for err in exc.errors()]
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            shown = "; ".join(problems[:5]) + more
            raise ConfigError(source, shown, problems=problems) from exc

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data; :meth:`from_dict` accepts it back."""
        return self.model_dump(mode="json")

    def serving(self) -> DeviceProfile:
        """This profile without the keys only the exporter reads (how weights were rounded): what a
        manifest records for the agent, so an agent older than those keys still reads it (a
        manifest leaves out profile keys that were never given, see ``edgeglm.bundle``)."""
        kept = {k: v for k, v in self.to_dict().items() if k not in EXPORT_ONLY}
        return DeviceProfile.from_dict(kept, source=f"profile {self.name}")

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and "kv_cache_dtype" not in data:
            data = {**data, "kv_cache_dtype": "fp16" if data.get("weights") == "fp16" else "fp32"}
        return data

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if len(value) > NAME_MAX or not _NAME.fullmatch(value):
            raise ValueError(f"must be 1-64 characters of a-z, 0-9 and '-' (got {value!r})")
        return value

    @field_validator("block_size")
    @classmethod
    def _block_size(cls, value: int | None) -> int | None:
        if value is not None and value not in (16, 32, 64, 128, 256):
            raise ValueError(f"must be a power of two from 16 to 256 (got {value!r})")
        return value

    @model_validator(mode="after")
    def _rules(self) -> DeviceProfile:
        eps = self.execution_providers
        for ep in eps:
            if eps.count(ep) > 1:
                raise _rule("execution_providers", f"lists {ep} twice")
        if "CPUExecutionProvider" in eps[:-1]:
            raise _rule("execution_providers", "CPUExecutionProvider must be last (it is the fallback)")
        quantized = self.weights in ("int4", "int8")
        if quantized and self.block_size is None:
            raise _rule("block_size", f"required for {self.weights} weights (quantization block)")
        if not quantized and self.block_size is not None:
            raise _rule("block_size", f"only used with int4/int8 weights (weights = {self.weights!r})")
        if self.accuracy_level and not (quantized and self.graph == "fused"):
            raise _rule("accuracy_level", "MatMulNBits only: needs graph 'fused' and int4/int8 weights")
        if self.symmetric_quant and not (quantized and self.graph == "fused"):
            raise _rule("symmetric_quant", "MatMulNBits only: needs graph 'fused' and int4/int8 weights")
        if self.quantizer is not None and not self.symmetric_quant:
            raise _rule("quantizer", "rounds symmetric MatMulNBits weights: needs symmetric_quant = true")
        if self.quantizer == "search" and self.weights != "int4":
            raise _rule("quantizer", "the scale search is for int4 weights ('rtn' or 'gptq' for int8)")
        if self.int8_layers and not (self.weights == "int4" and self.symmetric_quant):
            raise _rule("int8_layers", "keeps layers of symmetric int4 weights at 8 bits: needs both")
        if self.prefix_cache_mb and self.graph != "fused":
            raise _rule("prefix_cache_mb", "reuses the fused graph's KV arena: needs graph 'fused'")
        if self.weights in ("fp32", "fp16") and self.kv_cache_dtype != self.weights:
            raise _rule("kv_cache_dtype", f"must be {self.weights!r} with {self.weights} weights")
        if self.weights == "fp16" and eps[0] == "CPUExecutionProvider":
            raise _rule("weights", "fp16 needs a GPU execution provider first; use int8/int4 on CPU")
        if self.runtime == "onnxruntime":
            if self.tensorrt is not None:
                raise _rule("tensorrt", "this table is only allowed when runtime = 'tensorrt'")
            return self
        if eps[0] != "TensorrtExecutionProvider":
            raise _rule("execution_providers", "runtime 'tensorrt' needs TensorrtExecutionProvider first")
        if self.graph != "standard":
            raise _rule("graph", "runtime 'tensorrt' needs 'standard' (TensorRT has no ORT contrib ops)")
        trt = self.tensorrt
        if trt is None:
            raise _rule("tensorrt", "required table when runtime = 'tensorrt'")
        if trt.precision != _TRT_PRECISION[self.weights]:
            want = _TRT_PRECISION[self.weights]
            raise _rule("tensorrt.precision", f"must be {want!r} with {self.weights} weights")
        if trt.max_batch < self.max_batch_size:
            raise _rule("tensorrt.max_batch", f"must be >= max_batch_size ({self.max_batch_size})")
        if trt.max_seq < self.max_context:
            raise _rule("tensorrt.max_seq", f"must be >= max_context ({self.max_context})")
        if trt.workspace_mb >= self.memory_budget_mb:
            raise _rule("tensorrt.workspace_mb", f"must be < memory_budget_mb ({self.memory_budget_mb})")
        return self


def profiles_dir() -> Traversable:
    """Folder of the shipped profiles: ``$EDGEGLM_PROFILES_DIR``, else the package data folder.

    A :class:`~importlib.resources.abc.Traversable` (a :class:`~pathlib.Path` when the package is
    installed as files, as wheels and editable installs are): join and read it, do not glob it.
    """
    override = os.environ.get(PROFILES_DIR_ENV)
    if override:
        return Path(override).expanduser()
    return files("edgeglm").joinpath(PROFILES_PACKAGE_DIR)


def shipped_profiles() -> list[str]:
    """Sorted names of the shipped profiles (empty if the folder is missing)."""
    folder = profiles_dir()
    if not folder.is_dir():
        return []
    return sorted(
        entry.name.removesuffix(".toml")
        for entry in folder.iterdir()
        if entry.name.endswith(".toml") and entry.is_file()
    )


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """Load a shipped profile by name, or a profile file by path."""
    path, shipped_name = _locate(name_or_path)
    source = f"device profile {path}"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise NotFoundError(source, "no such file", path=path) from exc
    except OSError as exc:
        raise ConfigError(source, f"cannot read: {exc.strerror or exc}", path=path) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(source, "not UTF-8 text", path=path) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, f"invalid TOML: {exc}", path=path) from exc
    profile = DeviceProfile.from_dict(data, source=source)
    if shipped_name is not None and profile.name != shipped_name:
        raise ConfigError(source, f"name: must match the file name {shipped_name!r} (got {profile.name!r})")
    return profile


def is_profile_path(name_or_path: str | Path) -> bool:
    """True for a profile *file* (a Path, anything with a ``/`` or ending in ``.toml``), False for a name."""
    if isinstance(name_or_path, Path):
        return True
    value = name_or_path
    return (
        value.endswith(".toml") or "/" in value or bool(os.altsep and os.altsep in value) or os.sep in value
    )


def _locate(name_or_path: str | Path) -> tuple[Traversable, str | None]:
    """The file to read, and the profile name it must hold when it is a shipped one (else None)."""
    if is_profile_path(name_or_path):
        path = Path(name_or_path).expanduser()
        folder = profiles_dir()
        # A shipped file named by its path is still a shipped profile: its name must match too.
        in_folder = isinstance(folder, Path) and path.resolve().parent == folder.resolve()
        return path, path.stem if in_folder else None
    value = str(name_or_path)
    if value not in shipped_profiles():
        shipped = ", ".join(shipped_profiles()) or "none"
        raise NotFoundError(
            f"device profile {value!r}",
            "no shipped profile has this name",
            hint=f"Shipped profiles: {shipped}. Or give the path to a .toml file.",
            name=value,
        )
    return profiles_dir().joinpath(f"{value}.toml"), value


_TYPES = {
    "int_type": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "bool_type": "true or false",
    "tuple_type": "a list",
    "model_type": "a table",
}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _describe(err: ErrorDetails) -> str:
    """One pydantic error as ``dotted.key: problem (got value)``."""
    kind, loc, ctx = err["type"], err["loc"], err.get("ctx") or {}
    if kind == "profile_rule":
        loc = (*loc, *str(ctx["key"]).split("."))
    key = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    got = _show(err["input"])
    if kind == "profile_rule":
        problem = str(ctx["problem"])
    elif kind == "missing":
        problem = "required key is missing"
    elif kind == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), _keys_at(loc[:-1]), n=1)
        problem = "unknown key" + (f"; did you mean {close[0]!r}?" if close else "")
    elif kind in _BOUNDS:
        bound = next(iter(ctx.values()))
        problem = f"must be {_BOUNDS[kind]} {bound} (got {got})"
    elif kind in _TYPES:
        problem = f"must be {_TYPES[kind]} (got {got})"
    elif kind == "literal_error":
        problem = f"must be {ctx['expected']} (got {got})"
    elif kind == "value_error":
        problem = str(ctx["error"])
    elif kind in ("too_short", "string_too_short"):
        problem = "must not be empty"
    else:
        problem = f"{err['msg'][0].lower()}{err['msg'][1:]} (got {got})"
    return f"{key}: {problem}" if key else problem


def _show(value: Any) -> str:
    """A value as an operator wrote it in TOML (true, not True), cut to one short line."""
    text = str(value).lower() if isinstance(value, bool) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _keys_at(loc: tuple[int | str, ...]) -> list[str]:
    """The keys allowed in the table at ``loc`` (for "did you mean")."""
    model: type[BaseModel] = DeviceProfile
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        found = [t for t in (field.annotation, *get_args(field.annotation)) if _is_model(t)]
        if not found:
            return []
        model = found[0]
    return list(model.model_fields)


def _is_model(value: Any) -> bool:
    return isinstance(value, type) and issubclass(value, BaseModel)
