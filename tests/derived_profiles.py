"""Test profiles derived from shipped ones, through the same validation as a TOML file."""

from __future__ import annotations

import tomllib
from typing import Any

from edgeglm.profiles import DeviceProfile, profiles_dir

# A shipped fused profile turned standard drops the keys only the fused graph takes.
STANDARD_GRAPH: dict[str, Any] = {
    "graph": "standard",
    "accuracy_level": None,
    "symmetric_quant": None,
    "quantizer": None,
    "int8_layers": None,
    "prefix_cache_mb": None,
}


def derived_profile(base: str, name: str, **changes: Any) -> DeviceProfile:
    """The shipped profile ``base`` with ``changes`` (``None`` drops a key), named ``name``."""
    data = tomllib.loads((profiles_dir() / f"{base}.toml").read_text())
    data.update(changes, name=name)
    for key, value in list(data.items()):
        if value is None:
            del data[key]
    return DeviceProfile.from_dict(data, source=f"test profile {name}")
