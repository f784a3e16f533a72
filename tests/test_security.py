"""Security properties on both doors: API key, constant-time comparison, loopback by default, no
pickle in persistence or weights, data-root modes, dataset names that cannot leave their folder.

See docs/reliability.md (section Security) for the list and the expected answers.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import io
import json
import os
import re
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

import http_compat.middleware
import ipc.server
from engine.api import Engine
from engine.backbones import load_weights_file
from engine.errors import CorruptModel, InvalidId, InvalidInput, WeightsError
from engine.storage import ModelStore, seal
from http_compat.server import HttpServer
from http_compat.settings import HttpSettings
from ipc import EngineClient, IpcServer, RemoteError
from ipc.settings import IpcSettings
from tests.support import REPO, Doors, door_settings, noise, png_bytes

ROLE, ROI, MM, SIDE = "cam1", "a", 0.1, 64
KEY = "s3cret-Key_42"


def _png(seed: int = 0) -> bytes:
    return png_bytes(noise(SIDE, seed=seed))


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    eng = Engine(door_settings(tmp_path_factory.mktemp("security")).engine)
    eng.fit_ok(ROLE, ROI, MM, [_png(s) for s in range(3)])
    eng.calibrate_ng(ROLE, ROI, MM, [1.0, 2.0])
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def keyed(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Doors]:
    doors = Doors(engine, door_settings(engine.data_root, api_key=KEY), api_key=KEY)
    yield doors
    doors.close()


@pytest.fixture(scope="module")
def doors(engine: Engine) -> Iterator[Doors]:
    d = Doors(engine, door_settings(engine.data_root))
    yield d
    d.close()


# --- API key ---------------------------------------------------------------------------------------

WRONG_KEYS = [None, "", "s3cret-Key_4", "s3cret-Key_43", "S3CRET-KEY_42", KEY + " ", "s3cret-Kéy_42", "x" * 10_000]


@pytest.mark.parametrize("wrong", WRONG_KEYS, ids=lambda k: "none" if k is None else f"len{len(k)}")
def test_api_key_is_required_on_the_zmq_door(keyed: Doors, wrong: str | None) -> None:
    fit = {"role_id": ROLE, "roi_id": "intruder", "mm_per_px": MM, "images": [_png()]}
    infer = {"role_id": ROLE, "roi_id": ROI, "mm_per_px": MM, "image": _png()}
    for op, args in (("health", {}), ("infer", infer), ("fit_ok", fit), ("list_models", {})):
        client = EngineClient(keyed.ipc.endpoint, api_key=wrong, timeout=30, retries=0)
        try:
            with pytest.raises(RemoteError) as info:
                client.call(op, args)
        finally:
            client.close()
        assert (info.value.status, info.value.code) == (401, "unauthorized")
    assert not (keyed.engine.data_root / "models" / ROLE / "intruder").exists()
    assert keyed.zmq_answer("infer", infer)[0] == 200


# h11 refuses to send a header value with surrounding blanks: the server never sees one
@pytest.mark.parametrize("wrong", [k for k in WRONG_KEYS if k is None or k == k.strip()],
                         ids=lambda k: "none" if k is None else f"len{len(k)}")
def test_api_key_is_required_on_the_http_door(keyed: Doors, wrong: str | None) -> None:
    headers = {} if wrong is None else {"X-API-Key": wrong.encode("utf-8")}
    url = keyed.http.url
    files = {"image": ("a.png", _png())}
    form = {"role_id": ROLE, "roi_id": ROI, "mm_per_px": "0.1"}
    with httpx.Client(base_url=url, timeout=30, headers=headers) as c:
        for r in (c.get("/health"), c.get("/openapi.json"), c.get("/docs"), c.get("/no/such/path"),
                  c.post("/infer", data=form, files=files),
                  c.post("/fit_ok", data={**form, "roi_id": "intruder"}, files={"images": ("a.png", _png())})):
            assert (r.status_code, r.json()["code"]) == (401, "unauthorized"), r.text
    assert not (keyed.engine.data_root / "models" / ROLE / "intruder").exists()
    assert keyed.web.post("/infer", data=form, files=files).status_code == 200


def test_keys_are_compared_in_constant_time(keyed: Doors, monkeypatch: pytest.MonkeyPatch) -> None:
    # the code path: both checks call hmac.compare_digest, and neither compares the key with == / !=
    for func in (ipc.server.IpcServer._check, http_compat.middleware.RequestGate._refuse):
        source = inspect.getsource(func)
        assert "hmac.compare_digest(" in source
        assert not re.search(r"(==|!=)\s*self\._(api_)?key|self\._(api_)?key\s*(==|!=)", source), source
    # and at run time: the comparison that decides goes through compare_digest with the real key
    seen: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        seen.append((bytes(a), bytes(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert keyed.zmq.call("health")["status"] == "ok"
    assert keyed.web.get("/health").status_code == 200
    assert seen.count((KEY.encode(), KEY.encode())) == 2


# --- loopback by default ---------------------------------------------------------------------------

def test_defaults_bind_loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("BACKEND_ZMQ_ENDPOINT", "BACKEND_HTTP_HOST", "BACKEND_ALLOW_REMOTE", "BACKEND_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    ipc, http = IpcSettings(), HttpSettings()
    assert ipc.zmq_endpoint.startswith("tcp://127.0.0.1:") and not ipc.allow_remote
    assert http.http_host == "127.0.0.1" and not http.allow_remote


@pytest.mark.parametrize("endpoint", ["tcp://0.0.0.0:*", "tcp://*:*", "tcp://192.168.1.10:5555", "tcp://eth0:5555",
                                      "tcp://[::]:5555", "tcp://plant-pc.local:5555"])
def test_zmq_remote_bind_needs_allow_remote(engine: Engine, endpoint: str) -> None:
    server = IpcServer(engine, door_settings(engine.data_root, zmq_endpoint=endpoint).ipc)
    with pytest.raises(ValueError, match="allow_remote|ALLOW_REMOTE"):
        server.start()
    with pytest.raises(RuntimeError):
        server.endpoint  # noqa: B018 - nothing was bound


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "plant-pc.local"])
def test_http_remote_bind_needs_allow_remote(engine: Engine, host: str) -> None:
    with pytest.raises(ValueError, match="allow_remote"):
        HttpServer(engine, door_settings(engine.data_root, http_host=host).http)


def test_remote_bind_with_explicit_opt_in(engine: Engine) -> None:
    settings = door_settings(engine.data_root, zmq_endpoint="tcp://0.0.0.0:*", http_host="0.0.0.0", allow_remote=True,
                         api_key=KEY)
    ipc_door, http_door = IpcServer(engine, settings.ipc), HttpServer(engine, settings.http)
    ipc_door.start()
    http_door.start()
    try:
        with EngineClient(ipc_door.endpoint.replace("0.0.0.0", "127.0.0.1"), api_key=KEY, timeout=10) as c:
            assert c.call("health")["status"] == "ok"
        assert httpx.get(f"http://127.0.0.1:{http_door.port}/health", headers={"X-API-Key": KEY}).status_code == 200
    finally:
        http_door.stop(timeout=2)
        ipc_door.stop(timeout=2)


# --- no pickle ---------------------------------------------------------------------------------------

class _Trap:
    """Unpickling this creates ``path``: proof that a loader ran pickle."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str, str]]:
        return open, (str(self.path), "w")


