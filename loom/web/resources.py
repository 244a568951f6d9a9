"""The resource tree: ``/stream``, ``/stream/:id`` and ``/spy``.

Every error is JSON ``{"error": "..."}``. Handlers are plain or ``async``
methods; ``render_async`` is the one place a coroutine meets a request.
"""

from __future__ import annotations

from typing import Awaitable, Callable

from twisted.internet.defer import Deferred
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from loom import __version__
from loom.errors import (
    BadRequest,
    LoomError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
)
from loom.follow import Follower
from loom.ids import validate_id
from loom.metadata import parse_metadata
from loom.spy import Spy
from loom.web.auth import BearerAuth
from loom.web.ingest import Ingest
from loom.web.responses import answer_failure, write_error, write_json

SERVER_HEADER = f"Loom/{__version__}".encode("ascii")


def render_async(request, handler: Callable[[], Awaitable[None]]) -> int:
    """Run a coroutine handler for ``request``; errors become JSON answers."""
    Deferred.fromCoroutine(handler()).addErrback(lambda f: answer_failure(request, f))
    return NOT_DONE_YET


def query_flag(request, name: bytes) -> bool:
    """Whether a query flag such as ``?notail`` or ``?force=true`` is set."""
    values = request.args.get(name)
    if not values:
        return False
    value = values[-1].lower()
    if value in (b"", b"true", b"1", b"yes"):
        return True
    if value in (b"false", b"0", b"no"):
        return False
    raise BadRequest(f"Query parameter {name.decode()} takes true or false.")


class JsonResource(Resource):
    """A resource whose errors, including unsupported methods, are JSON."""

    def render(self, request):
        request.setHeader(b"Server", SERVER_HEADER)
        method = request.method.decode("ascii", "replace")
        handler = getattr(self, "render_" + method, None)
        try:
            if handler is None or not method.isupper():
                allowed = sorted(
                    name[len("render_"):] for name in dir(self)
                    if name.startswith("render_") and name[len("render_"):].isupper()
                )
                raise MethodNotAllowed(method, allowed)
            return handler(request)
        except LoomError as e:
            write_error(request, e)
            return NOT_DONE_YET


class ErrorResource(JsonResource):
    """Answers every request with one error (an auth failure, an unknown route)."""

    isLeaf = True

    def __init__(self, error: LoomError):
        super().__init__()
        self._error = error

    def render(self, request):
        request.setHeader(b"Server", SERVER_HEADER)
        write_error(request, self._error)
        return NOT_DONE_YET


# --- the tree -------------------------------------------------------------------


class RequestSink:
    """Adapts a request to what a Follower writes to."""

    def __init__(self, request):
        self._request = request
        self.write = request.write_body  # write(parts, size): the hot path, without a layer

    def registerProducer(self, producer, streaming: bool) -> None:
        self._request.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        if not self._request._disconnected:
            self._request.unregisterProducer()

    def end(self) -> None:
        if not self._request._disconnected and not self._request.finished:
            self._request.finish()

    def cut(self) -> None:
        channel = self._request.channel
        if channel is not None:
            channel.loseConnection()

    def abort(self) -> None:
        channel = self._request.channel
        if channel is not None:
            channel.abort()


