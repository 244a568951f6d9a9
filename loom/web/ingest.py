"""Ingest: the body of one ``POST /stream`` request, appended to one stream as it arrives.

It creates (or resumes) the stream, sends the 201 (or 200), appends every
chunk the body decoder hands over, and ends the response only when the data
is durable; on any storage failure it cuts the producer's connection off, so
that the producer can tell. It knows nothing of Twisted's internals: only the
channel's and the request's Loom methods (loom.web.channel).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http

from loom.errors import StorageFailed, StreamCut, StreamGone, StreamTooLarge
from loom.store import TAKEN_OVER, LiveStream

if TYPE_CHECKING:
    from loom.web.channel import LoomChannel, LoomRequest

log = Logger()


class Ingest:
    """Feeds the body of one ``POST /stream`` request into one LiveStream.

    Until the stream exists the channel is paused, so at most one network
    read is held in memory. After that every chunk is appended (handed to the
    OS) before the next one is read.

    With ``respond_at_end`` the 201 (or 200) is held back until the body has
    ended and is durable, and then sent whole; a stream cut off before that
    gets its headers and a cut response then. A reverse proxy asks for this:
    nginx stops forwarding a request body once it has passed a response's
    headers on, and HAProxy 2.6 can take a 201 that arrives with a
    ``100 Continue`` for a complete response (docs/deployment.md).
    """

    def __init__(self, request: LoomRequest, store, producer_idle_timeout: float | None,
                 respond_at_end: bool = False):
        self._request = request
        self._respond_at_end = respond_at_end
        self._store = store
        self._channel: LoomChannel = request.channel
        self._producer_idle_timeout = producer_idle_timeout
        self._pending: list[list] = []
        self._stream: LiveStream | None = None
        self._body_ended = False
        self._lost = False
        self._failed = False
        self._malformed = False
        self._syncing = False
        self._created = False  # this request made the stream (not a resume of it)
        self._cut_early: str | None = None
        request.body_sink = self

    async def run(self, stream_id: str | None, metadata_json: str, force: bool) -> None:
        """Create the stream and answer 201, or raise the LoomError to answer instead."""
        self._created = True
        await self._start(lambda owner: self._store.create(
            stream_id, metadata_json, force, on_cut=self._cut, owner=owner))

    async def resume(self, stream_id: str, offset: int) -> None:
        """Append to a stream at ``offset`` and answer 200, or raise (416: resend from X)."""
        await self._start(lambda owner: self._store.resume(
            stream_id, offset, on_cut=self._cut, owner=owner), resumed_at=offset)

    async def _start(self, open_stream, resumed_at: int | None = None) -> None:
        self._channel.pause_reading()
        try:
            # The store binds this ingest to the stream as its producer in the
            # same step that grants it: no other producer can slip in between.
            stream = await open_stream(getattr(self._request, "token_id", None))
        except BaseException:
            self._channel.resume_reading()
            raise
        self._stream = stream
        self._request.stream_id = stream.id
        if self._cut_early is not None:
            self._failed = True
            self._channel.resume_reading()
            raise StreamGone(stream.id, self._cut_early)
        if self._malformed:
            # The body proved malformed while the stream was being made; the
            # client has its 400 already.
            self._give_up()
            self._channel.resume_reading()
            return
        if not self._lost:
            self._send_created(stream, resumed_at)
        pending, self._pending = self._pending, []
        for parts in pending:
            self.body_data(parts)
        if self._lost:
            self._abort_stream()
        elif self._body_ended:
            self._complete()
        self._channel.resume_reading()

    def _send_created(self, stream: LiveStream, resumed_at: int | None) -> None:
        request = self._request
        self._channel.send_continue()
        if not request.body_done:
            self._channel.set_body_timeout(self._producer_idle_timeout)
        request.setHeader(b"X-Stream-Id", stream.id.encode("ascii"))
        request.setHeader(b"Location", b"/stream/" + stream.id.encode("ascii"))
        if resumed_at is None:
            request.setResponseCode(http.CREATED)
        else:
            request.setResponseCode(http.OK)
            request.setHeader(b"X-Stream-Offset", b"%d" % resumed_at)
        if stream.replaced:
            request.setHeader(b"X-Stream-Replaced", b"true")
        if self._respond_at_end:
            return  # finish() sends the headers with the response's end (or _cut_off)
        request.write(b"")  # the headers leave now; the body of the response stays empty

    # body_sink

    def body_data(self, parts: list) -> None:
        if self._failed:
            return
        if self._stream is None:
            self._pending.append(parts)
            return
        try:
            committing = self._stream.append_parts(parts)
        except StreamTooLarge as e:
            self._fail(e.message, reason=f"the size limit of {self._store.max_stream_bytes} "
                                         "bytes was reached")
            return
        except StorageFailed as e:
            self._fail(str(e), reason=f"storing the data failed: {e}")
            return
        except StreamCut:
            self._fail(None)
            return
        if committing is not None:
            # The byte log confirms later (a networked log): read nothing more
            # from the producer until it has.
            self._channel.pause_reading()
            committing.addCallbacks(lambda _: self._channel.resume_reading(),
                                    self._commit_failed)
        if self._store.fsync == "always" and not self._syncing:
            self._sync_before_reading_more()

    def _commit_failed(self, failure: Failure) -> None:
        self._channel.resume_reading()
        self._fail(failure.getErrorMessage(), reason="the stream's log refused the data")

    def body_ended(self) -> None:
        self._body_ended = True
        if self._stream is not None and not self._failed:
            self._complete()

    def body_lost(self, reason: Failure) -> None:
        self._lost = True
        if self._stream is not None and not self._failed:
            self._abort_stream()

    def body_malformed(self) -> None:
        """The body's framing broke: no more of it will come (the channel answers or aborts)."""
        self._malformed = True
        if self._stream is not None:
            self._give_up()

    def _give_up(self) -> None:
        """After a malformed body: a stream this request made and never stored a byte
        of is removed, so the same request can be retried; any other is aborted."""
        if self._failed:
            return
        stream = self._stream
        if self._created and stream.size == 0:
            self._failed = True
            d = Deferred.fromCoroutine(self._store.discard(stream))
            d.addErrback(lambda f: log.failure("discarding stream {stream_id} failed", f,
                                               stream_id=stream.id))
            return
        self._fail("the request body was malformed", reason="the request body was malformed")

    # internals

    def _sync_before_reading_more(self) -> None:
        self._syncing = True
        self._channel.pause_reading()

        def synced(_):
            if self._stream.synced < self._stream.size and not self._failed:
                self._stream.sync().addCallbacks(synced, failed)
                return
            self._syncing = False
            self._channel.resume_reading()

        def failed(failure):
            self._syncing = False
            self._channel.resume_reading()
            self._fail(failure.getErrorMessage())

        self._stream.sync().addCallbacks(synced, failed)

    def _complete(self) -> None:
        def completed(_):
            if not self._request.gone and not self._request.finished:
                self._request.finish()

        def failed(failure):
            failure.trap(StorageFailed, StreamCut)
            self._fail(failure.getErrorMessage(), record=False)

        d = Deferred.fromCoroutine(self._stream.complete())
        d.addCallbacks(completed, failed)

    def _abort_stream(self, reason: str | None = None) -> None:
        def failed(failure):
            failure.trap(StorageFailed, StreamCut)

        Deferred.fromCoroutine(self._stream.abort(reason)).addErrback(failed)

    def _fail(self, message: str | None, record: bool = True, reason: str | None = None) -> None:
        """Storing failed after the 201: abort the connection so the producer can tell.

        ``reason`` is recorded with the aborted stream.
        """
        if self._failed:
            return
        self._failed = True
        if message:
            log.error(
                "stream {stream_id}: {message}; aborting its producer",
                stream_id=self._stream.id,
                message=message,
            )
        if record and self._stream.outcome is None and not self._stream.closing:
            self._abort_stream(reason)
        self._cut_off()

    def _cut_off(self) -> None:
        """End the answer so that the producer cannot take it for a clean end.

        A 201 held back (``respond_at_end``) goes out now, headers only: the
        body is over for Loom, so a proxy forwarding no more of it does no
        harm, and its client then sees the response cut, as without a proxy
        (curl exits 18), rather than the proxy's 502 for a reset.
        """
        request = self._request
        if self._respond_at_end and not request.startedWriting and not request.gone:
            request.write(b"")
        self._channel.cut_off()

    def _cut(self, outcome: str) -> None:
        """The store ended the stream under us (replaced, deleted, shutting down, failed),
        or another producer took it over (the stream goes on without us)."""
        if self._failed:
            return
        if self._stream is None:
            # Cut between the store granting the stream and this ingest hearing of it
            # (a DELETE in the same turn): _start answers instead of the 201.
            self._cut_early = outcome
            return
        if outcome == TAKEN_OVER:
            self._failed = True
            log.info("stream {stream_id} taken over: disconnecting its previous producer",
                     stream_id=self._stream.id)
            self._cut_off()
            return
        log.info(
            "stream {stream_id} {outcome}: disconnecting its producer",
            stream_id=self._stream.id,
            outcome=outcome,
        )
        self._fail(None)
