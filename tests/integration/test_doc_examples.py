"""Every shell example in README.md and docs/*.md runs, as written, or says why it cannot.

A fenced ``sh`` block is run by bash (``-e -o pipefail``) in a small world made for the docs:

    ./keys/release.pub   the key the tiny bundles are signed with
    BUNDLE, OLD, NEW     tiny signed bundles (two different exports for OLD and NEW)
    an agent             ``edgectl agent serve BUNDLE --device-id ID`` on the shared mosquitto,
                         for a block that asks ``edgeglm/v1/dev/ID/infer``

A block whose commands leave a background job (``mosquitto_sub ... &``) passes when the job has
printed a reply with ``"done": true``; its process group is then stopped by its id. A block that
cannot run here carries, on the line before its fence, ``<!-- doc-test: skip: REASON -->`` (a
real 1.5B checkpoint, a remote host, systemctl, ``make test`` itself) or
``<!-- doc-test: run-by: TEST_FILE ... -->`` naming the test that runs it; both are checked here.
Usage synopses with ``[optional]`` parts are ``text`` blocks, not ``sh``.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgectl.demo.procs import Proc, tool, wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)
_MARK = re.compile(r"<!-- doc-test: (skip|run-by): (.+?) -->")
_INFER = re.compile(r"edgeglm/v1/dev/([\w.-]+)/infer")


@dataclass(frozen=True)
class Block:
    doc: str
    line: int
    body: str
    mark: tuple[str, str] | None  # (skip | run-by, reason or test file)

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


def blocks() -> list[Block]:
    out = []
    for path in DOCS:
        text = path.read_text()
        for m in _FENCE.finditer(text):
            if m[1] not in ("sh", "bash", "shell", "console"):
                continue
            line = text.count("\n", 0, m.start()) + 1
            before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
            mark = _MARK.fullmatch(before.strip())
            doc = str(path.relative_to(ROOT))
            out.append(Block(doc, line, m[2], (mark[1], mark[2]) if mark else None))
    return out


BLOCKS = blocks()
RUNNABLE = [b for b in BLOCKS if b.mark is None]


def test_every_shell_block_runs_or_says_why_not() -> None:
    assert len(BLOCKS) >= 15 and RUNNABLE, "the docs' shell blocks were not found"
    for block in BLOCKS:
        if block.mark is None:
            continue
        kind, why = block.mark
        if kind == "skip":
            assert len(why) >= 20, f"{block.id}: say why it cannot run here"
        else:
            assert (ROOT / why.split()[0]).is_file(), f"{block.id}: {why.split()[0]} does not exist"
    # A synopsis is not a script: brackets of optional parts never stand in an sh block.
    assert not [b.id for b in RUNNABLE if re.search(r" \[--", b.body)]


@pytest.fixture(scope="module")
def world(tiny_bundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    new, _, public = tiny_bundle("fused-int8")
    old, _, _ = tiny_bundle("fused-int4")
    root = tmp_path_factory.mktemp("doc-world")
    (root / "keys").mkdir()
    (root / "keys" / "release.pub").write_bytes(public.read_bytes())
    for name, folder in (("BUNDLE", new), ("OLD", old), ("NEW", new)):
        (root / name).symlink_to(folder)
    return root


def _serve(world: Path, device: str, log: Path) -> Proc:
    cmd = [tool("edgectl"), "-v", "agent", "serve", str(world / "BUNDLE"), "--device-id", device]
    cmd += ["--trust", str(world / "keys" / "release.pub")]
    proc = Proc(f"agent {device}", cmd, log).start()
    wait_for(lambda: "taking inference requests" in proc.log(), 180, f"the agent {device} to subscribe")
    return proc


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_the_shell_example_runs_as_written(block: Block, world: Path, tmp_path: Path) -> None:
    served = [_serve(world, device, tmp_path / f"{device}.log") for device in _INFER.findall(block.body)]
    out = tmp_path / "out.txt"
    env = {**os.environ, "PATH": f"{Path(tool('edgectl')).parent}:{os.environ['PATH']}"}
    env.pop("EDGEGLM_HUB_URL", None)
    env.pop("EDGEGLM_TOKEN", None)
    script = f"set -e -o pipefail\n{block.body}"
    with out.open("wb") as sink:
        bash = subprocess.Popen(
            ["bash", "-c", script], cwd=world, env=env, stdout=sink, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        code = bash.wait(timeout=300)
        assert code == 0, f"{block.id} exited {code}:\n{out.read_text()[-3000:]}"
        if re.search(r"&\s*$", block.body, re.M):  # a background listener: wait for its answer
            deadline = time.monotonic() + 120
            while '"done": true' not in out.read_text() and '"done":true' not in out.read_text():
                assert time.monotonic() < deadline, f"{block.id}: no answer:\n{out.read_text()[-3000:]}"
                time.sleep(0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the block's own process group, by its id
            os.killpg(bash.pid, signal.SIGTERM)
        for proc in served:
            assert proc.stop(grace=20) == 0, proc.log()[-2000:]
    assert "Traceback" not in out.read_text(), out.read_text()[-3000:]
