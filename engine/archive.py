"""Portable model archives: one zip file holding one model version.

Members::

    archive.json        format, engine and schema versions, backbone, input rule, origin
    checksums.json      sha256 of every ``model/`` member
    model/<file>        every file of the version folder (manifest, memory, index, calibration...)

Reading trusts nothing inside the file: member names must be plain names from that list (no
absolute path, no ``..``, no folder, no link), sizes are bounded (a member is read at most to
its bound, whatever its header says), every checksum must match, the manifest must carry its own
valid seal and file checksums (``engine.storage.read_folder``), and the backbone, its weights, the
input rule and the schema must be this engine's. Nothing is unpickled (arrays are read with
``allow_pickle=False``).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine import __version__
from engine.backbones import BackboneInfo
from engine.errors import ArchiveInvalid, ModelFileError
from engine.recipes import manifest_layout
from engine.storage import SCHEMA_VERSION, ModelFiles, read_folder

__all__ = ["FORMAT", "FORMAT_VERSION", "Archive", "read_archive", "write_archive"]

FORMAT = "inspection-model-archive"
FORMAT_VERSION = 1
_INFO, _CHECKSUMS, _MODEL = "archive.json", "checksums.json", "model/"
_MEMBER = re.compile(r"model/[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}|archive\.json|checksums\.json")
_REQUIRED = {_INFO, _CHECKSUMS, "model/manifest.json", "model/embeddings.npy", "model/coreset.faiss"}
_MAX_MEMBERS = 64
_MAX_JSON_BYTES = 16 * 1024 * 1024


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_archive(files: dict[str, bytes], origin: dict[str, Any], backbone: BackboneInfo) -> bytes:
    """The archive of one version's ``files`` (name -> bytes); ``origin`` names where it came from."""
    manifest = json.loads(files["manifest.json"])
    info = {"format": FORMAT, "format_version": FORMAT_VERSION, "engine_version": __version__,
            "schema_version": manifest.get("schema_version"), "input": manifest.get("input"), "origin": origin,
            "backbone": {"name": backbone.name, "weights_sha256": backbone.weights_sha256}}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(_INFO, json.dumps(info, indent=2, sort_keys=True))
        zf.writestr(_CHECKSUMS, json.dumps({name: _sha256(data) for name, data in sorted(files.items())}, indent=2))
        for name, data in sorted(files.items()):
            zf.writestr(_MODEL + name, data)
    return buf.getvalue()


@dataclass(frozen=True)
class Archive:
    """A verified archive: its model files (verified like a stored model), every file by name, and
    its archive.json."""

    model: ModelFiles
    files: dict[str, bytes]
    info: dict[str, Any]


def read_archive(data: bytes, backbone: BackboneInfo, max_bytes: int) -> Archive:
    """Verify an archive completely (see the module text); ``max_bytes`` bounds its unpacked size.

    Raises:
        ArchiveInvalid: what is wrong with it, first fault found; nothing is installed.
    """
    members = _members(data, max_bytes)
    info = _json(members[_INFO], _INFO)
    checksums = _json(members[_CHECKSUMS], _CHECKSUMS)
    files = {name[len(_MODEL):]: blob for name, blob in members.items() if name.startswith(_MODEL)}
    if set(checksums) != set(files):
        raise ArchiveInvalid("checksums.json does not list exactly the model files")
    for name, blob in files.items():
        if checksums[name] != _sha256(blob):
            raise ArchiveInvalid(f"{name} checksum mismatch (tampered with or damaged)")
    if info.get("format") != FORMAT or info.get("format_version") != FORMAT_VERSION:
        raise ArchiveInvalid(f"not a {FORMAT} version {FORMAT_VERSION} file")
    with tempfile.TemporaryDirectory(prefix="model-import-") as tmp:
        for name, blob in files.items():
            (Path(tmp) / name).write_bytes(blob)
        try:
            model = read_folder(Path(tmp), "in the archive")
        except ModelFileError as exc:
            raise ArchiveInvalid(f"{exc.message}") from exc
    _check_compatible(model.manifest, info, backbone)
    return Archive(model, files, info)


def _members(data: bytes, max_bytes: int) -> dict[str, bytes]:
    """Every member by name, each checked and read at most to the bound left."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise ArchiveInvalid(f"not a zip file, or truncated ({exc})") from exc
    out: dict[str, bytes] = {}
    left = max_bytes
    with zf:
        entries = zf.infolist()
        if len(entries) > _MAX_MEMBERS:
            raise ArchiveInvalid(f"{len(entries)} members (at most {_MAX_MEMBERS})")
        for entry in entries:
            name = entry.filename
            if not _MEMBER.fullmatch(name) or name in out:
                raise ArchiveInvalid(f"member name {name[:200]!r} is not allowed")
            if stat.S_ISLNK(entry.external_attr >> 16) or entry.is_dir():
                raise ArchiveInvalid(f"member {name!r} is a link or a folder")
            try:
                with zf.open(entry) as fh:
                    blob = fh.read(left + 1)
            except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as exc:
                raise ArchiveInvalid(f"member {name!r} cannot be read ({exc})") from exc
            if len(blob) > left:
                raise ArchiveInvalid(f"unpacks to more than {max_bytes} bytes")
            left -= len(blob)
            out[name] = blob
    missing = sorted(_REQUIRED - set(out))
    if missing:
        raise ArchiveInvalid(f"missing {', '.join(missing)}")
    return out


def _json(blob: bytes, name: str) -> dict[str, Any]:
    if len(blob) > _MAX_JSON_BYTES:
        raise ArchiveInvalid(f"{name} is too large")
    try:
        value = json.loads(blob)
    except (ValueError, RecursionError) as exc:
        raise ArchiveInvalid(f"{name} is not JSON") from exc
    if not isinstance(value, dict):
        raise ArchiveInvalid(f"{name} is not a JSON object")
    return value


def _check_compatible(manifest: dict[str, Any], info: dict[str, Any], backbone: BackboneInfo) -> None:
    """The archive's model must replay on this engine: same backbone and weights, same input rule
    and normalization; the side and feature layout are the model's own recipe (any side on the
    backbone's stride grid, a valid layout)."""
    fitted = manifest.get("backbone") or {}
    if fitted.get("name") != backbone.name or fitted.get("weights_sha256") != backbone.weights_sha256:
        raise ArchiveInvalid(
            f"the model was fitted with backbone {fitted.get('name')} (weights "
            f"{str(fitted.get('weights_sha256'))[:12]}); this engine runs {backbone.name} "
            f"(weights {backbone.weights_sha256[:12]})")
    rule = manifest.get("input") or {}
    normalization = rule.get("normalization") or {}
    side = rule.get("side")
    on_grid = isinstance(side, int) and not isinstance(side, bool) and side > 0 and side % backbone.stride == 0
    if (rule.get("rule") != "resize_square" or not on_grid
            or normalization.get("mean") != list(backbone.mean) or normalization.get("std") != list(backbone.std)):
        raise ArchiveInvalid(f"the model's input rule {rule.get('rule')}/{side} is not this engine's "
                             f"(resize_square to a multiple of {backbone.stride} px with its normalization)")
    try:
        manifest_layout(manifest)
    except (TypeError, ValueError, KeyError) as exc:
        raise ArchiveInvalid(f"the model's feature layout {manifest.get('features')!r} is invalid") from exc
    if info.get("schema_version") != SCHEMA_VERSION or info.get("input") != manifest.get("input"):
        raise ArchiveInvalid(f"archive.json does not describe its model (schema "
                             f"{info.get('schema_version')!r}, this engine stores {SCHEMA_VERSION})")
