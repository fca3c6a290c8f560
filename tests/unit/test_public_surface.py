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
