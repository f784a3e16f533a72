"""Growing a PatchCore memory with new OK patches, without the training patches of the fit.

The coreset of a fit is a greedy k-center selection: every training patch lies within the
covering radius ``r`` of a kept row, and the kept rows were chosen at least ``r`` apart. New
patches are merged by the same rule: a new patch joins when it lies farther than ``r`` from every
kept row (the memory's and the new rows already taken), taken farthest first, exactly as the
greedy selection would continue. The fit's own radius is not stored, so it is estimated from the
memory: the smallest distance between a sample of memory rows and their nearest other row (k-center
rows are at least ``r`` apart, so this is an estimate from above, tight for the last rows chosen).
The estimate is made once and recorded in the manifest. All distances are exact.

A fit's memory holds a fixed share of its patches (the coreset ratio); a full refit on more images
would hold more rows, closer together. So the selection also continues, farthest first, until the
grown memory holds that share of every patch seen (fit and added), as the refit's greedy selection
would: the coverage rule bounds how far a new patch may be from the memory, the budget keeps the
memory as fine as a refit's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.knn import Distance, build_index, prepare_rows

__all__ = ["estimate_radius", "nearest", "select_rows"]

_RADIUS_SAMPLE = 4096
_BATCH = 64                  # rows the farthest-first selection picks among between two full updates


def _as_distance(raw: np.ndarray, distance: Distance) -> np.ndarray:
    """faiss flat-index values -> distances: l2 squared -> Euclidean, inner product -> 1 - cosine."""
    return np.sqrt(np.maximum(raw, 0.0)) if distance == "l2" else 1.0 - raw


def nearest(bank: np.ndarray, queries: np.ndarray, distance: Distance, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact search of ``queries`` (Q, D) in ``bank`` (M, D): ((Q,) distance to the nearest row,
    (Q,) mean distance to the ``k`` nearest rows, the patch score of inference)."""
    index = build_index(bank, distance)
    raw, _ = index.search(prepare_rows(queries, distance), min(k, index.ntotal))
    dist = _as_distance(raw, distance).astype(np.float32)
    return dist[:, 0], dist.mean(axis=1)


def estimate_radius(bank: np.ndarray, distance: Distance, seed: int) -> float:
    """The covering-radius estimate (see the module text); 0.0 for a memory of one row."""
    if len(bank) < 2:
        return 0.0
    rng = np.random.default_rng(seed)
    sample = bank[rng.choice(len(bank), size=min(len(bank), _RADIUS_SAMPLE), replace=False)]
    index = build_index(bank, distance)
    raw, _ = index.search(prepare_rows(sample, distance), 2)
    dist = _as_distance(raw, distance)
    others = dist[:, 1]                      # column 0 is the row itself (or an exact duplicate)
    positive = others[others > 1e-6]
    return float(positive.min()) if len(positive) else 0.0


def select_rows(rows: np.ndarray, nearest_kept: np.ndarray, radius: float, distance: Distance,
                at_least: int = 0) -> np.ndarray:
    """Indices of the ``rows`` (N, D) that join a memory, farthest first, as the greedy k-center
    selection would continue with the memory's rows already chosen: a row joins while its distance
    to every kept row (``nearest_kept``: to the memory; then also to the rows taken) is above
    ``radius``, and, farthest first, until ``at_least`` rows were taken (the fit's row budget).

    The selection runs on the rows farthest from the memory only, as many as it can need (all rows
    above ``radius``, and at least four times ``at_least``); when a row left out could have been
    picked (its distance to the memory is not below the last pick's gap), it runs again on twice as
    many. The result is the one of the selection over every row."""
    gaps = nearest_kept.astype(np.float32)
    if distance == "l2":                                       # squared: no root per step
        gaps, radius = gaps * gaps, radius * radius
    order = np.argsort(-gaps, kind="stable")
    size = min(len(rows), max(4 * at_least, int(np.count_nonzero(gaps > radius))))
    while True:
        candidates = order[:size]
        floor = float(gaps[order[size]]) if size < len(rows) else float("-inf")   # the largest gap left out
        run = _greedy(prepare_rows(rows[candidates], distance), gaps[candidates], radius, distance, at_least)
        if size == len(rows) or run.same_as_all(floor):
            return candidates[np.asarray(run.taken, dtype=np.int64)]
        size = min(len(rows), 2 * size)


@dataclass(frozen=True)
class _Run:
    taken: list[int]
    last: float          # gap of the last pick (inf: none)
    done: bool           # stopped by the rule (not for lack of rows with a gap)
    left: float          # the largest gap among the candidates when it stopped (-inf: none left)

    def same_as_all(self, floor: float) -> bool:
        """Whether the run over every row (whose left-out rows have gaps <= ``floor``) picks the same."""
        return self.last > floor and (self.done or self.left >= floor)


def _distances(x: np.ndarray, norms: np.ndarray | None, y: np.ndarray, y_norms: np.ndarray | None) -> np.ndarray:
    """(len(x), len(y)) squared l2 (``norms`` given) or cosine distances between prepared rows."""
    dots = x @ y.T
    if norms is None or y_norms is None:
        return 1.0 - dots
    return np.maximum(norms[:, None] + y_norms[None, :] - 2.0 * dots, 0.0)


def _greedy(x: np.ndarray, start: np.ndarray, limit: float, distance: Distance, at_least: int) -> _Run:
    """Farthest-first picks among prepared rows ``x`` (C, D) with starting gaps ``start`` (squared
    for l2), exactly one at a time, computed in batches: the rows with the ``_BATCH`` largest gaps
    are picked among themselves for as long as the best of them is at least the largest gap outside
    (gaps only shrink), then every gap is updated with one matrix product."""
    gap = start.astype(np.float32, copy=True)
    norms = np.einsum("cd,cd->c", x, x) if distance == "l2" else None
    taken: list[int] = []
    last = float("inf")
    while len(taken) < len(gap):
        top, bound = _largest(gap, _BATCH)
        top_norms = None if norms is None else norms[top]
        local = gap[top].copy()
        between = _distances(x[top], top_norms, x[top], top_norms)            # T T
        picks: list[int] = []
        while True:
            i = int(np.argmax(local))
            far = float(local[i])
            if far < bound:
                break                                   # another row may now be the farthest: update all
            if far <= limit and len(taken) + len(picks) >= at_least:
                taken += [int(top[p]) for p in picks]
                return _Run(taken, last, True, far)
            if far <= 0.0:
                taken += [int(top[p]) for p in picks]
                return _Run(taken, last, False, far)
            picks.append(i)
            last = far
            np.minimum(local, between[i], out=local)
            local[i] = -1.0                             # picked: never again
        chosen = top[np.asarray(picks, dtype=np.int64)]
        gap = np.minimum(gap, _distances(x, norms, x[chosen], None if norms is None else norms[chosen]).min(1))
        gap[chosen] = 0.0
        taken += [int(c) for c in chosen]
    return _Run(taken, last, False, float("-inf"))


def _largest(values: np.ndarray, count: int) -> tuple[np.ndarray, float]:
    """Indices of the ``count`` largest ``values`` and the largest value outside them (-inf: none)."""
    if len(values) <= count:
        return np.arange(len(values)), float("-inf")
    part = np.argpartition(-values, count)
    return part[:count], float(values[part[count]])
