"""Storage faults through the engine and both doors: a full disk, damaged model files, recovery.

Each fault must give a typed error with its wire status (StorageError 507, CorruptModel 500), keep
the previous model byte-identical, and leave both doors serving. See docs/reliability.md.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.api import Engine
from engine.errors import CorruptModel, StorageError
from engine.storage import ModelStore, seal
from tests.support import Doors, door_settings, png_bytes

ROLE = "cam1"
MM = 0.1
SIDE = 64


def _images(seed: int, n: int = 3) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [png_bytes(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)) for _ in range(n)]


def _tree_hash(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _leftovers(role_dir: Path) -> list[str]:
    return sorted(p.name for p in role_dir.iterdir() if p.name.startswith("."))


def _http_infer(roi: str, image: bytes) -> dict[str, Any]:
    return {"data": {"role_id": ROLE, "roi_id": roi, "mm_per_px": str(MM)},
            "files": {"image": ("roi.png", image, "image/png")}}


def _http_fit(roi: str, images: list[bytes]) -> dict[str, Any]:
    return {"data": {"role_id": ROLE, "roi_id": roi, "mm_per_px": str(MM)},
            "files": [("images", (f"{i}.png", im, "image/png")) for i, im in enumerate(images)]}


# --- a full disk ---------------------------------------------------------------------------------

@contextmanager
def _tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
                          capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode(errors='replace').strip()})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


class _Disk:
    """Turns "disk full" on and off: a real full tmpfs, or every fsync failing with ENOSPC."""

    def __init__(self, kind: str, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.kind, self.root, self.full = kind, root, False
        if kind == "injected":
            real_fsync = os.fsync

            def fsync(fd: int) -> None:
                if self.full:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                real_fsync(fd)

            monkeypatch.setattr(os, "fsync", fsync)

    def fill(self) -> None:
        self.full = True
        if self.kind == "tmpfs":
            chunk = b"\0" * 65536
            fd = os.open(self.root / "filler", os.O_WRONLY | os.O_CREAT, 0o600)   # unbuffered
            try:
                while True:
                    os.write(fd, chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
            finally:
                os.close(fd)

    def free(self) -> None:
        self.full = False
        (self.root / "filler").unlink(missing_ok=True)


@pytest.fixture(params=["tmpfs", "injected"])
def full_disk(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[_Disk]:
    if request.param == "tmpfs":
        with _tmpfs(tmp_path / "disk", "6m") as root:
            yield _Disk("tmpfs", root / "data", monkeypatch)
    else:
        yield _Disk("injected", tmp_path / "data", monkeypatch)


def test_full_disk_is_507_and_keeps_the_old_model(full_disk: _Disk) -> None:
    settings = door_settings(full_disk.root)
    engine = Engine(settings.engine)
    images = _images(1)
    engine.fit_ok(ROLE, "a", MM, images)
    engine.calibrate_ng(ROLE, "a", MM, [1.0, 2.0])
    folder = ModelStore(full_disk.root).model_dir(ROLE, "a")
    before = _tree_hash(folder)
    with Doors(engine, settings) as doors:
        full_disk.fill()
        with pytest.raises(StorageError) as info:
            engine.fit_ok(ROLE, "a", MM, _images(2))
        assert info.value.status == 507 and "cannot save model" in info.value.message
        assert doors.zmq_error("fit_ok", {"role_id": ROLE, "roi_id": "a", "mm_per_px": MM,
                                          "images": _images(3)})[:2] == (507, "storage_error")
        status, body = doors.http_answer("POST", "/fit_ok", **_http_fit("a", _images(4)))
        assert (status, body["code"]) == (507, "storage_error"), body
        with pytest.raises(StorageError):
            engine.calibrate_ng(ROLE, "a", MM, [5.0, 6.0])
        assert doors.zmq_error("dataset_upload", {"role_id": ROLE, "roi_id": "a", "label": "ok",
                                                  "image": images[0]})[:2] == (507, "storage_error")
        status, body = doors.http_answer("POST", "/datasets/ok/upload", data={"role_id": ROLE, "roi_id": "a"},
                                        files={"image": ("x.png", images[0], "image/png")})
        assert (status, body["code"]) == (507, "storage_error"), body
        doors.assert_healthy()

        # nothing changed on disk, nothing left behind, and the old model still loads from disk
        assert _tree_hash(folder) == before
        assert _leftovers(folder.parent) == []
        ModelStore(full_disk.root).load(ROLE, "a")
        assert doors.zmq.call("infer", {"role_id": ROLE, "roi_id": "a", "mm_per_px": MM,
                                        "image": images[0]})["decision"] in ("ok", "ng")

        full_disk.free()
        assert doors.zmq.call("fit_ok", {"role_id": ROLE, "roi_id": "a", "mm_per_px": MM,
                                         "images": _images(5)})["model_version"] == 2
    engine.close()


# --- damaged model files -------------------------------------------------------------------------

def _reseal(folder: Path, **files: bytes) -> None:
    """Replace files and record their true checksums in a correctly sealed manifest."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for name, data in files.items():
        name = name.replace("_", ".")
        (folder / name).write_bytes(data)
        manifest["files"][name] = hashlib.sha256(data).hexdigest()
    manifest.pop("manifest_sha256")
    (folder / "manifest.json").write_text(json.dumps(seal(manifest)))


