"""The engine's one error tree. Every error carries a stable wire ``code`` and an HTTP-like
``status``; both doors map errors to replies from these two attributes alone.

* EngineError (500 engine_error)
  - InvalidInput (400 invalid_input)
    - InvalidId (400 invalid_id)
    - InvalidShape (400 invalid_shape)
    - InvalidImage (400 invalid_image)
    - ReservedRecipe (400 reserved_recipe)
    - InvalidHost (400 invalid_host)
    - ArchiveInvalid (400 archive_invalid)
  - Unauthorized (401 unauthorized)
  - CrossSiteRequest (403 cross_site_request)
  - ModelNotFound (404 model_not_found)
  - SampleNotFound (404 sample_not_found)
  - VersionNotFound (404 version_not_found)
  - ImageNotKept (404 image_not_kept)
  - MmPerPxMismatch (409 mm_per_px_mismatch)
  - ModelChanged (409 model_changed)
  - FitInProgress (409 fit_in_progress)
  - PayloadTooLarge (413 payload_too_large)
  - CalibrationMissing (428 calibration_missing)
  - ModelFileError (500 model_file_error)
    - CorruptModel (500 corrupt_model)
    - IncompatibleModel (500 incompatible_model)
  - WeightsError (500 weights_invalid)
  - ServerBusy (503 server_busy)
  - StorageError (507 storage_error)
"""

from __future__ import annotations

__all__ = [
    "ArchiveInvalid",
    "CalibrationMissing",
    "CorruptModel",
    "CrossSiteRequest",
    "EngineError",
    "FitInProgress",
    "ImageNotKept",
    "IncompatibleModel",
    "InvalidHost",
    "InvalidId",
    "InvalidImage",
    "InvalidInput",
    "InvalidShape",
    "MmPerPxMismatch",
    "ModelChanged",
    "ModelFileError",
    "ModelNotFound",
    "PayloadTooLarge",
    "ReservedRecipe",
    "SampleNotFound",
    "ServerBusy",
    "StorageError",
    "Unauthorized",
    "VersionNotFound",
    "WeightsError",
]


class EngineError(Exception):
    """Base of every error the engine raises on purpose."""

    code: str = "engine_error"
    status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class InvalidInput(EngineError):
    code, status = "invalid_input", 400


class InvalidId(InvalidInput):
    code, status = "invalid_id", 400


class InvalidShape(InvalidInput):
    code, status = "invalid_shape", 400


class InvalidImage(InvalidInput):
    code, status = "invalid_image", 400


class ReservedRecipe(InvalidInput):
    code, status = "reserved_recipe", 400


class InvalidHost(InvalidInput):
    """The request's ``Host`` is not a name this server answers to (DNS rebinding)."""

    code, status = "invalid_host", 400


class ArchiveInvalid(InvalidInput):
    """A model archive that cannot be installed: truncated, tampered with, unsafe member names, or
    made for another backbone, input rule or storage schema. Nothing is installed."""

    code, status = "archive_invalid", 400


class Unauthorized(EngineError):
    code, status = "unauthorized", 401


class CrossSiteRequest(EngineError):
    """A state-changing request sent by a web page of another origin (cross-site request forgery)."""

    code, status = "cross_site_request", 403


class ModelNotFound(EngineError):
    code, status = "model_not_found", 404


class SampleNotFound(EngineError):
    code, status = "sample_not_found", 404


class VersionNotFound(EngineError):
    """No kept version of this model has that number (older ones are removed by retention)."""

    code, status = "version_not_found", 404
class ImageNotKept(EngineError):
    """A training image an explanation names is not stored: the fit's images came with the request
    (only stored dataset samples are kept), or the sample was deleted since."""

    code, status = "image_not_kept", 404


class MmPerPxMismatch(EngineError):
    code, status = "mm_per_px_mismatch", 409


class ModelChanged(EngineError):
    """The model was refitted while a calibration was being computed on the previous version."""

    code, status = "model_changed", 409


class FitInProgress(EngineError):
    """A fit of this model is running; the call is refused at once instead of waiting for it."""

    code, status = "fit_in_progress", 409


class PayloadTooLarge(EngineError):
    code, status = "payload_too_large", 413


class CalibrationMissing(EngineError):
    code, status = "calibration_missing", 428


class ModelFileError(EngineError):
    code, status = "model_file_error", 500


class CorruptModel(ModelFileError):
    code, status = "corrupt_model", 500


class IncompatibleModel(ModelFileError):
    code, status = "incompatible_model", 500


class WeightsError(EngineError):
    """A backbone weights file is missing, truncated, or not the expected one."""

    code, status = "weights_invalid", 500


class ServerBusy(EngineError):
    """The process-wide memory budget (or a queue) is full; the request did no work: retry later."""

    code, status = "server_busy", 503


class StorageError(EngineError):
    """Writing to the data root failed (full disk, permissions); nothing stored was changed."""

    code, status = "storage_error", 507
