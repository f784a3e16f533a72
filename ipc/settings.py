"""Settings of the ZeroMQ door, read like the engine's (environment, then the BACKEND_CONFIG YAML)."""

from __future__ import annotations

from pydantic import SecretStr

from engine.settings import EnvSettings, env_field

__all__ = ["IpcSettings"]


class IpcSettings(EnvSettings):
    zmq_enabled: bool = env_field(True, "BACKEND_ZMQ_ENABLED", "zmq_enabled")
    zmq_endpoint: str = env_field("tcp://127.0.0.1:5555", "BACKEND_ZMQ_ENDPOINT", "zmq_endpoint",
                                  description="tcp:// (loopback unless allow_remote) or ipc://")
    zmq_events: str | None = env_field(None, "BACKEND_ZMQ_EVENTS", "zmq_events",
                                       description="PUB endpoint for progress events; none when unset.")
    zmq_workers: int = env_field(4, "BACKEND_ZMQ_WORKERS", "zmq_workers", ge=1, le=64)
    zmq_max_message_bytes: int = env_field(128 * 1024 * 1024, "BACKEND_ZMQ_MAX_MESSAGE", "zmq_max_message_bytes",
                                           ge=1024)
    api_key: SecretStr | None = env_field(None, "BACKEND_API_KEY", "api_key",
                                          description="When set, every request must carry it.")
    allow_remote: bool = env_field(False, "BACKEND_ALLOW_REMOTE", "allow_remote",
                                   description="Must be true to bind to a non-loopback interface.")
    max_request_bytes: int = env_field(512 * 1024 * 1024, "BACKEND_MAX_REQUEST_BYTES", "max_request_bytes", ge=1)
