"""The kernel's public names are deliberate: every module declares a sorted __all__ that exists."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import edgeglm

# Every kernel module and package, and the modules of its packages (edgeglm.protocol and its parts).
MODULES = sorted(m.name for m in pkgutil.walk_packages(edgeglm.__path__, "edgeglm."))


def _isort_key(name: str) -> tuple[int, str]:
    """ruff RUF022 order: CONSTANTS, then Classes, then functions."""
    return (0 if name.isupper() else 1 if name[:1].isupper() else 2, name)


def test_every_kernel_module_declares_a_sorted_all():
    assert "edgeglm.protocol" in MODULES and "edgeglm.bundle" in MODULES
    for name in MODULES:
        module = importlib.import_module(name)
        exported = getattr(module, "__all__", None)
        assert exported is not None, f"{name} has no __all__"
        assert list(exported) == sorted(exported, key=_isort_key), f"{name}.__all__ is not sorted"
        missing = [n for n in exported if not hasattr(module, n)]
        assert not missing, f"{name}.__all__ names missing attributes {missing}"


def test_protocol_package_re_exports_the_names_of_its_parts():
    """edgeglm.protocol is one module per part; the package's __all__ is exactly theirs, re-exported."""
    parts = [n for n in MODULES if n.startswith("edgeglm.protocol.")]
    assert set(parts) >= {
        "edgeglm.protocol.topics",
        "edgeglm.protocol.message",
        "edgeglm.protocol.control",
        "edgeglm.protocol.inference",
        "edgeglm.protocol.error_body",
        "edgeglm.protocol.frames",
    }
    package = importlib.import_module("edgeglm.protocol")
    owners: dict[str, str] = {}
    for name in parts:
        module = importlib.import_module(name)
        for exported in module.__all__:
            assert exported not in owners, f"{exported} is in {owners[exported]} and {name}"
            owners[exported] = name
            assert getattr(package, exported) is getattr(module, exported), f"{exported} is not re-exported"
    assert sorted(package.__all__) == sorted(owners)


def test_kernel_imports_nothing_heavy_and_no_wing():
    """An edge box imports the kernel and the CLI without torch, transformers, onnx or a wing."""
    code = (
        "import importlib, sys\n"
        f"for m in {[*MODULES, 'edgectl']!r}: importlib.import_module(m)\n"
        "bad = {'torch', 'transformers', 'onnx', 'onnxruntime', 'export', 'edge_agent', 'cloud_hub'}\n"
        "print(sorted(bad & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
