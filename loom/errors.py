"""Loom's errors: each one knows the HTTP status and the sentence a client sees."""

from __future__ import annotations


class LoomError(Exception):
    """A failure a client caused or must be told about, with its HTTP status."""

    status = 500
    headers: dict[str, str] = {}

    def __init__(self, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        if headers is not None:
            self.headers = headers


class BadRequest(LoomError):
    status = 400


class InvalidStreamId(BadRequest):
    """The id in the path is not a valid stream id."""


class InvalidMetadata(BadRequest):
    """X-Stream-Metadata is not a JSON object Loom accepts."""


class Unauthorized(LoomError):
    status = 401

    def __init__(self, message: str = "A valid bearer token is required."):
        super().__init__(message, {"WWW-Authenticate": 'Bearer realm="loom"'})


class Forbidden(LoomError):
    status = 403


class NotFound(LoomError):
    status = 404


class StreamNotFound(NotFound):
    def __init__(self, stream_id: str):
        super().__init__(f"The stream with ID {stream_id} does not exist")
        self.stream_id = stream_id


class MethodNotAllowed(LoomError):
    status = 405

    def __init__(self, method: str, allowed: list[str]):
        super().__init__(
            f"Method {method} is not allowed here; use {', '.join(allowed)}.",
            {"Allow": ", ".join(allowed)},
        )


class StreamExists(LoomError):
    status = 409

    def __init__(self, stream_id: str):
        super().__init__(
            f"The stream with ID {stream_id} already exists. "
            "Specify force=true query param to override."
        )
        self.stream_id = stream_id


class PayloadTooLarge(LoomError):
    status = 413


class StreamTooLarge(PayloadTooLarge):
    """A stream reached the configured maximum size."""


class HeadersTooLarge(LoomError):
    status = 431


class StorageFailed(LoomError):
    """Writing or syncing stream data failed (disk full, I/O error)."""

    status = 507


class StreamNotResumable(LoomError):
    """Only an aborted or interrupted stream (or a live one, taken over) can be appended to."""

    status = 409


class StreamGone(LoomError):
    """The stream was ended (deleted, replaced, the server stopping) as it was being made."""

    status = 409

    def __init__(self, stream_id: str, outcome: str):
        super().__init__(f"Stream {stream_id} was {outcome} before its producer could start.")
        if outcome == "interrupted":
            self.status = 503


class StreamBusy(LoomError):
    """Another producer holds the stream right now; ``Retry-After`` says when to ask again."""

    status = 409

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message, {"Retry-After": str(retry_after)})


class OffsetMismatch(LoomError):
    """X-Stream-Offset differs from the size of the stream."""

    status = 416

    def __init__(self, stream_id: str, size: int | None):
        if size is None:
            super().__init__(f"Stream {stream_id} does not hold that many bytes; a token "
                             "that may also read the stream is told how many it holds.")
        else:
            super().__init__(f"Stream {stream_id} holds {size} bytes: resend from there.",
                             {"X-Stream-Size": str(size)})
        self.stream_id = stream_id
        self.size = size

    def without_size(self) -> OffsetMismatch:
        """The same refusal for a client that may not read the stream: no size in it."""
        return OffsetMismatch(self.stream_id, None)


class RangeNotSatisfiable(LoomError):
    status = 416

    def __init__(self, size: int):
        super().__init__(
            f"The requested range is outside the stream's {size} bytes.",
            {"Content-Range": f"bytes */{size}"},
        )


class Unavailable(LoomError):
    status = 503


class StreamCut(Exception):
    """The stream stopped accepting data: replaced, deleted or shut down."""


class ConfigError(Exception):
    """The configuration cannot be used; the message names the problem in one line."""
