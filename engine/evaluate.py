"""Detection quality of the engine on MVTec-AD-layout category folders: image AUROC, pixel AUROC,
per-region overlap (PRO), fit time and ROI latency, per category.

    python -m engine evaluate <category dir> [<category dir> ...] [--max-train N] [--input-size S]
                              [--coreset-ratio R] [--backbone NAME] [--weights FILE] [--data-root DIR]
                              [--json] [--out report.json] [--panel out.png] [--verbose]

Layout: ``train/good/*.png`` (fit), ``test/<good|defect>/*.png`` (scored),
``ground_truth/<defect>/<name>_mask.png`` (pixel labels; good images count as all-zero masks).

The model is fitted and scored through the public :class:`engine.api.Engine` facade, exactly as
the doors use it: encoded image bytes in, ``allow_uncalibrated=True``, float32 heatmaps out.
Settings not given on the command line come from the environment, as for the server.

Pixel AUROC is computed over every pixel of every test image after resizing each anomaly map
(cv2 INTER_AREA) and each mask (INTER_NEAREST) to ``map_side`` x ``map_side`` (256 by default),
so memory stays bounded (83 bottle images: 5.4 M pixels) whatever the image size.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from engine.images import IMAGE_SUFFIXES
from engine.metrics import auroc, pro_auc
from engine.sampling import spread

__all__ = [
    "EvalReport",
    "ImageScore",
    "TestImage",
    "auroc",
    "evaluate",
    "format_auto_recipe",
    "format_report",
    "list_test",
    "list_train",
    "main",
    "read_mask",
    "resize_side",
    "write_panel",
]

_ROLE, _ROI = "evaluate", "category"
_MM_PER_PX = 1.0  # the evaluation never looks at areas in mm


@dataclass(frozen=True)
class TestImage:
    """One test image: its file, its folder under test/ ("good" or a defect) and its mask file."""

    path: Path
    defect: str
    mask_path: Path | None          # None for good images (all-zero mask)

    @property
    def label(self) -> int:
        return 0 if self.defect == "good" else 1

    @property
    def name(self) -> str:
        return f"{self.defect}/{self.path.name}"


@dataclass(frozen=True)
class ImageScore:
    name: str
    label: int
    score: float


@dataclass(frozen=True)
class EvalReport:
    """Everything ``evaluate`` measured; ``as_dict`` is what ``--json`` prints."""

    category: str
    backbone: str
    input_size: int
    coreset_ratio: float
    n_train: int
    n_test: int
    n_defective: int
    image_auroc: float
    pixel_auroc: float | None       # None when the category has no ground_truth folder
    pro: float | None               # normalized PRO area up to FPR 0.3 (engine.metrics.pro_auc); idem
    pixel_side: int                 # maps and masks resized to pixel_side x pixel_side for pixel AUROC
    coreset_size: int
    n_embeddings: int
    token_shape: tuple[int, int]
    fit_s: dict[str, float]         # seconds per fit stage (FitResult.timings_ms), plus "total"
    infer_ms: dict[str, float]      # median ms per image per stage (InferResult.timings_ms)
    wall_s: float
    scores: tuple[ImageScore, ...] = field(default=())
    panel: str | None = None
    recipe: dict[str, Any] | None = None        # the fitted model's recipe (schemas.RecipeInfo)
    auto_recipe: dict[str, Any] | None = None   # schemas.AutoRecipeReport when BACKEND_AUTO_RECIPE=on
    settings: dict[str, Any] = field(default_factory=dict)   # engine settings given (beyond the environment)
    versus: EvalReport | None = None            # the reference engine of ``--versus``, same process

    @property
    def latency_ratio(self) -> float | None:
        """Median ROI latency of this engine over that of ``versus`` (inferences taken in turns)."""
        if self.versus is None:
            return None
        return self.infer_ms["total"] / self.versus.infer_ms["total"]

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.versus is not None:
            out["versus"]["latency_ratio"] = None
            out["latency_ratio"] = round(self.latency_ratio or 0.0, 4)
        return out


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def list_train(category: Path, max_train: int | None = None) -> list[Path]:
    """Sorted ``train/good`` images; with ``max_train``, that many evenly spaced ones (deterministic).

    Raises:
        FileNotFoundError: no train/good folder or no image in it.
        ValueError: max_train < 1.
    """
    folder = Path(category) / "train" / "good"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist: not an MVTec-layout category folder")
    files = _images(folder)
    if not files:
        raise FileNotFoundError(f"no image in {folder}")
    if max_train is None:
        return files
    if max_train < 1:
        raise ValueError(f"max_train must be >= 1, got {max_train}")
    return [files[i] for i in spread(len(files), max_train)]


def list_test(category: Path) -> list[TestImage]:
    """Every image under ``test/``, good first, then the defect folders in name order.

    Mask paths are filled in when ``ground_truth/`` exists.

    Raises:
        FileNotFoundError: no test folder, no image, or a defect image without its mask.
    """
    root = Path(category)
    test = root / "test"
    if not test.is_dir():
        raise FileNotFoundError(f"{test} does not exist: not an MVTec-layout category folder")
    truth = root / "ground_truth"
    folders = sorted((p for p in test.iterdir() if p.is_dir()), key=lambda p: (p.name != "good", p.name))
    out = []
    for folder in folders:
        for path in _images(folder):
            mask = None
            if folder.name != "good" and truth.is_dir():
                mask = truth / folder.name / f"{path.stem}_mask.png"
                if not mask.is_file():
                    raise FileNotFoundError(f"mask {mask} for {path} is missing")
            out.append(TestImage(path, folder.name, mask))
    if not out:
        raise FileNotFoundError(f"no image under {test}")
    return out


def resize_side(array: np.ndarray, side: int, interpolation: int) -> np.ndarray:
    import cv2

    if array.shape[:2] == (side, side):
        return array
    return cv2.resize(array, (side, side), interpolation=interpolation)


def read_mask(item: TestImage, height: int, width: int, side: int) -> np.ndarray:
    """(side, side) bool ground truth of one test image (all False for good images)."""
    import cv2

    if item.mask_path is None:
        return np.zeros((side, side), dtype=bool)
    mask = cv2.imread(str(item.mask_path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise ValueError(f"mask {item.mask_path} cannot be read")
    if mask.shape != (height, width):
        raise ValueError(f"mask {item.mask_path} is {mask.shape}, its image is {(height, width)}")
    return resize_side(mask, side, cv2.INTER_NEAREST) > 0


@dataclass
class _Scored:
    """What one engine produced on the test set."""

    maps: np.ndarray                  # T S S, resized anomaly maps
    masks: np.ndarray                 # T S S bool ground truth
    scores: list[ImageScore] = field(default_factory=list)
    timings: list[dict[str, float]] = field(default_factory=list)
    scales: list[float] = field(default_factory=list)


def _infer_one(engine: Any, item: TestImage, data: bytes, out: _Scored, i: int, has_truth: bool) -> None:
    import cv2

    result = engine.infer(_ROLE, _ROI, _MM_PER_PX, data, allow_uncalibrated=True, heatmap="float32")
    raw = result.heatmap_raw
    if raw is None or raw.dtype != "float32":
        raise RuntimeError("the engine returned no float32 heatmap")
    height, width = raw.shape
    amap = np.frombuffer(raw.data, dtype=np.float32).reshape(height, width)
    side = out.maps.shape[1]
    out.maps[i] = resize_side(amap, side, cv2.INTER_AREA)
    out.masks[i] = read_mask(item, height, width, side) if has_truth else False
    out.scores.append(ImageScore(item.name, item.label, float(result.score)))
    out.timings.append(result.timings_ms)
    out.scales.append(result.heatmap_scale)


def _score_tests(engines: Sequence[Any], tests: Sequence[TestImage], pixel_side: int,
                 has_truth: bool) -> list[_Scored]:
    """Infer every test image with each engine; with several, they take turns (a b, b a, ...) so
    a change of machine load hits them alike and their latencies compare."""
    out = [_Scored(np.empty((len(tests), pixel_side, pixel_side), np.float32),
                   np.empty((len(tests), pixel_side, pixel_side), bool)) for _ in engines]
    for i, item in enumerate(tests):
        data = item.path.read_bytes()
        order = range(len(engines)) if i % 2 == 0 else reversed(range(len(engines)))
        for j in order:
            _infer_one(engines[j], item, data, out[j], i, has_truth)
    return out


def _report(category: Path, fit: Any, n_train: int, tests: Sequence[TestImage], scored: _Scored,
            has_truth: bool, started: float, overrides: dict[str, Any]) -> EvalReport:
    """The figures of one engine's fit and test pass."""
    labels = np.array([s.label for s in scored.scores])
    pixel_auroc, pro = ((auroc(scored.maps, scored.masks), pro_auc(scored.maps, scored.masks))
                        if has_truth and scored.masks.any() else (None, None))
    fit_s = {stage: round(ms / 1000.0, 3) for stage, ms in fit.timings_ms.items()}
    fit_s["total"] = round(sum(fit.timings_ms.values()) / 1000.0, 3)
    stages = list(dict.fromkeys(k for t in scored.timings for k in t))
    infer_ms = {k: round(statistics.median(t[k] for t in scored.timings if k in t), 3) for k in stages}
    return EvalReport(
        category=category.name, backbone=fit.backbone, input_size=fit.input_size,
        coreset_ratio=fit.recipe.coreset_ratio, n_train=n_train, n_test=len(tests),
        n_defective=int(labels.sum()),
        image_auroc=round(auroc(np.array([s.score for s in scored.scores]), labels), 6),
        pixel_auroc=None if pixel_auroc is None else round(pixel_auroc, 6),
        pro=None if pro is None else round(pro, 6), pixel_side=scored.maps.shape[1],
        coreset_size=fit.coreset_size, n_embeddings=fit.n_embeddings, token_shape=fit.token_shape,
        fit_s=fit_s, infer_ms=infer_ms, wall_s=round(time.perf_counter() - started, 3),
        scores=tuple(scored.scores), recipe=fit.recipe.model_dump(),
        auto_recipe=fit.auto_recipe.model_dump() if fit.auto_recipe else None, settings=overrides,
    )


