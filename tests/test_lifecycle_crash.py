"""``kill -9`` of a process in the middle of ``add_ok``, ``activate`` and version cleanup, over and over.

Each round starts a child process on the same data root that builds the engine (start-up recovery
runs there too) and then repeats one op as fast as it can; the parent kills it with SIGKILL at a
random moment (for add_ok, every second round within 30 ms of its save starting), then opens the
data root with a fresh engine and checks what the kill left: no hidden leftover folder in the model
tree or its version history, the served version is listed, every kept version verifies (checksums),
the model loads and scores, and (``activate``) the score is exactly the one of the version served.
The child's folder fsyncs are slowed by 50 ms (a slow disk), so that kills land inside the writes too.
``LIFECYCLE_CRASH_ROUNDS`` rounds per op (default 10); prints where the kills landed. Marked slow.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from engine.api import Engine
from engine.settings import Settings
from tests.support import REPO, part_png

pytestmark = pytest.mark.slow

ROLE, MM = "crash", 0.1
ROUNDS = int(os.environ.get("LIFECYCLE_CRASH_ROUNDS", "10"))
KEPT = 3
PROBE = part_png(999)

CHILD = """
import sys
import time
from pathlib import Path
import engine.storage
import engine.versions
from engine.api import Engine
from engine.settings import Settings
from tests.support import part_png
durable = engine.storage.fsync_dir


def slow_fsync_dir(path):
    time.sleep(0.05)            # a slow disk: each durable step of a write lasts, so kills land inside writes
    durable(path)


engine.storage.fsync_dir = engine.versions.fsync_dir = slow_fsync_dir
root, op, roi, kept = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[5])
engine = Engine(Settings(data_root=root, backbone="efficientnet_lite0", input_size=64, model_versions_kept=kept))
Path(sys.argv[4]).write_text("ready")
saving = Path(sys.argv[4] + ".save")


def progress(stage, done, total):
    if stage == "save" and done == 0:
        saving.write_text("save")


i = 0
while True:
    i += 1
    if op == "add_ok":
        engine.lifecycle.add_ok("crash", roi, [part_png(100 + i)], progress=progress)
    elif op == "activate":
        engine.lifecycle.activate("crash", roi, 1 + i % 2)
    else:
        engine.calibrate_ng("crash", roi, 0.1, [float(1 + i % 7)])
"""


def _engine(root: Path) -> Engine:
    return Engine(Settings(data_root=root, backbone="efficientnet_lite0", input_size=64, model_versions_kept=KEPT))


def _run_and_kill(root: Path, op: str, roi: str, rnd: random.Random, tmp: Path, at_save: bool) -> None:
    """Kill the child at a random moment, or (``at_save``) within 30 ms of an add_ok's save starting."""
    ready = tmp / f"ready-{op}-{rnd.random()}"
    saving = Path(f"{ready}.save")
    with open(tmp / "child.log", "ab") as log:
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(root), op, roi, str(ready), str(KEPT)], cwd=REPO,
                                 stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert child.poll() is None, (tmp / "child.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the child never became ready"
            time.sleep(0.02)
        while at_save and not saving.exists() and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(rnd.uniform(0.0, 0.03) if at_save else rnd.uniform(0.0, 1.5))
        assert child.poll() is None, (tmp / "child.log").read_text()[-2000:]
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
        child.wait(30)


def _check(root: Path, roi: str, reference: dict[int, float] | None = None) -> int:
    """Open the data root as a restarted engine would and check it; returns the version served."""
    engine = _engine(root)
    try:
        hidden = [p.name for p in (root / "models" / ROLE).iterdir() if p.name.startswith(".")]
        history = root / "model_versions" / ROLE / roi
        hidden += [p.name for p in history.iterdir() if p.name.startswith(".")] if history.is_dir() else []
        assert hidden == [], f"recovery left {hidden}"
        listing = engine.lifecycle.versions(ROLE, roi)
        kept = [v.version for v in listing.versions]
        assert listing.active_version in kept and len(kept) <= KEPT + 1
        store = engine.models.store(None)
        for number in kept:
            store.read_version(ROLE, roi, number)            # every kept version verifies
        score = engine.infer(ROLE, roi, MM, PROBE, allow_uncalibrated=True, heatmap="none").score
        assert np.isfinite(score)
        if reference is not None:
            assert score == reference[listing.active_version]
        return int(listing.active_version)
    finally:
        engine.close()


def _landing(root: Path, roi: str) -> str:
    """Where the kill landed, read from the hidden folders it left (before any recovery)."""
    history = root / "model_versions" / ROLE / roi
    names = [p.name for p in (root / "models" / ROLE).iterdir()]
    names += [p.name for p in history.iterdir()] if history.is_dir() else []
    for mark, where in ((".old-", "between or after the swap's renames"), (".staging-", "writing a folder"),
                        (".trash-", "removing a folder")):
        if any(mark in name for name in names):
            return where
    return "outside a write"


def _crash_loop(tmp_path: Path, op: str, roi: str, reference: dict[int, float] | None = None) -> set[int]:
    rnd = random.Random(f"{op}-20261130")
    served, landings = set(), Counter()
    for round_ in range(ROUNDS):
        _run_and_kill(tmp_path / "data", op, roi, rnd, tmp_path, at_save=op == "add_ok" and round_ % 2 == 1)
        landings[_landing(tmp_path / "data", roi)] += 1
        served.add(_check(tmp_path / "data", roi, reference))
    print(f"{op}: kills landed " + ", ".join(f"{where} x{n}" for where, n in landings.most_common()))
    return served


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    engine = _engine(tmp_path / "data")
    try:
        for roi in ("add", "act", "clean"):
            engine.fit_ok(ROLE, roi, MM, [part_png(s) for s in range(3)])
        engine.lifecycle.add_ok(ROLE, "act", [part_png(50, defect=True)])
    finally:
        engine.close()
    return tmp_path / "data"


def test_kill_9_during_add_ok_leaves_a_loadable_model(root: Path, tmp_path: Path) -> None:
    served = _crash_loop(tmp_path, "add_ok", "add")
    assert max(served) > 1          # the kills did not all land before the first add_ok finished


def test_kill_9_during_activate_serves_one_version_with_its_exact_scores(root: Path, tmp_path: Path) -> None:
    engine = _engine(root)
    try:
        reference = {}
        for version in (1, 2):
            engine.lifecycle.activate(ROLE, "act", version)
            reference[version] = engine.infer(ROLE, "act", MM, PROBE, allow_uncalibrated=True, heatmap="none").score
    finally:
        engine.close()
    assert reference[1] != reference[2]
    assert _crash_loop(tmp_path, "activate", "act", reference) <= {1, 2}


def test_kill_9_during_version_cleanup_keeps_the_served_version(root: Path, tmp_path: Path) -> None:
    served = _crash_loop(tmp_path, "cleanup", "clean")
    assert max(served) > KEPT + 1   # versions were created and older ones removed while being killed
