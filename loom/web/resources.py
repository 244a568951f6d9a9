"""The resource tree: /stream, /stream/:id, /streams, /spy, /health, /metrics.

Every error is JSON ``{"error": "..."}``. Handlers are plain or ``async``
methods; ``render_async`` is the one place a coroutine meets a request.

This module is longer than most (about 560 lines): the whole route table, with
each route's scope and error answers, reads best in one place; what a route
needs beyond that lives elsewhere (loom.web.ingest, loom.web.listing,
loom.follow, loom.spy).
"""

from __future__ import annotations

import collections
import json
import re
from typing import Awaitable, Callable

from prometheus_client.exposition import choose_encoder
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from loom import __version__
from loom.errors import (
    BadRequest,
    LoomError,
    MethodNotAllowed,
    NotFound,
    OffsetMismatch,
    PayloadTooLarge,
    RangeNotSatisfiable,
    Unavailable,
)
from loom.follow import Follower
from loom.ids import validate_id
from loom.metadata import parse_metadata
from loom.spy import Spy
from loom.web.auth import BearerAuth, may, require
from loom.web.ingest import Ingest
from loom.web.listing import filters_from, page
from loom.web.metrics import metrics_registry
from loom.web.query import capped, count, flag, single, strict_flag
from loom.web.responses import answer_failure, write_error, write_json, write_json_text
from loom.web.site import SiteCounters

log = Logger()

SERVER_HEADER = f"Loom/{__version__}".encode("ascii")


def render_async(request, handler: Callable[[], Awaitable[None]],
                 cancel_on_disconnect: bool = True) -> int:
    """Run a coroutine handler for ``request``; errors become JSON answers.

    If the client disconnects first, the handler is cancelled where it waits
    (CancelledError, answered to no one): a change it started in the store
    must be ``shielded`` so that it runs to its end all the same.
    """
    running = Deferred.fromCoroutine(handler())
    running.addErrback(lambda f: answer_failure(request, f))
    if cancel_on_disconnect and not running.called:
        request.notifyFinish().addErrback(lambda _: running.cancel())
    return NOT_DONE_YET


def shielded(change: Awaitable) -> Deferred:
    """Wait for ``change`` (a store operation) such that cancelling the wait does not cancel
    the change: once begun, it runs to its end, and a failure nobody waits for any more is
    logged."""
    work = Deferred.fromCoroutine(change) if not isinstance(change, Deferred) else change
    waiter: Deferred = Deferred()

    def done(result):
        if not waiter.called:
            waiter.callback(result)  # (a Failure goes down the errback chain)
        elif isinstance(result, Failure) and not result.check(LoomError):
            log.failure("a change whose client left failed", result)

    work.addBoth(done)
    return waiter


class JsonResource(Resource):
    """A resource whose errors, including unsupported methods, are JSON."""

    def render(self, request):
        request.setHeader(b"Server", SERVER_HEADER)
        method = request.method.decode("ascii", "replace")
        handler = getattr(self, "render_" + method, None)
        if handler is None and method == "HEAD":
            # HEAD is GET without the body (twisted.web drops what is written).
            handler = getattr(self, "render_GET", None)
        try:
            if handler is None or not method.isupper():
                allowed = sorted(
                    name[len("render_"):] for name in dir(self)
                    if name.startswith("render_") and name[len("render_"):].isupper()
                )
                if "GET" in allowed and "HEAD" not in allowed:
                    allowed = sorted([*allowed, "HEAD"])
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


class AppLeaf(JsonResource):
    """A leaf of the tree that answers from the app's store and settings."""

    isLeaf = True

    def __init__(self, app: LoomApp):
        super().__init__()
        self._app = app


