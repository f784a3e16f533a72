"""``serve``: build the engine, start both doors on it, run until SIGINT/SIGTERM, stop cleanly."""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from engine.api import Engine
from engine.logs import configure_logging
from engine.settings import Settings
from http_compat.server import HttpServer
from http_compat.settings import HttpSettings
from ipc.server import IpcServer
from ipc.settings import IpcSettings
from service.settings import ServiceSettings

__all__ = ["ServeConfig", "serve"]

log = structlog.get_logger("service")


class _Door(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...


@dataclass(frozen=True)
class ServeConfig:
    """The four settings objects of the process, each read from the environment and YAML file."""

    engine: Settings = field(default_factory=Settings)
    ipc: IpcSettings = field(default_factory=IpcSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    service: ServiceSettings = field(default_factory=ServiceSettings)

    @classmethod
    def of(cls, **values: Any) -> ServeConfig:
        """The four settings objects from one flat set of field names, as a YAML file holds them
        (a name several objects share, such as ``api_key``, goes to each of them).

        Raises:
            ValueError: a name no settings object knows.
        """
        classes = {"engine": Settings, "ipc": IpcSettings, "http": HttpSettings, "service": ServiceSettings}
        unknown = set(values) - {name for c in classes.values() for name in c.model_fields}
        if unknown:
            raise ValueError(f"unknown settings: {', '.join(sorted(unknown))}")
        return cls(**{part: c(**{k: v for k, v in values.items() if k in c.model_fields})
                      for part, c in classes.items()})


def _install_signal_handlers(stop: threading.Event) -> None:
    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    if hasattr(signal, "SIGBREAK"):  # Ctrl+Break in a Windows console
        signal.signal(signal.SIGBREAK, on_signal)


def _start_doors(engine: Engine, config: ServeConfig) -> tuple[list[_Door], dict[str, str]]:
    """Start the enabled doors; on a failure stop those already started and re-raise."""
    doors: list[_Door] = []
    endpoints: dict[str, str] = {}
    try:
        if config.ipc.zmq_enabled:
            ipc = IpcServer(engine, config.ipc)
            ipc.start()
            doors.append(ipc)
            endpoints["zmq"] = ipc.endpoint
        if config.http.http_enabled:
            http = HttpServer(engine, config.http)
            http.start()
            doors.append(http)
            endpoints["http"] = http.url
    except Exception:
        for door in reversed(doors):
            door.stop()
        raise
    return doors, endpoints


def serve(config: ServeConfig | None = None) -> int:
    """Run the engine with its doors until a signal; prints one ``ready:`` line once serving."""
    config = config or ServeConfig()
    configure_logging(config.service.log_level, config.service.log_json)
    stop = threading.Event()
    # installed before the doors start: a SIGTERM while the second door is starting must
    # still shut down cleanly, not kill the process
    _install_signal_handlers(stop)
    engine = Engine(config.engine)
    doors, endpoints = _start_doors(engine, config)
    ready = {"backbone": engine.backbone_info.name, "device": engine.device, **endpoints}
    log.info("serving", **ready)
    print("ready: " + " ".join(f"{k}={v}" for k, v in ready.items()), flush=True)
    while not stop.wait(0.5):
        pass
    log.info("shutting_down")
    for door in reversed(doors):
        door.stop()
    engine.close()
    log.info("stopped")
    return 0
