"""The inverted file's lists in panels for the C scans (``engine/_ivfscan.c``), and the other C
kernels' wrappers (the projection, the anomaly map's banded product).

``engine.search`` answers the searches of a projected inverted file with these scans when the
extension was built and the CPU has AVX2 (``AVAILABLE``), and with numpy and faiss otherwise; both
give the same exact distances, and approximate ones by the same rule (each query's ``nprobe``
lists of nearest centroid, its ``candidates`` rows nearest in coordinates there, the k nearest of
those by true distance).

Why a scan of our own: numpy's path tests balls per block of lists (a matrix product per block),
so a query that needs one list of a block is compared with the whole block's wanted lists, and
its Python steps cost ~0.1 ms per block (a 60k-row memory has ~60 blocks). The C scan tests
each list's ball per query, compares rows 16 at a time from panels that stay in cache while every
query that needs the list goes through them, and tightens each query's bound as true distances
come in.

Why an approximate scan of our own: faiss's inverted-file search takes one query at a time, with a
heap per query; the C scan takes each probed list once, with all the queries that probe it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

try:
    from engine import _ivfscan
except ImportError:      # built without a C compiler: engine.search uses numpy and faiss
    _ivfscan = None

__all__ = ["AVAILABLE", "BUILT", "EXT_AXES", "HELPERS", "LANES", "Finer", "Projector", "TiledLists", "at_or_above",
           "banded_rows", "cells_above", "helpers", "set_helpers"]

BUILT = _ivfscan is not None
# built, and on a CPU where it beats numpy (x86 with AVX2; engine/_ivfscan.c): what the engine uses
AVAILABLE = BUILT and bool(_ivfscan.FAST)
# the extension has threads of its own for the exact scan (pthreads; engine/_ivfscan.c)
HELPERS = BUILT and bool(_ivfscan.HELPERS)
LANES = 16 if _ivfscan is None else int(_ivfscan.LANES)
# padding columns: far from every query (squared distances ~1e36 stay finite in float32)
_PAD = 1e18
_AXIS_BLOCK = 32 if _ivfscan is None else int(_ivfscan.AXIS_BLOCK)
# principal axes past the coordinates' that the exact scan's second lower bound takes
EXT_AXES = 32 if _ivfscan is None else int(_ivfscan.EXT_AXES)
# coordinates of the probe choice's first look at a panel of list centroids (the rest by their length)
SPLIT = 16 if _ivfscan is None else int(_ivfscan.SPLIT)


@dataclass(frozen=True)
class Finer:
    """Rows' coordinates for the exact scan's second lower bound: their next ``EXT_AXES`` principal
    coordinates past the projection's axes (zeros past the last axis) and the residual length past
    those. The projection's last coordinate w (the residual past its axes) splits into them:
    w^2 = |coords|^2 + rest^2, so a row whose coordinate distance passes the first bound can be held
    to a tighter one before its true distance is taken (``engine/_ivfscan.c``, scan_group)."""

    coords: np.ndarray      # (n, EXT_AXES) float32
    rest: np.ndarray        # (n,) float32

    @classmethod
    def empty(cls, n: int) -> Finer:
        """Outputs for n rows' finer coordinates."""
        return cls(np.empty((n, EXT_AXES), dtype=np.float32), np.empty(n, dtype=np.float32))