class RequestSink:
    """Adapts a request to what a Follower writes to."""

    def __init__(self, request):
        self._request = request
        self.write = request.write_body  # write(parts, size): the hot path, without a layer

    def registerProducer(self, producer, streaming: bool) -> None:
        self._request.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        if not self._request.gone:
            self._request.unregisterProducer()

    def end(self) -> None:
        if not self._request.gone and not self._request.finished:
            self._request.finish()

    def cut(self) -> None:
        channel = self._request.channel
        if channel is not None:
            channel.cut_off()

    def abort(self) -> None:
        channel = self._request.channel
        if channel is not None:
            channel.abort()


_RANGE = re.compile(r"bytes=(\d*)-(\d*)\Z", re.ASCII)


def byte_range(header: bytes | None, size: int) -> tuple[int, int] | None:
    """The [start, end) a Range header asks for, None to ignore it; RangeNotSatisfiable.

    One range is honoured (``N-M``, ``N-``, ``-K``); several ranges or a
    syntax Loom does not know are ignored, which RFC 9110 allows. Positions
    of any length are understood: one beyond the stream is past its end.
    """
    if header is None:
        return None
    match = _RANGE.match(header.decode("latin-1").strip())
    if not match or match.group(1) == match.group(2) == "":
        return None
    first, last = match.groups()
    if first == "":  # the last K bytes
        count = capped(last)
        if count == 0 or size == 0:  # nothing to give the last bytes of
            raise RangeNotSatisfiable(size)
        return max(0, size - count), size
    start = capped(first)
    end = min(size, capped(last) + 1) if last else size
    if last and capped(last) < start:
        return None  # invalid: ignore
    if start >= size:
        raise RangeNotSatisfiable(size)
    return start, end


def one_header(request, name: bytes) -> bytes | None:
    """The value of a header that may be given once; BadRequest if it is given twice."""
    values = request.requestHeaders.getRawHeaders(name)
    if not values:
        return None
    if len(values) > 1:
        raise BadRequest(f"Send one {name.decode('ascii')} header, not several.")
    return values[0]


def respond_at_end(request) -> bool:
    """Whether a producer (or the proxy in front of Loom) asked for its 201 only once the
    body has ended and is stored: ``X-Stream-Respond: at-end``; ``at-once`` is the default."""
    value = one_header(request, b"X-Stream-Respond")
    if value is None or value.lower() == b"at-once":
        return False
    if value.lower() == b"at-end":
        return True
    raise BadRequest("X-Stream-Respond is at-once (the default) or at-end.")


def query_offset(request) -> int | None:
    value = single(request.args, b"offset")
    return None if value is None else count(value, "offset")