class StreamResource(JsonResource):
    """``/stream/:id``: read a stream (GET) or produce it (POST)."""

    isLeaf = True

    def __init__(self, app: LoomApp, raw_id: bytes | None):
        super().__init__()
        self._app = app
        self._raw_id = raw_id

    def render(self, request):
        if request.postpath:
            # /stream/x/ or /stream/x/y: not a stream.
            request.setHeader(b"Server", SERVER_HEADER)
            write_error(request, NotFound("There is no such route."))
            return NOT_DONE_YET
        return super().render(request)

    def render_POST(self, request):
        stream_id = None if self._raw_id is None else validate_id(self._raw_id)
        force = query_flag(request, b"force")
        metadata = request.requestHeaders.getRawHeaders(b"x-stream-metadata") or [None]
        if len(metadata) > 1:
            raise BadRequest("Send one X-Stream-Metadata header, not several.")
        _, metadata_json = parse_metadata(metadata[0], self._app.max_metadata_bytes)
        limit = self._app.store.max_stream_bytes
        declared = request.getHeader(b"content-length")
        if limit is not None and declared is not None and int(declared) > limit:
            raise PayloadTooLarge(
                f"The body is {int(declared)} bytes; streams are limited to {limit} bytes."
            )
        ingest = Ingest(request, self._app.store, self._app.producer_idle_timeout)
        return render_async(request, lambda: ingest.run(stream_id, metadata_json, force))

    def render_GET(self, request):
        if self._raw_id is None:
            raise MethodNotAllowed("GET", ["POST"])
        stream_id = validate_id(self._raw_id)
        notail = query_flag(request, b"notail")
        handle = self._app.store.open(stream_id)
        request.stream_id = stream_id
        finite = handle.live is None or notail
        end = handle.size if finite else None
        request.setHeader(b"Content-Type", b"application/octet-stream")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"X-Stream-Id", stream_id.encode("ascii"))
        request.setHeader(b"X-Stream-Metadata", handle.metadata_json.encode("ascii"))
        request.setHeader(b"X-Stream-State", handle.state.encode("ascii"))
        if handle.record.reason and handle.live is None:
            request.setHeader(b"X-Stream-Reason", handle.record.reason.encode("ascii", "replace"))
        if finite:
            request.setHeader(b"Content-Length", b"%d" % end)
        else:
            request.setHeader(b"Cache-Control", b"no-cache")
            request.setHeader(b"X-Accel-Buffering", b"no")  # tell proxies not to buffer
        request.channel.limit_send_buffer(self._app.reader_send_buffer)
        follower = Follower(handle, RequestSink(request), self._app.clock, end=end,
                            stall_timeout=self._app.stalled_reader_timeout)
        request.notifyFinish().addBoth(lambda _: follower.stop())
        request.write(b"")  # headers now, even if no byte of the stream exists yet
        follower.start()
        return NOT_DONE_YET


class SpyResource(JsonResource):
    """``/spy``: every live stream, line by line; ``?color`` paints each stream."""

    isLeaf = True

    def __init__(self, app: LoomApp):
        super().__init__()
        self._app = app

    def render_GET(self, request):
        if request.postpath:
            raise NotFound("There is no such route.")
        color = query_flag(request, b"color")
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"X-Accel-Buffering", b"no")
        request.channel.limit_send_buffer(self._app.reader_send_buffer)
        spy = Spy(self._app.store, RequestSink(request), self._app.clock, color=color,
                  stall_timeout=self._app.stalled_reader_timeout)
        request.notifyFinish().addBoth(lambda _: spy.stop())
        request.write(b"")  # headers at once, even with no stream to show yet
        spy.start()
        return NOT_DONE_YET


class StreamCollection(JsonResource):
    """``/stream`` and ``/stream/``: POST creates a stream with a generated id."""

    def __init__(self, app: LoomApp):
        super().__init__()
        self._app = app

    def getChild(self, name, request):
        if name == b"" and not request.postpath:
            return StreamResource(self._app, None)
        return StreamResource(self._app, name)

    def render(self, request):
        return StreamResource(self._app, None).render(request)


class LoomApp:
    """What the resources need: the store, the auth check, the limits, the clock."""

    def __init__(
        self,
        store,
        clock,
        auth: BearerAuth,
        max_metadata_bytes: int = 8192,
        producer_idle_timeout: float | None = 3600.0,
        stalled_reader_timeout: float | None = 600.0,
        reader_send_buffer: int | None = 256 * 1024,
    ):
        self.store = store
        self.clock = clock
        self.auth = auth
        self.max_metadata_bytes = max_metadata_bytes
        self.producer_idle_timeout = producer_idle_timeout
        self.stalled_reader_timeout = stalled_reader_timeout
        self.reader_send_buffer = reader_send_buffer


class Root(JsonResource):
    """``/``: checks the bearer token for every route, then dispatches."""

    def __init__(self, app: LoomApp):
        super().__init__()
        self._app = app
        self._routes = {b"stream": StreamCollection(app), b"spy": SpyResource(app)}

    def getChildWithDefault(self, name, request):
        try:
            self._app.auth.check(request)
        except LoomError as e:
            return ErrorResource(e)
        if name == b"" and not request.postpath:
            return self
        route = self._routes.get(name)
        if route is None:
            return ErrorResource(NotFound("There is no such route."))
        return route

    def render_GET(self, request):
        write_json(request, http.OK, {"service": "loom", "version": __version__})
        return NOT_DONE_YET
