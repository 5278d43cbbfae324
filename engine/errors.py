"""The engine's one exception tree; the API maps each class to an HTTP status."""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error the engine raises on purpose."""

    code = "engine_error"
    status = 500

    def __init__(self, message: str, *, field: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        if code is not None:
            self.code = code

    def to_dict(self) -> dict:
        """The JSON body an HTTP client gets for this error."""
        return {"error": {"code": self.code, "message": self.message, "field": self.field}}


class ConfigError(EngineError):
    """A setting is missing, mistyped or unsafe; `field` is its key path."""

    code = "config_error"


class ValidationError(EngineError):
    """Input that does not follow the protocol; `field` names the offending path."""

    code = "invalid"
    status = 400


class PayloadTooLarge(ValidationError):
    """A body or event over the documented size limit."""

    code = "too_large"
    status = 413


class AuthError(EngineError):
    """A missing or unknown API key."""

    code = "unauthorized"
    status = 401


class ForbiddenError(EngineError):
    """A known key whose role does not allow this call."""

    code = "forbidden"
    status = 403


class NotFound(EngineError):
    """The named customer, or other resource, does not exist."""

    code = "not_found"
    status = 404


class Unavailable(EngineError):
    """A dependency (Redis, a shard) cannot answer now; the client may retry."""

    code = "unavailable"
    status = 503


class StoreError(Unavailable):
    """Redis refused or failed a command."""

    code = "store_unavailable"


class ModelError(EngineError):
    """A model file that cannot be used: unreadable, corrupt, or of another feature schema."""

    code = "model_refused"
    status = 422
