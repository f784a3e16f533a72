"""Structured logs (structlog) for the serving process; the library itself never configures logging."""

from __future__ import annotations

import logging
import sys
import threading
import time

import structlog

__all__ = ["LogThrottle", "configure_logging"]


class LogThrottle:
    """At most one log line per ``interval_s`` for an event that can repeat thousands of times a
    second (a full client queue, a refused connection): ``due()`` returns how many were skipped
    since the last line when one may be written now, else None."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self._interval = interval_s
        self._next = 0.0
        self._skipped = 0
        self._lock = threading.Lock()

    def due(self) -> int | None:
        now = time.monotonic()
        with self._lock:
            if now < self._next:
                self._skipped += 1
                return None
            skipped, self._skipped, self._next = self._skipped, 0, now + self._interval
            return skipped


def configure_logging(level: str = "INFO", json_lines: bool = True) -> None:
    """One JSON object per line on stderr (or readable console lines), for structlog and stdlib loggers.

    Fields bound with ``structlog.contextvars.bind_contextvars`` (the doors bind ``request_id``)
    appear in every line logged while serving that request.
    """
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    renderer = structlog.processors.JSONRenderer() if json_lines else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(foreign_pre_chain=shared, processors=[
        structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer]))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
