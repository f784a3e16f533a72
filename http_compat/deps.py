"""FastAPI dependencies: the engine, the settings, the request id and the recipe of a request."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Query, Request

from engine.api import Engine
from engine.settings import Settings

__all__ = [
    "EngineDep",
    "RecipeDep",
    "RequestIdDep",
    "SettingsDep",
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
    settings: Settings = request.app.state.settings
    return settings


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


EngineDep = Annotated[Engine, Depends(get_engine)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
RequestIdDep = Annotated[str, Depends(get_request_id)]
RecipeDep = Annotated[str | None, Depends(get_recipe)]