def _calls(text: str, name: str) -> list[str]:
    """The argument text of every ``name(...)`` call in ``text`` (parentheses balanced)."""
    found = []
    for match in re.finditer(re.escape(name) + r"\(", text):
        depth, end = 1, match.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            end += 1
        found.append(text[match.end(): end - 1])
    return found


def test_sources_never_unpickle() -> None:
    sources = {p: p.read_text() for pkg in ("engine", "ipc", "http_compat") for p in (REPO / pkg).rglob("*.py")}
    loads = 0
    for path, text in sources.items():
        assert not re.search(r"^\s*(import pickle|from pickle|import dill|import joblib)", text, re.M), path
        assert "pickle.load" not in text, path
        for args in _calls(text, "np.load"):
            assert "allow_pickle=False" in args, (path, args)
            loads += 1
        for args in _calls(text, "torch.load"):
            assert "weights_only=True" in args, (path, args)
            loads += 1
    assert loads >= 2


def test_pickled_embeddings_are_refused_never_unpickled(engine: Engine, doors: Doors, tmp_path: Path) -> None:
    """An object-array embeddings.npy with a matching checksum and a valid seal: CorruptModel, no unpickling."""
    engine.fit_ok(ROLE, "pickled", MM, [_png(7)])
    folder = ModelStore(engine.data_root).model_dir(ROLE, "pickled")
    marker = tmp_path / "unpickled"
    buf = io.BytesIO()
    np.save(buf, np.array([_Trap(marker)], dtype=object), allow_pickle=True)
    data = buf.getvalue()
    (folder / "embeddings.npy").write_bytes(data)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["embeddings.npy"] = hashlib.sha256(data).hexdigest()
    manifest.pop("manifest_sha256")
    (folder / "manifest.json").write_text(json.dumps(seal(manifest)))
    engine.close()                                   # drop the cached model: the next use reads the folder
    with pytest.raises(CorruptModel, match="Object arrays cannot be loaded"):
        engine.infer(ROLE, "pickled", MM, _png(), allow_uncalibrated=True)
    args = {"role_id": ROLE, "roi_id": "pickled", "mm_per_px": MM, "image": _png(), "allow_uncalibrated": True}
    assert doors.zmq_answer("infer", args) == (500, "corrupt_model")
    r = doors.web.post("/infer", data={"role_id": ROLE, "roi_id": "pickled", "mm_per_px": "0.1",
                                       "allow_uncalibrated": "true"}, files={"image": ("a.png", _png())})
    assert (r.status_code, r.json()["code"]) == (500, "corrupt_model")
    assert not marker.exists()


