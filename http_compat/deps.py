"""FastAPI dependencies: the engine, the settings, the request id and the recipe of a request."""

from __future__ import annotations

from typing import Annotated

import structlog
from fastapi import Depends, Header, Query, Request

from engine.api import Engine
from engine.settings import Settings

__all__ = [
    "EngineDep",
    "RecipeDep",
    "RequestIdDep",
    "SettingsDep",
    "bind_model",
    "first_recipe",
    "get_engine",
    "get_recipe",
    "get_request_id",
    "get_settings",
]


def get_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def get_settings(request: Request) -> Settings:
    """The engine's settings (its limits on images and fits apply to uploads before they are read)."""
    engine: Engine = request.app.state.engine
    return engine.settings


def get_request_id(request: Request) -> str:
    """The id ``RequestGate`` gave this request (the client's X-Request-Id, else a new one)."""
    return str(request.scope["state"]["request_id"])


def first_recipe(*candidates: str | None) -> str | None:
    """The first recipe id that is given and not blank; None means "no recipe"."""
    for value in candidates:
        if value is not None and value.strip():
            return value.strip()
    return None


def get_recipe(
    recipe_id: Annotated[str | None, Query(description="Product recipe (also X-Recipe-Id).")] = None,
    x_recipe_id: Annotated[str | None, Header(description="Product recipe, as the GUI sends it.")] = None,
) -> str | None:
    """The recipe named by the query string, else by the ``X-Recipe-Id`` header."""
    return first_recipe(recipe_id, x_recipe_id)


def bind_model(role_id: object, roi_id: object = None) -> None:
    """Add the model a request names to its log context (call it first in the route's thread,
    where the engine call runs; RequestGate has bound the request id and op already)."""
    fields = {name: value for name, value in (("role_id", role_id), ("roi_id", roi_id)) if isinstance(value, str)}
    structlog.contextvars.bind_contextvars(**fields)


EngineDep = Annotated[Engine, Depends(get_engine)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
RequestIdDep = Annotated[str, Depends(get_request_id)]
RecipeDep = Annotated[str | None, Depends(get_recipe)]
