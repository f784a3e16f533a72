"""PatchCore's memory: build it from training features, score new features against it."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import faiss
import numpy as np
import torch

from engine.anomaly_map import anomaly_map, masked_percentile
from engine.coreset import CoresetRule, greedy_coreset
from engine.knn import Distance, TorchBank, build_index
from engine.refine import DEFAULT_MARGIN, MapReader, RefinedMap, margin_for, refine_map
from engine.search import IndexChoice, MemorySearch, RowFilter, build_search_index, keep_rows
from engine.threads import run_shared

__all__ = ["Memory", "MemorySearch", "build_memory", "leave_out_scores", "patch_origins", "score_map", "searcher"]

# rows of patches the memory left out, on which the probe count of an inverted file is tuned
_PROBE_QUERIES = 2000


@dataclass(frozen=True)
class Memory:
    bank: np.ndarray        # (M, D) float32 rows kept
    sources: np.ndarray     # (M,) index of the training image each row came from
    index: faiss.Index
    choice: IndexChoice
    origins: np.ndarray     # (M, 3) int32: training image index, patch row, patch column of each row
    coreset_axes: int | None = None   # principal axes the coreset was selected on; None = all


def build_memory(
    features: np.ndarray, ratio: float, keep_all: bool, distance: Distance, *,
    rule: CoresetRule, seed: int, device: str, ivf_min_rows: int, timings: dict[str, float] | None = None,
) -> Memory:
    """features (N, h, w, D) -> memory of about ``ratio * N * h * w`` rows (all with keep_all).

    ``timings`` receives the milliseconds of the ``coreset`` selection and the ``index`` build.
    """
    start = time.perf_counter()
    n, h, w, d = features.shape
    flat = features.reshape(-1, d)                                   # N*h*w D
    sources = np.repeat(np.arange(n), h * w)
    axes = None
    if keep_all:
        keep = np.arange(len(flat))
    else:
        k = max(1, int(round(ratio * len(flat))))
        x = torch.from_numpy(flat).to(device)
        if distance == "cosine":
            x = torch.nn.functional.normalize(x, dim=1)
        axes = rule.axes(*x.shape)
        keep = greedy_coreset(x, k, projection_dim=axes, seed=seed).cpu().numpy()
    bank = np.ascontiguousarray(flat[keep])
    coreset_done = time.perf_counter()
    probes = None
    if len(bank) >= ivf_min_rows:
        # recall is measured on patches the memory did not keep: they stand for unseen parts
        rest = np.setdiff1d(np.arange(len(flat)), keep)
        rng = np.random.default_rng(seed)
        probes = flat[rng.choice(rest, size=min(len(rest), _PROBE_QUERIES), replace=False)] if len(rest) else None
    index, choice = build_search_index(bank, distance, ivf_min_rows=ivf_min_rows, probe_queries=probes, seed=seed)
    if timings is not None:
        timings["coreset"] = round((coreset_done - start) * 1000.0, 3)
        timings["index"] = round((time.perf_counter() - coreset_done) * 1000.0, 3)
    return Memory(bank, sources[keep], index, choice, patch_origins(keep, h, w), axes)


def patch_origins(rows: np.ndarray, h: int, w: int) -> np.ndarray:
    """(M, 3) int32 (image, patch row, patch column) of flat feature rows of (N, h, w) grids."""
    rows = np.asarray(rows, dtype=np.int64)
    image, cell = np.divmod(rows, h * w)
    return np.stack([image, cell // w, cell % w], axis=1).astype(np.int32)


def searcher(index: faiss.Index, bank: np.ndarray, distance: Distance, k: int,
             choice: dict[str, object]) -> MemorySearch:
    """The search of a stored memory; ``choice`` is the manifest's ``index`` entry."""
    nprobe = int(choice.get("nprobe", 0) or 0)             # type: ignore[call-overload]
    candidates = int(choice.get("candidates", 0) or 0)     # type: ignore[call-overload]
    # models fitted before the margin was measured refine with the default one
    margin = float(choice.get("margin", 0.0) or DEFAULT_MARGIN)    # type: ignore[arg-type]
    if candidates > 0:
        return MemorySearch(index, bank, distance, k, nprobe=nprobe, candidates=candidates, margin=margin)
    return MemorySearch(index, bank, distance, k, nprobe=nprobe, margin=margin)


