"""A Python client for the ZeroMQ door: one typed method per op, a lazy-pirate REQ socket.

After a timeout the REQ socket is closed (linger 0) and reopened; idempotent ops are sent again
up to ``retries`` times, the others (fit, calibrations, uploads, deletes) never are, since the
engine may have done them. Then :class:`EngineUnavailable` is raised. An ``ok: false`` reply
raises :class:`RemoteError` with the server's ``status``, ``code`` and ``message``.

One client serves one thread at a time (calls from several threads are serialized).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import zmq
from pydantic import BaseModel

from engine.schemas import (
    ActivateResult,
    AddOkResult,
    CalibrationResult,
    DatasetClearResult,
    DatasetListing,
    DatasetSample,
    DeleteResult,
    DriftResult,
    ExplainPatchResult,
    ExportResult,
    FitResult,
    HealthResult,
    HeatmapFormat,
    HistoryResult,
    ImportResult,
    InferBatchResult,
    InferDatasetResult,
    InferResult,
    MarkResult,
    ModelSummary,
    StateResult,
    VersionsResult,
)
from ipc.errors import EngineUnavailable, RemoteError
from ipc.protocol import OPS, PROTOCOL_VERSION, array_to_wire, pack, unpack

__all__ = ["EngineClient"]

Image = bytes | bytearray | memoryview | np.ndarray


def _image(value: Image) -> Any:
    if isinstance(value, np.ndarray):
        return array_to_wire(value)          # raw pixels: the server does no decode
    return bytes(value)


class EngineClient:
    """Calls the engine over ZeroMQ. Use as a context manager, or call ``close()``.

    Args:
        endpoint: the server's endpoint, e.g. ``tcp://127.0.0.1:5555``.
        api_key: sent with every request when the server has one set.
        timeout: seconds to wait for a reply to a short op.
        long_timeout: seconds to wait for ``fit_ok``, ``calibrate_dataset``, ``infer_dataset``.
        retries: extra attempts after a timeout, idempotent ops only.
    """

    def __init__(self, endpoint: str, *, api_key: str | None = None, timeout: float = 30.0,
                 long_timeout: float = 1800.0, retries: int = 2) -> None:
        self.endpoint = endpoint
        self._api_key = api_key
        self.timeout = timeout
        self.long_timeout = long_timeout
        self.retries = retries
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._sock: zmq.Socket[bytes] | None = None
        self._lock = threading.Lock()

    # -- plumbing ------------------------------------------------------------------------------

    def __enter__(self) -> EngineClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the socket (linger 0) and the client's own context. Idempotent."""
        with self._lock:
            self._reset()
            if not self._ctx.closed:
                self._ctx.term()

    def _reset(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def _socket(self) -> zmq.Socket[bytes]:
        if self._sock is None:
            if self._ctx.closed:
                raise RuntimeError("EngineClient is closed")
            sock = self._ctx.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            try:
                sock.connect(self.endpoint)
            except zmq.ZMQError as exc:
                sock.close(linger=0)
                raise ValueError(f"cannot connect to {self.endpoint!r}: {exc}") from exc
            self._sock = sock
        return self._sock

    def call(self, op: str, args: dict[str, Any] | None = None, *, timeout: float | None = None,
             request_id: str | None = None) -> dict[str, Any]:
        """Send one request and return its ``result`` map.

        Raises:
            RemoteError: the server replied ``ok: false``.
            EngineUnavailable: no reply in ``timeout`` s (after the retries allowed for ``op``).
        """
        info = OPS.get(op)
        if timeout is None:
            timeout = self.long_timeout if info is not None and info.long else self.timeout
        attempts = 1 + (self.retries if info is not None and info.idempotent else 0)
        req_id = request_id or uuid.uuid4().hex
        request: dict[str, Any] = {"v": PROTOCOL_VERSION, "op": op, "id": req_id}
        if self._api_key is not None:
            request["api_key"] = self._api_key   # before args: the server checks it before unpacking them
        request["args"] = {k: v for k, v in (args or {}).items() if v is not None}
        payload = pack(request)
        with self._lock:
            for _ in range(attempts):
                reply = self._exchange(payload, req_id, timeout)
                if reply is not None:
                    break
                self._reset()                 # a REQ socket that lost its reply cannot send again
            else:
                raise EngineUnavailable(
                    f"no reply from {self.endpoint} to {op!r} within {timeout:g} s "
                    f"({attempts} attempt{'s' if attempts > 1 else ''})")
        if not isinstance(reply, dict) or "ok" not in reply:
            raise RemoteError(0, "malformed_reply", f"the server sent {type(reply).__name__}, not a reply map")
        if not reply["ok"]:
            err = reply.get("error") or {}
            raise RemoteError(int(reply.get("status", 0)), str(err.get("code", "unknown")),
                              str(err.get("message", "")), req_id)
        return reply.get("result") or {}

    def _exchange(self, payload: bytes, req_id: str, timeout: float) -> Any | None:
        sock = self._socket()
        sock.send(payload)
        deadline = time.monotonic() + timeout
        while True:
            left_ms = int(max(0.0, deadline - time.monotonic()) * 1000)
            if not sock.poll(left_ms, zmq.POLLIN):
                return None
            try:
                reply = unpack(sock.recv())
            except ValueError as exc:
                raise RemoteError(0, "malformed_reply", str(exc)) from None
            if isinstance(reply, dict) and reply.get("id") not in (req_id, None):
                continue                      # not ours (cannot happen on a fresh REQ socket)
            return reply

    def progress(self, endpoint: str, *, timeout: float | None = None,
                 request_id: str | None = None) -> Iterator[dict[str, Any]]:
        """Yield progress events ``{op, id, role_id, roi_id, stage, done, total}`` from ``endpoint``.

        Ends when no event arrives for ``timeout`` s (None: never). Events published before the
        subscription is connected (a few ms) are not seen. Safe to iterate in another thread.
        """
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()   # its own, so close() never waits on it
        sub = ctx.socket(zmq.SUB)
        try:
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.connect(endpoint)
            while True:
                if not sub.poll(None if timeout is None else int(timeout * 1000), zmq.POLLIN):
                    return
                event = unpack(sub.recv())
                if isinstance(event, dict) and (request_id is None or event.get("id") == request_id):
                    yield event
        finally:
            sub.close(linger=0)
            ctx.term()

    # -- ops -----------------------------------------------------------------------------------

    def health(self, *, timeout: float | None = None) -> HealthResult:
        return HealthResult.model_validate(self.call("health", timeout=timeout))

    def fit_ok(self, role_id: str, roi_id: str, mm_per_px: float, images: Sequence[Image] | None = None, *,
               operator_id: str | None = None, memory_fit: bool = False, use_dataset: bool = False,
               recipe_id: str | None = None, timeout: float | None = None,
               request_id: str | None = None) -> FitResult:
        args = {"role_id": role_id, "roi_id": roi_id, "mm_per_px": mm_per_px,
                "images": None if images is None else [_image(i) for i in images],
                "operator_id": operator_id, "memory_fit": memory_fit, "use_dataset": use_dataset,
                "recipe_id": recipe_id}
        return FitResult.model_validate(self.call("fit_ok", args, timeout=timeout, request_id=request_id))

    def calibrate_ng(self, role_id: str, roi_id: str, mm_per_px: float, ok_scores: Sequence[float],
                     ng_scores: Sequence[float] | None = None, score_percentile: float | None = None,
                     area_mm2_thr: float | None = None, *, recipe_id: str | None = None,
                     timeout: float | None = None) -> CalibrationResult:
        args = {"role_id": role_id, "roi_id": roi_id, "mm_per_px": mm_per_px,
                "ok_scores": [float(s) for s in ok_scores],
                "ng_scores": None if ng_scores is None else [float(s) for s in ng_scores],
                "score_percentile": score_percentile, "area_mm2_thr": area_mm2_thr, "recipe_id": recipe_id}
        return CalibrationResult.model_validate(self.call("calibrate_ng", args, timeout=timeout))

    def infer(self, role_id: str, roi_id: str, mm_per_px: float, image: Image,
              shape: BaseModel | dict[str, Any] | str | None = None, *, operator_id: str | None = None,
              allow_uncalibrated: bool = False, heatmap: HeatmapFormat = "png", recipe_id: str | None = None,
              explain: bool = False, timeout: float | None = None) -> InferResult:
        if isinstance(shape, BaseModel):
            shape = shape.model_dump(mode="python")
        args = {"role_id": role_id, "roi_id": roi_id, "mm_per_px": mm_per_px, "image": _image(image),
                "shape": shape, "operator_id": operator_id, "allow_uncalibrated": allow_uncalibrated,
                "heatmap": heatmap, "recipe_id": recipe_id, **({"explain": True} if explain else {})}
        return InferResult.model_validate(self.call("infer", args, timeout=timeout))

    def infer_batch(self, role_id: str, items: list[dict[str, Any]], *, allow_uncalibrated: bool = False,
                    heatmap: HeatmapFormat = "none", recipe_id: str | None = None,
                    timeout: float | None = None) -> InferBatchResult:
        """Several ROIs of one part in one call; each item: roi_id, image, mm_per_px, shape?"""
        wire_items = []
        for item in items:
            shape = item.get("shape")
            if isinstance(shape, BaseModel):
                shape = shape.model_dump(mode="python")
            wire_items.append({**item, "image": _image(item["image"]), "shape": shape})
        args = {"role_id": role_id, "items": wire_items, "allow_uncalibrated": allow_uncalibrated,
                "heatmap": heatmap, "recipe_id": recipe_id}
        return InferBatchResult.model_validate(self.call("infer_batch", args, timeout=timeout))

    def state(self, role_id: str, roi_id: str, *, recipe_id: str | None = None,
              timeout: float | None = None) -> StateResult:
        args = {"role_id": role_id, "roi_id": roi_id, "recipe_id": recipe_id}
        return StateResult.model_validate(self.call("state", args, timeout=timeout))

    def manifest(self, role_id: str, roi_id: str, *, recipe_id: str | None = None,
                 timeout: float | None = None) -> dict[str, Any]:
        return self.call("manifest", {"role_id": role_id, "roi_id": roi_id, "recipe_id": recipe_id},
                         timeout=timeout)

    def list_models(self, *, recipe_id: str | None = None, timeout: float | None = None) -> list[ModelSummary]:
        items = self.call("list_models", {"recipe_id": recipe_id}, timeout=timeout)["items"]
        return [ModelSummary.model_validate(m) for m in items]

    def delete_model(self, role_id: str, roi_id: str, *, recipe_id: str | None = None,
                     timeout: float | None = None) -> DeleteResult:
        args = {"role_id": role_id, "roi_id": roi_id, "recipe_id": recipe_id}
        return DeleteResult.model_validate(self.call("delete_model", args, timeout=timeout))

    def dataset_upload(self, role_id: str, roi_id: str, label: str, image: bytes, filename: str | None = None,
                       meta: dict[str, Any] | None = None, *, recipe_id: str | None = None,
                       timeout: float | None = None) -> DatasetSample:
        args = {"role_id": role_id, "roi_id": roi_id, "label": label, "image": bytes(image),
                "filename": filename, "meta": meta, "recipe_id": recipe_id}
        return DatasetSample.model_validate(self.call("dataset_upload", args, timeout=timeout))

    def dataset_list(self, role_id: str, roi_id: str, *, recipe_id: str | None = None,
                     timeout: float | None = None) -> DatasetListing:
        args = {"role_id": role_id, "roi_id": roi_id, "recipe_id": recipe_id}
        return DatasetListing.model_validate(self.call("dataset_list", args, timeout=timeout))

    def dataset_file(self, role_id: str, roi_id: str, label: str, filename: str, *,
                     recipe_id: str | None = None, timeout: float | None = None) -> bytes:
        args = {"role_id": role_id, "roi_id": roi_id, "label": label, "filename": filename,
                "recipe_id": recipe_id}
        return bytes(self.call("dataset_file", args, timeout=timeout)["data"])

    def dataset_meta(self, role_id: str, roi_id: str, label: str, filename: str, *,
                     recipe_id: str | None = None, timeout: float | None = None) -> dict[str, Any]:
        args = {"role_id": role_id, "roi_id": roi_id, "label": label, "filename": filename,
                "recipe_id": recipe_id}
        return self.call("dataset_meta", args, timeout=timeout)

    def dataset_delete(self, role_id: str, roi_id: str, label: str, filename: str, *,
                       recipe_id: str | None = None, timeout: float | None = None) -> DatasetClearResult:
        args = {"role_id": role_id, "roi_id": roi_id, "label": label, "filename": filename,
                "recipe_id": recipe_id}
        return DatasetClearResult.model_validate(self.call("dataset_delete", args, timeout=timeout))

    def dataset_clear(self, role_id: str, roi_id: str, label: str | None = None, *,
                      recipe_id: str | None = None, timeout: float | None = None) -> DatasetClearResult:
        args = {"role_id": role_id, "roi_id": roi_id, "label": label, "recipe_id": recipe_id}
        return DatasetClearResult.model_validate(self.call("dataset_clear", args, timeout=timeout))

    def calibrate_dataset(self, role_id: str, roi_id: str, default_mm_per_px: float | None = None,
                          score_percentile: float | None = None, area_mm2_thr: float | None = None, *,
                          recipe_id: str | None = None, timeout: float | None = None,
                          request_id: str | None = None) -> CalibrationResult:
        args = {"role_id": role_id, "roi_id": roi_id, "default_mm_per_px": default_mm_per_px,
                "score_percentile": score_percentile, "area_mm2_thr": area_mm2_thr, "recipe_id": recipe_id}
        return CalibrationResult.model_validate(
            self.call("calibrate_dataset", args, timeout=timeout, request_id=request_id))

    def infer_dataset(self, role_id: str, roi_id: str, default_mm_per_px: float | None = None,
                      include_heatmap: bool = False, *, recipe_id: str | None = None,
                      timeout: float | None = None, request_id: str | None = None) -> InferDatasetResult:
        args = {"role_id": role_id, "roi_id": roi_id, "default_mm_per_px": default_mm_per_px,
                "include_heatmap": include_heatmap, "recipe_id": recipe_id}
        return InferDatasetResult.model_validate(
            self.call("infer_dataset", args, timeout=timeout, request_id=request_id))

    # -- model lifecycle (docs/lifecycle.md) -----------------------------------------------------

    def versions(self, role_id: str, roi_id: str, *, recipe_id: str | None = None,
                 timeout: float | None = None) -> VersionsResult:
        args = {"role_id": role_id, "roi_id": roi_id, "recipe_id": recipe_id}
        return VersionsResult.model_validate(self.call("versions", args, timeout=timeout))

    def activate(self, role_id: str, roi_id: str, version: int, *, recipe_id: str | None = None,
                 timeout: float | None = None) -> ActivateResult:
        args = {"role_id": role_id, "roi_id": roi_id, "version": version, "recipe_id": recipe_id}
        return ActivateResult.model_validate(self.call("activate", args, timeout=timeout))

    def add_ok(self, role_id: str, roi_id: str, images: Sequence[Image], mm_per_px: float | None = None, *,
               operator_id: str | None = None, recipe_id: str | None = None,
               timeout: float | None = None) -> AddOkResult:
        args = {"role_id": role_id, "roi_id": roi_id, "images": [_image(i) for i in images],
                "mm_per_px": mm_per_px, "operator_id": operator_id, "recipe_id": recipe_id}
        return AddOkResult.model_validate(self.call("add_ok", args, timeout=timeout))

    def mark_ok(self, role_id: str, roi_id: str, image: bytes, mm_per_px: float | None = None,
                shape: BaseModel | dict[str, Any] | str | None = None, *, operator_id: str | None = None,
                recipe_id: str | None = None, timeout: float | None = None) -> MarkResult:
        return self._mark("mark_ok", role_id, roi_id, image, mm_per_px, shape, operator_id, recipe_id, timeout)

    def mark_ng(self, role_id: str, roi_id: str, image: bytes, mm_per_px: float | None = None,
                shape: BaseModel | dict[str, Any] | str | None = None, *, operator_id: str | None = None,
                recipe_id: str | None = None, timeout: float | None = None) -> MarkResult:
        return self._mark("mark_ng", role_id, roi_id, image, mm_per_px, shape, operator_id, recipe_id, timeout)

    def _mark(self, op: str, role_id: str, roi_id: str, image: bytes, mm_per_px: float | None,
              shape: BaseModel | dict[str, Any] | str | None, operator_id: str | None, recipe_id: str | None,
              timeout: float | None) -> MarkResult:
        if isinstance(shape, BaseModel):
            shape = shape.model_dump(mode="python")
        args = {"role_id": role_id, "roi_id": roi_id, "image": bytes(image), "mm_per_px": mm_per_px,
                "shape": shape, "operator_id": operator_id, "recipe_id": recipe_id}
        return MarkResult.model_validate(self.call(op, args, timeout=timeout))

    def export_model(self, role_id: str, roi_id: str, version: int | None = None, *,
                     recipe_id: str | None = None, timeout: float | None = None) -> ExportResult:
        args = {"role_id": role_id, "roi_id": roi_id, "version": version, "recipe_id": recipe_id}
        return ExportResult.model_validate(self.call("export_model", args, timeout=timeout))

    def import_model(self, role_id: str, roi_id: str, archive: bytes, *, recipe_id: str | None = None,
                     timeout: float | None = None) -> ImportResult:
        args = {"role_id": role_id, "roi_id": roi_id, "archive": bytes(archive), "recipe_id": recipe_id}
        return ImportResult.model_validate(self.call("import_model", args, timeout=timeout))
    # -- observability (docs/observability.md) ---------------------------------------------------

    def history(self, role_id: str, roi_id: str, *, since: float | None = None, until: float | None = None,
                decision: str | None = None, limit: int = 100, thumbnails: bool = False,
                recipe_id: str | None = None, timeout: float | None = None) -> HistoryResult:
        args = {"role_id": role_id, "roi_id": roi_id, "since": since, "until": until, "decision": decision,
                "limit": limit, "thumbnails": thumbnails, "recipe_id": recipe_id}
        return HistoryResult.model_validate(self.call("history", args, timeout=timeout))

    def drift(self, role_id: str, roi_id: str, *, recipe_id: str | None = None,
              timeout: float | None = None) -> DriftResult:
        args = {"role_id": role_id, "roi_id": roi_id, "recipe_id": recipe_id}
        return DriftResult.model_validate(self.call("drift", args, timeout=timeout))

    def explain_patch(self, role_id: str, roi_id: str, image_index: int, patch_row: int, patch_col: int, *,
                      recipe_id: str | None = None, timeout: float | None = None) -> ExplainPatchResult:
        args = {"role_id": role_id, "roi_id": roi_id, "image_index": image_index, "patch_row": patch_row,
                "patch_col": patch_col, "recipe_id": recipe_id}
        return ExplainPatchResult.model_validate(self.call("explain_patch", args, timeout=timeout))