class StreamResource(JsonResource):
    """``/stream/:id``: read (GET, HEAD), produce (POST) or delete (DELETE) a stream."""

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

    def _stream_id(self, method: str) -> str:
        if self._raw_id is None:
            raise MethodNotAllowed(method, ["POST"])
        return validate_id(self._raw_id)

    # producing

    def render_POST(self, request):
        require(request, "write")
        stream_id = None if self._raw_id is None else validate_id(self._raw_id)
        force = strict_flag(request.args, b"force")
        if force:
            require(request, "replace")
        if flag(request.args, b"append"):
            return self._append(request, stream_id, force)
        metadata = one_header(request, b"X-Stream-Metadata")
        _, metadata_json = parse_metadata(metadata, self._app.max_metadata_bytes)
        self._check_declared_length(request)
        ingest = Ingest(request, self._app.store, self._app.producer_idle_timeout,
                        respond_at_end(request))
        # (An ingest whose producer leaves ends its stream itself: see Ingest.body_lost.)
        return render_async(request, lambda: ingest.run(stream_id, metadata_json, force),
                            cancel_on_disconnect=False)

    def _append(self, request, stream_id: str | None, force: bool):
        if stream_id is None:
            raise BadRequest("append=true needs the stream's id: POST /stream/<id>?append=true.")
        if force:
            raise BadRequest("append and force cannot be combined.")
        offset = one_header(request, b"X-Stream-Offset")
        if offset is None:
            raise BadRequest(
                "append=true needs X-Stream-Offset: the number of bytes the server holds."
            )
        offset = count(offset, "X-Stream-Offset")
        self._check_declared_length(request)
        ingest = Ingest(request, self._app.store, self._app.producer_idle_timeout,
                        respond_at_end(request))

        async def append():
            try:
                await ingest.resume(stream_id, offset)
            except OffsetMismatch as e:
                # The size is for those who may read the stream anyway.
                raise e if may(request, "read") else e.without_size() from None

        return render_async(request, append, cancel_on_disconnect=False)

    def _check_declared_length(self, request) -> None:
        limit = self._app.store.max_stream_bytes
        declared = request.getHeader(b"content-length")
        if limit is not None and declared is not None and int(declared) > limit:
            raise PayloadTooLarge(
                f"The body is {int(declared)} bytes; streams are limited to {limit} bytes."
            )

    # reading

    def render_GET(self, request):
        return self._read(request, "GET")

    def render_HEAD(self, request):
        return self._read(request, "HEAD")

    def _read(self, request, method: str):
        require(request, "read")
        stream_id = self._stream_id(method)
        notail = flag(request.args, b"notail")
        offset = query_offset(request)
        return render_async(request, lambda: self._answer_read(request, method, stream_id,
                                                               notail, offset))

    async def _answer_read(self, request, method: str, stream_id: str, notail: bool,
                           offset: int | None) -> None:
        handle = await self._app.store.open(stream_id)
        if request.gone:
            handle.close()
            return
        try:
            start, end, status = self._plan(request, handle, notail, offset)
        except LoomError:
            handle.close()
            raise
        request.stream_id = stream_id
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/octet-stream")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"Accept-Ranges", b"bytes")
        request.setHeader(b"X-Stream-Id", stream_id.encode("ascii"))
        metadata = handle.metadata_json
        if not metadata.isascii():  # stored by another writer: escape it as this Loom would
            metadata = json.dumps(json.loads(metadata), separators=(",", ":"))
        request.setHeader(b"X-Stream-Metadata", metadata.encode("ascii"))
        request.setHeader(b"X-Stream-State", handle.state.encode("ascii"))
        request.setHeader(b"X-Stream-Size", b"%d" % handle.size)
        if handle.record.reason and handle.live is None:
            request.setHeader(b"X-Stream-Reason", handle.record.reason.encode("ascii", "replace"))
        if end is not None:
            request.setHeader(b"Content-Length", b"%d" % (end - start))
        else:
            request.setHeader(b"Cache-Control", b"no-cache")
            request.setHeader(b"X-Accel-Buffering", b"no")  # tell proxies not to buffer
        if method == "HEAD":
            handle.close()
            request.write(b"")
            request.finish()
            return
        request.channel.limit_send_buffer(self._app.reader_send_buffer)
        follower = Follower(handle, RequestSink(request), self._app.clock, offset=start,
                            end=end, stall_timeout=self._app.stalled_reader_timeout,
                            resumes=self._app.store)
        self._app.followers += 1

        def done(_):
            self._app.followers -= 1
            follower.stop()

        request.notifyFinish().addBoth(done)
        request.write(b"")  # headers now, even if no byte of the stream exists yet
        follower.start()

    def _plan(self, request, handle, notail: bool, offset: int | None):
        """(start, end or None to follow live, status) for a read."""
        size = handle.size
        following = handle.live is not None and not notail
        wanted = None if following else byte_range(one_header(request, b"Range"), size)
        if wanted is not None:
            if offset is not None:
                raise BadRequest("Use either ?offset or a Range header, not both.")
            start, end = wanted
            request.setHeader(b"Content-Range", b"bytes %d-%d/%d" % (start, end - 1, size))
            return start, end, http.PARTIAL_CONTENT
        start = offset or 0
        if following:
            return start, None, http.OK
        if start > size:
            raise RangeNotSatisfiable(size)
        return start, size, http.OK

    # deleting

    def render_DELETE(self, request):
        require(request, "admin")
        stream_id = self._stream_id("DELETE")

        async def delete():
            await shielded(self._app.store.delete(stream_id))
            request.setResponseCode(http.NO_CONTENT)
            request.finish()

        return render_async(request, delete)


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


