"""Every op of the ZeroMQ door against the real engine, on real MVTec AD bottle images (small).

One server for the module (tcp://127.0.0.1, random port, progress events on). Models:
``a`` (8 images, calibrated with real OK/NG scores), ``b`` (40 images, fitted while other
clients poll health and infer on ``a``; left uncalibrated), ``ds`` (fitted from uploaded samples).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import cv2
import numpy as np
import pytest

from engine.api import Engine
from engine.schemas import CalibrationResult, FitResult, InferResult
from ipc import EngineClient, IpcServer, RemoteError, array_from_wire
from service.serve import ServeConfig
from tests.support import MVTEC_BOTTLE, load_bgr, png_bytes

SIZE = 128           # ROI side sent over the wire (the files are 900 x 900)
MMPP = 0.1
ROLE = "top"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (MVTEC_BOTTLE / "train" / "good").is_dir(),
                       reason=f"MVTec AD bottle images not found at {MVTEC_BOTTLE}"),
]


class _Events:
    """Collects progress events in a thread while a block runs."""

    def __init__(self, client: EngineClient, endpoint: str) -> None:
        self.items: list[dict[str, Any]] = []
        self._thread = threading.Thread(target=self._collect, args=(client, endpoint), daemon=True)

    def _collect(self, client: EngineClient, endpoint: str) -> None:
        for event in client.progress(endpoint, timeout=1.5):
            self.items.append(event)

    def __enter__(self) -> _Events:
        self._thread.start()
        time.sleep(0.3)            # the SUB connection must be up before the first event
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join(10)


@pytest.fixture(scope="module")
def images() -> dict[str, list[np.ndarray]]:
    return {
        "train": [load_bgr(p, SIZE) for p in sorted((MVTEC_BOTTLE / "train" / "good").glob("*.png"))[:48]],
        "good": [load_bgr(p, SIZE) for p in sorted((MVTEC_BOTTLE / "test" / "good").glob("*.png"))[:2]],
        "broken": [load_bgr(p, SIZE) for p in sorted((MVTEC_BOTTLE / "test" / "broken_large").glob("*.png"))[:3]],
    }


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> ServeConfig:
    return ServeConfig.of(data_root=tmp_path_factory.mktemp("ipc_engine"), input_size=SIZE,
                    backbone="efficientnet_lite0", coreset_ratio=0.1, zmq_endpoint="tcp://127.0.0.1:*",
                    zmq_events="tcp://127.0.0.1:*", zmq_workers=2)


@pytest.fixture(scope="module")
def engine(settings: ServeConfig) -> Iterator[Engine]:
    eng = Engine(settings.engine)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def server(engine: Engine, settings: ServeConfig) -> Iterator[IpcServer]:
    srv = IpcServer(engine, settings.ipc)
    srv.start()
    yield srv
    srv.stop(timeout=30)


@pytest.fixture(scope="module")
def client(server: IpcServer) -> Iterator[EngineClient]:
    with EngineClient(server.endpoint, timeout=60, long_timeout=300) as c:
        yield c


@pytest.fixture(scope="module")
def fit_a(client: EngineClient, images: dict[str, list[np.ndarray]]) -> FitResult:
    return client.fit_ok(ROLE, "a", MMPP, [png_bytes(i) for i in images["train"][:8]], operator_id="op1")


@pytest.fixture(scope="module")
def calib_a(client: EngineClient, fit_a: FitResult, images: dict[str, list[np.ndarray]]) -> CalibrationResult:
    ng = [client.infer(ROLE, "a", MMPP, png_bytes(i), allow_uncalibrated=True, heatmap="none").score
          for i in images["broken"]]
    return client.calibrate_ng(ROLE, "a", MMPP, list(fit_a.ok_scores), ng)


@pytest.fixture(scope="module")
def fit_b_under_load(server: IpcServer, client: EngineClient, calib_a: CalibrationResult,
                     images: dict[str, list[np.ndarray]]) -> dict[str, Any]:
    """Fit 40 images on ``b`` in one client while two others poll health and infer on ``a``."""
    out: dict[str, Any] = {}
    payload = [png_bytes(i) for i in images["train"][8:48]]

    def fit() -> None:
        with EngineClient(server.endpoint, long_timeout=300) as fitter:
            try:
                out["fit"] = fitter.fit_ok(ROLE, "b", MMPP, payload, request_id="fit-b")
            except Exception as exc:  # reported by the tests, not lost in the thread
                out["fit"] = exc

    health_ms: list[float] = []
    infers: list[InferResult] = []
    with _Events(client, server.events_endpoint or "") as events, \
            EngineClient(server.endpoint, timeout=10) as poller, EngineClient(server.endpoint, timeout=60) as other:
        worker = threading.Thread(target=fit)
        worker.start()
        time.sleep(0.2)                       # let the fit request reach the engine
        while worker.is_alive():
            t0 = time.perf_counter()
            poller.health()
            health_ms.append((time.perf_counter() - t0) * 1e3)
            if len(health_ms) % 25 == 1:        # from the first poll on: a fast machine fits 40 images quickly
                infers.append(other.infer(ROLE, "a", MMPP, png_bytes(images["good"][0]), heatmap="none"))
            time.sleep(0.002)
        worker.join()
    out.update(health_ms=health_ms, infers=infers, events=events.items)
    return out


# -- fit, calibrate, infer -----------------------------------------------------------------------


def test_fit_ok_round_trip(fit_a: FitResult) -> None:
    assert (fit_a.role_id, fit_a.roi_id, fit_a.n_images) == (ROLE, "a", 8)
    assert fit_a.coreset_size > 0 and fit_a.n_embeddings >= fit_a.coreset_size
    assert len(fit_a.ok_scores) == 8 and len(fit_a.token_shape) == 2


def test_calibrate_ng_round_trip(calib_a: CalibrationResult, fit_a: FitResult) -> None:
    assert (calib_a.n_ok, calib_a.n_ng) == (8, 3)
    assert calib_a.method == "ok_ng_midpoint" and calib_a.threshold > 0
    assert calib_a.model_version == fit_a.model_version


def test_infer_encoded_and_raw_buffer_agree(client: EngineClient, calib_a: CalibrationResult,
                                            images: dict[str, list[np.ndarray]]) -> None:
    img = images["broken"][0]
    by_png = client.infer(ROLE, "a", MMPP, png_bytes(img))
    rgb = np.ascontiguousarray(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))   # raw buffers are RGB
    by_raw = client.infer(ROLE, "a", MMPP, rgb)                        # sent as a raw buffer, no decode
    assert by_png.threshold == pytest.approx(calib_a.threshold)
    assert by_png.image_shape == by_raw.image_shape == (SIZE, SIZE)
    assert by_raw.score == pytest.approx(by_png.score, rel=1e-5)
    assert by_png.decision in ("ok", "ng") and by_png.heatmap_png is not None
    heat = cv2.imdecode(np.frombuffer(by_png.heatmap_png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert heat.shape[:2] == (SIZE, SIZE)
    grey = np.ascontiguousarray(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY))  # a 2-D raw buffer is an image too
    assert client.infer(ROLE, "a", MMPP, grey, heatmap="none").image_shape == (SIZE, SIZE)


@pytest.mark.parametrize("fmt", ["none", "uint8", "float32"])
def test_infer_heatmap_forms(client: EngineClient, calib_a: CalibrationResult,
                             images: dict[str, list[np.ndarray]], fmt: str) -> None:
    res = client.infer(ROLE, "a", MMPP, png_bytes(images["broken"][1]), heatmap=fmt)
    assert res.heatmap_png is None
    if fmt == "none":
        assert res.heatmap_raw is None
        return
    assert res.heatmap_raw is not None
    heat = array_from_wire(res.heatmap_raw)
    assert heat.dtype == np.dtype(fmt) and heat.shape == (SIZE, SIZE)
    assert np.isfinite(heat.astype(np.float64)).all() and heat.max() > 0


def test_infer_with_a_shape(client: EngineClient, calib_a: CalibrationResult,
                            images: dict[str, list[np.ndarray]]) -> None:
    png = png_bytes(images["good"][1])
    circle = {"kind": "circle", "cx": SIZE / 2, "cy": SIZE / 2, "r": SIZE / 3}
    assert client.infer(ROLE, "a", MMPP, png, circle, heatmap="none").score >= 0
    with pytest.raises(RemoteError) as info:
        client.infer(ROLE, "a", MMPP, png, {"kind": "circle", "cx": 1, "cy": 1, "r": -5})
    assert info.value.status == 400


def test_engine_errors_keep_their_status(client: EngineClient, calib_a: CalibrationResult,
                                         images: dict[str, list[np.ndarray]]) -> None:
    png = png_bytes(images["good"][0])
    cases = [
        (lambda: client.infer(ROLE, "missing", MMPP, png), 404, "model_not_found"),
        (lambda: client.infer(ROLE, "a", MMPP * 2, png), 409, "mm_per_px_mismatch"),
        (lambda: client.infer(ROLE, "a", MMPP, b"not an image"), 400, "invalid_image"),
        (lambda: client.state(ROLE, "../etc"), 400, "invalid_id"),
    ]
    for call, status, code in cases:
        with pytest.raises(RemoteError) as info:
            call()
        assert (info.value.status, info.value.code) == (status, code)


# -- concurrency and progress --------------------------------------------------------------------


def test_health_stays_fast_during_a_fit(fit_b_under_load: dict[str, Any]) -> None:
    fit = fit_b_under_load["fit"]
    assert isinstance(fit, FitResult) and fit.n_images == 40
    ms = fit_b_under_load["health_ms"]
    assert len(ms) >= 10, f"the fit was too short to measure ({len(ms)} health calls)"
    assert float(np.percentile(ms, 99)) < 50.0, f"health p99 {np.percentile(ms, 99):.1f} ms over {len(ms)} calls"


def test_infer_on_another_roi_runs_during_a_fit(fit_b_under_load: dict[str, Any]) -> None:
    assert fit_b_under_load["infers"], "no infer completed while the fit ran"
    assert all(r.roi_id == "a" and r.threshold is not None for r in fit_b_under_load["infers"])


def test_fit_publishes_progress(fit_b_under_load: dict[str, Any]) -> None:
    events = [e for e in fit_b_under_load["events"] if e["id"] == "fit-b"]
    assert events, "no progress event for the fit"
    assert {e["op"] for e in events} == {"fit_ok"}
    assert all(e["role_id"] == ROLE and e["roi_id"] == "b" for e in events)
    assert all(isinstance(e["stage"], str) and 0 <= e["done"] <= e["total"] for e in events)


def test_uncalibrated_model_is_428_unless_allowed(client: EngineClient, fit_b_under_load: dict[str, Any],
                                                  images: dict[str, list[np.ndarray]]) -> None:
    png = png_bytes(images["good"][0])
    with pytest.raises(RemoteError) as info:
        client.infer(ROLE, "b", MMPP, png)
    assert (info.value.status, info.value.code) == (428, "calibration_missing")
    raw = client.infer(ROLE, "b", MMPP, png, allow_uncalibrated=True)
    assert raw.threshold is None and raw.score >= 0


# -- model bookkeeping ---------------------------------------------------------------------------


def test_state_manifest_list_delete(client: EngineClient, calib_a: CalibrationResult,
                                    fit_b_under_load: dict[str, Any]) -> None:
    state = client.state(ROLE, "a")
    assert state.memory_fitted and state.calib_present
    assert state.threshold == pytest.approx(calib_a.threshold)
    manifest = client.manifest(ROLE, "a")
    assert isinstance(manifest, dict) and manifest
    listed = {(m.role_id, m.roi_id) for m in client.list_models()}
    assert {(ROLE, "a"), (ROLE, "b")} <= listed
    assert client.delete_model(ROLE, "b").deleted is True
    assert (ROLE, "b") not in {(m.role_id, m.roi_id) for m in client.list_models()}
    with pytest.raises(RemoteError) as info:
        client.infer(ROLE, "b", MMPP, png_bytes(np.zeros((SIZE, SIZE, 3), np.uint8)),
                     allow_uncalibrated=True)
    assert info.value.status == 404


# -- datasets ------------------------------------------------------------------------------------


def test_dataset_ops_round_trip(server: IpcServer, client: EngineClient,
                                images: dict[str, list[np.ndarray]]) -> None:
    roi = "ds"
    ok_png = [png_bytes(i) for i in images["train"][:5]]
    ng_png = [png_bytes(i) for i in images["broken"][:2]]
    sent_meta = {"operator": "op1", "shift": 2, "tags": ["a", "b"]}
    uploads = [client.dataset_upload(ROLE, roi, "ok", p, f"ok_{n}.png", sent_meta) for n, p in enumerate(ok_png)]
    uploads += [client.dataset_upload(ROLE, roi, "ng", p, f"ng_{n}.png") for n, p in enumerate(ng_png)]
    assert [u.bytes for u in uploads] == [len(p) for p in ok_png + ng_png]

    listing = client.dataset_list(ROLE, roi)
    assert (listing.classes["ok"].count, listing.classes["ng"].count) == (5, 2)
    first = uploads[0]
    assert client.dataset_file(ROLE, roi, "ok", first.filename) == ok_png[0]
    meta = client.dataset_meta(ROLE, roi, "ok", first.filename)
    assert {k: meta[k] for k in sent_meta} == sent_meta

    with _Events(client, server.events_endpoint or "") as events:
        fit = client.fit_ok(ROLE, roi, MMPP, use_dataset=True, request_id="ds-fit")
        calib = client.calibrate_dataset(ROLE, roi, MMPP, request_id="ds-cal")
        report = client.infer_dataset(ROLE, roi, MMPP, include_heatmap=True, request_id="ds-inf")
    assert fit.n_images == 5
    assert (calib.n_ok, calib.n_ng) == (5, 2)
    assert report.n_total == 7 and report.n_errors == 0
    assert all(item.score is not None and item.heatmap_png for item in report.items)
    seen = {e["op"] for e in events.items if e["id"] in ("ds-fit", "ds-cal", "ds-inf")}
    assert {"fit_ok", "calibrate_dataset", "infer_dataset"} <= seen

    assert client.dataset_delete(ROLE, roi, "ng", uploads[-1].filename).removed == 1
    with pytest.raises(RemoteError) as info:
        client.dataset_file(ROLE, roi, "ng", uploads[-1].filename)
    assert (info.value.status, info.value.code) == (404, "sample_not_found")
    assert client.dataset_clear(ROLE, roi, "ng").removed == 1
    assert client.dataset_clear(ROLE, roi).removed == 5
    assert client.dataset_list(ROLE, roi).classes["ok"].count == 0
    assert client.delete_model(ROLE, roi).deleted is True


# -- shutdown ------------------------------------------------------------------------------------


def test_stop_finishes_the_running_fit_and_refuses_the_queued(
    engine: Engine, settings: ServeConfig, client: EngineClient, images: dict[str, list[np.ndarray]]
) -> None:
    before = {t for t in threading.enumerate() if t.name.startswith("ipc-")}
    srv = IpcServer(engine, settings.ipc.model_copy(update={"zmq_workers": 1}))
    srv.start()
    out: dict[str, Any] = {}
    payload = [png_bytes(i) for i in images["train"][:40]]

    def call(name: str, fn: Any) -> None:
        with EngineClient(srv.endpoint, timeout=60, long_timeout=300, retries=0) as c:
            try:
                out[name] = fn(c)
            except Exception as exc:
                out[name] = exc

    fit = threading.Thread(target=call, args=("fit", lambda c: c.fit_ok(ROLE, "stop", MMPP, payload,
                                                                        request_id="fit-stop")))
    queued = threading.Thread(target=call, args=("state", lambda c: c.state(ROLE, "a")))
    with _Events(client, srv.events_endpoint or "") as events:
        fit.start()
        deadline = time.monotonic() + 30
        while not any(e["id"] == "fit-stop" for e in events.items) and time.monotonic() < deadline:
            time.sleep(0.005)                    # the one worker is now inside the fit
        queued.start()
        time.sleep(0.1)                          # the state request waits in the queue
        srv.stop(timeout=120)
        fit.join(10)
        queued.join(10)
    assert isinstance(out["fit"], FitResult) and out["fit"].n_images == 40
    assert isinstance(out["state"], RemoteError)
    assert (out["state"].status, out["state"].code) == (503, "shutting_down")
    assert {t for t in threading.enumerate() if t.name.startswith("ipc-")} == before
    assert client.delete_model(ROLE, "stop").deleted is True


def test_infer_batch_matches_single_infers(client: EngineClient, calib_a: CalibrationResult,
                                           images: dict[str, list[np.ndarray]]) -> None:
    broken, good = images["broken"][0], images["good"][0]
    raw_rgb = np.ascontiguousarray(good[:, :, ::-1])
    batch = client.infer_batch(ROLE, [
        {"roi_id": "a", "image": png_bytes(broken), "mm_per_px": MMPP},
        {"roi_id": "a", "image": raw_rgb, "mm_per_px": MMPP, "shape": {"kind": "circle", "cx": 64, "cy": 64, "r": 60}},
        {"roi_id": "missing", "image": png_bytes(good), "mm_per_px": MMPP},
    ])
    assert (batch.n_total, batch.n_errors) == (3, 1)
    first, second, third = batch.items
    single = client.infer(ROLE, "a", MMPP, png_bytes(broken), heatmap="none")
    assert first.result is not None and abs(first.result.score - single.score) < 1e-4
    assert first.result.decision == single.decision == "ng"
    circle = client.infer(ROLE, "a", MMPP, raw_rgb, {"kind": "circle", "cx": 64, "cy": 64, "r": 60}, heatmap="none")
    assert second.result is not None and abs(second.result.score - circle.score) < 1e-4
    assert third.result is None and third.error is not None
    assert (third.error.status, third.error.code) == (404, "model_not_found")
