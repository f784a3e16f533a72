"""Model folders on disk: round trip, crash safety at every step, corruption and write failures."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import stat
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.errors import CorruptModel, IncompatibleModel, ModelFileError, ModelNotFound, StorageError
from engine.knn import build_index, deserialize_index, serialize_index
from engine.storage import SCHEMA_VERSION, ModelStore, seal

ROLE, ROI = "top", "roi1"


def _model(version: int) -> tuple[dict[str, Any], np.ndarray, bytes]:
    """A manifest, a (50, 8) bank whose values encode ``version`` and its faiss index bytes."""
    emb = (np.random.default_rng(version).normal(size=(50, 8)) + 10 * version).astype(np.float32)
    manifest = {"model_version": version, "mm_per_px": 0.1, "token_shape": [7, 7], "threshold": None}
    return manifest, emb, serialize_index(build_index(emb, "l2"))


def _save(store: ModelStore, version: int, roi: str = ROI) -> tuple[np.ndarray, bytes]:
    manifest, emb, index = _model(version)
    store.save(ROLE, roi, manifest, emb, index)
    return emb, index


def _assert_version(store: ModelStore, version: int) -> None:
    """load() returns the complete model ``version``, and nothing is left beside it."""
    files = store.load(ROLE, ROI)
    _, emb, index = _model(version)
    assert files.manifest["model_version"] == version
    np.testing.assert_array_equal(files.embeddings, emb)
    assert files.index_bytes == index
    assert sorted(p.name for p in (store.models_dir / ROLE).iterdir()) == [ROI]


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "base")


@pytest.fixture
def new_folder(tmp_path: Path) -> Path:
    """A complete model folder of version 2, written by a save elsewhere (what a staging holds)."""
    other = ModelStore(tmp_path / "other")
    _save(other, 2)
    return other.model_dir(ROLE, ROI)


# --- round trip ---------------------------------------------------------------------------


def test_round_trip(store: ModelStore) -> None:
    manifest, emb, index = _model(1)
    written = store.save(ROLE, ROI, manifest, emb, index)
    files = store.load(ROLE, ROI)
    np.testing.assert_array_equal(files.embeddings, emb)
    assert files.embeddings.dtype == np.float32 and files.embeddings.shape == (50, 8)
    assert files.index_bytes == index
    assert deserialize_index(files.index_bytes).ntotal == 50
    assert files.calibration is None
    assert files.manifest == written
    assert written["schema_version"] == SCHEMA_VERSION == 1
    assert {k: written[k] for k in manifest} == manifest
    folder = store.model_dir(ROLE, ROI)
    assert written["files"] == {
        "embeddings.npy": hashlib.sha256((folder / "embeddings.npy").read_bytes()).hexdigest(),
        "coreset.faiss": hashlib.sha256(index).hexdigest(),
    }
    assert seal({k: v for k, v in written.items() if k != "manifest_sha256"}) == written
    assert json.loads((folder / "manifest.json").read_text()) == written
    assert sorted(p.name for p in folder.iterdir()) == ["coreset.faiss", "embeddings.npy", "manifest.json"]
    assert store.exists(ROLE, ROI) and store.read_manifest(ROLE, ROI) == written
    assert store.list() == [(ROLE, ROI)]


def test_calibration_round_trip_and_version_guard(store: ModelStore) -> None:
    _save(store, 1)
    manifest = store.read_manifest(ROLE, ROI)
    assert manifest is not None
    store.write_calibration(ROLE, ROI, {"threshold": 1.5, "model_version": 1}, {**manifest, "threshold": 1.5})
    files = store.load(ROLE, ROI)
    assert files.calibration == {"threshold": 1.5, "model_version": 1}
    assert files.manifest["threshold"] == 1.5
    # a calibration.json from another model version is not this model's
    store.write_calibration(ROLE, ROI, {"threshold": 9.0, "model_version": 7}, manifest)
    assert store.load(ROLE, ROI).calibration is None


def test_refit_replaces_model_and_drops_calibration(store: ModelStore) -> None:
    _save(store, 1)
    manifest = store.read_manifest(ROLE, ROI)
    assert manifest is not None
    store.write_calibration(ROLE, ROI, {"threshold": 1.5, "model_version": 1}, manifest)
    _save(store, 2)
    _assert_version(store, 2)
    assert store.load(ROLE, ROI).calibration is None


def test_missing_model_is_model_not_found(store: ModelStore) -> None:
    with pytest.raises(ModelNotFound, match="memory not found.*fit the model first"):
        store.load(ROLE, ROI)
    assert store.read_manifest(ROLE, ROI) is None
    assert not store.exists(ROLE, ROI)
    assert store.list() == []


def test_delete(store: ModelStore) -> None:
    _save(store, 1)
    _save(store, 1, roi="roi2")
    assert store.delete(ROLE, ROI) is True
    assert store.delete(ROLE, ROI) is False
    with pytest.raises(ModelNotFound):
        store.load(ROLE, ROI)
    assert store.list() == [(ROLE, "roi2")]
    assert sorted(p.name for p in (store.models_dir / ROLE).iterdir()) == ["roi2"]


def test_files_are_not_world_writable(store: ModelStore) -> None:
    _save(store, 1)
    store.write_calibration(ROLE, ROI, {"threshold": 1.0, "model_version": 1}, store.read_manifest(ROLE, ROI) or {})
    paths = [store.models_dir, store.models_dir / ROLE, *store.model_dir(ROLE, ROI).rglob("*"),
             store.model_dir(ROLE, ROI)]
    for path in paths:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert not mode & stat.S_IWOTH, (path, oct(mode))
        if path.is_file():
            assert mode == 0o644, (path, oct(mode))


# --- crash safety: the state after a crash between any two steps of save / swap -------------


def _staging(store: ModelStore, tag: str = "0badc0de") -> Path:
    return store.models_dir / ROLE / f".{ROI}.staging-{tag}"


def _old(store: ModelStore, tag: str = "0badc0de") -> Path:
    return store.models_dir / ROLE / f".{ROI}.old-{tag}"


def test_crash_after_staging_mkdir(store: ModelStore) -> None:
    _save(store, 1)
    _staging(store).mkdir()
    _assert_version(store, 1)


@pytest.mark.parametrize("written", [["embeddings.npy"], ["embeddings.npy", "coreset.faiss"]])
def test_crash_while_writing_staging_files(store: ModelStore, new_folder: Path, written: list[str]) -> None:
    _save(store, 1)
    staging = _staging(store)
    staging.mkdir()
    for name in written:
        shutil.copy(new_folder / name, staging / name)
    (staging / "manifest.json").write_bytes((new_folder / "manifest.json").read_bytes()[:40])  # torn write
    _assert_version(store, 1)


def test_crash_with_complete_staging_before_swap(store: ModelStore, new_folder: Path) -> None:
    _save(store, 1)
    shutil.copytree(new_folder, _staging(store))
    _assert_version(store, 1)


def test_crash_between_the_two_renames(store: ModelStore, new_folder: Path) -> None:
    _save(store, 1)
    shutil.copytree(new_folder, _staging(store))
    os.rename(store.model_dir(ROLE, ROI), _old(store))        # first rename done, second not
    _assert_version(store, 1)                                 # the old model is put back


def test_crash_after_both_renames(store: ModelStore, new_folder: Path) -> None:
    _save(store, 1)
    os.rename(store.model_dir(ROLE, ROI), _old(store))
    shutil.copytree(new_folder, store.model_dir(ROLE, ROI))   # staging -> final done
    _assert_version(store, 2)


def test_crash_while_removing_old(store: ModelStore, new_folder: Path) -> None:
    _save(store, 1)
    os.rename(store.model_dir(ROLE, ROI), _old(store))
    shutil.copytree(new_folder, store.model_dir(ROLE, ROI))
    (_old(store) / "embeddings.npy").unlink()                 # rmtree cut short
    _assert_version(store, 2)


def test_crash_during_first_fit_leaves_no_model(store: ModelStore, new_folder: Path) -> None:
    (store.models_dir / ROLE).mkdir(parents=True)
    shutil.copytree(new_folder, _staging(store))
    with pytest.raises(ModelNotFound):
        store.load(ROLE, ROI)
    assert list((store.models_dir / ROLE).iterdir()) == []


@pytest.mark.parametrize("step", ["staging", "between_renames", "after_renames"])
def test_recover_all_at_start_up(store: ModelStore, new_folder: Path, step: str) -> None:
    _save(store, 1)
    _save(store, 1, roi="other")
    shutil.copytree(new_folder, _staging(store))
    if step != "staging":
        os.rename(store.model_dir(ROLE, ROI), _old(store))
    if step == "after_renames":
        os.rename(_staging(store), store.model_dir(ROLE, ROI))
    store.recover_all()
    assert sorted(p.name for p in (store.models_dir / ROLE).iterdir()) == ["other", ROI]
    assert store.load(ROLE, ROI).manifest["model_version"] == (2 if step == "after_renames" else 1)


def test_crash_during_delete_does_not_resurrect_model(store: ModelStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: delete renamed the model to an ``.old-`` folder, which recovery put back even
    when the crash came half-way through removing it (a half-deleted, corrupt model)."""
    _save(store, 1)

    class _Crash(BaseException):
        pass

    def crash_midway(path: Path, ignore_errors: bool = False) -> None:
        (Path(path) / "embeddings.npy").unlink()
        raise _Crash

    monkeypatch.setattr("engine.storage.shutil.rmtree", crash_midway)
    with pytest.raises(_Crash):
        store.delete(ROLE, ROI)
    monkeypatch.undo()
    with pytest.raises(ModelNotFound):
        store.load(ROLE, ROI)
    assert list((store.models_dir / ROLE).iterdir()) == []