def _fit_and_score(category: Path, train: list[Path], tests: list[TestImage], configs: list[dict[str, Any]],
                   data_root: Path, pixel_side: int) -> tuple[list[Any], list[_Scored]]:
    """One engine per settings dict, each fitted in turn, then the test set scored in turns."""
    from engine.api import Engine
    from engine.settings import Settings

    engines = []
    try:
        for j, config in enumerate(configs):
            root = data_root if j == 0 else data_root / f"versus-{j}"
            engines.append(Engine(Settings(data_root=root, **config)))
        fits = [engine.fit_ok(_ROLE, _ROI, _MM_PER_PX, [p.read_bytes() for p in train]) for engine in engines]
        return fits, _score_tests(engines, tests, pixel_side, (category / "ground_truth").is_dir())
    finally:
        for engine in engines:
            engine.close()


def evaluate(
    category: Path | str, *, max_train: int | None = None, input_size: int | None = None,
    coreset_ratio: float | None = None, backbone: str | None = None, weights: Path | None = None,
    data_root: Path | None = None, pixel_side: int = 256, panel: Path | None = None, panel_count: int = 6,
    settings: dict[str, Any] | None = None, versus: dict[str, Any] | None = None,
) -> EvalReport:
    """Fit on train/good, score every test image, return AUROCs and timings.

    Args:
        category: MVTec-layout folder (train/good, test/*, ground_truth/*).
        max_train: fit on this many evenly spaced train images (all when None).
        input_size, coreset_ratio, backbone, weights: engine settings (None = the engine's setting).
        data_root: where the model is written; a temporary folder, removed afterwards, when None.
        pixel_side: side the maps and masks are resized to for the pixel AUROC.
        panel: write a PNG panel (image | heatmap overlay) of ``panel_count`` test images there.
        settings: more engine settings (field names) for the evaluated engine.
        versus: when given, a second engine with these settings changed (on top of the
            environment and the named arguments, not ``settings``) is fitted and scored in the
            same process, inferences taken in turns; its report is the result's ``versus``.
    """
    if pixel_side < 8:
        raise ValueError(f"pixel_side must be >= 8, got {pixel_side}")
    started = time.perf_counter()
    category = Path(category)
    train, tests = list_train(category, max_train), list_test(category)
    common = {name: value for name, value in (("input_size", input_size), ("coreset_ratio", coreset_ratio),
                                               ("backbone", backbone), ("weights", weights)) if value is not None}
    configs = [{**common, **(settings or {})}] + ([{**common, **versus}] if versus is not None else [])
    with tempfile.TemporaryDirectory(prefix="engine-eval-") as tmp:
        fits, scored = _fit_and_score(category, train, tests, configs,
                                      Path(data_root) if data_root is not None else Path(tmp), pixel_side)
    has_truth = (category / "ground_truth").is_dir()
    reports = [_report(category, fit, len(train), tests, s, has_truth, started, config)
               for fit, s, config in zip(fits, scored, configs, strict=True)]
    report = reports[0]
    if panel is not None:
        first = scored[0]
        write_panel(panel, tests, first.maps, first.masks, [s.score for s in first.scores], first.scales[0],
                    panel_count)
        report = replace(report, panel=str(panel))
    return replace(report, versus=reports[1]) if versus is not None else report


