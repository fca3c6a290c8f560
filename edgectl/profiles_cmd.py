"""``edgectl profiles``: list and inspect device profiles."""

from __future__ import annotations

from typing import Any

import click

from edgectl.output import emit, output_option, render_table
from edgectl.params import ProfileParam
from edgeglm.profiles import DeviceProfile, load_profile, profiles_dir, shipped_profiles

__all__ = ["profiles"]

_COLUMNS = ("name", "runtime", "graph", "weights", "block_size", "max_context", "memory_budget_mb")


@click.group()
def profiles() -> None:
    """Device profiles: what a bundle is built for and how the agent runs it."""


@profiles.command("list")
@output_option
def list_profiles(output: str) -> None:
    """List the shipped profiles (from EDGEGLM_PROFILES_DIR or edgeglm/device_profiles/)."""
    found = [load_profile(name).to_dict() for name in shipped_profiles()]
    emit(found, output, _summary_table)


@profiles.command("show")
@click.argument("profile", metavar="NAME_OR_PATH", type=ProfileParam())
@output_option
def show_profile(profile: DeviceProfile, output: str) -> None:
    """Show every field of one profile, defaults included."""
    emit(profile.to_dict(), output, _detail_table)


def _summary_table(found: list[dict[str, Any]]) -> str:
    if not found:
        return f"no profiles in {profiles_dir()}"
    rows = [[item[c] for c in _COLUMNS] + [item["description"]] for item in found]
    return render_table([*_COLUMNS, "description"], rows)


def _detail_table(data: dict[str, Any]) -> str:
    return render_table(["key", "value"], list(_flatten(data)))


def _flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in data.items():
        if isinstance(value, dict):
            rows.extend(_flatten(value, f"{prefix}{key}."))
        elif isinstance(value, list):
            rows.append((f"{prefix}{key}", ", ".join(str(v) for v in value)))
        else:
            rows.append((f"{prefix}{key}", "-" if value is None else value))
    return rows
