"""Settings of the service process itself (logging); the engine and each door have their own."""

from __future__ import annotations

from pydantic import AliasChoices, Field

from engine.settings import EnvSettings

__all__ = ["ServiceSettings"]


class ServiceSettings(EnvSettings):
    """Read from the environment and the ``BACKEND_CONFIG`` YAML file, like every settings object."""

    log_level: str = Field("INFO", validation_alias=AliasChoices("BACKEND_LOG_LEVEL", "log_level"))
    log_json: bool = Field(
        True, validation_alias=AliasChoices("BACKEND_LOG_JSON", "log_json"),
        description="One JSON object per log line (true) or readable console lines (false).",
    )