def test_reads_during_saves_never_fail(store: ModelStore) -> None:
    """Regression: a reader's recovery removed the staging folder of a save in progress (the save
    failed) or undid its swap between the two renames (the reader saw no model)."""
    _save(store, 0)
    errors: list[BaseException] = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            try:
                files = ModelStore(store.models_dir.parent).load(ROLE, ROI)
                version = files.manifest["model_version"]
                np.testing.assert_array_equal(files.embeddings, _model(version)[1])   # never a mix
            except BaseException as exc:  # noqa: BLE001 - collected and reported below
                errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for version in range(1, 31):
            _save(ModelStore(store.models_dir.parent), version)
    finally:
        done.set()
        for t in threads:
            t.join()
    assert errors == []
    _assert_version(store, 30)


# --- corrupt and incompatible files ----------------------------------------------------------


def _folder(store: ModelStore) -> Path:
    _save(store, 1)
    return store.model_dir(ROLE, ROI)


def test_truncated_embeddings_is_corrupt(store: ModelStore) -> None:
    path = _folder(store) / "embeddings.npy"
    path.write_bytes(path.read_bytes()[:-16])
    with pytest.raises(CorruptModel, match="embeddings.npy checksum mismatch"):
        store.load(ROLE, ROI)


def test_edited_index_is_corrupt(store: ModelStore) -> None:
    path = _folder(store) / "coreset.faiss"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptModel, match="coreset.faiss checksum mismatch"):
        store.load(ROLE, ROI)


