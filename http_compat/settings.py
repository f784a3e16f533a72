"""Settings of the REST door, read like the engine's (environment, then the BACKEND_CONFIG YAML).

List settings are a JSON list in the environment (``BACKEND_HTTP_ALLOWED_HOSTS='["plant-pc"]'``)
or a YAML list in the file.
"""

from __future__ import annotations

from typing import Literal

from pydantic import SecretStr

from engine.settings import EnvSettings, env_field

__all__ = ["HttpSettings"]


class HttpSettings(EnvSettings):
    http_enabled: bool = env_field(True, "BACKEND_HTTP_ENABLED", "http_enabled")
    http_host: str = env_field("127.0.0.1", "BACKEND_HTTP_HOST", "http_host")
    http_port: int = env_field(8000, "BACKEND_HTTP_PORT", "http_port", ge=0, le=65535,
                               description="0 = any free port (the bound one is in the ready line).")
    api_key: SecretStr | None = env_field(None, "BACKEND_API_KEY", "api_key",
                                          description="When set, every request must carry X-API-Key.")
    allow_remote: bool = env_field(False, "BACKEND_ALLOW_REMOTE", "allow_remote",
                                   description="Must be true to bind to a non-loopback interface.")
    max_request_bytes: int = env_field(512 * 1024 * 1024, "BACKEND_MAX_REQUEST_BYTES", "max_request_bytes", ge=1)
    http_error_dialect: Literal["auto", "seed", "gui"] = env_field(
        "auto", "BACKEND_HTTP_ERROR_DIALECT", "http_error_dialect",
        description="Status of model_not_found and calibration_missing: seed = 404 / 428 (the brief), "
                    "gui = 400 (what the existing GUI recognises), auto = gui for requests that carry "
                    "model_key (only that GUI sends it), seed otherwise. docs/curl_examples.md.",
    )

    # cross-site protection (http_compat.origin)
    http_allowed_hosts: list[str] = env_field(
        [], "BACKEND_HTTP_ALLOWED_HOSTS", "http_allowed_hosts",
        description="Host names the door answers to besides loopback names and its bind address "
                    "(e.g. the PC's name when allow_remote); '*' = any.")
    http_allowed_origins: list[str] = env_field(
        [], "BACKEND_HTTP_ALLOWED_ORIGINS", "http_allowed_origins",
        description="Web origins (scheme://host:port) allowed to send POST/PUT/PATCH/DELETE; "
                    "the door's own origin always is.")

    # connections and timeouts (http_compat.connections, http_compat.middleware)
    http_max_connections: int = env_field(
        256, "BACKEND_HTTP_MAX_CONNECTIONS", "http_max_connections", ge=4,
        description="Open connections; at the cap the longest-idle one is closed for a new one "
                    "(503 when all are busy). Lowered to fit the process's file descriptor limit.")
    http_header_timeout_s: float = env_field(
        10.0, "BACKEND_HTTP_HEADER_TIMEOUT_S", "http_header_timeout_s", gt=0,
        description="A new connection, or a request begun on a kept-alive one, must send its headers "
                    "within this time (else 408 and close); on Linux the kernel first holds a "
                    "connection that has sent nothing for about as long.")
    http_keepalive_timeout_s: float = env_field(
        130.0, "BACKEND_HTTP_KEEPALIVE_TIMEOUT_S", "http_keepalive_timeout_s", gt=0,
        description="Idle time of a kept-alive connection between requests; longer than .NET's "
                    "connection pool idle timeout (60-100 s), so the GUI never reuses a closed one.")
    http_body_gap_s: float = env_field(
        60.0, "BACKEND_HTTP_BODY_GAP_S", "http_body_gap_s", gt=0,
        description="Longest wait for the next chunk of a request body (408 after).")
    http_body_timeout_s: float = env_field(
        300.0, "BACKEND_HTTP_BODY_TIMEOUT_S", "http_body_timeout_s", gt=0,
        description="Longest time to receive a whole request body, however it trickles (408 after).")
    http_max_json_bytes: int = env_field(
        4 * 1024 * 1024, "BACKEND_HTTP_MAX_JSON_BYTES", "http_max_json_bytes", ge=1024,
        description="A JSON request body (calibrate_ng, calibrate_dataset, infer_dataset).")
