"""Tripwires for the error tree: one code per class, deliberate statuses, ``__all__`` in step."""

from __future__ import annotations

import inspect

import pytest

import engine.errors as errors_module
from engine.errors import EngineError

ALLOWED_STATUSES = {400, 401, 403, 404, 409, 413, 428, 500, 503, 507}

# the deliberate status of every class: a new class, or a changed status, must be added here
EXPECTED = {
    "EngineError": ("engine_error", 500),
    "InvalidInput": ("invalid_input", 400),
    "InvalidId": ("invalid_id", 400),
    "InvalidShape": ("invalid_shape", 400),
    "InvalidImage": ("invalid_image", 400),
    "ReservedRecipe": ("reserved_recipe", 400),
    "InvalidHost": ("invalid_host", 400),
    "ArchiveInvalid": ("archive_invalid", 400),
    "Unauthorized": ("unauthorized", 401),
    "CrossSiteRequest": ("cross_site_request", 403),
    "ModelNotFound": ("model_not_found", 404),
    "SampleNotFound": ("sample_not_found", 404),
    "VersionNotFound": ("version_not_found", 404),
    "ImageNotKept": ("image_not_kept", 404),
    "MmPerPxMismatch": ("mm_per_px_mismatch", 409),
    "ModelChanged": ("model_changed", 409),
    "FitInProgress": ("fit_in_progress", 409),
    "PayloadTooLarge": ("payload_too_large", 413),
    "CalibrationMissing": ("calibration_missing", 428),
    "ModelFileError": ("model_file_error", 500),
    "CorruptModel": ("corrupt_model", 500),
    "IncompatibleModel": ("incompatible_model", 500),
    "WeightsError": ("weights_invalid", 500),
    "ServerBusy": ("server_busy", 503),
    "StorageError": ("storage_error", 507),
}


def _all_subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub, *_all_subclasses(sub)}
    return out


def _engine_error_classes() -> list[type[EngineError]]:
    # importing the doors registers any error class they define
    for name in ("engine.api", "ipc", "http_compat"):
        pytest.importorskip(name)
    return sorted({EngineError, *_all_subclasses(EngineError)}, key=lambda c: c.__qualname__)


def test_every_engine_error_has_its_own_code_and_a_deliberate_status() -> None:
    classes = _engine_error_classes()
    codes = [cls.code for cls in classes]
    assert len(codes) == len(set(codes)), f"duplicate codes: {sorted(c for c in codes if codes.count(c) > 1)}"
    for cls in classes:
        assert "code" in vars(cls) and "status" in vars(cls), f"{cls.__name__} inherits its code or status"
        assert isinstance(cls.code, str) and cls.code.islower() and " " not in cls.code
        assert cls.status in ALLOWED_STATUSES, (cls.__name__, cls.status)


def test_engine_errors_are_the_documented_tree() -> None:
    classes = {cls.__name__: cls for cls in _engine_error_classes() if cls.__module__ == "engine.errors"}
    assert {name: (cls.code, cls.status) for name, cls in classes.items()} == EXPECTED
    # the tree drawn in the module docstring names every class
    for name in EXPECTED:
        assert name in (errors_module.__doc__ or ""), name


def test_errors_all_lists_exactly_the_public_classes() -> None:
    public = {name for name, obj in vars(errors_module).items()
              if inspect.isclass(obj) and obj.__module__ == "engine.errors" and not name.startswith("_")}
    assert sorted(errors_module.__all__) == sorted(public)
    assert len(errors_module.__all__) == len(set(errors_module.__all__))
    assert all(issubclass(getattr(errors_module, name), EngineError) for name in errors_module.__all__)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_error_carries_message_and_wire_dict(name: str) -> None:
    cls = getattr(errors_module, name)
    exc = cls("something went wrong")
    assert str(exc) == exc.message == "something went wrong"
    assert exc.to_dict() == {"code": cls.code, "message": "something went wrong"}
    assert isinstance(exc, EngineError) and isinstance(exc, Exception)


def test_families() -> None:
    from engine.errors import (
        CorruptModel,
        IncompatibleModel,
        InvalidHost,
        InvalidId,
        InvalidImage,
        InvalidInput,
        InvalidShape,
        ModelFileError,
        ReservedRecipe,
    )
    for cls in (InvalidId, InvalidShape, InvalidImage, ReservedRecipe, InvalidHost):
        assert issubclass(cls, InvalidInput)
    for cls in (CorruptModel, IncompatibleModel):
        assert issubclass(cls, ModelFileError)
