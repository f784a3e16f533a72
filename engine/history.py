"""The inspection history: the last inspections of every ROI in an embedded SQLite database.

Recording never delays or fails an inspection. ``record`` only appends to an in-memory queue; one
writer thread encodes the thumbnails (PNG) and commits the queue at most every ``flush_interval_s``
(so a killed process loses at most that much), keeps the newest ``max_per_roi`` rows of each
ROI, and on any database error (full disk, locked or damaged file) drops the batch and counts it.
The database runs in WAL mode, so queries read while the writer writes.
"""

from __future__ import annotations

import atexit
import queue
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import structlog

from engine.schemas import HistoryEntry

__all__ = ["InspectionHistory", "InspectionRecord"]

log = structlog.get_logger("engine.history")

_QUEUE_LIMIT = 10_000           # records waiting for the writer (thumbnails: ~16 KB each); more are dropped
_SCHEMA = """
CREATE TABLE IF NOT EXISTS inspections (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL, recipe_id TEXT NOT NULL, role_id TEXT NOT NULL, roi_id TEXT NOT NULL,
    model_version INTEGER NOT NULL, score REAL NOT NULL, threshold REAL, decision TEXT,
    n_regions INTEGER NOT NULL, area_mm2 REAL NOT NULL, max_area_mm2 REAL NOT NULL,
    request_id TEXT, operator_id TEXT,
    boxes TEXT NOT NULL DEFAULT '', image_h INTEGER NOT NULL DEFAULT 0, image_w INTEGER NOT NULL DEFAULT 0,
    thumbnail BLOB, heatmap BLOB
);
CREATE INDEX IF NOT EXISTS inspections_roi_time ON inspections (recipe_id, role_id, roi_id, time);
"""


@dataclass(frozen=True)
class InspectionRecord:
    """One inspection as the history keeps it (``recipe_id`` "" for the default recipe)."""

    time: float                              # seconds since the epoch (UTC)
    recipe_id: str
    role_id: str
    roi_id: str
    model_version: int
    score: float
    threshold: float | None
    decision: Literal["ok", "ng"] | None
    n_regions: int
    area_mm2: float                          # total area of the regions that decided
    max_area_mm2: float                      # the largest of them
    request_id: str | None
    operator_id: str | None
    boxes: str = ""                          # the regions' boxes: "x,y,w,h;x,y,w,h" in ROI pixels
    image_h: int = 0
    image_w: int = 0
    thumbnail: bytes | np.ndarray | None = None   # small image: JPEG bytes (uint8 array until written)
    heatmap: bytes | np.ndarray | None = None     # small heatmap, grey 128 = threshold (likewise)
    id: int | None = None                    # set on the records a query returns

    def entry(self) -> HistoryEntry:
        """The record as the ``history`` op returns it (thumbnails as PNG bytes when queried)."""
        return HistoryEntry(
            id=self.id or 0, time=self.time, model_version=self.model_version, score=self.score,
            threshold=self.threshold, decision=self.decision, n_regions=self.n_regions, area_mm2=self.area_mm2,
            max_area_mm2=self.max_area_mm2, boxes=_boxes(self.boxes), image_shape=(self.image_h, self.image_w),
            request_id=self.request_id, operator_id=self.operator_id,
            thumbnail_jpeg=self.thumbnail if isinstance(self.thumbnail, bytes) else None,
            heatmap_png=self.heatmap if isinstance(self.heatmap, bytes) else None)


_COLUMNS = tuple(f.name for f in fields(InspectionRecord) if f.name != "id")


def _boxes(text: str) -> tuple[tuple[int, int, int, int], ...]:
    """Boxes from their stored text, "x,y,w,h;x,y,w,h"."""
    return tuple(tuple(int(v) for v in part.split(",")) for part in text.split(";") if part)  # type: ignore[misc]
_BLOBS = ("thumbnail", "heatmap")


# the image thumbnail as JPEG (a 64-px PNG of a real part is ~12 KB, this ~2 KB); the heatmap as PNG
_ENCODINGS = {"thumbnail": (".jpg", [cv2.IMWRITE_JPEG_QUALITY, 85]), "heatmap": (".png", [])}