def _edit_json(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _one_dim_embeddings(folder: Path) -> None:
    """A 1-D array as long as the index: the row-count check alone would pass it."""
    rows = json.loads((folder / "manifest.json").read_text())["coreset_size"]
    _reseal(folder, embeddings_npy=_npy(np.zeros(rows, np.float32)))


# ROI -> (damage done to its folder, fragment of the error message, does state() see it too?)
DAMAGE: dict[str, tuple[Callable[[Path], None], str, bool]] = {
    "truncated_faiss": (lambda f: _truncate(f / "coreset.faiss"), "coreset.faiss checksum mismatch", False),
    "truncated_npy": (lambda f: _truncate(f / "embeddings.npy"), "embeddings.npy checksum mismatch", False),
    "flipped_npy": (lambda f: _flip_byte(f / "embeddings.npy"), "embeddings.npy checksum mismatch", False),
    "missing_faiss": (lambda f: (f / "coreset.faiss").unlink(), "coreset.faiss cannot be read", False),
    "edited_manifest": (lambda f: _edit_json(f / "manifest.json", lambda m: m.update(knn_k=3)),
                        "manifest.json was edited", True),
    "wrong_checksum": (lambda f: _edit_json(f / "manifest.json",
                                            lambda m: m["files"].update({"coreset.faiss": "0" * 64})),
                       "manifest.json was edited", True),
    "resealed_wrong_checksum": (
        lambda f: (_edit_json(f / "manifest.json", lambda m: m["files"].update({"embeddings.npy": "0" * 64})),
                   _reseal(f)),
        "embeddings.npy checksum mismatch", False),
    "manifest_not_json": (lambda f: (f / "manifest.json").write_text("{\"trunc"), "not JSON", True),
    "resealed_garbage_faiss": (lambda f: _reseal(f, coreset_faiss=b"\0" * 64), "not a faiss index", False),
    "resealed_1d_embeddings": (_one_dim_embeddings, "index and embeddings disagree", False),
    "calibration_not_json": (lambda f: (f / "calibration.json").write_text("nope"), "calibration.json", False),
    "calibration_bad_threshold": (
        lambda f: _edit_json(f / "calibration.json", lambda c: c.update(threshold="high")),
        "calibration.json has no valid threshold", False),
}


@pytest.fixture(scope="module")
def damaged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Doors]:
    """A fresh engine (nothing cached) over a data root where each DAMAGE roi is broken, plus an intact one."""
    root = tmp_path_factory.mktemp("damaged")
    settings = door_settings(root)
    builder = Engine(settings.engine)
    for i, roi in enumerate(["intact", *DAMAGE]):
        builder.fit_ok(ROLE, roi, MM, _images(10 + i))
        builder.calibrate_ng(ROLE, roi, MM, [1.0, 2.0])
    builder.close()
    store = ModelStore(root)
    for roi, (damage, _, _) in DAMAGE.items():
        damage(store.model_dir(ROLE, roi))
    engine = Engine(settings.engine)
    with Doors(engine, settings) as doors:
        yield doors
    engine.close()


