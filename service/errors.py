"""One error base carrying its HTTP status; the handler turns any of them into ``{"error": "<one line>"}``."""

from __future__ import annotations


class ServiceError(Exception):
    status = 500
    headers: dict[str, str] | None = None

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))  # one line, always

    @property
    def message(self) -> str:
        return str(self.args[0])


class BadRequest(ServiceError):
    """The client's request is malformed or does not fit the model."""

    status = 400


class Unauthorized(ServiceError):
    status = 401

    def __init__(self, message: str = "missing or wrong API key (Authorization: Bearer <key>)") -> None:
        super().__init__(message)
        self.headers = {"WWW-Authenticate": "Bearer"}


class NotFound(ServiceError):
    status = 404


class RequestTimeout(ServiceError):
    """The body did not arrive in time (a slow client must not hold a queue place forever)."""

    status = 408


class PayloadTooLarge(ServiceError):
    status = 413


class UnsupportedEncoding(ServiceError):
    status = 415


class Unavailable(ServiceError):
    """Not ready, draining, or the queue is full: try again later."""

    status = 503

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        if retry_after is not None:
            self.headers = {"Retry-After": str(retry_after)}


class Timeout(ServiceError):
    """The request's V2 ``timeout`` parameter expired before its result was ready."""

    status = 504


class ModelLoadError(Exception):
    """A model in the repository cannot be served (it stays not ready; the others serve)."""
