"""Model persistence under the data root, crash-safe.

Layout (seed §3), per recipe (the default recipe at the root, others under
``recipes/<recipe>/``)::

    models/<role>/<roi>/embeddings.npy      memory bank rows (M, D) float32
    models/<role>/<roi>/coreset.faiss       faiss index over those rows (serialized bytes)
    models/<role>/<roi>/manifest.json       everything needed to replay the model, checksums
    models/<role>/<roi>/calibration.json    threshold and how it was obtained (after calibration)
    models/<role>/<roi>/sources.npy         where each memory row came from, (M, 3) int32: training
                                            image index, patch row, patch column (optional: older
                                            models have none; docs/observability.md)

Every change of a model folder is one swap. A fit writes a complete new folder
``.<roi>.staging-<id>`` (each file fsynced; with the calibration it carries over, if any), then
swaps it in: ``<roi>`` -> ``.<roi>.old-<id>``, staging -> ``<roi>``, old removed. A calibration
does the same with hard links to the unchanged data files plus its new ``calibration.json`` and
manifest, so the threshold and the manifest's mirror of it change in one step. A crash at any
point leaves either the old or the new folder complete; ``recover`` puts the old one back when
the swap was cut between its two renames, and removes leftovers (``recover_all``, at start-up,
also removes temp files an older single-file write may have left). A delete renames ``<roi>`` to
``.<roi>.trash-<id>`` before removing it; recovery removes trash, never restores it.
Within one process, saves, deletes, recovery and reads of one model folder hold its lock.

Every save and calibration is a new numbered version (manifest ``version``): the served folder
above, and each version kept under ``model_versions/<role>/<roi>/<n>/`` (``engine.versions``,
docs/lifecycle.md). ``activate`` swaps a kept version in as the served folder by the same swap.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from engine.errors import CorruptModel, IncompatibleModel, ModelNotFound, StorageError, VersionNotFound
from engine.files import DIR_MODE, FILE_MODE, fsync_dir, is_temp_file, link_or_copy, make_dirs, write_synced
from engine.versions import VersionHistory

__all__ = ["DEFAULT_VERSIONS_KEPT", "SCHEMA_VERSION", "ModelFiles", "ModelStore", "atomic_write_bytes",
           "atomic_write_json", "fsync_dir", "make_dirs", "read_folder", "remove_temp_files", "seal", "version_of"]

SCHEMA_VERSION = 1
DEFAULT_VERSIONS_KEPT = 5
EMBEDDINGS = "embeddings.npy"
INDEX = "coreset.faiss"
MANIFEST = "manifest.json"
CALIBRATION = "calibration.json"
SOURCES = "sources.npy"
_LEFTOVER = re.compile(r"\.(.+)\.(?:old|staging|trash)-[0-9a-f]{8}")
log = structlog.get_logger("engine.storage")
_LOCKS_GUARD = threading.Lock()
_FOLDER_LOCKS: dict[str, threading.RLock] = {}


def _folder_lock(final: Path) -> threading.RLock:
    """One lock per model folder in this process. A save (staging and swap), a delete, a recovery
    and a read of the same model must not interleave: a reader's ``recover`` would otherwise remove
    the staging folder of a fit in progress, or undo its swap between the two renames, and a read
    could mix the files of two versions."""
    with _LOCKS_GUARD:
        return _FOLDER_LOCKS.setdefault(os.path.abspath(final), threading.RLock())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a fsynced temp file and ``os.replace``.

    Raises:
        StorageError: the write failed (full disk, permissions); ``path`` is unchanged.
    """
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"cannot write {path.name}: {exc.strerror or exc}") from exc
    fsync_dir(path.parent)


def remove_temp_files(folder: Path) -> int:
    """Remove the temp files a crash in ``atomic_write_bytes`` left in ``folder``; returns how many."""
    removed = 0
    for path in folder.iterdir() if folder.is_dir() else ():
        if is_temp_file(path.name) and path.is_file():
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True).encode("utf-8")


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, _json_bytes(obj))


