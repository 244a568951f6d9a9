"""LiveStream: a stream whose producer is connected: append-only, observable, then ended once.

Bytes go to the stream's byte log at the offset they follow. ``written``
counts what was handed to the log, ``size`` what the log has *committed*:
followers are woken for committed bytes only, so no reader ever sees a byte
the log could still lose. A local log commits as it writes; a networked one
later, and then ``append_parts`` returns a Deferred the producer waits for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from loom.buffers import before
from loom.errors import StorageFailed, StreamCut, StreamTooLarge
from loom.model import ABORTED, COMPLETE, INTERRUPTED, REPLACED, TAKEN_OVER, StreamRecord
from loom.store.catalog_db import CatalogError
from loom.store.files import PartialWrite

if TYPE_CHECKING:
    from loom.store.streams import StreamStore

log = Logger()


class StreamListener(Protocol):
    def stream_grew(self, stream: LiveStream, start: int, parts: list | None, size: int) -> None:
        """``size`` bytes were committed at offset ``start``: in ``parts`` (bytes or
        memoryviews, valid during the call only), or, when None, to be read from the file."""

    def stream_ended(self, stream: LiveStream) -> None:
        """The stream ended; ``stream.outcome`` says how."""

    def listener_failed(self) -> None:
        """One of this listener's callbacks raised: it was dropped, and should let go."""