def test_pickle_bomb_weights_are_refused_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    bomb = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save({"pos_embed": torch.zeros(1), "trap": _Trap(marker)}, bomb)
    with pytest.raises(WeightsError, match="cannot read weights file"):
        load_weights_file(bomb)
    for backbone in ("dinov2_vits14", "auto", "efficientnet_lite0"):
        with pytest.raises(WeightsError):
            Engine(door_settings(tmp_path / "data", backbone=backbone, weights=bomb).engine)
    (tmp_path / "data" / "weights").mkdir(parents=True, exist_ok=True)
    os.replace(bomb, tmp_path / "data" / "weights" / bomb.name)      # found by "auto" in <data_root>/weights
    with pytest.raises(WeightsError):
        Engine(door_settings(tmp_path / "data", backbone="auto").engine)
    assert not marker.exists()


# --- modes -------------------------------------------------------------------------------------------

def test_data_root_is_not_world_writable_even_with_umask_0(tmp_path: Path) -> None:
    """Regression: folders made with mkdir(parents=True) were 0o777 under umask 0."""
    old = os.umask(0)
    try:
        root = tmp_path / "fresh" / "data"
        settings = door_settings(root)
        engine = Engine(settings.engine)
        d = Doors(engine, settings)
        try:
            engine.fit_ok(ROLE, ROI, MM, [_png(1)])
            engine.calibrate_ng(ROLE, ROI, MM, [1.0])
            d.zmq.call("fit_ok", {"role_id": "r2", "roi_id": "b", "mm_per_px": MM, "images": [_png(2)],
                                  "recipe_id": "line2"})
            r = d.web.post("/fit_ok", data={"role_id": "r3", "roi_id": "c", "mm_per_px": "0.1"},
                           files={"images": ("a.png", _png(3))})
            assert r.status_code == 200
            engine.dataset_upload(ROLE, ROI, "ok", _png(4), "e.png", {"mm_per_px": MM})
            d.zmq.call("dataset_upload", {"role_id": "r2", "roi_id": "b", "label": "ng", "image": _png(5),
                                          "meta": {"x": 1}, "recipe_id": "line2"})
            r = d.web.post("/datasets/ok/upload", data={"role_id": "r3", "roi_id": "c", "metas": '{"a": 1}'},
                           files={"image": ("h.png", _png(6))})
            assert r.status_code == 200
        finally:
            d.close()
            engine.close()
    finally:
        os.umask(old)
    paths = [root, *root.rglob("*")]
    assert len([p for p in paths if p.is_file()]) >= 15
    for path in paths:
        mode = stat.S_IMODE(path.lstat().st_mode)
        assert not mode & (stat.S_IWOTH | stat.S_IWGRP), (path, oct(mode))


# --- dataset names -----------------------------------------------------------------------------------

EVIL_NAMES = ["../x.png", "../../x.png", "..", "/tmp/x.png", "/etc/passwd", "a\x00.png", "x.png\x00.txt",
              "..\\..\\x.png", "a\\b.png", "C:\\x.png", "C:x.png", "x/../../y.png", "sub/x.png", ".hidden.png",
              "x.png/", "con.png", "x.png ", "x.png.", "~/x.png", "%2e%2e%2fx.png", "\u2025/x.png", "x" * 300 + ".png"]