@pytest.mark.parametrize("roi", list(DAMAGE))
def test_damaged_model_is_corrupt_model_on_both_doors(damaged: Doors, roi: str) -> None:
    _, fragment, state_sees_it = DAMAGE[roi]
    image = _images(99, 1)[0]
    with pytest.raises(CorruptModel, match=fragment):
        damaged.engine.infer(ROLE, roi, MM, image)
    for _ in range(2):           # the error is not cached away: the second call says the same
        status, code, message = damaged.zmq_error("infer", {"role_id": ROLE, "roi_id": roi, "mm_per_px": MM,
                                                            "image": image})
        assert (status, code) == (500, "corrupt_model") and fragment in message and roi in message
        status, body = damaged.http_answer("POST", "/infer", **_http_infer(roi, image))
        assert (status, body["code"]) == (500, "corrupt_model") and fragment in body["error"], body
    if state_sees_it:
        assert damaged.zmq_error("state", {"role_id": ROLE, "roi_id": roi})[:2] == (500, "corrupt_model")
        status, body = damaged.http_answer("GET", "/state", params={"role_id": ROLE, "roi_id": roi})
        assert (status, body["code"]) == (500, "corrupt_model")
    damaged.assert_healthy()
    result = damaged.zmq.call("infer", {"role_id": ROLE, "roi_id": "intact", "mm_per_px": MM, "image": image})
    assert result["decision"] in ("ok", "ng")


def test_list_models_skips_a_damaged_manifest(damaged: Doors) -> None:
    listed = {m["roi_id"] for m in damaged.zmq.call("list_models")["items"]}
    assert "intact" in listed and "truncated_faiss" in listed
    assert not listed & {"edited_manifest", "wrong_checksum", "manifest_not_json"}
    status, body = damaged.http_answer("GET", "/models")
    assert status == 200 and {m["roi_id"] for m in body["models"]} == listed


def test_calibrate_does_not_reseal_an_edited_manifest(damaged: Doors) -> None:
    # calibrate_ng rewrites the manifest with a fresh seal: it must refuse an edited one, or the
    # edit (here knn_k) would be laundered into a model that loads and scores differently
    with pytest.raises(CorruptModel, match="manifest.json was edited"):
        damaged.engine.calibrate_ng(ROLE, "edited_manifest", MM, [1.0, 2.0])
    assert damaged.zmq_error("calibrate_ng", {"role_id": ROLE, "roi_id": "edited_manifest", "mm_per_px": MM,
                                              "ok_scores": [1.0]})[:2] == (500, "corrupt_model")


def test_refit_repairs_every_damaged_model(damaged: Doors) -> None:
    image = _images(99, 1)[0]
    for i, roi in enumerate(DAMAGE):
        fit = damaged.zmq.call("fit_ok", {"role_id": ROLE, "roi_id": roi, "mm_per_px": MM, "images": _images(50 + i)})
        assert fit["coreset_size"] > 0
        raw = damaged.engine.infer(ROLE, roi, MM, image, allow_uncalibrated=True)
        assert raw.threshold is None and np.isfinite(raw.score)


# --- recovery at start-up ------------------------------------------------------------------------

def test_start_up_recovers_a_swap_cut_in_a_recipe(tmp_path: Path) -> None:
    """Regression: start-up recovery covered the default recipe only."""
    settings = door_settings(tmp_path)
    engine = Engine(settings.engine)
    engine.fit_ok(ROLE, "a", MM, _images(1), recipe_id="line2")
    engine.close()
    role_dir = tmp_path / "recipes" / "line2" / "models" / ROLE
    before = _tree_hash(role_dir / "a")
    # a crash between the swap's two renames: the model is only there as .a.old-*
    os.rename(role_dir / "a", role_dir / f".a.old-{uuid.uuid4().hex[:8]}")
    staging = role_dir / f".a.staging-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    (staging / "embeddings.npy").write_bytes(b"half")
    engine = Engine(settings.engine)
    assert _leftovers(role_dir) == [] and _tree_hash(role_dir / "a") == before
    assert [m.roi_id for m in engine.list_models(recipe_id="line2")] == ["a"]
    engine.close()


def test_leftovers_never_block_a_later_fit(tmp_path: Path) -> None:
    settings = door_settings(tmp_path)
    engine = Engine(settings.engine)
    engine.fit_ok(ROLE, "a", MM, _images(1))
    role_dir = tmp_path / "models" / ROLE
    for kind in ("staging", "old", "trash"):
        (role_dir / f".a.{kind}-{uuid.uuid4().hex[:8]}").mkdir()
    shutil.copytree(role_dir / "a", role_dir / f".a.old-{uuid.uuid4().hex[:8]}", dirs_exist_ok=True)
    assert engine.fit_ok(ROLE, "a", MM, _images(2)).model_version == 2
    assert _leftovers(role_dir) == []
    engine.close()