def _manifest_digest(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest with its own checksum (``manifest_sha256``) over every other field."""
    return {**manifest, "manifest_sha256": _manifest_digest(manifest)}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class ModelFiles:
    """The verified contents of one model folder."""

    manifest: dict[str, Any]
    embeddings: np.ndarray
    index_bytes: bytes
    calibration: dict[str, Any] | None
    origins: np.ndarray | None = None     # sources.npy, None for models written without it


class ModelStore:
    """Model folders of one recipe: ``<base>/models/<role>/<roi>``."""

    def __init__(self, base: Path, versions_kept: int = DEFAULT_VERSIONS_KEPT) -> None:
        self.models_dir = Path(base) / "models"
        self.versions_dir = Path(base) / "model_versions"
        self.versions_kept = versions_kept

    def history(self, role_id: str, roi_id: str) -> VersionHistory:
        return VersionHistory(self.versions_dir / role_id / roi_id)

    def model_dir(self, role_id: str, roi_id: str) -> Path:
        return self.models_dir / role_id / roi_id

    def exists(self, role_id: str, roi_id: str) -> bool:
        with _folder_lock(self.model_dir(role_id, roi_id)):
            self.recover(role_id, roi_id)
            return (self.model_dir(role_id, roi_id) / MANIFEST).is_file()

    # --- writing -------------------------------------------------------------------------

    def save(self, role_id: str, roi_id: str, manifest: dict[str, Any], embeddings: np.ndarray,
             index_bytes: bytes, calibration: dict[str, Any] | None = None, *,
             created_by: str = "fit", extra: dict[str, bytes] | None = None,
             origins: np.ndarray | None = None) -> dict[str, Any]:
        """Write a complete new model version (with its ``calibration``, when one is carried over
        from the previous version, the ``origins`` of its rows, and ``extra`` files) and swap it in
        as a unit; returns the
        manifest written.

        Raises:
            StorageError: a write failed; the previous model (if any) is untouched.
        """
        emb_bytes = _npy_bytes(np.ascontiguousarray(embeddings, dtype=np.float32))
        data = {EMBEDDINGS: emb_bytes, INDEX: index_bytes}
        if origins is not None:
            data[SOURCES] = _npy_bytes(np.ascontiguousarray(origins, dtype=np.int32))
        with _folder_lock(self.model_dir(role_id, roi_id)):
            manifest = seal({**self._stamp(role_id, roi_id, manifest, created_by), "schema_version": SCHEMA_VERSION,
                             "files": {name: _sha256(blob) for name, blob in data.items()}})
            files = {**(extra or {}), **data, MANIFEST: _json_bytes(manifest)}
            if calibration is not None:
                files[CALIBRATION] = _json_bytes(calibration)
            self._replace(role_id, roi_id, files, {}, f"cannot save model {role_id}/{roi_id}")
            self._keep_active(role_id, roi_id, manifest)
        return manifest

    def _replace(self, role_id: str, roi_id: str, files: dict[str, bytes], links: dict[str, Path],
                 failure: str) -> None:
        """Swap in a new folder holding ``files`` (written and fsynced) and ``links`` (hard links
        to existing files, copies where the file system has no hard links).

        Raises:
            StorageError: a write failed; the current folder is untouched.
        """
        role_dir = self.models_dir / role_id
        final = role_dir / roi_id
        tag = uuid.uuid4().hex[:8]
        staging = role_dir / f".{roi_id}.staging-{tag}"
        try:
            with _folder_lock(final):
                make_dirs(role_dir)
                staging.mkdir(mode=DIR_MODE)
                for name, source in links.items():
                    link_or_copy(source, staging / name)
                for name, data in files.items():
                    write_synced(staging / name, data)
                fsync_dir(staging)
                self._swap_in(staging, final, tag)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise StorageError(f"{failure}: {exc.strerror or exc}") from exc

    def _swap_in(self, staging: Path, final: Path, tag: str) -> None:
        old = final.with_name(f".{final.name}.old-{tag}")
        had_old = final.exists()
        if had_old:
            os.rename(final, old)
        try:
            os.rename(staging, final)
        except OSError:
            if had_old:
                os.rename(old, final)  # the second rename failed (no crash): put the old model back now
            raise
        fsync_dir(final.parent)
        if had_old:
            shutil.rmtree(old, ignore_errors=True)

    def write_calibration(self, role_id: str, roi_id: str, calibration: dict[str, Any],
                          manifest: dict[str, Any]) -> None:
        """Replace calibration.json and the manifest (its mirror of the threshold) in one swap; the
        data files are carried over as hard links.

        Raises:
            ModelNotFound: no model to calibrate.
            StorageError: a write failed; the model folder is untouched.
        """
        folder = self.model_dir(role_id, roi_id)
        with _folder_lock(folder):
            self.recover(role_id, roi_id)
            if not (folder / MANIFEST).is_file():
                raise ModelNotFound(f"memory not found for role_id={role_id} roi_id={roi_id}: fit the model first")
            manifest = seal(self._stamp(role_id, roi_id, manifest, "calibration"))
            files = {CALIBRATION: _json_bytes(calibration), MANIFEST: _json_bytes(manifest)}
            links = {p.name: p for p in folder.iterdir() if p.is_file() and p.name not in files
                     and not is_temp_file(p.name)}
            self._replace(role_id, roi_id, files, links, f"cannot write calibration.json of model {role_id}/{roi_id}")
            self._keep_active(role_id, roi_id, manifest)

    def delete(self, role_id: str, roi_id: str) -> bool:
        final = self.model_dir(role_id, roi_id)
        with _folder_lock(final):
            if not final.exists():
                return False
            # "trash", not "old": recovery removes it and never puts it back (a crash during the
            # rmtree below must not bring back half a deleted model)
            trash = final.with_name(f".{roi_id}.trash-{uuid.uuid4().hex[:8]}")
            try:
                os.rename(final, trash)  # one rename: the model disappears as a unit
                fsync_dir(final.parent)
            except OSError as exc:
                raise StorageError(f"cannot delete model {role_id}/{roi_id}: {exc.strerror or exc}") from exc
            shutil.rmtree(trash, ignore_errors=True)
            try:
                self.history(role_id, roi_id).remove_all()   # after a crash before this: recover_all does it
            except OSError as exc:
                log.warning("versions_not_removed", role_id=role_id, roi_id=roi_id, error=str(exc))
        return True

    # --- reading -------------------------------------------------------------------------

    def load(self, role_id: str, roi_id: str) -> ModelFiles:
        """Read and verify a model folder.

        Raises:
            ModelNotFound: no model for this role and ROI.
            CorruptModel: a file is missing, unreadable, or its checksum differs.
            IncompatibleModel: an unknown schema_version.
        """
        with _folder_lock(self.model_dir(role_id, roi_id)):
            return self._load(role_id, roi_id)

    def _load(self, role_id: str, roi_id: str) -> ModelFiles:
        self.recover(role_id, roi_id)
        folder = self.model_dir(role_id, roi_id)
        if not (folder / MANIFEST).is_file():
            raise ModelNotFound(f"memory not found for role_id={role_id} roi_id={roi_id}: fit the model first")
        return read_folder(folder, f"{role_id}/{roi_id}")

    # --- versions ------------------------------------------------------------------------

    def _current(self, role_id: str, roi_id: str) -> dict[str, Any] | None:
        """The verified manifest served now; None when there is none or it is damaged."""
        try:
            return self.read_manifest(role_id, roi_id)
        except CorruptModel:
            return None

    def _stamp(self, role_id: str, roi_id: str, manifest: dict[str, Any], created_by: str) -> dict[str, Any]:
        """``manifest`` as the next version: its number, when and by what it was made. The version
        served now is kept first (one stored before versions existed, or one a crash left unkept).

        Raises:
            StorageError: the served version cannot be kept; nothing was changed.
        """
        current = self._current(role_id, roi_id)
        if current is not None:
            self._keep_active(role_id, roi_id, current, strict=True)
        last = max([0, *self.history(role_id, roi_id).numbers(), *([version_of(current)] if current else [])])
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return {**manifest, "version": last + 1, "version_created_by": created_by, "version_created_at": created}

    def _keep_active(self, role_id: str, roi_id: str, manifest: dict[str, Any], *, strict: bool = False) -> None:
        """Keep the served folder as its version, then apply the retention. A failure after a new
        version was swapped in is logged (the next write or listing keeps it) unless ``strict``."""
        history, number = self.history(role_id, roi_id), version_of(manifest)
        try:
            history.keep(self.model_dir(role_id, roi_id), number)
            history.prune(self.versions_kept, number)
        except OSError as exc:
            if strict:
                raise StorageError(f"cannot keep version {number} of model {role_id}/{roi_id}: "
                                   f"{exc.strerror or exc}") from exc
            log.warning("version_not_kept", role_id=role_id, roi_id=roi_id, version=number, error=str(exc))

    def versions(self, role_id: str, roi_id: str) -> tuple[int | None, list[tuple[int, dict[str, Any]]]]:
        """(number served now or None, [(number, manifest as stored)] of the kept versions)."""
        with _folder_lock(self.model_dir(role_id, roi_id)):
            self.recover(role_id, roi_id)
            current = self._current(role_id, roi_id)
            if current is not None:
                self._keep_active(role_id, roi_id, current)
            history = self.history(role_id, roi_id)
            kept = [(n, m) for n in history.numbers() if (m := history.manifest(n)) is not None]
            return (version_of(current) if current else None), kept

    def next_model_version(self, role_id: str, roi_id: str) -> int:
        """A ``model_version`` no kept version of this model has used (a memory's number)."""
        with _folder_lock(self.model_dir(role_id, roi_id)):
            _, kept = self.versions(role_id, roi_id)
            current = self._current(role_id, roi_id) or {}
            used = [int(m.get("model_version") or 0) for _, m in kept] + [int(current.get("model_version") or 0)]
            return max(used) + 1

    def read_version(self, role_id: str, roi_id: str, number: int) -> tuple[ModelFiles, dict[str, bytes]]:
        """The verified files of kept version ``number``, and every file of it by name.

        Raises:
            VersionNotFound, CorruptModel, IncompatibleModel.
        """
        with _folder_lock(self.model_dir(role_id, roi_id)):
            history = self.history(role_id, roi_id)
            if not history.has(number):
                raise VersionNotFound(f"model {role_id}/{roi_id} has no kept version {number}")
            folder = history.path(number)
            files = read_folder(folder, f"{role_id}/{roi_id} version {number}")
            try:
                blobs = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
            except OSError as exc:
                raise CorruptModel(f"model {role_id}/{roi_id} version {number} cannot be read: {exc}") from exc
            return files, blobs

    def activate(self, role_id: str, roi_id: str, number: int) -> dict[str, Any]:
        """Serve kept version ``number`` (verified first) in one swap; returns its manifest.

        Raises:
            ModelNotFound, VersionNotFound, CorruptModel, IncompatibleModel, StorageError.
        """
        folder = self.model_dir(role_id, roi_id)
        with _folder_lock(folder):
            self.recover(role_id, roi_id)
            current = self._current(role_id, roi_id)
            if current is not None:
                self._keep_active(role_id, roi_id, current, strict=True)
            files, _ = self.read_version(role_id, roi_id, number)
            if current is None or version_of(current) != number:
                source = self.history(role_id, roi_id).path(number)
                links = {p.name: p for p in source.iterdir() if p.is_file() and not is_temp_file(p.name)}
                self._replace(role_id, roi_id, {}, links, f"cannot activate version {number} of {role_id}/{roi_id}")
            return files.manifest


    def read_manifest(self, role_id: str, roi_id: str) -> dict[str, Any] | None:
        with _folder_lock(self.model_dir(role_id, roi_id)):
            self.recover(role_id, roi_id)
            path = self.model_dir(role_id, roi_id) / MANIFEST
            if not path.is_file():
                return None
            manifest = _read_json(path, f"{role_id}/{roi_id}")
            # verified here too: calibrate_ng re-seals what it reads, which would launder an edit
            if manifest.get("manifest_sha256") != _manifest_digest(manifest):
                raise CorruptModel(f"model {role_id}/{roi_id}: manifest.json was edited or damaged "
                                   "(checksum mismatch); refit the model")
            return manifest

    def read_calibration(self, role_id: str, roi_id: str, model_version: object) -> dict[str, Any] | None:
        """calibration.json of the model, when there is one and it belongs to ``model_version``.

        Raises:
            CorruptModel: calibration.json is not a JSON object.
        """
        with _folder_lock(self.model_dir(role_id, roi_id)):
            path = self.model_dir(role_id, roi_id) / CALIBRATION
            if not path.is_file():
                return None
            calibration = _read_json(path, f"{role_id}/{roi_id}")
            return calibration if calibration.get("model_version") == model_version else None

    def list(self) -> list[tuple[str, str]]:
        """(role_id, roi_id) of every stored model."""
        if not self.models_dir.is_dir():
            return []
        found = []
        for role in sorted(p for p in self.models_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for roi in sorted(p for p in role.iterdir() if p.is_dir() and not p.name.startswith(".")):
                if (roi / MANIFEST).is_file():
                    found.append((role.name, roi.name))
        return found

    # --- crash recovery ------------------------------------------------------------------

    def recover(self, role_id: str, roi_id: str) -> None:
        """Finish or undo a swap cut short by a crash, and remove leftovers of this model."""
        role_dir = self.models_dir / role_id
        if not role_dir.is_dir():
            return
        final = role_dir / roi_id
        with _folder_lock(final):
            olds = sorted(role_dir.glob(f".{roi_id}.old-*"), key=lambda p: p.stat().st_mtime)
            stagings = [*role_dir.glob(f".{roi_id}.staging-*"), *role_dir.glob(f".{roi_id}.trash-*")]
            if not olds and not stagings:
                return
            if not final.exists() and olds:
                os.rename(olds.pop(), final)  # cut between the two renames: put the old model back
                fsync_dir(role_dir)
            for leftover in [*olds, *stagings]:
                shutil.rmtree(leftover, ignore_errors=True)

    def recover_all(self) -> None:
        """Recover every model (see ``recover``) and its kept versions, and remove temp files left
        inside model folders."""
        for role in self.models_dir.iterdir() if self.models_dir.is_dir() else ():
            if not role.is_dir():
                continue
            rois = {m.group(1) for p in role.iterdir() if (m := _LEFTOVER.fullmatch(p.name))}
            for roi in rois:
                self.recover(role.name, roi)
            for folder in role.iterdir():
                if folder.is_dir() and not folder.name.startswith("."):
                    with _folder_lock(folder):
                        remove_temp_files(folder)
        for history in self.versions_dir.glob("*/*") if self.versions_dir.is_dir() else ():
            VersionHistory(history).recover()
            if history.is_dir() and not self.model_dir(history.parent.name, history.name).exists():
                VersionHistory(history).remove_all()     # a delete cut short between its two removals


def read_folder(folder: Path, where: str) -> ModelFiles:
    """Read and verify the model files in ``folder`` (``where`` names it in errors).

    Raises:
        CorruptModel: a file is missing, unreadable, or its checksum differs.
        IncompatibleModel: an unknown schema_version.
    """
    manifest = _read_json(folder / MANIFEST, where)
    if manifest.get("manifest_sha256") != _manifest_digest(manifest):
        raise CorruptModel(
            f"model {where}: manifest.json was edited or damaged (checksum mismatch); refit the model")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise IncompatibleModel(f"model {where} has schema_version {version!r}; this engine reads {SCHEMA_VERSION}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise CorruptModel(f"model {where}: manifest has no file checksums")
    blobs = {}
    for name in (EMBEDDINGS, INDEX, *((SOURCES,) if SOURCES in files else ())):
        try:
            data = (folder / name).read_bytes()
        except OSError as exc:
            raise CorruptModel(f"model {where}: {name} cannot be read ({exc.strerror or exc})") from exc
        if _sha256(data) != files.get(name):
            raise CorruptModel(f"model {where}: {name} checksum mismatch (truncated or edited); refit the model")
        blobs[name] = data
    try:
        embeddings = np.load(io.BytesIO(blobs[EMBEDDINGS]), allow_pickle=False)
    except ValueError as exc:
        raise CorruptModel(f"model {where}: {EMBEDDINGS} is not a valid array: {exc}") from exc
    calibration = None
    if (folder / CALIBRATION).is_file():
        calibration = _read_json(folder / CALIBRATION, where)
        if calibration.get("model_version") != manifest.get("model_version"):
            calibration = None  # left from another model version: not this model's
    return ModelFiles(manifest, embeddings, blobs[INDEX], calibration, _origins(blobs.get(SOURCES), where))


def version_of(manifest: dict[str, Any]) -> int:
    """The version number of a stored manifest (a model stored before versions existed is 1)."""
    return int(manifest.get("version") or 1)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _origins(data: bytes | None, where: str) -> np.ndarray | None:
    """sources.npy as (M, 3) int32, or None when the model has none."""
    if data is None:
        return None
    try:
        origins = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:
        raise CorruptModel(f"model {where}: {SOURCES} is not a valid array: {exc}") from exc
    if origins.ndim != 2 or origins.shape[1] != 3 or origins.dtype != np.int32:
        raise CorruptModel(f"model {where}: {SOURCES} is not an (M, 3) int32 array")
    return origins


def _read_json(path: Path, where: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:   # ValueError: not UTF-8, not JSON, 4300+ digits
        raise CorruptModel(f"model {where}: {path.name} is unreadable or not JSON ({str(exc)[:200]})") from exc
    if not isinstance(data, dict):
        raise CorruptModel(f"model {where}: {path.name} is not a JSON object")
    return data
