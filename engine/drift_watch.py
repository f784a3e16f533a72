"""The drift state of every ROI, kept up to date as inspections arrive (the statistics are in
``engine.drift``).

Per ROI and model version: the window of the last ``window`` scores, the NG decisions among
them, and the counts of the inspections before the window (the NG rate "history"). A new model
version starts a new window. ``observe`` returns the change when the state moved, so its caller
can log and publish it.

Two references, in turn:

* ``fit``: until the first full window, the recent scores are compared with the fit's hold-out OK
  scores, an alarm only when they run *higher*. Hold-out scores come from a memory without the
  scored image's fold (and its coreset rows), so they overestimate how unseen OK parts score:
  measured on bottle (20-image fit, Lite0 at 112 px) hold-out median 18.8, new OK parts 14.0. A
  two-sided test against them would flag every healthy line.
* ``baseline``: the first full window that was not in alarm becomes the model's production
  baseline; later windows are compared with it both ways (brightness, blur, a new supplier move
  the scores up or down).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.drift import DriftReport, DriftRule, DriftState, assess

__all__ = ["DriftChange", "DriftWatch", "RoiKey", "RoiWatch"]

RoiKey = tuple[str, str, str]      # recipe ("" for the default), role, ROI


@dataclass
class RoiWatch:
    """What one ROI's drift state is computed from (guarded by the watch's lock)."""

    model_version: int
    reference: tuple[float, ...]
    scores: deque[float]
    ng: deque[bool]
    baseline: tuple[float, ...] | None = None
    before_n: int = 0                  # inspections that left the window
    before_ng: int = 0
    state: DriftState = "ok"
    changed_at: float | None = None
    report: DriftReport | None = field(default=None)


@dataclass(frozen=True)
class DriftChange:
    key: RoiKey
    model_version: int
    previous: DriftState
    report: DriftReport
    time: float


class DriftWatch:
    """Thread-safe per-ROI drift state over a sliding window of ``window`` scores."""

    def __init__(self, window: int, rule: DriftRule | None = None) -> None:
        self.window = window
        self.rule = rule or DriftRule()
        self._rois: dict[RoiKey, RoiWatch] = {}
        self._lock = threading.Lock()

    def known(self, key: RoiKey, model_version: int) -> bool:
        with self._lock:
            watch = self._rois.get(key)
            return watch is not None and watch.model_version == model_version

    def seed(self, key: RoiKey, model_version: int, reference: Sequence[float],
             past: Sequence[tuple[float, str | None]]) -> None:
        """Start the ROI's window from ``past`` (score, decision) pairs, oldest first, without
        reporting a change (a restarted process picks up the state it had)."""
        watch = self._fresh(model_version, reference)
        for score, decision in past:
            self._push(watch, score, decision == "ng")
        watch.report = self._assess(watch)
        watch.state = watch.report.state if watch.report else "ok"
        with self._lock:
            current = self._rois.get(key)
            if current is None or current.model_version != model_version:   # not raced by an observe
                self._rois[key] = watch

    def observe(self, key: RoiKey, model_version: int, reference: Sequence[float], score: float,
                decision: str | None) -> DriftChange | None:
        """Add one inspection; the change when the ROI's state moved."""
        with self._lock:
            watch = self._rois.get(key)
            if watch is None or watch.model_version != model_version:
                watch = self._rois[key] = self._fresh(model_version, reference)
            self._push(watch, score, decision == "ng")
            report = self._assess(watch)
            watch.report = report
            if report is None or report.state == watch.state:
                return None
            previous, watch.state, watch.changed_at = watch.state, report.state, time.time()
            return DriftChange(key, model_version, previous, report, watch.changed_at)

    def current(self, key: RoiKey) -> RoiWatch | None:
        """A copy of the ROI's watch (None before its first inspection in this process)."""
        with self._lock:
            watch = self._rois.get(key)
            if watch is None:
                return None
            return RoiWatch(watch.model_version, watch.reference, deque(watch.scores), deque(watch.ng),
                            watch.baseline, watch.before_n, watch.before_ng, watch.state, watch.changed_at,
                            watch.report)

    def _fresh(self, model_version: int, reference: Sequence[float]) -> RoiWatch:
        return RoiWatch(model_version, tuple(float(v) for v in reference), deque(maxlen=self.window),
                        deque(maxlen=self.window))

    def _push(self, watch: RoiWatch, score: float, ng: bool) -> None:
        if len(watch.scores) == self.window:
            watch.before_n += 1
            watch.before_ng += int(watch.ng[0])
        watch.scores.append(float(score))
        watch.ng.append(ng)

    def _assess(self, watch: RoiWatch) -> DriftReport | None:
        """None when the model has no reference (fitted on one image: no hold-out OK scores)."""
        if not watch.reference:
            return None
        history = watch.before_ng / watch.before_n if watch.before_n else None
        if watch.baseline is not None:
            return assess(watch.baseline, watch.scores, ng_window=sum(watch.ng), ng_rate_history=history,
                          rule=self.rule)
        report = assess(watch.reference, watch.scores, ng_window=sum(watch.ng), ng_rate_history=history,
                        rule=self.rule, higher_only=True)
        if len(watch.scores) == self.window and report.state != "alarm":
            watch.baseline = tuple(watch.scores)
        return report