def _encoded(name: str, value: bytes | np.ndarray | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    ext, params = _ENCODINGS[name]
    ok, buf = cv2.imencode(ext, value, params)
    return buf.tobytes() if ok else None


def _row(item: InspectionRecord) -> tuple[object, ...]:
    """The record as inserted: thumbnails encoded here, in the writer thread, off the request path."""
    return tuple(_encoded(name, getattr(item, name)) if name in _BLOBS else getattr(item, name) for name in _COLUMNS)


class InspectionHistory:
    """Bounded per-ROI history in ``path`` (created when missing). One left open is closed at
    interpreter exit (``_close_open``)."""

    def __init__(self, path: Path, *, max_per_roi: int = 10_000, flush_interval_s: float = 1.0) -> None:
        if max_per_roi < 1 or flush_interval_s <= 0:
            raise ValueError("max_per_roi must be >= 1 and flush_interval_s > 0")
        self.path = Path(path)
        self.max_per_roi = max_per_roi
        self._interval = flush_interval_s
        self._queue: queue.Queue[InspectionRecord] = queue.Queue(_QUEUE_LIMIT)
        self._dropped = 0
        self._dropped_lock = threading.Lock()
        self._stop = threading.Event()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db:
            db.executescript(_SCHEMA)
        self._writer = threading.Thread(target=self._write_loop, name="history-writer", daemon=True)
        self._writer.start()
        _open.add(self)

    @property
    def dropped(self) -> int:
        """Records lost so far (queue full or a database error)."""
        return self._dropped

    def record(self, item: InspectionRecord) -> None:
        """Queue one record; never blocks, never raises."""
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self._count_dropped(1, "queue_full")

    def query(self, role_id: str, roi_id: str, recipe_id: str | None = None, *, since: float | None = None,
              until: float | None = None, decision: str | None = None, limit: int = 100,
              thumbnails: bool = False) -> list[InspectionRecord]:
        """Newest first: the ROI's records in [since, until], optionally of one decision (and with
        their thumbnails as PNG bytes when ``thumbnails``)."""
        columns = [name if thumbnails or name not in _BLOBS else "NULL" for name in (*_COLUMNS, "id")]
        sql = f"SELECT {', '.join(columns)} FROM inspections WHERE recipe_id = ? AND role_id = ? AND roi_id = ?"
        args: list[object] = [recipe_id or "", role_id, roi_id]
        for clause, value in (("time >= ?", since), ("time <= ?", until), ("decision = ?", decision)):
            if value is not None:
                sql += f" AND {clause}"
                args.append(value)
        sql += " ORDER BY time DESC, id DESC LIMIT ?"
        args.append(max(0, int(limit)))
        with self._reader() as db:
            return [InspectionRecord(*row) for row in db.execute(sql, args)]

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until every record queued before this call is committed (or dropped)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)

    def close(self) -> None:
        """Commit what is queued and stop the writer."""
        _open.discard(self)
        self._stop.set()
        self._writer.join(self._interval + 10.0)

    # --- the writer ------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=1.0, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")   # WAL + NORMAL: a crash loses at most the last commits
        return db

    @contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        with closing(sqlite3.connect(self.path, timeout=1.0)) as db:
            yield db

    def _write_loop(self) -> None:
        db: sqlite3.Connection | None = None
        while True:
            stopping = self._stop.wait(self._interval)
            batch = self._drain()
            if batch:
                db = self._commit(db, batch)
            if stopping:
                break
        if db is not None:
            db.close()

    def _drain(self) -> list[InspectionRecord]:
        batch = []
        while True:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                return batch

    def _commit(self, db: sqlite3.Connection | None, batch: Sequence[InspectionRecord]) -> sqlite3.Connection | None:
        try:
            db = db or self._connect()
            with db:   # one transaction
                db.execute("BEGIN")
                db.executemany(f"INSERT INTO inspections ({', '.join(_COLUMNS)}) VALUES "
                               f"({', '.join('?' * len(_COLUMNS))})", [_row(item) for item in batch])
                for key in {(r.recipe_id, r.role_id, r.roi_id) for r in batch}:
                    self._prune(db, key)
        except sqlite3.Error as exc:
            self._count_dropped(len(batch), type(exc).__name__, str(exc))
            if db is not None:
                db.close()
            db = None   # reconnect next time: the file may have been repaired or space freed
        finally:
            for _ in batch:
                self._queue.task_done()
        return db

    def _prune(self, db: sqlite3.Connection, key: tuple[str, str, str]) -> None:
        db.execute(
            "DELETE FROM inspections WHERE recipe_id = ? AND role_id = ? AND roi_id = ? AND id <= ("
            " SELECT id FROM inspections WHERE recipe_id = ? AND role_id = ? AND roi_id = ?"
            " ORDER BY id DESC LIMIT 1 OFFSET ?)", (*key, *key, self.max_per_roi))

    def _count_dropped(self, n: int, reason: str, detail: str = "") -> None:
        with self._dropped_lock:
            self._dropped += n
            total = self._dropped
        log.warning("history_records_dropped", count=n, reason=reason, detail=detail, dropped_total=total)


_open: weakref.WeakSet[InspectionHistory] = weakref.WeakSet()


@atexit.register
def _close_open() -> None:
    """Histories still open at interpreter exit commit what is queued and stop their writers while
    the interpreter is whole. Left to themselves, their daemon writers are stopped wherever they
    are: one stopped inside OpenCV's encoder (a C++ frame) aborts the process ("terminate called
    without an active exception"), and whatever waits for the next flush is lost."""
    for history in list(_open):
        history.close()
