"""Region explanations, the inspection history and the drift op, on the real engine (EfficientNet-
Lite0 at 112 px, real MVTec AD bottles) and through both doors (real ZeroMQ, real uvicorn).

Models: ``top/ds`` (10 stored OK samples, calibrated on real OK/NG scores), ``top/sent`` (6 images
sent with the fit), ``top/old`` (``ds`` stored again without row sources, as older models are).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
import pytest

from engine.api import Engine
from engine.errors import ImageNotKept, InvalidInput
from engine.images import resize_square
from engine.monitor import _thumbnails
from engine.settings import Settings
from engine.storage import SOURCES
from tests.support import Doors, door_settings, load_bgr, png_bytes

SIDE = 224
INPUT = 112
MM = 0.1
ROLE = "top"


class World:
    def __init__(self, engine: Engine, train: list[Path], broken: list[Path], good: list[Path]) -> None:
        self.engine, self.broken, self.good = engine, broken, good
        self.names = [p.name for p in train[:10]]


def _png(path: Path) -> bytes:
    return png_bytes(load_bgr(path, SIDE))


def _calibrate(engine: Engine, roi: str, ok_scores: tuple[float, ...], broken: list[Path]) -> None:
    ng = [engine.infer(ROLE, roi, MM, _png(p), allow_uncalibrated=True).score for p in broken[:3]]
    engine.calibrate_ng(ROLE, roi, MM, list(ok_scores), ng)


@pytest.fixture(scope="module")
def world(bottle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("monitor")
    engine = Engine(Settings(data_root=root / "data", backbone="efficientnet_lite0", input_size=INPUT,
                             history_flush_interval_s=0.05))
    train = sorted((bottle_dir / "train" / "good").glob("*.png"))
    broken = sorted((bottle_dir / "test" / "broken_large").glob("*.png"))
    good = sorted((bottle_dir / "test" / "good").glob("*.png"))
    for path in train[:10]:
        engine.dataset_upload(ROLE, "ds", "ok", _png(path), path.name)
    fit = engine.fit_ok(ROLE, "ds", MM, use_dataset=True)
    _calibrate(engine, "ds", fit.ok_scores, broken)
    sent = engine.fit_ok(ROLE, "sent", MM, [_png(p) for p in train[10:16]])
    _calibrate(engine, "sent", sent.ok_scores, broken)
    store = engine.models.store(None)
    files = store.load(ROLE, "ds")
    old = {k: v for k, v in files.manifest.items() if k not in ("training_images", "files", "manifest_sha256")}
    store.save(ROLE, "old", {**old, "roi_id": "old"}, files.embeddings, files.index_bytes, files.calibration)
    yield World(engine, train, broken, good)
    engine.close()


def _features(engine: Engine, png: bytes) -> np.ndarray:
    rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return engine.extractor([resize_square(rgb, INPUT)])[0]


def test_each_defect_region_names_its_nearest_normal_patch(world: World) -> None:
    engine = world.engine
    folder = engine.models.store(None).model_dir(ROLE, "ds")
    bank, origins = np.load(folder / "embeddings.npy"), np.load(folder / SOURCES)
    assert origins.shape == (len(bank), 3) and origins.dtype == np.int32
    for path in world.broken[3:7]:
        png = _png(path)
        res = engine.infer(ROLE, "ds", MM, png, explain=True)
        assert res.decision == "ng" and res.regions
        features = _features(engine, png)
        for region in res.regions:
            e = region.explanation
            assert e is not None and e.known and e.source in world.names
            assert world.names.index(e.source) == e.image_index
            # the same nearest row as an independent brute-force search over the stored memory
            distances = np.sqrt(((bank - features[e.patch]) ** 2).sum(axis=1))
            row = int(np.argmin(distances))
            assert e.distance == pytest.approx(float(distances[row]), rel=1e-3)
            assert tuple(origins[row]) == (e.image_index, *e.source_patch)
            x, y, w, h = e.source_box
            assert w > 0 and h > 0 and 0 <= x and x + w <= SIDE and 0 <= y and y + h <= SIDE
            rx, ry, rw, rh = region.bbox
            bx, by, bw, bh = e.box                  # the hottest patch lies on the region
            assert bx < rx + rw and rx < bx + bw and by < ry + rh and ry < by + bh


def test_explain_patch_crops_the_stored_sample(world: World) -> None:
    engine = world.engine
    res = engine.infer(ROLE, "ds", MM, _png(world.broken[3]), explain=True)
    e = res.regions[0].explanation
    assert e is not None and e.image_index is not None and e.source_patch is not None
    crop = engine.monitor.explain_patch(ROLE, "ds", e.image_index, *e.source_patch)
    assert crop.source == e.source and crop.source_box == e.source_box
    image = cv2.imdecode(np.frombuffer(crop.png, np.uint8), cv2.IMREAD_COLOR)
    stored = cv2.imdecode(np.frombuffer(engine.dataset_file(ROLE, "ds", "ok", crop.source), np.uint8),
                          cv2.IMREAD_COLOR)
    x, y, w, h = crop.crop_box
    assert image.shape[:2] == (h, w)
    assert np.array_equal(image, stored[y:y + h, x:x + w])
    sx, sy, sw, sh = crop.source_box              # the patch, with context around it
    assert x <= sx and y <= sy and sx + sw <= x + w and sy + sh <= y + h
    with pytest.raises(InvalidInput):
        engine.monitor.explain_patch(ROLE, "ds", 99, 0, 0)


def test_explanations_only_when_asked(world: World) -> None:
    res = world.engine.infer(ROLE, "ds", MM, _png(world.broken[4]))
    assert res.regions and all(region.explanation is None for region in res.regions)
    assert all("explanation" not in region for region in res.model_dump()["regions"])


def test_images_sent_with_the_fit_are_named_by_index_but_not_kept(world: World) -> None:
    engine = world.engine
    # the 6-image model's clearest find (its threshold sits close to the milder breaks)
    res = max((engine.infer(ROLE, "sent", MM, _png(path), explain=True) for path in world.broken[3:8]),
              key=lambda r: r.score)
    assert res.decision == "ng"
    e = res.regions[0].explanation
    assert e is not None and e.known and e.source is None and e.image_index is not None and 0 <= e.image_index < 6
    assert e.source_patch is not None
    with pytest.raises(ImageNotKept) as info:
        engine.monitor.explain_patch(ROLE, "sent", e.image_index, *e.source_patch)
    assert info.value.status == 404 and "did not keep" in info.value.message


def test_a_model_without_row_sources_still_scores_and_says_so(world: World) -> None:
    engine = world.engine
    assert not (engine.models.store(None).model_dir(ROLE, "old") / SOURCES).exists()
    res = engine.infer(ROLE, "old", MM, _png(world.broken[5]), explain=True)
    same = engine.infer(ROLE, "ds", MM, _png(world.broken[5]), explain=True)
    assert res.score == pytest.approx(same.score, rel=1e-5)
    e = res.regions[0].explanation
    assert e is not None and not e.known and e.source is None and e.image_index is None and e.distance > 0


def test_history_records_inspections_and_answers_queries(world: World) -> None:
    engine, roi = world.engine, "ds"
    engine.monitor.flush()
    before = engine.monitor.history(ROLE, roi, limit=1_000).n
    decisions = []
    for i, path in enumerate([*world.good[:4], *world.broken[:2]]):
        decisions.append(engine.infer(ROLE, roi, MM, _png(path), operator_id=f"op{i}").decision)
    batch = engine.infer_batch(ROLE, [{"roi_id": roi, "image": _png(world.good[4]), "mm_per_px": MM}])
    assert batch.n_errors == 0
    engine.monitor.flush()
    found = engine.monitor.history(ROLE, roi, limit=1_000)
    assert found.n == before + 7 and found.dropped == 0 and found.enabled
    newest = found.items[:7]
    assert [item.operator_id for item in newest] == [None, "op5", "op4", "op3", "op2", "op1", "op0"]
    assert [item.decision for item in newest[1:]] == decisions[::-1]
    assert all(a.time >= b.time for a, b in zip(found.items, found.items[1:], strict=False))
    ng = engine.monitor.history(ROLE, roi, decision="ng", limit=1_000)
    assert ng.n >= 2 and all(item.decision == "ng" and item.n_regions > 0 and item.boxes for item in ng.items)
    window = engine.monitor.history(ROLE, roi, since=newest[4].time, until=newest[1].time)
    assert [item.id for item in window.items] == [item.id for item in newest[1:5]]
    shot = engine.monitor.history(ROLE, roi, limit=1, thumbnails=True).items[0]
    assert shot.thumbnail_jpeg is not None and shot.heatmap_png is not None
    thumb = cv2.imdecode(np.frombuffer(shot.thumbnail_jpeg, np.uint8), cv2.IMREAD_COLOR)
    heat = cv2.imdecode(np.frombuffer(shot.heatmap_png, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert thumb.shape[:2] == heat.shape[:2] == (64, 64)
    assert engine.monitor.history(ROLE, roi, limit=1).items[0].thumbnail_jpeg is None
    with pytest.raises(InvalidInput):
        engine.monitor.history(ROLE, roi, limit=0)


@pytest.mark.parametrize(("side", "roi_shape"), [(224, (900, 900)), (416, (900, 900)), (224, (300, 900))])
def test_thumbnails_follow_the_image_and_map(side: int, roi_shape: tuple[int, int]) -> None:
    """The history thumbnails (halvings, then a short step) match a plain area downscale of the
    model's input and a linear one of the map, at the ROI's aspect."""
    rng = np.random.default_rng(side)
    noise = cv2.GaussianBlur(rng.integers(0, 256, (side, side, 3), dtype=np.uint8), (0, 0), 2)
    image = cv2.normalize(noise, None, 0, 255, cv2.NORM_MINMAX)     # texture a nearest step would alias (~17-22 off)
    yy, xx = np.mgrid[0:roi_shape[0], 0:roi_shape[1]].astype(np.float32)
    amap = 10.0 * np.exp(-((yy - 150) ** 2 + (xx - 400) ** 2) / 2e4).astype(np.float32)
    inspection = SimpleNamespace(roi=SimpleNamespace(resized=image), amap=amap,
                                 result=SimpleNamespace(image_shape=roi_shape, heatmap_scale=5.0))
    thumb, heat = _thumbnails(inspection)
    size = (64, round(64 * roi_shape[0] / roi_shape[1]))
    assert thumb.shape == (size[1], size[0], 3) and heat.shape == (size[1], size[0])
    reference = cv2.cvtColor(cv2.resize(image, size, interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2BGR)
    assert np.abs(thumb.astype(np.int16) - reference).mean() < 10.0
    assert not np.array_equal(thumb, cv2.cvtColor(reference, cv2.COLOR_BGR2RGB))   # channels as OpenCV writes them
    expected = np.clip(cv2.resize(amap, size, interpolation=cv2.INTER_AREA) * (128.0 / 5.0), 0, 255)
    assert np.abs(heat.astype(np.float32) - expected).max() <= 3.0


def test_stored_sample_scoring_is_not_an_inspection(world: World) -> None:
    engine = world.engine
    engine.monitor.flush()
    before = engine.monitor.history(ROLE, "ds", limit=1_000).n
    engine.infer_dataset(ROLE, "ds")
    engine.monitor.flush()
    assert engine.monitor.history(ROLE, "ds", limit=1_000).n == before


@pytest.fixture(scope="module")
def doors(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Doors]:
    config = door_settings(tmp_path_factory.mktemp("doors"))
    with Doors(world.engine, config) as d:
        yield d


def _post_infer(doors: Doors, roi: str, png: bytes, request_id: str, **fields: str) -> dict[str, Any]:
    r = doors.web.post("/infer", headers={"X-Request-Id": request_id},
                       data={"role_id": ROLE, "roi_id": roi, "mm_per_px": str(MM), **fields},
                       files={"image": ("roi.png", png, "image/png")})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def test_both_doors_record_with_the_request_id_and_query_the_history(world: World, doors: Doors) -> None:
    _post_infer(doors, "ds", _png(world.good[5]), "http-req-1", operator_id="web-op")
    doors.zmq.call("infer", {"role_id": ROLE, "roi_id": "ds", "mm_per_px": MM, "image": _png(world.good[6]),
                             "operator_id": "zmq-op", "heatmap": "none"}, request_id="zmq-req-1")
    world.engine.monitor.flush()
    status, body = doors.http_answer("GET", "/history", params={"role_id": ROLE, "roi_id": "ds", "limit": 2,
                                                                "thumbnails": "true"})
    assert status == 200
    assert [(i["request_id"], i["operator_id"]) for i in body["items"]] == [("zmq-req-1", "zmq-op"),
                                                                            ("http-req-1", "web-op")]
    assert base64.b64decode(body["items"][0]["heatmap_png_base64"]).startswith(b"\x89PNG")
    result = doors.zmq.call("history", {"role_id": ROLE, "roi_id": "ds", "limit": 2,
                                        "since": body["items"][1]["time"]})
    assert [i["request_id"] for i in result["items"]] == ["zmq-req-1", "http-req-1"]
    typed = doors.zmq.history(ROLE, "ds", until=body["items"][1]["time"], limit=1, thumbnails=True)
    assert typed.items[0].request_id == "http-req-1" and typed.items[0].thumbnail_jpeg is not None
    assert "thumbnail_jpeg_base64" not in doors.http_answer("GET", "/history", params={
        "role_id": ROLE, "roi_id": "ds", "limit": 1})[1]["items"][0]
    status, body = doors.http_answer("GET", "/history", params={"role_id": ROLE, "roi_id": "ds", "limit": 0})
    assert status == 400 and body["code"] == "invalid_input"
    assert doors.zmq_answer("history", {"role_id": ROLE, "roi_id": "ds", "decision": "maybe"})[0] == 400


def test_both_doors_report_drift_and_explain(world: World, doors: Doors) -> None:
    status, web = doors.http_answer("GET", "/drift", params={"role_id": ROLE, "roi_id": "ds"})
    zmq = doors.zmq.drift(ROLE, "ds").model_dump()
    assert status == 200 and web["state"] == zmq["state"] and web["n_window"] == zmq["n_window"] > 0
    assert web["model_version"] == zmq["model_version"] == 1 and web["window"] == 200
    assert doors.http_answer("GET", "/drift", params={"role_id": ROLE, "roi_id": "nothing"})[0] == 404
    body = _post_infer(doors, "ds", _png(world.broken[6]), "http-explain", explain="true")
    e = body["regions"][0]["explanation"]
    assert e["known"] and e["source"] in world.names
    plain = _post_infer(doors, "ds", _png(world.broken[6]), "http-plain")
    assert "explanation" not in plain["regions"][0]
    r = doors.web.get("/explain_patch", params={"role_id": ROLE, "roi_id": "ds", "image_index": e["image_index"],
                                                "patch_row": e["source_patch"][0], "patch_col": e["source_patch"][1]})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-source"] == e["source"] and cv2.imdecode(np.frombuffer(r.content, np.uint8), 1) is not None
    crop = doors.zmq.call("explain_patch", {"role_id": ROLE, "roi_id": "ds", "image_index": e["image_index"],
                                            "patch_row": e["source_patch"][0], "patch_col": e["source_patch"][1]})
    assert crop["png"] == r.content
    result = doors.zmq.infer(ROLE, "sent", MM, _png(world.broken[6]), heatmap="none", explain=True)
    e = result.regions[0].explanation.model_dump()                               # type: ignore[union-attr]
    status, body = doors.http_answer("GET", "/explain_patch", params={
        "role_id": ROLE, "roi_id": "sent", "image_index": e["image_index"], "patch_row": 0, "patch_col": 0})
    assert status == 404 and body["code"] == "image_not_kept"
    assert doors.zmq_answer("explain_patch", {"role_id": ROLE, "roi_id": "sent", "image_index": e["image_index"],
                                              "patch_row": 0, "patch_col": 0}) == (404, "image_not_kept")


def test_an_unreadable_history_file_never_stops_inspections(tmp_path: Path, bottle_dir: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    (root / "history.sqlite").write_bytes(b"this is no database" * 100)
    engine = Engine(Settings(data_root=root, backbone="efficientnet_lite0", input_size=64))
    try:
        images = [png_bytes(load_bgr(p, 64)) for p in sorted(bottle_dir.glob("train/good/00[0-2].png"))]
        engine.fit_ok(ROLE, "cap", MM, images)
        res = engine.infer(ROLE, "cap", MM, images[0], allow_uncalibrated=True)
        assert res.score > 0
        found = engine.monitor.history(ROLE, "cap")
        assert not found.enabled and found.n == 0
        assert "unavailable" in engine.monitor.drift(ROLE, "cap").reason
    finally:
        engine.close()
