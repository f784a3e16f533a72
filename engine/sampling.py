"""Deterministic subsets: which of n items to use when at most ``most`` may be."""

from __future__ import annotations

__all__ = ["spread"]


def spread(n: int, most: int) -> list[int]:
    """Up to ``most`` indices spread evenly over range(n), first and last included (all when n <= most).

    Raises:
        ValueError: most < 1.
    """
    if most < 1:
        raise ValueError(f"most must be >= 1, got {most}")
    if most >= n:
        return list(range(n))
    if most == 1:
        return [0]
    return [int(round(i * (n - 1) / (most - 1))) for i in range(most)]
