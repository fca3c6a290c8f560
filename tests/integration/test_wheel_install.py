"""The wheel, installed as an operator installs it: ``pip wheel`` builds it from a copy of the
checkout, then ``edgeglm[agent]`` and ``edgeglm[hub]`` each go into a fresh virtualenv that has
nothing of the project, and the console scripts run from there (docs/agent-install.md,
docs/hub-production.md).

- ``[agent]``: ``edgectl profiles list`` shows the shipped profiles (package data), ``edge-agent
  status`` with ``profile = "cpu-x86-int8"`` exits 0; torch, transformers and onnx are not
  pulled in.
- ``[hub]``: ``edgectl hub migrate`` then ``edgectl hub serve``; ``/healthz`` answers 200.
- Neither installs a top-level ``bench``.

The venvs are made without pip (``python -m venv --without-pip``) and filled by this
interpreter's pip (``pip --python``), which reuses its cache; the whole file takes a few tens of
seconds, most of it pip resolving and unpacking the dependencies.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
# What a checkout holds that is not part of the source: never copied into the build.
_NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
    ".hypothesis",
    "results",
)
# Never needed on an edge box (the import-linter contract "box" keeps the code off them).
_NOT_ON_A_BOX = ("torch", "transformers", "onnx", "optimum", "fastapi", "alembic")


def _run(
    *args: str | Path, timeout: float = 600, env: dict[str, str] | None = None, cwd: Path | None = None
) -> str:
    out = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd, check=False
    )
    assert out.returncode == 0, f"{args} exited {out.returncode}:\n{out.stdout}\n{out.stderr}"
    return out.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built from a copy of the checkout so the build leaves nothing in it."""
    base = tmp_path_factory.mktemp("wheel")
    source = base / "src"
    shutil.copytree(ROOT, source, ignore=_NOT_SOURCE)
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", base / "dist", source)
    (built,) = (base / "dist").glob("edgeglm-*.whl")
    return built


def _venv(where: Path, wheel: Path, extra: str) -> Path:
    """A fresh venv holding ``edgeglm[extra]`` from ``wheel`` (and what pip resolves for it)."""
    _run(sys.executable, "-m", "venv", "--without-pip", where)
    python = where / "bin" / "python"
    _run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        python,
        "install",
        "-q",
        f"edgeglm[{extra}] @ {wheel.as_uri()}",
    )
    return python


def _site_packages(python: Path) -> Path:
    return Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())


def _clean_env() -> dict[str, str]:
    """This environment without the project's overrides, so the venv finds only what it installed."""
    drop = ("PYTHONPATH", "EDGEGLM_PROFILES_DIR", "EDGE_AGENT_", "EDGEGLM_HUB_", "VIRTUAL_ENV")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def test_agent_extra_lists_and_loads_the_shipped_profiles(wheel: Path, tmp_path: Path) -> None:
    python = _venv(tmp_path / "venv", wheel, "agent")
    bin_dir = python.parent
    site = _site_packages(python)
    env = _clean_env()
    assert not (site / "bench").exists(), "the wheel installs bench/ as a top-level package"
    # run from an empty folder, so that the checkout's own packages cannot be found through the cwd
    away = tmp_path / "elsewhere"
    away.mkdir()
    probe = "import importlib.util as u, sys; print([m for m in sys.argv[1:] if u.find_spec(m)])"
    pulled = _run(python, "-c", probe, *_NOT_ON_A_BOX, "bench", env=env, cwd=away)
    assert pulled.strip() == "[]", f"the [agent] venv has {pulled.strip()}"
    where = _run(python, "-c", "import edgeglm; print(edgeglm.__file__)", env=env, cwd=away)
    assert Path(where.strip()).is_relative_to(site), where  # the wheel's copy, not the checkout
    # profiles come from the installed package, not from a checkout
    (shipped,) = list(site.glob("edgeglm/device_profiles/cpu-x86-int8.toml"))
    listed = json.loads(_run(bin_dir / "edgectl", "profiles", "list", "-o", "json", env=env))
    names = [p["name"] for p in listed]
    assert "cpu-x86-int8" in names and len(names) == len(list(shipped.parent.glob("*.toml"))), names
    table = _run(bin_dir / "edgectl", "profiles", "list", env=env)
    assert "cpu-x86-int8" in table and "no profiles" not in table

    box = tmp_path / "box"
    box.mkdir()
    _run(bin_dir / "edgectl", "keys", "create", "release", "--dir", box, "-o", "json", env=env)
    config = box / "agent.toml"
    config.write_text(
        f'device_id = "box-17"\nprofile = "cpu-x86-int8"\ndata_dir = "{box / "data"}"\n'
        f'trusted_keys = ["{box / "release.pub"}"]\n'
    )
    status = json.loads(_run(bin_dir / "edge-agent", "status", "--config", config, "-o", "json", env=env))
    assert status == {
        "device_id": "box-17",
        "active_slot": None,
        "slot_a": None,
        "slot_b": None,
        "last_update": None,
    }
    assert not (box / "data").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_hub_extra_migrates_and_serves_healthz(wheel: Path, tmp_path: Path) -> None:
    python = _venv(tmp_path / "venv", wheel, "hub")
    bin_dir = python.parent
    assert not (_site_packages(python) / "bench").exists(), "the wheel installs bench/ as a top-level package"
    env = _clean_env()
    db = f"sqlite:///{tmp_path / 'hub.db'}"
    data = tmp_path / "hub-data"
    migrated = json.loads(
        _run(bin_dir / "edgectl", "hub", "migrate", "--db", db, "--data", data, "-o", "json", env=env)
    )
    assert migrated["changed"] is True and migrated["before"] is None and migrated["after"]

    port = _free_port()
    hub = subprocess.Popen(
        [bin_dir / "edgectl", "hub", "serve", "--db", db, "--data", data, "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert hub.poll() is None, f"hub exited {hub.returncode}: {hub.communicate()}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as answer:
                    assert answer.status == 200
                    break
            except urllib.error.HTTPError as exc:
                pytest.fail(f"/healthz answered {exc.code}: {exc.read()!r}")
            except OSError:  # not listening yet
                assert time.monotonic() < deadline, "the hub did not answer /healthz within 60 s"
                time.sleep(0.2)
    finally:
        hub.send_signal(signal.SIGTERM)
        try:
            _, err = hub.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            hub.kill()
            _, err = hub.communicate()
            pytest.fail(f"the hub did not stop within 30 s of SIGTERM: {err}")
    # uvicorn shuts down, then re-raises the SIGTERM it caught: systemd counts that as a clean stop
    assert hub.returncode in (0, -signal.SIGTERM), err
