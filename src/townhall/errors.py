"""The one exception hierarchy of the API.

Domain code raises these; ``control.app`` maps every one of them (and every framework error) to
``{"error": {"code", "message"}}`` with the matching status in one place.
"""

from __future__ import annotations

import json


def error_body(code: str, message: str) -> bytes:
    """The one error document, ``{"error": {"code", "message"}}``, rendered as the app's
    ``JSONResponse`` renders it (compact, UTF-8): the routes, and the answers the HTTP protocol
    writes itself (listener requests, joins), send the same bytes."""
    return json.dumps(
        {"error": {"code": code, "message": message}},
        ensure_ascii=False,
        allow_nan=False,
        separators=(",", ":"),
    ).encode()


class ApiError(Exception):
    """Base of every error a client may see."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, code: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.retry_after = retry_after


class BadRequest(ApiError):
    status = 400
    code = "bad_request"


class Unauthorized(ApiError):
    status = 401
    code = "unauthorized"


class Forbidden(ApiError):
    status = 403
    code = "forbidden"


class NotFound(ApiError):
    status = 404
    code = "not_found"


class Conflict(ApiError):
    status = 409
    code = "conflict"


class UnsupportedMediaType(ApiError):
    status = 415
    code = "unsupported_media_type"


class RangeNotSatisfiable(ApiError):
    status = 416
    code = "range_not_satisfiable"


class PayloadTooLarge(ApiError):
    status = 413
    code = "payload_too_large"


class UnprocessableEntity(ApiError):
    status = 422
    code = "validation_error"


class TooManyRequests(ApiError):
    status = 429
    code = "rate_limited"


class ServiceUnavailable(ApiError):
    status = 503
    code = "unavailable"


class NotYetAvailable(ServiceUnavailable):
    """A live object that does not exist yet (a part still being encoded)."""

    code = "not_yet_available"
