"""Bounds on what a request can make the process build: nesting depth and item counts of a parsed
value (JSON or msgpack), and JSON text parsed within those bounds.

A parser builds the whole value before anyone looks at it, so the bounds are checked where they
cost least: JSON text is measured before ``json.loads`` (an upper bound from its brackets and
commas, C-speed), msgpack while it is unpacked (``ipc.protocol``), and the depth afterwards.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["ValueRefused", "check_structure", "parse_json"]


class ValueRefused(ValueError):
    """A value the bounds refuse. ``too_large`` (413): too many items; else (400): malformed or
    nested too deeply; ``syntax``: not JSON at all (a JSON syntax error)."""

    def __init__(self, message: str, *, too_large: bool = False, syntax: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large
        self.syntax = syntax


def check_structure(value: Any, *, max_depth: int, max_items: int) -> None:
    """Refuse a value nested deeper than ``max_depth`` containers or holding more than ``max_items``
    containers and items in all (iterative: no recursion, whatever the depth).

    Raises:
        ValueRefused: too deep (400) or too many items (413).
    """
    if not isinstance(value, list | dict):
        return
    stack: list[tuple[Any, int]] = [(value, 1)]
    items = 0
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node
        items += 1 + len(node)
        if items > max_items:
            raise ValueRefused(f"more than {max_items} items in one value", too_large=True)
        for child in children:
            if isinstance(child, list | dict):
                if depth >= max_depth:
                    raise ValueRefused(f"nested deeper than {max_depth} levels")
                stack.append((child, depth + 1))


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):     # 1e400 reads as inf
        raise ValueRefused(f"number {text[:40]} is beyond the float range")
    return number


def _no_constant(name: str) -> float:
    raise ValueRefused(f"{name} is not JSON (only finite numbers are)")


def _counts(text: str | bytes) -> tuple[int, int]:
    """(brackets that open a container, commas) of JSON text, strings included: upper bounds."""
    if isinstance(text, str):
        return text.count("[") + text.count("{"), text.count(",")
    return text.count(b"[") + text.count(b"{"), text.count(b",")


def parse_json(text: str | bytes, *, max_depth: int, max_items: int) -> Any:
    """``json.loads`` within bounds: standard JSON only (no NaN/Infinity, finite floats, ints of at
    most 4300 digits), nesting and item count checked.

    Raises:
        ValueRefused: not JSON, not UTF-8, too deep, a number out of range (400); too many items (413).
    """
    brackets, commas = _counts(text)
    if brackets + commas + 1 > max_items:      # an upper bound of containers and items: refused unread
        raise ValueRefused(f"more than {max_items} items in one value", too_large=True)
    try:
        value = json.loads(text, parse_float=_finite_float, parse_constant=_no_constant)
    except ValueRefused:
        raise
    except json.JSONDecodeError as exc:
        raise ValueRefused(f"not valid JSON: {exc.msg} at position {exc.pos}", syntax=True) from None
    except RecursionError:
        raise ValueRefused(f"nested deeper than {max_depth} levels") from None
    except ValueError as exc:                 # UnicodeDecodeError, an int of more than 4300 digits
        raise ValueRefused(f"not valid JSON: {str(exc)[:120]}") from None
    if isinstance(value, list | dict) and brackets > max_depth:   # fewer containers cannot nest deeper
        check_structure(value, max_depth=max_depth, max_items=max_items)
    return value
