"""Settings of the REST door, read like the engine's (environment, then the BACKEND_CONFIG YAML)."""

from __future__ import annotations

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