def _panel_picks(tests: Sequence[TestImage], count: int) -> list[int]:
    """About half good and half defective images, evenly spread, defect folders taken in turn."""
    good = [i for i, t in enumerate(tests) if t.label == 0]
    by_defect: dict[str, list[int]] = {}
    for i, t in enumerate(tests):
        if t.label == 1:
            by_defect.setdefault(t.defect, []).append(i)
    n_good = min(len(good), count // 2) if by_defect else min(len(good), count)
    picks = [good[j] for j in spread(len(good), n_good)] if n_good else []
    queues = [list(members) for members in by_defect.values()]
    turn = 0
    while len(picks) < count and any(queues):
        queue = queues[turn % len(queues)]
        if queue:
            # middle of what is left, so one image per folder comes from its middle, not its start
            picks.append(queue.pop(len(queue) // 2))
        turn += 1
    return picks


def write_panel(
    path: Path | str, tests: Sequence[TestImage], maps: np.ndarray, masks: np.ndarray,
    scores: Sequence[float], scale: float, count: int = 6, columns: int = 2,
) -> Path:
    """PNG grid of (image | heatmap overlay) pairs for ``count`` test images; returns the path.

    maps, masks: (T, S, S) resized anomaly maps and ground truth of all test images. Heatmaps use
    the engine's fixed scale (``scale`` at mid colour, twice it saturated), so tiles compare;
    the ground-truth outline is drawn in white on defective images.
    """
    import cv2

    from engine.heatmap import to_uint8

    picks = _panel_picks(tests, count)
    if not picks:
        raise ValueError("no test image to draw")
    side = maps.shape[1]
    tiles = []
    for i in picks:
        image = cv2.imread(str(tests[i].path), cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"{tests[i].path} cannot be read")
        image = resize_side(image, side, cv2.INTER_AREA)                        # S S 3 (BGR)
        heat = cv2.applyColorMap(to_uint8(maps[i], scale), cv2.COLORMAP_JET)
        overlay = cv2.addWeighted(image, 0.5, heat, 0.5, 0.0)
        if masks[i].any():
            contours, _ = cv2.findContours(masks[i].astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(overlay, contours, -1, (255, 255, 255), 1)
        caption = f"{tests[i].name} {scores[i]:.3f}"
        for tile, text in ((image, caption), (overlay, "heatmap")):
            (text_w, text_h), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)
            cv2.rectangle(tile, (0, 0), (text_w + 8, text_h + 10), (0, 0, 0), cv2.FILLED)
            cv2.putText(tile, text, (4, text_h + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1,
                        cv2.LINE_AA)
        tiles.append(np.hstack([image, overlay]))                          # S 2S 3
    blank = np.zeros_like(tiles[0])
    rows = []
    for first in range(0, len(tiles), columns):
        row = tiles[first : first + columns]
        row += [blank] * (columns - len(row))
        rows.append(np.hstack(row))                                         # S 2S*columns 3
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.vstack(rows)):
        raise OSError(f"cannot write {path}")
    return path


def format_report(report: EvalReport) -> str:
    """The human-readable summary ``main`` prints."""
    pixel = "n/a (no ground_truth)" if report.pixel_auroc is None else f"{report.pixel_auroc:.4f}"
    lines = [
        f"category      {report.category}: {report.n_train} train, {report.n_test} test "
        f"({report.n_defective} defective)",
        f"model         {report.backbone} @ {report.input_size} px, tokens {report.token_shape[0]}x"
        f"{report.token_shape[1]}, coreset {report.coreset_size} of {report.n_embeddings} "
        f"({report.coreset_ratio:g})",
        f"recipe        {report.recipe['name'] if report.recipe else 'n/a'}",
        f"image AUROC   {report.image_auroc:.4f}",
        f"pixel AUROC   {pixel}  (maps INTER_AREA / masks INTER_NEAREST resized to "
        f"{report.pixel_side}x{report.pixel_side})",
        f"PRO (0.3)     {'n/a' if report.pro is None else f'{report.pro:.4f}'}",
        "fit s         " + "  ".join(f"{k} {v:.2f}" for k, v in report.fit_s.items()),
        "infer ms/img  " + "  ".join(f"{k} {v:.1f}" for k, v in report.infer_ms.items()) + "  (median)",
        f"wall s        {report.wall_s:.1f}",
    ]
    if report.panel:
        lines.append(f"panel         {report.panel}")
    if report.settings:
        lines.append("settings      " + "  ".join(f"{k}={v}" for k, v in report.settings.items()))
    if report.auto_recipe:
        lines.append(format_auto_recipe(report.auto_recipe))
    if report.versus is not None:
        lines += ["", "versus        (reference engine, same process, inferences in turns)",
                  format_report(report.versus), f"latency ratio {report.latency_ratio:.2f}x"]
    return "\n".join(lines)


def format_auto_recipe(auto: dict[str, Any]) -> str:
    """The automatic recipe choice of one fit: what it kept, and every trial's validation figures."""
    lines = [
        f"auto recipe   chose {auto['chosen']['name']} in {auto['seconds']:.1f} s (budget {auto['budget_s']:g} s); "
        f"validation: {auto['n_ok']} held-out OK, {auto['n_synthetic']} synthetic defects, "
        f"{auto['n_real_ng']} stored NG; trials fit on {auto['n_fit']} OK images",
        "              recipe                            image AUROC  detected  pixel AUROC  s",
    ]
    for trial in auto["trials"]:
        mark = "*" if trial["recipe"] == auto["chosen"] else " "
        pixel = "n/a" if trial["pixel_auroc"] is None else f"{trial['pixel_auroc']:.4f}"
        lines.append(f"            {mark} {trial['recipe']['name']:<33} {trial['image_auroc']:<12.4f} "
                     f"{trial['detection_rate']:<9.3f} {pixel:<12} {trial['seconds']:.1f}")
    if auto["skipped"]:
        lines.append("              skipped (budget): " + ", ".join(auto["skipped"]))
    return "\n".join(lines)


def _quiet_logs(verbose: bool) -> None:
    # the engine logs one structlog line per infer; structlog's default prints to stdout, which
    # would mix with --json output: warnings (a drift alarm on the defective test images) go to
    # stderr too. Only this command-line entry point touches logging.
    import structlog

    if verbose:
        from engine.logs import configure_logging

        configure_logging("INFO", json_lines=False)   # stderr
    else:
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
                            logger_factory=structlog.PrintLoggerFactory(sys.stderr))
        logging.getLogger("engine").setLevel(logging.WARNING)


def _summary_line(label: str, r: EvalReport) -> str:
    pixel = "n/a" if r.pixel_auroc is None else f"{r.pixel_auroc:.4f}"
    pro = "n/a" if r.pro is None else f"{r.pro:.4f}"
    recipe = r.recipe["name"] if r.recipe else "n/a"
    return (f"{label:<13} {recipe:<30} {r.image_auroc:<12.4f} {pixel:<12} {pro:<7} {r.fit_s['total']:<7.1f} "
            f"{r.infer_ms.get('total', float('nan')):.1f}")


def format_summary(reports: Sequence[EvalReport]) -> str:
    """One line per category (and per reference engine of ``--versus``, with the latency ratio):
    the recipe, the quality figures, the fit time and the ROI latency."""
    lines = ["category      recipe                         image AUROC  pixel AUROC  PRO     fit s   "
             "infer ms (median)"]
    for r in reports:
        lines.append(_summary_line(r.category, r))
        if r.versus is not None:
            lines.append(_summary_line("  versus", r.versus))
            lines.append(f"  latency ratio {r.latency_ratio:.2f}x (median ROI latency over the reference's, "
                         f"inferences in turns)")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m engine evaluate",
        description="Per MVTec-layout category: fit on train/good, score test/*, print image AUROC, pixel "
                    "AUROC, PRO, fit time and ROI latency.",
    )
    parser.add_argument("categories", type=Path, nargs="+", metavar="category",
                        help="folder with train/good, test/<good|defect>, ground_truth/")
    parser.add_argument("--max-train", type=int, default=None,
                        help="fit on N evenly spaced train images (sorted by name); default all")
    parser.add_argument("--input-size", type=int, default=None, help="square input side (default: backbone's)")
    parser.add_argument("--coreset-ratio", type=float, default=None, help="default: the engine setting (0.1)")
    parser.add_argument("--backbone", default=None,
                        choices=["auto", "dinov2_vits14", "efficientnet_lite0", "efficientnet_lite2"])
    parser.add_argument("--weights", type=Path, default=None, help="backbone weights file")
    parser.add_argument("--data-root", type=Path, default=None, help="where the model is written (default: temp)")
    parser.add_argument("--pixel-side", type=int, default=256, help="side maps/masks are resized to (256)")
    parser.add_argument("--panel", type=Path, default=None,
                        help="write a PNG panel of heatmaps there (one category: that path; several: "
                             "<stem>-<category><suffix>)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON report to this file")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="NAME=VALUE",
                        help="an engine setting (field name, e.g. aggregation=1 or feature_levels=4,8,16); repeatable")
    parser.add_argument("--versus", action="append", default=None, metavar="NAME=VALUE",
                        help="also fit and score a reference engine with this setting changed (repeatable; on top "
                             "of the environment and the options above, not --set); prints the latency ratio")
    parser.add_argument("--verbose", action="store_true", help="engine logs on stderr")
    return parser