@pytest.fixture(scope="module")
def sentinel(engine: Engine) -> Path:
    """A real sample and files just outside the sample folder that a traversal would reach."""
    engine.dataset_upload(ROLE, ROI, "ok", _png(9), "real.png", {"mm_per_px": MM})
    for where in (engine.data_root / "x.png", engine.data_root / "datasets" / "x.png",
                  engine.data_root / "datasets" / ROLE / ROI / "x.png", engine.data_root.parent / "x.png"):
        where.write_bytes(b"SENTINEL")
    return engine.data_root


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("name", EVIL_NAMES, ids=lambda n: n.encode("unicode_escape").decode()[:24])
def test_dataset_names_cannot_leave_their_folder(engine: Engine, doors: Doors, sentinel: Path, name: str) -> None:
    before = _files(sentinel.parent)
    image = _png(3)
    for call in (lambda: engine.dataset_upload(ROLE, ROI, "ok", image, name),
                 lambda: engine.dataset_file(ROLE, ROI, "ok", name),
                 lambda: engine.dataset_meta(ROLE, ROI, "ok", name),
                 lambda: engine.dataset_delete(ROLE, ROI, "ok", name)):
        with pytest.raises(InvalidId):
            call()
    base = {"role_id": ROLE, "roi_id": ROI, "label": "ok", "filename": name}
    for op, args in (("dataset_upload", {**base, "image": image}), ("dataset_file", base), ("dataset_meta", base),
                     ("dataset_delete", base)):
        assert doors.zmq_answer(op, args) == (400, "invalid_id"), op
    form = {"role_id": ROLE, "roi_id": ROI}
    query = {**form, "label": "ok", "filename": name}
    for r in (doors.web.post("/datasets/ok/upload", data={**form, "metas": json.dumps({"filename": name})},
                             files={"image": ("fine.png", image)}),
              doors.web.get("/datasets/file", params=query), doors.web.get("/datasets/meta", params=query),
              doors.web.delete("/datasets/file", params=query)):
        assert (r.status_code, r.json()["code"]) == (400, "invalid_id"), (r.request.url, r.text)
    # as the multipart part's own file name: refused, or (python-multipart keeps only the last part
    # of a Windows path such as C:\x.png) stored under that plain name inside the sample folder
    r = doors.web.post("/datasets/ok/upload", data=form, files={"image": (name, image)})
    if r.status_code == 200:
        stored = r.json()["filename"]
        assert "\\" not in name.rsplit("\\", 1)[-1] and stored == name.rsplit("\\", 1)[-1], r.text
        engine.dataset_delete(ROLE, ROI, "ok", stored)
    else:
        assert (r.status_code, r.json()["code"]) == (400, "invalid_id"), r.text
    assert _files(sentinel.parent) == before


def test_dataset_label_and_ids_cannot_leave_their_folder(engine: Engine, doors: Doors, sentinel: Path) -> None:
    before = _files(sentinel.parent)
    with pytest.raises(InvalidInput):
        engine.dataset_upload(ROLE, ROI, "../ok", _png(), "y.png")  # type: ignore[arg-type]
    with pytest.raises(InvalidId):
        engine.dataset_file("..", ROI, "ok", "real.png")
    assert doors.zmq_answer("dataset_file", {"role_id": ROLE, "roi_id": "../a", "label": "ok",
                                             "filename": "real.png"}) == (400, "invalid_id")
    assert doors.zmq_answer("dataset_upload", {"role_id": ROLE, "roi_id": ROI, "label": "../../models",
                                               "image": _png()}) == (400, "invalid_args")
    r = doors.web.post("/datasets/..%2F..%2Fmodels/upload", data={"role_id": ROLE, "roi_id": ROI},
                       files={"image": ("y.png", _png())})
    assert r.status_code in (404, 422), r.text
    r = doors.web.get("/datasets/file", params={"role_id": "..", "roi_id": ROI, "label": "ok", "filename": "real.png"})
    assert (r.status_code, r.json()["code"]) == (400, "invalid_id")
    assert _files(sentinel.parent) == before
    # and the real sample is still served as it is
    r = doors.web.get("/datasets/file", params={"role_id": ROLE, "roi_id": ROI, "label": "ok", "filename": "real.png"})
    assert r.status_code == 200 and r.content == _png(9)
