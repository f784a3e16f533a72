"""The OK/NG sample store the GUI fills: ``datasets/<role>/<roi>/{ok,ng}/<file>``.

Each sample may carry a metadata file ``<file>.meta.json`` (what the GUI sent: mm_per_px,
shape_json, angle, timestamps...). Writes are atomic; names are validated so nothing is read
or written outside the sample folder.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from engine.errors import InvalidInput, SampleNotFound, StorageError
from engine.images import IMAGE_SUFFIXES
from engine.storage import atomic_write_bytes, atomic_write_json, make_dirs
from engine.validate import LABELS, check_filename, label as check_label

__all__ = ["LABELS", "META_SUFFIX", "DatasetStore", "StoredSamples"]

META_SUFFIX = ".meta.json"


class DatasetStore:
    """Samples of one recipe: ``<base>/datasets/<role>/<roi>/<label>/``."""

    def __init__(self, base: Path) -> None:
        self.root = Path(base) / "datasets"

    def folder(self, role_id: str, roi_id: str, label: str) -> Path:
        return self.root / role_id / roi_id / check_label(label)

    def add(self, role_id: str, roi_id: str, label: str, image: bytes, filename: str | None,
            meta: dict[str, Any] | None, extension: str) -> tuple[str, int]:
        """Store one (already validated) image and its metadata; returns (filename, bytes)."""
        folder = self.folder(role_id, roi_id, label)
        if filename is None:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
            filename = f"{label}_{stamp}_{uuid.uuid4().hex[:8]}{extension}"
        name = check_filename(filename)
        if not name.lower().endswith(IMAGE_SUFFIXES):
            raise InvalidInput(f"filename {name!r} must end with one of {', '.join(IMAGE_SUFFIXES)}")
        try:
            make_dirs(folder)
        except OSError as exc:
            raise StorageError(f"cannot create dataset folder: {exc.strerror or exc}") from exc
        atomic_write_bytes(folder / name, bytes(image))
        if meta is not None:
            atomic_write_json(folder / (name + META_SUFFIX), meta)
        return name, len(image)

    def files(self, role_id: str, roi_id: str, label: str) -> list[str]:
        folder = self.folder(role_id, roi_id, label)
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir()
                      if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES) and not p.name.startswith("."))

    def has_meta(self, role_id: str, roi_id: str, label: str, filename: str) -> bool:
        return (self.folder(role_id, roi_id, label) / (filename + META_SUFFIX)).is_file()

    def read(self, role_id: str, roi_id: str, label: str, filename: str) -> bytes:
        path = self._existing(role_id, roi_id, label, filename)
        return path.read_bytes()

    def meta(self, role_id: str, roi_id: str, label: str, filename: str) -> dict[str, Any]:
        path = self._existing(role_id, roi_id, label, filename)
        meta_path = path.with_name(path.name + META_SUFFIX)
        if not meta_path.is_file():
            return {}
        try:
            data = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return {}
        return data if isinstance(data, dict) else {}

    def delete(self, role_id: str, roi_id: str, label: str, filename: str) -> int:
        path = self._existing(role_id, roi_id, label, filename)
        path.unlink()
        path.with_name(path.name + META_SUFFIX).unlink(missing_ok=True)
        return 1

    def clear(self, role_id: str, roi_id: str, label: str | None) -> int:
        removed = 0
        for lab in (label,) if label is not None else LABELS:
            for name in self.files(role_id, roi_id, lab):
                removed += self.delete(role_id, roi_id, lab, name)
        return removed

    def _existing(self, role_id: str, roi_id: str, label: str, filename: str) -> Path:
        path = self.folder(role_id, roi_id, label) / check_filename(filename)
        if not path.is_file():
            raise SampleNotFound(f"no {label} sample named {filename!r} for {role_id}/{roi_id}")
        return path


class StoredSamples(Sequence[bytes]):
    """Stored samples of one label read one at a time as a consumer reaches them (bounded memory)."""

    def __init__(self, store: DatasetStore, role_id: str, roi_id: str, label: str, names: list[str]) -> None:
        self._store, self._role, self._roi, self._label, self.names = store, role_id, roi_id, label, names

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> bytes:  # type: ignore[override]
        return self._store.read(self._role, self._roi, self._label, self.names[index])