def score_map(
    search: MemorySearch | TorchBank, features: np.ndarray, height: int, width: int, sigma: float,
    mask: np.ndarray | None, percentile: float, threshold: float | None, *, k: int = 1,
    only: RowFilter | None = None, timings: dict[str, float] | None = None, before_check: MapReader | None = None,
) -> RefinedMap:
    """features (h, w, D) -> anomaly map (height, width), its score and the patch distances.

    An exact search scores every patch exactly; an approximate one is refined (``engine.refine``)
    until the score, and the pixels at or above ``threshold``, are those of exact search.
    ``k`` is the neighbour count of a torch bank (a ``MemorySearch`` holds its own, and the
    refinement's first-level margin).
    ``timings`` receives milliseconds: ``knn`` (searches, exact re-scoring included) and ``map``.
    ``before_check``: see ``engine.refine.refine_map`` (an approximate search's map only).
    """
    h, w, d = features.shape
    flat = features.reshape(-1, d)                                                   # h*w D
    clock = _Clock()
    with clock:
        if isinstance(search, TorchBank):
            patches = search.distances(flat, k)
        else:
            patches, reach = search.search(flat, only)
    start = time.perf_counter()
    if isinstance(search, TorchBank) or not search.approximate:
        amap = anomaly_map(patches.reshape(h, w), height, width, sigma, run=_beside)
        score = masked_percentile(amap, mask, percentile)
        scored = RefinedMap(amap, score, patches.reshape(h, w), float("-inf"), 0, 0, score)
    else:
        def exact(indices: np.ndarray) -> np.ndarray:
            with clock:
                return search.exact(flat[indices], reach[indices], only)

        scored = refine_map(patches.reshape(h, w), exact, height, width, sigma, mask, percentile, threshold,
                            margin=search.margin, run=_beside, before_check=before_check)
    if timings is not None:
        spent = clock.seconds * 1000.0
        timings["knn"] = round(spent, 3)
        timings["map"] = round((time.perf_counter() - start) * 1000.0 - (spent - clock.first * 1000.0), 3)
    return scored


def _beside(steps: Sequence[Callable[[], object]]) -> None:
    """The map products' bands of rows: one on an idle helper thread, the others in the calling
    thread (all here when no helper is idle)."""
    run_shared(steps)()


class _Clock:
    """Adds up the seconds spent inside ``with clock:`` blocks (``first``: the first block's)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.first = -1.0

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        spent = time.perf_counter() - self._start
        self.first = spent if self.first < 0 else self.first
        self.seconds += spent


def leave_out_scores(
    features: np.ndarray, memory: Memory, image_sizes: Sequence[tuple[int, int]], scored: Sequence[int],
    distance: Distance, k: int, sigma: float, percentile: float, folds: int,
) -> tuple[dict[int, float], float]:
    """Image scores of training images ``scored``, each against the memory without its own fold.

    Image i belongs to fold ``i % folds``; it is scored like an inference (whole image, no mask)
    against the memory rows that came from other folds, so the scores estimate what unseen OK
    parts will score. A flat memory gets one flat index per fold; an inverted file is searched
    once, each fold's rows filtered out, with exact refinement of the score; how far those
    refinements found the exact scores below their approximate estimates gives the memory's
    refinement margin (``engine.refine.margin_for``), returned with the scores. Needs at least
    two training images for scores (else none, and the default margin).
    """
    n = features.shape[0]
    folds = min(folds, n)
    if folds < 2:
        return {}, DEFAULT_MARGIN
    fold_of = memory.sources % folds
    approximate = memory.choice.kind != "flat"
    shared = MemorySearch(memory.index, memory.bank, distance, k, nprobe=memory.choice.nprobe,
                          candidates=memory.choice.candidates) if approximate else None
    out: dict[int, float] = {}
    gaps: list[float | None] = []
    for fold in range(folds):
        members = [i for i in scored if i % folds == fold]
        others = fold_of != fold
        if not members or not others.any():
            continue
        if shared is not None:
            search, only = shared, keep_rows(others)
        else:
            rows = memory.bank[others]
            search, only = MemorySearch(build_index(rows, distance), rows, distance, k), None
        for i in members:
            height, width = image_sizes[i]
            refined = score_map(search, features[i], height, width, sigma, None, percentile, None, only=only)
            out[i] = refined.score
            gaps.append(refined.gap)
    return out, margin_for(gaps) if approximate else DEFAULT_MARGIN
