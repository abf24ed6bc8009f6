"""What can go wrong with a request, by meaning. Each class names a ``kind``; each transport has one table
from kind to its own status (REST: HTTP status in :mod:`service.rest.codec`; gRPC: status code in
:mod:`service.grpc.server`), and one encoder. Nothing here knows a status code."""

from __future__ import annotations

MAX_MESSAGE = 1000  # characters of an error message; what a client sent can make one longer
ECHO_LIMIT = 80  # characters of a client's string (a model name, a service) quoted in a message


def shown(text: str, limit: int = ECHO_LIMIT) -> str:
    """A client's string quoted for an error message, cut to ``limit`` characters (and how long it was)."""
    if len(text) <= limit:
        return f"'{text}'"
    return f"'{text[:limit]}...' ({len(text)} characters)"


class ServiceError(Exception):
    """A request that cannot be answered with a result. The message is one line, fit to show the client,
    and at most MAX_MESSAGE characters (client strings are echoed through :func:`shown`; this is the net)."""

    kind = "internal"
    retry_after: int | None = None

    def __init__(self, message: str) -> None:
        line = " ".join(message.split())  # one line, always
        if len(line) > MAX_MESSAGE:
            line = line[: MAX_MESSAGE - 3] + "..."
        super().__init__(line)

    @property
    def message(self) -> str:
        return str(self.args[0])


class Internal(ServiceError):
    """A server fault (logged with its traceback on the server; the client sees a fixed line)."""

    def __init__(self, message: str = "internal error (logged on the server)") -> None:
        super().__init__(message)


class BadRequest(ServiceError):
    """The client's request is malformed or does not fit the model."""

    kind = "invalid_argument"


class Unauthorized(ServiceError):
    """BNFOLD_API_KEY is set and the request's Bearer token is missing or wrong."""

    kind = "unauthenticated"

    def __init__(self, message: str = "missing or wrong API key (Authorization: Bearer <key>)") -> None:
        super().__init__(message)


class NotFound(ServiceError):
    """No such model, or no such version of it."""

    kind = "not_found"


class RequestTimeout(ServiceError):
    """The body did not arrive in time (a slow client must not hold a queue place forever)."""

    kind = "body_timeout"


class PayloadTooLarge(ServiceError):
    """The request is larger than BNFOLD_MAX_BODY_BYTES (or inflates beyond it)."""

    kind = "too_large"


class UnsupportedEncoding(ServiceError):
    """A content encoding the server does not speak."""

    kind = "unsupported_encoding"


class Unavailable(ServiceError):
    """Not ready or draining: try again later (perhaps elsewhere)."""

    kind = "unavailable"

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Busy(Unavailable):
    """Every place in the queue is taken: try again after ``retry_after`` seconds."""

    kind = "busy"


class Timeout(ServiceError):
    """The request's deadline (V2 ``timeout`` parameter, gRPC deadline) expired before its result was ready."""

    kind = "deadline_exceeded"


class ClientGone(ServiceError):
    """The client went away (disconnected, cancelled) before it was answered: nobody to answer."""

    kind = "cancelled"


class ModelLoadError(Exception):
    """A model in the repository cannot be served (it stays not ready; the others serve)."""
