"""The layering and size rules of the code base, checked from the source (AST), not by eye.

* ``engine`` is a library: it imports neither door, nor the service that composes them, nor the
  benchmark or packaging scripts.
* The doors are independent of each other; only ``service`` imports both.
* The ``Engine`` facade stays small, and no function grows past a screenful.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "ipc", "http_compat", "service")
FORBIDDEN = {
    "engine": {"ipc", "http_compat", "service", "bench", "packaging"},
    "ipc": {"http_compat", "service", "bench", "packaging"},
    "http_compat": {"ipc", "service", "bench", "packaging"},
}
MAX_FUNCTION_LINES = 60
MAX_FACADE_LINES = 250


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imported_tops(path: Path) -> set[str]:
    """First components of every module ``path`` imports, at any depth (function bodies too)."""
    tops = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            tops.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            tops.add(node.module.split(".")[0])
    return tops


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_what_its_layer_may(package: str) -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imported_tops(path) & FORBIDDEN[package])
        for path in _modules(package)
        if _imported_tops(path) & FORBIDDEN[package]
    }
    assert offenders == {}


def test_the_import_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    # the rule must not be dodged by a lazy import
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from ipc.server import IpcServer\n    import http_compat.app\n")
    assert {"ipc", "http_compat"} <= _imported_tops(module)


def test_only_the_service_composes_both_doors() -> None:
    composers = {str(path.relative_to(ROOT)) for package in PACKAGES for path in _modules(package)
                 if {"ipc", "http_compat"} <= _imported_tops(path)}
    assert composers and all(name.startswith("service/") for name in composers)


def test_no_function_is_longer_than_a_screen() -> None:
    long = []
    for package in ("engine", "ipc", "http_compat", "service"):
        for path in _modules(package):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    lines = node.end_lineno - node.lineno + 1   # type: ignore[operator]
                    if lines > MAX_FUNCTION_LINES:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []


def test_the_engine_facade_stays_small() -> None:
    facade = ROOT / "engine" / "api.py"
    assert "class Engine" in facade.read_text(encoding="utf-8")
    assert len(facade.read_text(encoding="utf-8").splitlines()) <= MAX_FACADE_LINES