def _panel_path(panel: Path | None, category: Path, several: bool) -> Path | None:
    if panel is None or not several:
        return panel
    return panel.with_name(f"{panel.stem}-{category.name}{panel.suffix}")


def _pairs(items: Sequence[str]) -> dict[str, str]:
    """NAME=VALUE strings -> {NAME: VALUE}; values stay text, the settings object converts them."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"expected NAME=VALUE, got {item!r}")
        out[name.strip()] = value.strip()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    from engine.errors import EngineError

    _quiet_logs(args.verbose)
    several = len(args.categories) > 1
    reports = []
    try:
        for category in args.categories:
            reports.append(evaluate(
                category, max_train=args.max_train, input_size=args.input_size,
                coreset_ratio=args.coreset_ratio, backbone=args.backbone, weights=args.weights,
                data_root=args.data_root, pixel_side=args.pixel_side,
                panel=_panel_path(args.panel, category, several), settings=_pairs(args.settings),
                versus=None if args.versus is None else _pairs(args.versus),
            ))
    except (FileNotFoundError, ValueError, EngineError) as exc:   # pydantic's ValidationError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # one category: the report itself (as before); several: {"categories": [...]}
    document = reports[0].as_dict() if not several else {"categories": [r.as_dict() for r in reports]}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(document, indent=1), encoding="utf-8")
    if args.json:
        print(json.dumps(document))
    else:
        print("\n\n".join(format_report(r) for r in reports))
        if several or args.versus is not None:
            print("\n" + format_summary(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