@dataclass(frozen=True)
class Projector:
    """Rows to coordinates in C: the principal coordinates, then the residual length; computed in
    float32 for the approximate scan's picks (as numpy's float32 product rounds), in float64 for
    the exact scan's lower bounds. The GIL is released: pieces of a search project side by side.
    ``mean`` and ``axes`` are float32 values (a faiss PCA's), so float32 holds them exactly."""

    mean: np.ndarray        # (D,) float32
    axes_t: np.ndarray      # (D, axes rounded up to the C block) float32, the axes as columns
    axes_t64: np.ndarray    # the same in float64
    axes: int

    @classmethod
    def of(cls, mean: np.ndarray, axes: np.ndarray) -> Projector:
        """From the ``mean`` (D,) and the orthonormal ``axes`` (A, D) of a projection."""
        count, dim = axes.shape
        width = -(-count // _AXIS_BLOCK) * _AXIS_BLOCK
        axes_t = np.zeros((dim, width), dtype=np.float32)
        axes_t[:, :count] = axes.T
        return cls(np.ascontiguousarray(mean, dtype=np.float32), axes_t, axes_t.astype(np.float64), count)

    def __call__(self, rows: np.ndarray, *, precise: bool = False) -> np.ndarray:
        """(n, D) rows -> (n, axes + 1) float32 coordinates, computed in float64 where ``precise``."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        out = np.empty((len(rows), self.axes + 1), dtype=np.float32)
        _ivfscan.project(rows, self.mean, self.axes_t64 if precise else self.axes_t, self.mean.shape[0], self.axes,
                         precise, out, self.axes, None, None)
        return out

    def fill(self, rows: np.ndarray, out: np.ndarray, finer: Finer | None, progress: np.ndarray) -> None:
        """``split(rows, at)`` into ``out`` (n, at + 1) and ``finer`` (None where ``at`` is every
        axis: ``self(rows, precise=True)``), shared by the calls given the same ``progress`` (two
        int64, zeros at first): each projects the next rows none has taken, and returns once every
        row is projected, by whichever call. Calls on several threads split the rows and go on to
        read them all with no hand-off between the threads."""
        at = out.shape[1] - 1
        if finer is None and at != self.axes:
            raise ValueError(f"coordinates on {at} of {self.axes} axes leave finer ones: give their outputs")
        _ivfscan.project(np.ascontiguousarray(rows, dtype=np.float32), self.mean, self.axes_t64, self.mean.shape[0],
                         self.axes, True, out, at, None if finer is None else finer.coords,
                         None if finer is None else finer.rest, progress)

    def split(self, rows: np.ndarray, at: int) -> tuple[np.ndarray, Finer]:
        """(n, D) rows -> their precise coordinates on the first ``at`` axes (n, at + 1), the
        residual past those last (the same values as a projector of those axes alone gives), and
        the other axes' (at most ``EXT_AXES``) as the second bound's ``Finer`` coordinates."""
        if not 0 < at < self.axes or self.axes - at > EXT_AXES:
            raise ValueError(f"a split keeps 1..{self.axes - 1} axes and leaves at most {EXT_AXES}, got {at}")
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        out = np.empty((len(rows), at + 1), dtype=np.float32)
        finer = Finer(np.empty((len(rows), EXT_AXES), dtype=np.float32), np.empty(len(rows), dtype=np.float32))
        _ivfscan.project(rows, self.mean, self.axes_t64, self.mean.shape[0], self.axes, True, out, at, finer.coords,
                         finer.rest)
        return out, finer


def _panels(rows: np.ndarray) -> np.ndarray:
    """(n, d) -> panels of (d, LANES) float32, flat, the rows rounded up to LANES with _PAD."""
    n, d = rows.shape
    width = -(-max(n, 1) // LANES) * LANES
    padded = np.full((width, d), _PAD, dtype=np.float32)
    padded[:n] = rows
    return np.ascontiguousarray(padded.reshape(-1, LANES, d).transpose(0, 2, 1)).ravel()


@dataclass(frozen=True)
class TiledLists:
    """An inverted file's rows by list in panels (``engine/_ivfscan.c``), with the lists' balls;
    positions are those of ``bank``, where each list's rows are contiguous (``list_start``)."""

    panels: np.ndarray        # (columns * d,) float32: every list's panels in turn (zeros in padding)
    norms: np.ndarray         # (columns,) float32 squared norm of each column's coordinates, +inf for padding
    column_start: np.ndarray  # (L + 1,) int64 first column of each list (a multiple of LANES)
    slots: np.ndarray         # (columns,) int64 position of each column's row, -1 for padding
    centres: np.ndarray       # (L rounded up to LANES, * d) float32: panels of the lists' ball centres
    radius: np.ndarray        # (L,) float32 the lists' ball radii
    bank: np.ndarray          # (positions, D) float32 the true rows
    dims: int                 # coordinates per row
    centroids: np.ndarray     # (L rounded up to LANES, * d) float32: panels of the lists' quantizer centroids
    centroid_norms: np.ndarray  # (L rounded up to LANES,) float32 their squared norms, +inf for padding
    # (L rounded up to LANES,) float32 the length of each centroid's coordinates past SPLIT (0 for
    # padding): the probe choice's first look at a panel of centroids; None: every panel in full
    centroid_tails: np.ndarray | None
    # the columns' coordinates for the exact scan's second bound, in panels of (EXT_AXES, LANES), and
    # their residual lengths; None: one bound
    finer_panels: np.ndarray | None = None
    finer_rest: np.ndarray | None = None

    @classmethod
    def of(cls, coords: np.ndarray, list_start: np.ndarray, centres: np.ndarray, radius: np.ndarray,
           bank: np.ndarray, list_centroids: np.ndarray) -> TiledLists:
        """Panels of the rows ``coords`` (positions, d), list l at ``list_start[l]:list_start[l + 1]``,
        whose balls are ``centres`` (L, d) and ``radius`` (L,), and whose rows the quantizer gave
        to the centroids ``list_centroids`` (L, d) (the approximate scan probes by them)."""
        sizes = np.diff(list_start)
        if len(coords) != len(bank) or list_start[0] != 0 or list_start[-1] != len(bank) or np.any(sizes < 0):
            raise ValueError("the lists do not cover the bank's positions")
        widths = -(-sizes // LANES) * LANES
        column_start = np.concatenate([[0], np.cumsum(widths)]).astype(np.int64)
        # each list's rows at the start of its columns; the C scan trusts this layout (it checks sizes only)
        column = column_start[:-1].repeat(sizes) + np.arange(len(coords)) - list_start[:-1].repeat(sizes)
        padded = np.zeros((int(column_start[-1]), coords.shape[1]), dtype=np.float32)
        padded[column] = coords
        norms = np.full(int(column_start[-1]), np.inf, dtype=np.float32)
        norms[column] = np.einsum("nd,nd->n", coords, coords, dtype=np.float64)
        slots = np.full(int(column_start[-1]), -1, dtype=np.int64)
        slots[column] = np.arange(len(coords))
        list_centroids = np.asarray(list_centroids, dtype=np.float32)
        if list_centroids.shape != (len(sizes), coords.shape[1]):
            raise ValueError("one centroid per list, of the coordinates' size, expected")
        centroid_norms = np.full(-(-len(sizes) // LANES) * LANES, np.inf, dtype=np.float32)
        centroid_norms[: len(sizes)] = np.einsum("ld,ld->l", list_centroids, list_centroids, dtype=np.float64)
        centroid_tails = None
        if coords.shape[1] > SPLIT:
            rest = list_centroids[:, SPLIT:]
            centroid_tails = np.zeros(len(centroid_norms), dtype=np.float32)
            centroid_tails[: len(sizes)] = np.sqrt(np.einsum("ld,ld->l", rest, rest, dtype=np.float64))
        return cls(_panels(padded), norms, column_start, slots, _panels(np.asarray(centres, np.float32)),
                   np.ascontiguousarray(radius, dtype=np.float32), np.ascontiguousarray(bank, dtype=np.float32),
                   coords.shape[1], _panels(list_centroids), centroid_norms, centroid_tails)

    def with_finer(self, finer: Finer) -> TiledLists:
        """The same lists, whose exact scan holds rows to the second bound too (``finer``: the
        positions' coordinates for it, from the projection that gave the panels' coordinates)."""
        if finer.coords.shape != (len(self.bank), EXT_AXES) or finer.rest.shape != (len(self.bank),):
            raise ValueError("one row of finer coordinates per position expected")
        held = self.slots >= 0
        coords = np.zeros((len(self.slots), EXT_AXES), dtype=np.float32)
        coords[held] = finer.coords[self.slots[held]]
        rest = np.zeros(len(self.slots), dtype=np.float32)
        rest[held] = finer.rest[self.slots[held]]
        return replace(self, finer_panels=_panels(coords), finer_rest=rest)

    def approximate(self, coords: np.ndarray, rows: np.ndarray, nprobe: int, candidates: int, k: int,
                    shown: np.ndarray | None) -> np.ndarray:
        """(n, k) ascending squared true distances of the queries (``coords`` (n, d), ``rows`` (n, D))
        to the k nearest by true distance of the ``candidates`` ``shown`` rows (by position; None =
        all) nearest in coordinates among the query's ``nprobe`` lists of nearest centroid; +inf
        where fewer are."""
        out = np.empty((len(coords), k), dtype=np.float32)
        _ivfscan.approximate(self.panels, self.norms, self.column_start, self.slots, self.centres, self.radius,
                             self.centroids, self.centroid_norms, self.bank,
                             None if shown is None else np.ascontiguousarray(shown, dtype=np.uint8), self.dims,
                             self.bank.shape[1], np.ascontiguousarray(coords, dtype=np.float32),
                             np.ascontiguousarray(rows, dtype=np.float32), int(nprobe), int(candidates), int(k), out,
                             self.centroid_tails)
        return out

    def approximate_shared(self, rows: np.ndarray, projector: Projector, nprobe: int, candidates: int, k: int,
                           shown: np.ndarray | None) -> tuple[np.ndarray, int]:
        """``approximate`` of the queries ``rows`` (n, D), their coordinates from ``projector``
        (float32), by the calling thread and the extension's helper threads (``set_helpers``):
        each takes the next chunk of queries none has taken, projects it and scans it. The chunks
        shrink as the queries run out, so the threads end together; they are the same whichever
        thread takes them, and so are the results. Also the number of threads that took part."""
        if projector.axes != self.dims - 1:
            raise ValueError(f"a projector on {projector.axes} axes for coordinates of {self.dims}")
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        out = np.empty((len(rows), k), dtype=np.float32)
        members = _ivfscan.approximate_team(
            self.panels, self.norms, self.column_start, self.slots, self.centres, self.radius, self.centroids,
            self.centroid_norms, self.bank, None if shown is None else np.ascontiguousarray(shown, dtype=np.uint8),
            self.dims, self.bank.shape[1], np.empty((len(rows), self.dims), dtype=np.float32), rows, int(nprobe),
            int(candidates), int(k), out, self.centroid_tails, projector.mean, projector.axes_t, projector.axes)
        return out, int(members)

    @property
    def lists(self) -> int:
        return len(self.radius)

    def exact(self, coords: np.ndarray, rows: np.ndarray, reach_sq: np.ndarray, k: int, shown: np.ndarray | None,
              lists: slice, finer: Finer | None = None, taken: np.ndarray | None = None) -> np.ndarray:
        """(n, k) ascending squared true distances of the queries (``coords`` (n, d), ``rows``
        (n, D)) to their k nearest ``shown`` rows (by position; None = all) of the lists ``lists``
        (its start a multiple of LANES) whose coordinate distance is within ``reach_sq`` (n,);
        +inf where fewer are. ``finer``: the queries' coordinates for the second bound, taken
        where these lists have theirs (the same distances, fewer of them computed). ``taken``: one
        int64, 0 at first, shared by calls over the same lists on several threads: each call scans
        the next panel of lists none has taken, and answers for those (merge the calls' results)."""
        out = np.empty((len(coords), k), dtype=np.float32)
        both = finer is not None and self.finer_panels is not None
        _ivfscan.exact(self.panels, self.norms, self.column_start, self.slots, self.centres, self.radius, self.bank,
                       None if shown is None else np.ascontiguousarray(shown, dtype=np.uint8), self.dims,
                       self.bank.shape[1], np.ascontiguousarray(coords, dtype=np.float32),
                       np.ascontiguousarray(rows, dtype=np.float32), np.ascontiguousarray(reach_sq, dtype=np.float32),
                       int(k), lists.start, lists.stop, out,
                       *((self.finer_panels, self.finer_rest, np.ascontiguousarray(finer.coords, dtype=np.float32),
                          np.ascontiguousarray(finer.rest, dtype=np.float32)) if both else (None,) * 4), taken)
        return out

    def exact_shared(self, rows: np.ndarray, reach_sq: np.ndarray, k: int, shown: np.ndarray | None,
                     projector: Projector | None) -> tuple[np.ndarray, int]:
        """``exact`` over every list, by the calling thread and the extension's helper threads
        (``set_helpers``), with the queries' coordinates from ``projector`` (None: the rows are
        the coordinates), projected by the same threads first; and the number of threads that
        took part. The helpers never take the GIL: the work goes to them and comes back with no
        wake-up of a Python thread, and no turn of the GIL."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        n = len(rows)
        out = np.empty((n, k), dtype=np.float32)
        coords, finer = rows, None
        if projector is not None:
            coords = np.empty((n, self.dims), dtype=np.float32)
            finer = Finer.empty(n) if projector.axes > self.dims - 1 else None
        members = _ivfscan.exact_team(
            self.panels, self.norms, self.column_start, self.slots, self.centres, self.radius, self.bank,
            None if shown is None else np.ascontiguousarray(shown, dtype=np.uint8), self.dims, self.bank.shape[1],
            coords, rows, np.ascontiguousarray(reach_sq, dtype=np.float32), int(k), out,
            *((self.finer_panels, self.finer_rest, finer.coords, finer.rest) if finer is not None else (None,) * 4),
            *((projector.mean, projector.axes_t64, projector.axes) if projector is not None else (None, None, 0)))
        return out, int(members)


def set_helpers(count: int) -> int:
    """Helper threads that the shared scans (``TiledLists.exact_shared``, ``approximate_shared``)
    take beside the caller from now on (at most 15; started once, then kept); that number, 0
    without ``HELPERS``."""
    return int(_ivfscan.set_helpers(int(count))) if HELPERS else 0


def helpers() -> int:
    """Helper threads the shared scans take now."""
    return int(_ivfscan.helpers()) if HELPERS else 0


def banded_rows(left: np.ndarray, bt: np.ndarray, band: np.ndarray, width: int, rows: slice, out: np.ndarray, *,
                columns: slice | None = None, add: bool = False) -> None:
    """``out[rows] = left @ bt[:, :width]`` (``+=`` with ``add``) in C, in the blocks of ``LANES``
    columns that overlap ``columns`` (None = all), each block over the rows ``band[b, 0]:band[b, 1]``
    of ``bt`` only (the others are zero there). ``left`` (rows, w) and ``out`` (H, width) float32
    C-contiguous; ``bt`` (w, width rounded up to LANES) float32, zeros past ``width``; ``band``
    (blocks, 2) int32. The GIL is released."""
    blocks = len(band)
    first, last = (0, blocks) if columns is None else (columns.start // LANES, -(-columns.stop // LANES))
    _ivfscan.banded_product(left, bt, band, left.shape[1], int(width), rows.start, rows.stop, first, last, add, out)


def at_or_above(values: np.ndarray, chosen: np.ndarray | None, cut: float) -> np.ndarray:
    """The values >= ``cut`` (a float32 value) where ``chosen``, in order: ``values[(values >= cut) &
    chosen]`` in C, without the full-size boolean arrays. ``values`` float32 and ``chosen`` bool (same
    size; None = all), C-contiguous. The GIL is released."""
    out = np.empty(values.size, dtype=np.float32)
    count = _ivfscan.at_or_above(values, None if chosen is None else chosen.view(np.uint8), cut, out)
    return out[:count]


def cells_above(amap: np.ndarray, chosen: np.ndarray | None, level: float, rows: tuple[np.ndarray, np.ndarray],
                columns: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """(h, w) bool: cell (r, c) holds a pixel of ``amap`` (H, W) float32 at or above ``level`` (a
    float32 value) where ``chosen`` ((H, W) bool; None = all), its pixels being the rows
    ``rows[0][r]:rows[1][r]`` (both rising with r) and the columns ``columns[0][c]:columns[1][c]``
    (int64 bounds). In C, each pixel compared once. The GIL is released."""
    height, width = amap.shape
    out = np.empty((len(rows[0]), len(columns[0])), dtype=np.uint8)
    _ivfscan.cells_above(amap, None if chosen is None else chosen.view(np.uint8), height, width, level,
                         *(np.ascontiguousarray(bound, dtype=np.int64) for bound in (*rows, *columns)), out)
    return out.view(bool)
