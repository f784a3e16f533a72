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
    # what unpacking one message may build (checked while unpacking, before the API key is looked at)
    zmq_max_container_len: int = env_field(100_000, "BACKEND_ZMQ_MAX_CONTAINER_LEN", "zmq_max_container_len",
                                           ge=16, description="Items in one msgpack array or map.")
    zmq_max_items: int = env_field(250_000, "BACKEND_ZMQ_MAX_ITEMS", "zmq_max_items", ge=64,
                                   description="Arrays, maps and their items in one message.")
    zmq_max_depth: int = env_field(32, "BACKEND_ZMQ_MAX_DEPTH", "zmq_max_depth", ge=4, le=512,
                                   description="Nested arrays and maps in one message.")
    # back-pressure: replies a client does not read
    zmq_sndhwm: int = env_field(128, "BACKEND_ZMQ_SNDHWM", "zmq_sndhwm", ge=1,
                                description="ZMQ_SNDHWM of the ROUTER: replies libzmq queues per client.")
    zmq_peer_max_pending: int = env_field(32, "BACKEND_ZMQ_PEER_MAX_PENDING", "zmq_peer_max_pending", ge=1,
                                          description="Requests in progress plus large replies unread, per client "
                                                      "(at most half the request queue).")
    zmq_peer_max_unread_bytes: int = env_field(64 * 1024 * 1024, "BACKEND_ZMQ_PEER_MAX_UNREAD",
                                               "zmq_peer_max_unread_bytes", ge=1024,
                                               description="Bytes of replies sent and not yet read, per client.")
    zmq_max_inflight_bytes: int = env_field(512 * 1024 * 1024, "BACKEND_ZMQ_MAX_INFLIGHT", "zmq_max_inflight_bytes",
                                            ge=1024, description="Bytes of requests accepted and not answered yet.")
