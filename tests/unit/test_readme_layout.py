"""README's Layout section is true to the tree: every module of the five packages is named in its
package's part of the section, and every module the section names exists there."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("edgectl", "edgeglm", "export", "edge_agent", "cloud_hub")


def _layout() -> dict[str, str]:
    """The Layout code block, split into its top-level entries (``name/`` at column 0)."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    parts: dict[str, str] = {}
    current = ""
    for line in block.splitlines():
        top = re.match(r"^([A-Za-z_][\w.-]*)/", line)
        if top:
            current = top.group(1)
        parts[current] = parts.get(current, "") + line + "\n"
    return parts


def _modules(package: str) -> set[str]:
    root = ROOT / package
    return {
        p.stem
        for p in root.rglob("*.py")
        if p.name != "__init__.py" and "migrations" not in p.relative_to(root).parts
    }


def test_every_module_is_in_the_layout_and_every_named_module_exists() -> None:
    parts = _layout()
    for package in PACKAGES:
        assert package in parts, f"README's Layout has no entry for {package}/"
        text = parts[package]
        named = set(re.findall(r"\b(\w+)\.py\b", text))
        missing = sorted(m for m in _modules(package) if not re.search(rf"\b{m}(\.py|/)", text))
        assert not missing, f"README's Layout does not name {package}'s modules {missing}"
        absent = sorted(named - _modules(package))
        assert not absent, f"README's Layout names modules {package}/ does not have: {absent}"