class StreamListing(AppLeaf):
    """``/streams``: streams by state, time and metadata, newest first, paged by cursor."""

    def render_GET(self, request):
        require(request, "read")
        if request.postpath and request.postpath != [b""]:
            raise NotFound("There is no such route.")
        filters = filters_from(request.args)  # a bad query is answered before any work

        async def answer():
            write_json_text(request, http.OK, await page(self._app.store, filters))

        return render_async(request, answer)


class SpyResource(AppLeaf):
    """``/spy``: every live stream, line by line; ``?color`` paints each stream."""

    def render_HEAD(self, request):
        self._head(request)
        request.write(b"")
        request.finish()
        return NOT_DONE_YET

    def render_GET(self, request):
        color = self._head(request)
        request.channel.limit_send_buffer(self._app.reader_send_buffer)
        spy = Spy(self._app.store, RequestSink(request), self._app.clock, color=color,
                  stall_timeout=self._app.stalled_reader_timeout)
        self._app.spies += 1

        def done(_):
            self._app.spies -= 1
            spy.stop()

        request.notifyFinish().addBoth(done)
        request.write(b"")  # headers at once, even with no stream to show yet
        spy.start()
        return NOT_DONE_YET

    def _head(self, request) -> bool:
        """Check the request and set the response's headers; whether to colour."""
        require(request, "spy")
        if request.postpath:
            raise NotFound("There is no such route.")
        color = flag(request.args, b"color")
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"X-Accel-Buffering", b"no")
        return color


class HealthResource(AppLeaf):
    """``/health``: 200 when the catalog and the data directory are usable, else 503."""

    def render_GET(self, request):
        async def answer():
            try:
                await self._app.store.check_health()
            except Unavailable as e:
                write_json(request, http.SERVICE_UNAVAILABLE, {"status": "unavailable",
                                                               "error": e.message})
            else:
                write_json(request, http.OK, {"status": "ok"})

        return render_async(request, answer)


class MetricsResource(AppLeaf):
    """``/metrics``: Prometheus text format."""

    def render_GET(self, request):
        require(request, "read")
        if request.postpath and request.postpath != [b""]:
            raise NotFound("There is no such route.")
        # The scraper's Accept header picks the text format version (0.0.4 for
        # Prometheus 2, newer ones where asked).
        accept = (request.getHeader(b"accept") or b"").decode("latin-1")
        encode, content_type = choose_encoder(accept)

        async def answer():
            # The catalog is counted off the reactor; the collector reads the figure.
            self._app.stream_count = await self._app.store.stream_count()
            body = encode(self._app.registry)
            request.setHeader(b"Content-Type", content_type.encode("ascii"))
            request.setHeader(b"Content-Length", b"%d" % len(body))
            request.write(body)
            request.finish()

        return render_async(request, answer)


class LoomApp:
    """What the resources need: the store, the auth check, the limits, the clock, counters."""

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
        self.followers = 0
        self.spies = 0
        self.stream_count = 0  # as of the last scrape
        self.errors: collections.Counter = collections.Counter()
        self.site_counters = SiteCounters()  # shared with the LoomSite
        self.registry, fsync = metrics_registry(self)
        store.on_sync = fsync.observe


class Root(JsonResource):
    """``/``: checks the bearer token for every route but /health, then dispatches."""

    def __init__(self, app: LoomApp):
        super().__init__()
        self._app = app
        self._routes = {
            b"stream": StreamCollection(app),
            b"streams": StreamListing(app),
            b"spy": SpyResource(app),
            b"metrics": MetricsResource(app),
        }
        self._health = HealthResource(app)

    def getChildWithDefault(self, name, request):
        if name == b"health" and not request.postpath:
            return self._health  # for load balancers and probes: no token needed
        try:
            request.scopes = self._app.auth.check(request)
        except LoomError as e:
            self._app.errors["auth"] += 1
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
