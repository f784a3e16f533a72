"""Uploaded image parts: limits, their real file names, and reading them one at a time.

Starlette spools every file part to a temporary file (1 MiB in memory, the rest on disk), so a
fit with hundreds of images holds at most one decoded upload in memory when the engine iterates
``UploadedImages`` lazily.
"""

from __future__ import annotations

import email.errors
import email.message
import email.utils
from collections.abc import Iterable, Sequence
from email.header import decode_header, make_header
from typing import Any, overload

from fastapi import Request, UploadFile

from engine.errors import InvalidInput, PayloadTooLarge
from engine.limits import ValueRefused, parse_json
from engine.settings import Settings

__all__ = ["UploadedImages", "collect_images", "one_image_part", "parse_batch_items", "parse_json_part",
           "part_filename"]


class UploadedImages(Sequence[bytes]):
    """The image parts of one request as a sequence of bytes, each read when indexed."""

    def __init__(self, files: Sequence[UploadFile]) -> None:
        self._files = list(files)

    def __len__(self) -> int:
        return len(self._files)

    @overload
    def __getitem__(self, index: int) -> bytes: ...
    @overload
    def __getitem__(self, index: slice) -> list[bytes]: ...

    def __getitem__(self, index: int | slice) -> bytes | list[bytes]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        spooled = self._files[index].file
        spooled.seek(0)
        return spooled.read()


def collect_images(settings: Settings, *groups: Iterable[UploadFile] | None, max_count: int) -> list[UploadFile]:
    """All file parts of the given groups (e.g. ``images`` and ``images[]``), limits enforced.

    Raises:
        PayloadTooLarge: more than ``max_count`` files, or one over ``settings.max_image_bytes``.
    """
    files = [f for group in groups if group for f in group]
    if len(files) > max_count:
        raise PayloadTooLarge(f"{len(files)} images in one request; the limit is {max_count}")
    for f in files:
        size = f.size if f.size is not None else f.file.seek(0, 2)   # seek returns the new offset
        if size > settings.max_image_bytes:
            raise PayloadTooLarge(
                f"image {part_filename(f) or '?'!r} is {size} bytes; the limit is {settings.max_image_bytes}"
            )
    return files


def part_filename(upload: UploadFile) -> str | None:
    """The part's file name, preferring RFC 2231 ``filename*`` as .NET sends it for non-ASCII names.

    Starlette keeps only ``filename=``, which .NET fills with an RFC 2047 encoded word there. A
    header that cannot be decoded (unknown charset, broken encoded word, bad escapes) leaves the
    name as sent: the file name check then refuses it if it is not a safe name.
    """
    disposition = upload.headers.get("content-disposition")
    if disposition:
        try:
            msg = email.message.Message()
            msg["content-disposition"] = disposition
            for key, value in msg.get_params(header="content-disposition", failobj=[])[1:]:
                if key.lower() == "filename" and isinstance(value, tuple):   # came from filename*=
                    return str(email.utils.collapse_rfc2231_value(value))
        except (email.errors.MessageError, ValueError, LookupError, TypeError):
            pass
    name = upload.filename
    if name and name.startswith("=?") and name.endswith("?="):
        try:
            return str(make_header(decode_header(name)))
        except (email.errors.MessageError, ValueError, LookupError):
            return name
    return name


async def one_image_part(request: Request) -> None:
    """Refuse a second ``image`` part (/infer scores one image; a second one was silently ignored).

    Raises:
        InvalidInput: more than one ``image`` part.
    """
    form = await request.form()            # parsed once per request; cached by Starlette
    count = len(form.getlist("image"))
    if count > 1:
        raise InvalidInput(f"/infer takes one image part, got {count}: use /infer_batch for several")


def _json_text(name: str, text: str, settings: Settings) -> Any:
    try:
        return parse_json(text, max_depth=settings.max_json_depth, max_items=settings.max_json_items)
    except ValueRefused as exc:
        raise (PayloadTooLarge if exc.too_large else InvalidInput)(f"{name}: {exc}") from None


def parse_json_part(name: str, text: str | None, settings: Settings) -> dict[str, Any] | None:
    """A JSON-object text field (``metas``), or None when absent or blank.

    Raises:
        InvalidInput: not JSON (NaN, deep nesting, huge numbers included), or not an object.
        PayloadTooLarge: more items than ``settings.max_json_items``.
    """
    if text is None or not text.strip():
        return None
    value = _json_text(name, text, settings)
    if not isinstance(value, dict):
        raise InvalidInput(f"{name} must be a JSON object, got {type(value).__name__}")
    return value


def parse_batch_items(text: str, n_images: int, settings: Settings) -> list[dict[str, Any]]:
    """The ``items`` JSON of /infer_batch: one object per image part, in order.

    Raises:
        InvalidInput: not a JSON list of objects, or not as many items as images.
        PayloadTooLarge: more items than ``settings.max_batch_items``.
    """
    items = _json_text("items", text, settings)
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise InvalidInput("items must be a JSON list of objects {roi_id, mm_per_px, shape?}")
    if len(items) > settings.max_batch_items:
        raise PayloadTooLarge(f"{len(items)} items exceed the limit of {settings.max_batch_items} per batch")
    if len(items) != n_images:
        raise InvalidInput(f"{len(items)} items but {n_images} images: send one image part per item")
    return items
