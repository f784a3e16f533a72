"""/docs and /redoc work on a PC without internet: every file the pages load comes from this server.

Over a real uvicorn server: the two pages, each URL they reference (scripts, styles, icon, the
OpenAPI document) is a path on this server that answers 200 with the right kind of content, and
no page names another host (no scheme, no protocol-relative ``//`` URL, no CDN, no web fonts).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from engine.api import Engine
from http_compat.docs import assets_dir
from http_compat.server import HttpServer
from tests.support import door_settings

# src="...", href="...", spec-url="..." attributes and Swagger UI's url: '...' option
_REFERENCES = re.compile(r"""(?:\b(?:src|href|spec-url)\s*=\s*["']([^"']+)["'])|(?:\burl:\s*'([^']+)')""")
_EXPECTED_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png", ".json": "application/json"}


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    config = door_settings(tmp_path_factory.mktemp("docs"))
    engine = Engine(config.engine)
    server = HttpServer(engine, config.http)
    server.start()
    yield server.url
    server.stop()
    engine.close()


def _references(html: str) -> list[str]:
    return [a or b for a, b in _REFERENCES.findall(html)]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_page_loads_only_files_of_this_server(base_url: str, page: str) -> None:
    r = httpx.get(base_url + page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    refs = _references(html)
    assert refs, "the page references no script: the pattern no longer matches FastAPI's page"
    assert "http://" not in html and "https://" not in html and "//" not in "".join(refs)
    assert not re.search(r"cdn|googleapis|jsdelivr|unpkg|fonts\.", html, re.IGNORECASE)
    scripts = [ref for ref in refs if ref.endswith(".js")]
    assert len(scripts) == 1
    for ref in refs:
        assert ref.startswith("/"), ref
        asset = httpx.get(base_url + ref)
        assert asset.status_code == 200, ref
        kind = _EXPECTED_TYPES[Path(ref).suffix]
        assert kind in asset.headers["content-type"], (ref, asset.headers["content-type"])
        assert len(asset.content) > (100_000 if ref in scripts else 100), ref


def test_swagger_ui_calls_no_online_validator(base_url: str) -> None:
    html = httpx.get(base_url + "/docs").text
    assert '"validatorUrl": null' in html


def test_assets_are_the_installed_package_files(base_url: str) -> None:
    # what the pages load is byte for byte the files of the fastapi-offline package (not a stub)
    for name in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js"):
        served = httpx.get(f"{base_url}/docs-assets/{name}").content
        assert served == (assets_dir() / name).read_bytes()
    assert b"SwaggerUIBundle" in (assets_dir() / "swagger-ui-bundle.js").read_bytes()
    assert b"Redoc" in (assets_dir() / "redoc.standalone.js").read_bytes()
