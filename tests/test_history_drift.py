"""Inspection history (SQLite, bounded, never failing an inspection) and the drift statistics."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import ks_2samp

from engine.drift import DriftRule, assess, ks_two_sample
from engine.history import InspectionHistory, InspectionRecord


def _record(i: int, roi: str = "a", decision: str = "ok", t0: float = 1_700_000_000.0) -> InspectionRecord:
    return InspectionRecord(time=t0 + i, recipe_id="", role_id="cam1", roi_id=roi, model_version=1,
                            score=float(i), threshold=10.0, decision=decision,  # type: ignore[arg-type]
                            n_regions=int(decision == "ng"), area_mm2=0.0, max_area_mm2=0.0,
                            request_id=f"r{i}", operator_id=None)


def test_history_keeps_the_newest_records_of_each_roi(tmp_path: Path) -> None:
    history = InspectionHistory(tmp_path / "h.sqlite", max_per_roi=50, flush_interval_s=0.05)
    try:
        for i in range(120):
            history.record(_record(i, roi="a"))
        for i in range(10):
            history.record(_record(i, roi="b", decision="ng"))
        history.flush()
        newest = history.query("cam1", "a", limit=1000)
        assert [r.request_id for r in newest] == [f"r{i}" for i in range(119, 69, -1)]
        assert len(history.query("cam1", "b", limit=1000)) == 10
        assert history.dropped == 0
    finally:
        history.close()


def test_history_queries_by_time_range_and_decision(tmp_path: Path) -> None:
    history = InspectionHistory(tmp_path / "h.sqlite", flush_interval_s=0.05)
    try:
        for i in range(30):
            history.record(_record(i, decision="ng" if i % 3 == 0 else "ok"))
        history.flush()
        t0 = 1_700_000_000.0
        window = history.query("cam1", "a", since=t0 + 10, until=t0 + 19, limit=100)
        assert [r.score for r in window] == [float(i) for i in range(19, 9, -1)]
        ng = history.query("cam1", "a", decision="ng", limit=100)
        assert len(ng) == 10 and all(r.decision == "ng" for r in ng)
        assert history.query("cam1", "other", limit=100) == []
    finally:
        history.close()


def test_records_survive_a_reopen_and_the_file_is_wal(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite"
    history = InspectionHistory(path, flush_interval_s=0.05)
    history.record(_record(1))
    history.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    again = InspectionHistory(path, flush_interval_s=0.05)
    try:
        assert [r.request_id for r in again.query("cam1", "a")] == ["r1"]
    finally:
        again.close()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only files")
def test_an_unwritable_database_drops_and_counts_instead_of_failing(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite"
    history = InspectionHistory(path, flush_interval_s=0.05)
    os.chmod(path, 0o444)
    try:
        start = time.perf_counter()
        history.record(_record(1))
        assert time.perf_counter() - start < 0.05
        history.flush()
        assert history.dropped == 1
    finally:
        os.chmod(path, 0o644)
        history.close()


def test_a_locked_database_drops_and_counts_instead_of_failing(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite"
    history = InspectionHistory(path, flush_interval_s=0.05)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")            # another process holds the write lock
    try:
        start = time.perf_counter()
        history.record(_record(1))
        assert time.perf_counter() - start < 0.05  # recording itself never waits
        history.flush(timeout=10)
        assert history.dropped == 1
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    history.record(_record(2))                    # the writer recovers once the lock is gone
    history.flush()
    try:
        assert [r.request_id for r in history.query("cam1", "a")] == ["r2"]
    finally:
        history.close()


def test_a_history_left_open_commits_its_queue_when_the_interpreter_exits(tmp_path: Path) -> None:
    """A process that exits without closing its history (its writer asleep for a minute) still
    commits what it queued, and exits cleanly."""
    path = tmp_path / "h.sqlite"
    script = (
        "import sys, numpy as np\n"
        "from engine.history import InspectionHistory, InspectionRecord\n"
        f"history = InspectionHistory({str(path)!r}, flush_interval_s=60.0)\n"
        "thumb = np.zeros((64, 64, 3), np.uint8)\n"
        "for i in range(40):\n"
        "    history.record(InspectionRecord(time=1.7e9 + i, recipe_id='', role_id='cam1', roi_id='a',\n"
        "        model_version=1, score=float(i), threshold=10.0, decision='ok', n_regions=0, area_mm2=0.0,\n"
        "        max_area_mm2=0.0, request_id=f'r{i}', operator_id=None, thumbnail=thumb, heatmap=thumb[..., 0]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    history = InspectionHistory(path)
    try:
        assert len(history.query("cam1", "a", limit=100)) == 40
    finally:
        history.close()


def test_ks_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    for shift in (0.0, 0.3, 1.0):
        a, b = rng.normal(size=64), rng.normal(shift, 1.0, size=200)
        d, p = ks_two_sample(a, b)
        ref = ks_2samp(a, b, method="asymp")
        assert d == pytest.approx(ref.statistic, abs=1e-12)
        assert p == pytest.approx(ref.pvalue, abs=0.02)


def test_drift_report_medians_and_bad_samples() -> None:
    rng = np.random.default_rng(2)
    for n_reference, n_window in ((63, 200), (64, 199), (1, 5)):
        reference, window = rng.normal(size=n_reference), deque(rng.normal(size=n_window).tolist())
        report = assess(tuple(reference), window, rule=DriftRule(min_window=3))
        assert report.median_reference == float(np.median(reference))
        assert report.median_window == float(np.median(list(window)))
        assert (report.n_reference, report.n_window) == (n_reference, n_window)
    assert assess([1.0], []).median_window is None
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(ValueError):
            ks_two_sample([1.0, bad, 2.0], [1.0])
        with pytest.raises(ValueError):
            assess([1.0, 2.0], [0.5, bad] * 20)


def test_drift_states() -> None:
    rng = np.random.default_rng(1)
    reference = rng.normal(1.0, 0.1, size=64)
    same = rng.normal(1.0, 0.1, size=200)
    shifted = rng.normal(1.25, 0.1, size=200)
    assert assess(reference, same).state == "ok"
    assert assess(reference, shifted).state == "alarm"
    assert assess(reference, shifted[:10]).state == "ok"            # too few scores to judge
    ng_burst = assess(reference, same, ng_window=20, ng_rate_history=0.01)
    assert ng_burst.state == "alarm" and ng_burst.reason == "NG rate rose"
    slight = rng.normal(1.04, 0.1, size=200)
    assert assess(reference, slight, rule=DriftRule(watch_p=0.5, alarm_p=1e-9)).state == "watch"
