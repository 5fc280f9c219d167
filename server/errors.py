"""The one exception tree of the server.

Every failure that reaches a client is an ``EnclaveError``: errors raised by vLLM,
sentence-transformers, pydantic or the file system are translated into one of these at
the boundary where they happen, so the API never shows a stack trace, a path or an
address. Each class fixes the HTTP status and the OpenAI ``type``; ``code`` and ``param``
say what exactly was wrong.
"""

from __future__ import annotations


class EnclaveError(Exception):
    status_code = 500
    error_type = "server_error"
    default_code: str | None = None

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, status_code: int | None = None, headers: dict[str, str] | None = None
    ):
        super().__init__(message)
        if status_code is not None:
            self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        # Response headers the error carries (Retry-After; a failed turn's trace id).
        self.headers: dict[str, str] = dict(headers or {})

    def to_body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequestError(EnclaveError):
    """The request is malformed or asks for something the server cannot do (400)."""

    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthExceededError(InvalidRequestError):
    default_code = "context_length_exceeded"


class AuthenticationError(EnclaveError):
    status_code = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDeniedError(EnclaveError):
    status_code = 403
    error_type = "permission_error"
    default_code = "insufficient_scope"


class NotFoundError(EnclaveError):
    status_code = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


class ModelNotFoundError(NotFoundError):
    default_code = "model_not_found"


class ConflictError(EnclaveError):
    """The resource is in a state that forbids the request (an action already cancelled)."""

    status_code = 409
    error_type = "invalid_request_error"
    default_code = "conflict"


class RequestTooLargeError(EnclaveError):
    status_code = 413
    error_type = "invalid_request_error"
    default_code = "request_too_large"


class InsufficientQuotaError(EnclaveError):
    """The API key's budget cannot cover this request (429, as OpenAI reports it)."""

    status_code = 429
    error_type = "insufficient_quota"
    default_code = "insufficient_quota"


class ServiceUnavailableError(EnclaveError):
    """The engine is still loading, or failed (503): the client may retry later."""

    status_code = 503
    error_type = "service_unavailable"
    default_code = "engine_not_ready"


class EngineError(EnclaveError):
    """The engine failed while serving a request that was valid (500)."""

    status_code = 500
    error_type = "server_error"
    default_code = "engine_error"


class ConfigError(Exception):
    """A setting, profile or model on disk is missing or wrong; raised at start-up.

    Not an ``EnclaveError``: it never reaches a client, it stops the process with a
    message that says what to change or what to run.
    """