def test_missing_index_is_corrupt(store: ModelStore) -> None:
    (_folder(store) / "coreset.faiss").unlink()
    with pytest.raises(CorruptModel, match="coreset.faiss cannot be read"):
        store.load(ROLE, ROI)


def test_edited_manifest_is_corrupt(store: ModelStore) -> None:
    path = _folder(store) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["mm_per_px"] = 0.2                                   # edited by hand, not resealed
    path.write_text(json.dumps(manifest))
    with pytest.raises(CorruptModel, match="manifest.json was edited"):
        store.load(ROLE, ROI)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", ""])
def test_unreadable_manifest_is_corrupt(store: ModelStore, text: str) -> None:
    (_folder(store) / "manifest.json").write_text(text)
    with pytest.raises(CorruptModel):
        store.load(ROLE, ROI)


def test_wrong_checksum_in_sealed_manifest_is_corrupt(store: ModelStore) -> None:
    path = _folder(store) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["files"]["embeddings.npy"] = "0" * 64
    path.write_text(json.dumps(seal(manifest)))
    with pytest.raises(CorruptModel, match="embeddings.npy checksum mismatch"):
        store.load(ROLE, ROI)


def test_manifest_without_checksums_is_corrupt(store: ModelStore) -> None:
    path = _folder(store) / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["files"]
    path.write_text(json.dumps(seal(manifest)))
    with pytest.raises(CorruptModel, match="no file checksums"):
        store.load(ROLE, ROI)


