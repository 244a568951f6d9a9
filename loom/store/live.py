"""LiveStream: a stream whose producer is connected: append-only, observable, ended once."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from loom.buffers import before
from loom.errors import (
    StorageFailed,
    StreamCut,
    StreamTooLarge,
)
from loom.model import (
    ABORTED,
    COMPLETE,
    INTERRUPTED,
    REPLACED,
    TAKEN_OVER,
    StreamRecord,
)
from loom.store.sqlite import CatalogError
from loom.store.files import DataFile, PartialWrite

if TYPE_CHECKING:
    from loom.store.streams import _StoreBase

log = Logger()


# --- live streams -------------------------------------------------------------


class StreamListener(Protocol):
    def stream_grew(self, stream: LiveStream, start: int, parts: list, size: int) -> None:
        """``size`` bytes, in ``parts`` (bytes or memoryviews, valid during the call
        only), were appended at offset ``start``."""

    def stream_ended(self, stream: LiveStream) -> None:
        """The stream ended; ``stream.outcome`` says how."""


class LiveStream:
    """A stream whose producer is connected: append-only, observable, then ended once.

    ``size`` counts bytes handed to the OS; ``synced`` the bytes known to be on
    stable storage. Followers subscribe to hear about growth and the end.
    """

    def __init__(self, store: _StoreBase, record: StreamRecord, data: DataFile):
        self._store = store
        self.record = record
        self.id = record.id
        self.metadata_json = record.metadata
        self.file = data
        self.size = 0
        self.synced = 0
        self.outcome: str | None = None
        self.closing = False
        self.replaced = False  # whether creating it replaced an older stream
        # The producer writing it: told when the stream is cut under it, and
        # bound by the store in the same step that grants it the stream.
        self.on_cut: Callable[[str], None] | None = None
        self.owner: bytes | None = None  # the token (digest) its producer used
        self.active_at = store._clock.seconds()  # when its producer was last heard from
        self._listeners: list[StreamListener] = []
        self._end_waiters: list[Deferred] = []
        self._syncing = False
        self._sync_waiters: list[Deferred] = []
        # After a failed fsync the kernel may have dropped the dirty pages, and
        # a later fsync can succeed without them: never trust this file again.
        self._sync_failed = False

    def __repr__(self) -> str:
        return f"<LiveStream {self.id} size={self.size} outcome={self.outcome}>"

    # producer side

    def append(self, data: bytes) -> None:
        """Hand ``data`` to the OS, then wake the followers (see append_parts)."""
        self.append_parts([data])

    def append_parts(self, parts: list) -> None:
        """Hand the bytes of ``parts`` to the OS in one write, then wake the followers once.

        Raises StorageFailed (the stream keeps exactly the bytes that reached
        the file), StreamTooLarge (the stream was filled up to its limit and
        not one byte more) or StreamCut.
        """
        if self.outcome is not None or self.closing:
            raise StreamCut(f"stream {self.id} no longer accepts data")
        size = sum(map(len, parts))
        limit = self._store.max_stream_bytes
        too_large = limit is not None and self.size + size > limit
        if too_large:
            parts = before(parts, limit - self.size)
            size = limit - self.size
        if size:
            self._store.bytes_in += size
            if len(parts) > 1 and (size < 16384 or len(parts) > 256):
                # Small pieces (lines of a log): one small copy is cheaper than
                # many iovecs, for the file and for every follower.
                parts = [b"".join(parts)]
            start = self.size
            self.active_at = self._store._clock.seconds()
            try:
                self.file.write(parts)
            except PartialWrite as e:
                self.size += e.written
                if e.written:
                    self._notify_grew(start, before(parts, e.written), e.written)
                raise StorageFailed(f"writing stream {self.id} failed: {e.strerror}") from e
            self.size += size
            self._store._crash.reached("written")
            self._notify_grew(start, parts, size)
        if too_large:
            raise StreamTooLarge(
                f"Stream {self.id} reached the size limit of {limit} bytes."
            )

    def sync(self) -> Deferred:
        """Fire once every byte appended so far is on stable storage.

        Syncs of one stream never overlap: callers that arrive while one is
        running share the next round.
        """
        d: Deferred = Deferred()
        if self._sync_failed:
            d.errback(StorageFailed(f"syncing stream {self.id} failed earlier"))
            return d
        if self.synced >= self.size and not self._syncing:
            d.callback(None)
            return d
        self._sync_waiters.append(d)
        if not self._syncing:
            self._start_sync()
        return d

    def _start_sync(self) -> None:
        waiters, self._sync_waiters = self._sync_waiters, []
        target = self.size
        self._syncing = True
        self.file.acquire()
        started = self._store._clock.seconds()

        def done(result):
            self._syncing = False
            self.file.release()
            self._store.observe_sync(self._store._clock.seconds() - started, result)
            if isinstance(result, Failure):
                log.error(
                    "syncing stream {stream_id} failed: {error}",
                    stream_id=self.id,
                    error=result.getErrorMessage(),
                )
                self._sync_failed = True
                failure = Failure(StorageFailed(f"syncing stream {self.id} failed"))
                for waiter in waiters:
                    waiter.errback(failure)
                if self.outcome is None and not self.closing and self.on_cut is not None:
                    # Tell the producer now rather than at the end of its body.
                    self.on_cut(ABORTED)
            else:
                self.synced = max(self.synced, target)
                for waiter in waiters:
                    waiter.callback(None)
            if self._sync_waiters:
                if self._sync_failed:
                    queued, self._sync_waiters = self._sync_waiters, []
                    for waiter in queued:
                        waiter.errback(StorageFailed(f"syncing stream {self.id} failed"))
                else:
                    self._start_sync()

        self._store._runners.io(self.file.thd_sync).addBoth(done)

    async def complete(self) -> None:
        """The body ended: sync, record the stream complete, end followers cleanly.

        Raises StorageFailed (the stream is then recorded aborted) or StreamCut.
        """
        await self._finish(COMPLETE)

    async def abort(self, reason: str | None = None) -> None:
        """The producer went away mid-body: keep what arrived, record the stream aborted."""
        await self._finish(ABORTED, reason)

    async def interrupt(self) -> None:
        """The server is stopping: keep what arrived, record the stream interrupted."""
        await self._finish(INTERRUPTED)

    async def _finish(self, state: str, reason: str | None = None) -> None:
        if self.outcome is not None:
            raise StreamCut(f"stream {self.id} already ended ({self.outcome})")
        if self.closing:
            raise StreamCut(f"stream {self.id} is already ending")
        self.closing = True
        try:
            if self._store.fsync != "never":
                await self.sync()
        except StorageFailed:
            await self._record(ABORTED, "syncing the data to disk failed")
            raise
        self._store._crash.reached("synced")
        await self._record(state, reason)

    async def _record(self, state: str, reason: str | None) -> None:
        try:
            still_ours = await self._store._record_end(self, state, reason)
        except CatalogError as e:
            log.error("stream {stream_id}: {error}", stream_id=self.id, error=e)
            # Never report success that was not recorded: the stream is aborted,
            # and the store keeps retrying to write that down.
            self._store._remember_unrecorded(self, reason or "the catalog could not record "
                                             "how the stream ended")
            self._end(ABORTED)
            raise StorageFailed(f"recording the end of stream {self.id} failed") from e
        if still_ours:
            self._store._crash.reached("recorded")
        if self.outcome is None:
            self._end(state if still_ours else REPLACED)
        if self.outcome != state:
            raise StreamCut(f"stream {self.id} was {self.outcome} while ending")

    def take_over(self) -> None:
        """A resuming producer proved it knows the exact size: the current one is dropped."""
        if self.on_cut is not None:
            on_cut, self.on_cut = self.on_cut, None
            on_cut(TAKEN_OVER)

    def cut(self, outcome: str) -> None:
        """End the stream now because its data is gone (replaced, deleted)."""
        if self.outcome is not None:
            return
        self._end(outcome)
        if self.on_cut is not None:
            self.on_cut(outcome)

    def when_ended(self) -> Deferred:
        """Fire (with None) once the stream has ended and left the registry."""
        if self.outcome is not None:
            return succeed(None)
        d: Deferred = Deferred()
        self._end_waiters.append(d)
        return d

    def _end(self, outcome: str) -> None:
        self.outcome = outcome
        self._store._unregister(self)
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            listener.stream_ended(self)
        self.file.release()
        waiters, self._end_waiters = self._end_waiters, []
        for waiter in waiters:
            if not waiter.called:  # a waiter that timed out was cancelled
                waiter.callback(None)

    # follower side

    def subscribe(self, listener: StreamListener) -> None:
        self._listeners.append(listener)

    def unsubscribe(self, listener: StreamListener) -> None:
        try:
            self._listeners.remove(listener)
        except ValueError:
            pass

    @property
    def listener_count(self) -> int:
        return len(self._listeners)

    def _notify_grew(self, start: int, parts: list, size: int) -> None:
        for listener in list(self._listeners):
            listener.stream_grew(self, start, parts, size)