class LiveStream:
    """A stream whose producer is connected: append-only, observable, then ended once.

    ``size`` counts committed bytes, ``synced`` the bytes known to be on stable
    storage (by any sync), ``fsynced`` those covered by this file's own fsync.
    Followers subscribe to hear about growth and the end.
    """

    def __init__(self, store: StreamStore, record: StreamRecord, data):
        self._store = store
        self.record = record
        self.id = record.id
        self.metadata_json = record.metadata
        self.file = data
        self.size = self.written = self.synced = self.fsynced = 0
        self.outcome: str | None = None
        self.closing = False
        self.replaced = False  # whether creating it replaced an older stream
        # The producer writing it: told when the stream is cut under it, and
        # bound by the store in the same step that grants it the stream.
        self.on_cut: Callable[[str], None] | None = None
        self.owner: bytes | None = None  # the token (digest) its producer used
        self.active_at = store.clock.seconds()  # when its producer was last heard from
        self._listeners: list[StreamListener] = []
        self._end_waiters: list[Deferred] = []
        self._commit_waiters: list[tuple[int, Deferred]] = []
        self._commit_error: StorageFailed | None = None  # the log refused an append
        self._syncing = False
        self._sync_waiters: list[Deferred] = []
        # After a failed fsync the kernel may have dropped the dirty pages, and
        # a later fsync can succeed without them: never trust this file again.
        self._sync_failed = False

    def __repr__(self) -> str:
        return f"<LiveStream {self.id} size={self.size} outcome={self.outcome}>"

    def starts_at(self, size: int) -> None:
        """A resumed stream holds ``size`` bytes already, all of them on disk."""
        self.size = self.written = self.synced = self.fsynced = size

    # producer side

    def append(self, data: bytes) -> Deferred | None:
        """Append ``data`` (see append_parts)."""
        return self.append_parts([data])

    def append_parts(self, parts: list) -> Deferred | None:
        """Append the bytes of ``parts`` to the log in one write; wake the followers once
        they are committed.

        Returns None when they are committed already, or a Deferred that fires
        when they are: the producer reads nothing more until then. Raises
        StorageFailed (the stream keeps exactly the bytes that reached the
        log), StreamTooLarge (the stream was filled up to its limit and not one
        byte more) or StreamCut.
        """
        if self.outcome is not None or self.closing:
            raise StreamCut(f"stream {self.id} no longer accepts data")
        if self._commit_error is not None:
            raise self._commit_error
        size = sum(map(len, parts))
        limit = self._store.max_stream_bytes
        too_large = limit is not None and self.written + size > limit
        if too_large:
            parts = before(parts, limit - self.written)
            size = limit - self.written
        pending = None
        if size:
            self._store.bytes_in += size
            if len(parts) > 1 and (size < 16384 or len(parts) > 256):
                # Small pieces (lines of a log): one small copy is cheaper than
                # many iovecs, for the file and for every follower.
                parts = [b"".join(parts)]
            start = self.written
            self.active_at = self._store.clock.seconds()
            try:
                pending = self._store.log.append(self.file, start, parts)
            except PartialWrite as e:
                self.written += e.written
                if e.written:
                    self._committed(start, before(parts, e.written), e.written)
                raise StorageFailed(f"writing stream {self.id} failed: {e.strerror}") from e
            self.written += size
            self._store.crash.reached("written")
            if pending is None:
                self._committed(start, parts, size)
            else:
                end = self.written
                pending.addCallbacks(lambda _: self._committed(self.size, None, end - self.size),
                                     self._refused)
        if too_large:
            raise StreamTooLarge(f"Stream {self.id} reached the size limit of {limit} bytes.")
        return pending

    def _committed(self, start: int, parts: list | None, size: int) -> None:
        if size <= 0:
            return
        self.size = start + size
        self._notify_grew(start, parts, size)
        while self._commit_waiters and self._commit_waiters[0][0] <= self.size:
            self._commit_waiters.pop(0)[1].callback(None)

    def _refused(self, failure: Failure) -> Failure:
        """The log refused an append it had taken: nothing after it can be committed. Every
        wait for a commit fails (StorageFailed), and so does the producer's (``failure``)."""
        if self._commit_error is None:
            self._commit_error = StorageFailed(
                f"storing stream {self.id} failed: {failure.getErrorMessage()}")
        waiters, self._commit_waiters = self._commit_waiters, []
        for _, waiter in waiters:
            waiter.errback(self._commit_error)
        return failure

    def when_committed(self) -> Deferred:
        """Fire once every byte written so far is committed; fail with StorageFailed if the
        log refused some of them."""
        if self._commit_error is not None:
            return fail(self._commit_error)
        if self.size >= self.written:
            return succeed(None)
        d: Deferred = Deferred()
        self._commit_waiters.append((self.written, d))
        return d

    # syncing

    def sync(self, own: bool = False) -> Deferred:
        """Fire once every byte appended so far is on stable storage.

        ``own``: through this file's own fsync, even if a sync of the whole file
        system (syncfs) covered its bytes already: syncfs reports write-back
        errors only on kernels from 5.8, and a superblock's error only once, so
        a stream is recorded complete only after its own fsync succeeded.
        Syncs of one stream never overlap: callers that arrive while one is
        running share the next round.
        """
        d: Deferred = Deferred()
        if self._sync_failed:
            d.errback(StorageFailed(f"syncing stream {self.id} failed earlier"))
            return d
        done = self.fsynced if own else self.synced
        if done >= self.written and not self._syncing:
            d.callback(None)
            return d
        self._sync_waiters.append(d)
        if not self._syncing:
            self._start_sync()
        return d

    def synced_by_many(self, size: int) -> None:
        """A sync of the whole file system (syncfs) covered the first ``size`` bytes."""
        self.synced = max(self.synced, size)

    def _start_sync(self) -> None:
        waiters, self._sync_waiters = self._sync_waiters, []
        target = self.written
        self._syncing = True
        self.file.acquire()
        started = self._store.clock.seconds()

        def done(result):
            self._syncing = False
            self.file.release()
            self._store.observe_sync(self._store.clock.seconds() - started, result)
            if isinstance(result, Failure):
                log.error("syncing stream {stream_id} failed: {error}",
                          stream_id=self.id, error=result.getErrorMessage())
                self._sync_failed = True
                if self.outcome is None and not self.closing and self.on_cut is not None:
                    # Tell the producer now rather than at the end of its body.
                    self.on_cut(ABORTED)
                failure = Failure(StorageFailed(f"syncing stream {self.id} failed"))
                for waiter in waiters:
                    waiter.errback(failure)
            else:
                self.synced = max(self.synced, target)
                self.fsynced = max(self.fsynced, target)
                for waiter in waiters:
                    waiter.callback(None)
            if self._sync_waiters:
                if self._sync_failed:
                    queued, self._sync_waiters = self._sync_waiters, []
                    for waiter in queued:
                        waiter.errback(StorageFailed(f"syncing stream {self.id} failed"))
                else:
                    self._start_sync()

        self._store.log.sync(self.file).addBoth(done)

    # ending

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
            await self.when_committed()
        except StorageFailed:
            await self._record(ABORTED, "storing the data failed")
            raise
        try:
            if self._store.fsync != "never":
                await self.sync(own=True)
        except StorageFailed:
            await self._record(ABORTED, "syncing the data to disk failed")
            raise
        self._store.crash.reached("synced")
        await self._record(state, reason)

    async def _record(self, state: str, reason: str | None) -> None:
        try:
            still_ours = await self._store.record_end(self, state, reason)
        except CatalogError as e:
            log.error("stream {stream_id}: {error}", stream_id=self.id, error=e)
            # Never report success that was not recorded: the stream is aborted,
            # and the store keeps retrying to write that down. (Unless it was cut
            # meanwhile, deleted or replaced: then it has ended already.)
            if self.outcome is None:
                self._store.remember_unrecorded(self, reason or "the catalog could not "
                                                "record how the stream ended")
                self._end(ABORTED)
            raise StorageFailed(f"recording the end of stream {self.id} failed") from e
        if still_ours:
            self._store.crash.reached("recorded")
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
        self._store.signal.unregister(self)
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            self._tell(listener, listener.stream_ended, self)
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

    def reader(self):
        """A StreamHandle of this live stream, for a reader that has it already (/spy)."""
        from loom.store.streams import StreamHandle

        return StreamHandle(self.record, self.file.acquire(), self)

    def _notify_grew(self, start: int, parts: list | None, size: int) -> None:
        for listener in list(self._listeners):
            self._tell(listener, listener.stream_grew, self, start, parts, size)

    def _tell(self, listener, callback, *args) -> None:
        """Call a listener; one that raises is logged and dropped on its own: it can never
        fail the producer's append or keep the listeners after it from hearing."""
        try:
            callback(*args)
        except Exception:
            log.failure("a reader of stream {stream_id} failed; it is dropped",
                        stream_id=self.id)
            self.unsubscribe(listener)
            failed = getattr(listener, "listener_failed", None)
            if failed is not None:
                try:
                    failed()
                except Exception:
                    log.failure("dropping a failed reader of stream {stream_id} failed too",
                                stream_id=self.id)