def test_pickled_embeddings_are_refused(store: ModelStore) -> None:
    """An object array (needs pickle) with a matching checksum is still not loaded."""
    folder = _folder(store)
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (folder / "embeddings.npy").write_bytes(buf.getvalue())
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["embeddings.npy"] = hashlib.sha256(buf.getvalue()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(seal(manifest)))
    with pytest.raises(CorruptModel, match="not a valid array"):
        store.load(ROLE, ROI)


@pytest.mark.parametrize("version", [2, 0, None, "1"])
def test_unknown_schema_version_is_incompatible(store: ModelStore, version: object) -> None:
    path = _folder(store) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["schema_version"] = version
    path.write_text(json.dumps(seal(manifest)))
    with pytest.raises(IncompatibleModel, match="schema_version") as info:
        store.load(ROLE, ROI)
    assert isinstance(info.value, ModelFileError) and info.value.code == "incompatible_model"


# --- write failures ----------------------------------------------------------------------------


def _enospc(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_while_writing_keeps_old_model(store: ModelStore, monkeypatch: pytest.MonkeyPatch) -> None:
    _save(store, 1)
    monkeypatch.setattr("engine.storage.os.fsync", _enospc)
    with pytest.raises(StorageError, match="No space left") as info:
        _save(store, 2)
    assert info.value.status == 507
    monkeypatch.undo()
    _assert_version(store, 1)


@pytest.mark.parametrize("fail_on", [1, 2])
def test_failed_rename_keeps_old_model(store: ModelStore, monkeypatch: pytest.MonkeyPatch, fail_on: int) -> None:
    """The first rename (model -> old) or the second (staging -> model) fails with ENOSPC."""
    _save(store, 1)
    real_rename = os.rename
    calls = []

    def rename(src: Any, dst: Any) -> None:
        calls.append((src, dst))
        if len(calls) == fail_on:
            _enospc()
        real_rename(src, dst)

    monkeypatch.setattr("engine.storage.os.rename", rename)
    with pytest.raises(StorageError, match="cannot save model top/roi1"):
        _save(store, 2)
    monkeypatch.undo()
    # the old model is in place right away (no recovery needed) and nothing is left beside it
    assert store.list() == [(ROLE, ROI)]
    assert sorted(p.name for p in (store.models_dir / ROLE).iterdir()) == [ROI]
    _assert_version(store, 1)


def test_failed_calibration_write_keeps_previous(store: ModelStore, monkeypatch: pytest.MonkeyPatch) -> None:
    _save(store, 1)
    manifest = store.read_manifest(ROLE, ROI) or {}
    store.write_calibration(ROLE, ROI, {"threshold": 1.0, "model_version": 1}, {**manifest, "threshold": 1.0})
    monkeypatch.setattr("engine.storage.os.replace", _enospc)
    with pytest.raises(StorageError, match="calibration.json"):
        store.write_calibration(ROLE, ROI, {"threshold": 2.0, "model_version": 1}, {**manifest, "threshold": 2.0})
    monkeypatch.undo()
    files = store.load(ROLE, ROI)
    assert files.calibration == {"threshold": 1.0, "model_version": 1}
    assert files.manifest["threshold"] == 1.0
    assert not [p for p in store.model_dir(ROLE, ROI).iterdir() if p.name.endswith(".tmp")]


def test_failed_delete_keeps_model(store: ModelStore, monkeypatch: pytest.MonkeyPatch) -> None:
    _save(store, 1)
    monkeypatch.setattr("engine.storage.os.rename", _enospc)
    with pytest.raises(StorageError, match="cannot delete"):
        store.delete(ROLE, ROI)
    monkeypatch.undo()
    _assert_version(store, 1)
