"""StreamStore: where streams live, on disk (DiskStore) or in memory (MemoryStore).

A stream is a catalog record plus an append-only data file. While its producer
is connected it is also a LiveStream in the store's registry: the producer
appends to it, followers subscribe to it and are woken when it grows or ends.
Readers always read by offset; a wake-up is only a hint that there is more.

Blocking work (creating files, fsync, catalog commits) runs through a
``Runners`` object: threads in production, inline calls under test fakes.
"""

from __future__ import annotations

import base64
import collections
import errno
import math
import os
import secrets
from dataclasses import dataclass, replace
from typing import Any, Callable, Protocol

from twisted.internet.defer import Deferred, DeferredList, DeferredLock, fail, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.python.threadpool import ThreadPool
from zope.interface import Attribute, Interface, implementer

from loom.buffers import after, before
from loom.catalog import Catalog, CatalogError, NotACatalog, StreamRecord
from loom.datadir import (
    CATALOG,
    CATALOG_COMPANIONS,
    RESERVE,
    DataDirectoryError,
    DirectoryLock,
    SpaceReserve,
    catalog_problem,
    create_atomically,
    describe_size,
    free_bytes,
    stream_file,
    what_to_do,
)
from loom.errors import (
    Forbidden,
    InvalidStreamId,
    OffsetMismatch,
    StorageFailed,
    StreamBusy,
    StreamCut,
    StreamExists,
    StreamNotFound,
    StreamNotResumable,
    StreamTooLarge,
    Unavailable,
)
from loom.faults import CrashPoints, FileSystem
from loom.ids import IdGenerator, validate_id

log = Logger()

# How a stream can end. The first three are stored states; the next two mean
# the stream's data is gone and its followers must be cut off at once.
COMPLETE, ABORTED, INTERRUPTED = "complete", "aborted", "interrupted"
REPLACED, DELETED = "replaced", "deleted"
# A finished stream whose file no longer holds what was recorded.
DAMAGED = "damaged"
# The stream goes on, but with another producer (a resume that took it over).
TAKEN_OVER = "taken over"


class PartialWrite(OSError):
    """A write failed after ``written`` bytes of the chunk reached the file."""

    def __init__(self, written: int, error: OSError):
        super().__init__(error.errno, error.strerror)
        self.written = written


# --- where blocking work runs ---------------------------------------------


class Runners(Protocol):
    def catalog(self, f: Callable, *args: Any) -> Deferred: ...

    def io(self, f: Callable, *args: Any) -> Deferred: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


class ThreadRunners:
    """Catalog writes in one dedicated thread (one SQLite writer); file syncs in a pool."""

    def __init__(self, reactor, io_threads: int = 4):
        self._reactor = reactor
        self._catalog = ThreadPool(1, 1, name="loom-catalog")
        self._io = ThreadPool(1, io_threads, name="loom-io")

    def start(self) -> None:
        self._catalog.start()
        self._io.start()

    def stop(self) -> None:
        self._catalog.stop()
        self._io.stop()

    def catalog(self, f, *args):
        from twisted.internet.threads import deferToThreadPool

        return deferToThreadPool(self._reactor, self._catalog, f, *args)

    def io(self, f, *args):
        from twisted.internet.threads import deferToThreadPool

        return deferToThreadPool(self._reactor, self._io, f, *args)


class InlineRunners:
    """Runs blocking work at once on the calling thread: for tests on fakes."""

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def catalog(self, f, *args):
        try:
            return succeed(f(*args))
        except BaseException:
            return fail()

    io = catalog


# --- data files -------------------------------------------------------------


class DataFile:
    """An append-only data file shared by a stream's writer and its readers.

    The file stays open while anyone holds a reference (``acquire`` /
    ``release``), so a follower can finish reading a stream whose file was
    unlinked by a replace. Every OS call goes through ``fs``. Writes are
    refused while ``room`` (a SpaceReserve) does not accept data.
    """

    def __init__(self, fd: int, fs: FileSystem, directory: str | None = None, room=None):
        self._fd = fd
        self._fs = fs
        self._refs = 1
        self._unsynced_directory = directory
        self._room = room

    def acquire(self) -> DataFile:
        self._refs += 1
        return self

    def release(self) -> None:
        self._refs -= 1
        if self._refs == 0:
            self._fs.close(self._fd)
            self._fd = -1

    def write(self, parts: list) -> None:
        """Hand every byte of ``parts`` to the OS, or raise PartialWrite saying how much got there."""
        if self._room is not None and not self._room.accepts_data:
            # The disk filled up and its reserve went to the catalog: that room
            # is for recording how streams end, not for more data.
            raise PartialWrite(0, OSError(errno.ENOSPC, "the disk is full"))
        written = 0
        while parts:
            try:
                done = (self._fs.writev(self._fd, parts) if len(parts) > 1
                        else self._fs.write(self._fd, parts[0]))
            except InterruptedError:
                continue
            except OSError as e:
                raise PartialWrite(written, e) from e
            written += done
            parts = after(parts, done)

    def read(self, offset: int, size: int) -> bytes:
        return self._fs.pread(self._fd, size, offset)

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def thd_sync(self) -> None:
        """fsync the data (and, the first time, the directory entry). Blocks."""
        self._fs.fsync(self._fd)
        if self._unsynced_directory is not None:
            fd = self._fs.open(self._unsynced_directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                self._fs.fsync(fd)
            finally:
                self._fs.close(fd)
            self._unsynced_directory = None


class MemoryFile:
    """A DataFile kept in memory, for MemoryStore."""

    def __init__(self, data: bytearray):
        self._data = data

    def acquire(self) -> MemoryFile:
        return self

    def release(self) -> None:
        pass

    def write(self, parts: list) -> None:
        for part in parts:
            self._data += part

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self._data[offset : offset + size])

    def size(self) -> int:
        return len(self._data)

    def thd_sync(self) -> None:
        pass


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


# --- what readers get ---------------------------------------------------------


@dataclass
class StreamHandle:
    """A reader's view of a stream: its record, its bytes, and its LiveStream if live.

    ``close`` must be called when the reader is done with it.
    """

    record: StreamRecord
    file: Any
    live: LiveStream | None

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def state(self) -> str:
        return "live" if self.live is not None else self.record.state

    @property
    def size(self) -> int:
        """Bytes readable now: the live size, or the recorded final size."""
        return self.live.size if self.live is not None else self.record.size

    @property
    def metadata_json(self) -> str:
        return self.record.metadata

    def read(self, offset: int, size: int) -> bytes:
        return self.file.read(offset, size)

    def close(self) -> None:
        if self.file is not None:
            self.file.release()
            self.file = None


class IStreamStore(Interface):
    """Creates, finds and ends streams. DiskStore and MemoryStore both provide it."""

    fsync = Attribute("The fsync policy: always, interval or never.")

    def start():
        """Open the storage and reconcile it after a crash; call before serving."""

    def stop():
        """Interrupt live streams, sync and close everything. Returns a Deferred."""

    def create(stream_id, metadata_json, force, on_cut, owner):
        """Create a live stream (id None: generate one). Deferred LiveStream.

        A taken id fails with StreamExists unless ``force``, which replaces the
        old stream: its data is deleted and its producer and followers cut.
        ``on_cut(outcome)`` is bound to the stream as its producer in the same
        step; ``owner`` is the token that producer used.
        """

    def resume(stream_id, offset, on_cut, owner):
        """Continue a stream at ``offset`` (its size) for a new producer. Deferred LiveStream."""

    def discard(stream):
        """Remove a stream that holds no byte yet, for a request that proved malformed."""

    def open(stream_id):
        """A StreamHandle to read the stream, or raise StreamNotFound."""

    def live_streams():
        """The LiveStreams whose producers are connected now."""

    def observe(observer):
        """Call ``observer(live_stream)`` for every stream created from now on."""

    def unobserve(observer):
        """Stop calling ``observer``."""


class _StoreBase:
    """Registry, locking and life cycle shared by the disk and memory stores."""

    def __init__(
        self,
        clock,
        runners: Runners,
        fsync: str = "interval",
        fsync_interval: float = 1.0,
        max_stream_bytes: int | None = None,
        crash: CrashPoints | None = None,
        resume_window: float | None = None,
        retention: float | None = None,
    ):
        self._clock = clock
        self._runners = runners
        self.fsync = fsync
        self._fsync_interval = fsync_interval
        self.max_stream_bytes = max_stream_bytes
        self.resume_window = resume_window
        self.retention = retention
        # Followers of an aborted stream waiting (resume_window) for a producer to resume it.
        self._resume_waiters: dict[str, list] = {}
        self._retention_loop: LoopingCall | None = None
        # Plain counters for /metrics (cheap enough for the hot path).
        self.bytes_in = 0
        self.errors: collections.Counter = collections.Counter()
        self.on_sync: Callable[[float], None] | None = None
        self._crash = crash or CrashPoints()
        self._live: dict[str, LiveStream] = {}
        self._locks: dict[str, DeferredLock] = {}
        self._observers: list[Callable[[LiveStream], None]] = []
        self._new_id = IdGenerator(clock)
        self._sync_loop: LoopingCall | None = None
        self._sync_round: Deferred | None = None
        self._stopped = False
        # Ends the catalog could not commit (disk full): served from here and
        # retried until the catalog takes them.
        self._unrecorded: dict[str, StreamRecord] = {}
        self._retry_loop: LoopingCall | None = None

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    # life cycle

    def start(self) -> None:
        self._runners.start()
        try:
            self._open_storage()
        except BaseException:
            self._runners.stop()  # no thread may keep a failed start-up alive
            self._close_storage()
            raise
        if self.fsync == "interval":
            self._sync_loop = LoopingCall(self._sync_live_streams)
            self._sync_loop.clock = self._clock
            self._sync_loop.start(self._fsync_interval, now=False)
        if self.retention:
            self._retention_loop = LoopingCall(self._sweep)
            self._retention_loop.clock = self._clock
            self._retention_loop.start(RETENTION_EVERY, now=True)

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        for loop in (self._sync_loop, self._retention_loop):
            if loop is not None and loop.running:
                loop.stop()
        for waiters in list(self._resume_waiters.values()):
            for follower in list(waiters):
                follower.resume_abandoned()
        if self._sync_round is not None:
            await self._sync_round
        streams = list(self._live.values())
        endings = []
        for stream in streams:
            # Start ending the stream first, so that cutting its producer's
            # connection below cannot turn it into an aborted stream.
            endings.append(Deferred.fromCoroutine(stream.interrupt()))
            if stream.on_cut is not None:
                stream.on_cut(INTERRUPTED)
        results = await DeferredList(endings, consumeErrors=True)
        clean = True
        for stream, (ok, result) in zip(streams, results):
            if not ok:
                clean = False
                log.warn(
                    "stream {stream_id} could not be recorded as interrupted: {error}",
                    stream_id=stream.id,
                    error=result.getErrorMessage(),
                )
        await self._retry_unrecorded()
        if self._retry_loop is not None and self._retry_loop.running:
            self._retry_loop.stop()
        if clean and not self._unrecorded:
            try:
                await self._runners.catalog(self._thd_mark_clean_shutdown)
            except CatalogError as e:
                log.warn("could not record a clean shutdown: {error}", error=e)
        self._runners.stop()
        self._close_storage()

    def _sync_live_streams(self) -> None:
        """One round of the interval policy: sync every stream with unsynced bytes."""
        if self._sync_round is not None:
            return  # the previous round is still running; skip, don't pile up
        dirty = [s for s in self._live.values() if s.size > s.synced]
        if not dirty:
            return

        def done(_):
            self._sync_round = None

        self._sync_round = Deferred.fromCoroutine(self._sync_streams(dirty))
        self._sync_round.addErrback(lambda f: log.failure("a sync round failed", f))
        self._sync_round.addCallback(done)

    async def _sync_streams(self, streams: list[LiveStream]) -> None:
        """Sync each stream (a store may do it in one go)."""
        await DeferredList([s.sync() for s in streams], consumeErrors=True)

    def observe_sync(self, seconds: float, result) -> None:
        """Hear how long a sync took (for /metrics), and count failures."""
        if isinstance(result, Failure):
            self.errors["sync"] += 1
        elif self.on_sync is not None:
            self.on_sync(seconds)

    def _remember_unrecorded(self, stream: LiveStream, reason: str) -> None:
        self._unrecorded[stream.id] = replace(
            stream.record, state=ABORTED, size=stream.size,
            finished_ms=self._now_ms(), reason=reason,
        )
        if self._retry_loop is None or not self._retry_loop.running:
            self._retry_loop = LoopingCall(self._retry_unrecorded)
            self._retry_loop.clock = self._clock
            self._retry_loop.start(1.0, now=False).addErrback(
                lambda f: log.failure("retrying catalog writes failed", f))

    async def _retry_unrecorded(self) -> None:
        """Try again to write down the ends the catalog refused earlier."""
        for stream_id, record in list(self._unrecorded.items()):
            try:
                await self._runners.catalog(
                    self._thd_record_end, record, record.state, record.size,
                    record.finished_ms, record.reason,
                )
            except CatalogError:
                return  # still failing: try again on the next round
            if self._unrecorded.get(stream_id) is record:
                del self._unrecorded[stream_id]
                log.info("stream {stream_id}: its end is recorded at last ({state}, "
                         "{size} bytes)", stream_id=stream_id, state=record.state,
                         size=record.size)
        if not self._unrecorded and self._retry_loop is not None and self._retry_loop.running:
            self._retry_loop.stop()

    # registry

    def live_streams(self) -> list[LiveStream]:
        return list(self._live.values())

    def observe(self, observer: Callable[[LiveStream], None]) -> None:
        self._observers.append(observer)

    def unobserve(self, observer: Callable[[LiveStream], None]) -> None:
        try:
            self._observers.remove(observer)
        except ValueError:
            pass

    @property
    def observer_count(self) -> int:
        return len(self._observers)

    def _unregister(self, stream: LiveStream) -> None:
        if self._live.get(stream.id) is stream:
            del self._live[stream.id]

    # creating

    async def create(
        self, stream_id: str | None, metadata_json: str, force: bool = False,
        on_cut: Callable[[str], None] | None = None, owner: bytes | None = None,
    ) -> LiveStream:
        """Create a live stream for the producer that ``on_cut`` speaks for (see IStreamStore).

        ``owner`` names the token the producer used: only it may take the
        stream over while it is live.
        """
        if stream_id is None:
            for _ in range(5):
                try:
                    return await self._create(self._new_id(), metadata_json, False,
                                              on_cut, owner)
                except StreamExists:
                    continue
            raise StorageFailed("could not generate an unused stream id")
        return await self._create(stream_id, metadata_json, force, on_cut, owner)

    async def _create(self, stream_id: str, metadata_json: str, force: bool,
                      on_cut, owner) -> LiveStream:
        async with self._locked(stream_id):
            if not force and (
                stream_id in self._live
                or stream_id in self._unrecorded
                or self._get_record(stream_id)
            ):
                raise StreamExists(stream_id)
            record = StreamRecord(
                id=stream_id,
                storage=new_storage_name(stream_id),
                metadata=metadata_json,
                state="live",
                size=0,
                created_ms=self._now_ms(),
            )
            try:
                data, replaced_storage = await self._runners.catalog(
                    self._thd_create, record, force
                )
            except (OSError, CatalogError) as e:
                _raise_if_out_of_files(e)
                self.errors["create"] += 1
                log.error("creating stream {stream_id} failed: {error}",
                          stream_id=stream_id, error=_describe(e))
                raise StorageFailed(
                    f"Loom could not create the stream: {_describe(e)}."
                ) from e
            self._unrecorded.pop(stream_id, None)
            self._abandon_resume(stream_id)  # a new stream: old followers cannot go on
            old = self._live.get(stream_id)
            stream = LiveStream(self, record, data)
            stream.replaced = replaced_storage is not None
            stream.on_cut, stream.owner = on_cut, owner
            self._live[stream_id] = stream
            if old is not None:
                old.cut(REPLACED)
            if replaced_storage is not None:
                try:
                    await self._runners.catalog(self._thd_remove_data, [replaced_storage])
                except (OSError, CatalogError) as e:
                    # The old file is an orphan now; the next reconciliation removes it.
                    log.warn("stream {stream_id}: removing the replaced data failed: {error}",
                             stream_id=stream_id, error=_describe(e))
                log.info("stream {stream_id} replaced", stream_id=stream_id)
            for observer in list(self._observers):
                observer(stream)
            return stream

    async def _record_end(self, stream: LiveStream, state: str, reason: str | None) -> bool:
        finished_ms = self._now_ms()
        ok = await self._runners.catalog(
            self._thd_record_end, stream.record, state, stream.size, finished_ms, reason
        )
        if ok:
            stream.record = replace(
                stream.record,
                state=state,
                size=stream.size,
                finished_ms=finished_ms,
                reason=reason,
            )
            log.info(
                "stream {stream_id} {state}, {size} bytes{why}",
                stream_id=stream.id,
                state=state,
                size=stream.size,
                why=f" ({reason})" if reason else "",
            )
        return ok

    # deleting, resuming, expiring

    async def delete(self, stream_id: str) -> None:
        """Remove a stream: its live producer and followers are cut, its row and file go.

        The row and a pending-delete note are committed together, so a crash
        before the file is gone still ends with the file gone.
        """
        async with self._locked(stream_id):
            self._check_catalog()  # before cutting anyone off for a deletion that cannot happen
            live = self._live.get(stream_id)
            record = live.record if live else self._unrecorded.get(stream_id)
            if record is None:
                record = self._get_record(stream_id)
            if record is None:
                raise StreamNotFound(stream_id)
            if live is not None:
                live.cut(DELETED)
            self._abandon_resume(stream_id)
            try:
                storages = await self._runners.catalog(
                    self._thd_delete, [(stream_id, record.storage)]
                )
            except (OSError, CatalogError) as e:
                self.errors["catalog"] += 1
                raise StorageFailed(f"Loom could not delete the stream: {_describe(e)}.") from e
            # Only now: if the delete failed, an end the catalog has not taken
            # yet must go on being served and retried.
            self._unrecorded.pop(stream_id, None)
            if not storages:
                raise StreamNotFound(stream_id)
            log.info("stream {stream_id} deleted", stream_id=stream_id)

    async def resume(self, stream_id: str, offset: int,
                     on_cut: Callable[[str], None] | None = None,
                     owner: bytes | None = None) -> LiveStream:
        """Continue a stream at ``offset``, which must be its size, for a new producer.

        An aborted or interrupted stream becomes live again, and followers
        still waiting for it go on. A stream still being ended (its producer
        just dropped) is waited for a moment, then resumed. A live stream whose
        producer the server still sees is taken over, if the new producer uses
        the same token and the old one has been silent for TAKEOVER_QUIET
        seconds: that producer is dropped, the stream and its followers carry
        on. So two producers racing for one stream never both write it: the
        second is refused (StreamBusy) until the first has gone quiet.
        OffsetMismatch says the size to resend from.
        """
        async with self._locked(stream_id):
            live = self._live.get(stream_id)
            if live is not None and live.closing:
                await self._wait_for_end(live)
                live = self._live.get(stream_id)
            if live is not None:
                if owner != live.owner:
                    raise Forbidden(f"Stream {stream_id} is being written with another "
                                    "token; only that token may take it over.")
                if offset != live.size:
                    raise OffsetMismatch(stream_id, live.size)
                silent = self._clock.seconds() - live.active_at
                if silent < TAKEOVER_QUIET:
                    raise StreamBusy(
                        f"Stream {stream_id} is being written by another producer (heard "
                        f"from {silent:.1f} s ago); it can be taken over once that producer "
                        f"has been silent for {TAKEOVER_QUIET:g} s.",
                        retry_after=math.ceil(TAKEOVER_QUIET),
                    )
                live.take_over()
                live.on_cut, live.active_at = on_cut, self._clock.seconds()
                log.info("stream {stream_id} taken over at {size} bytes",
                         stream_id=stream_id, size=live.size)
                return live
            record = self._unrecorded.get(stream_id) or self._get_record(stream_id)
            if record is None:
                raise StreamNotFound(stream_id)
            if record.state not in (ABORTED, INTERRUPTED):
                raise StreamNotResumable(
                    f"Stream {stream_id} is {record.state}: only an aborted or interrupted "
                    "stream can be appended to."
                )
            if offset != record.size:
                raise OffsetMismatch(stream_id, record.size)
            try:
                data = await self._runners.catalog(self._thd_reopen, record)
            except (OSError, CatalogError) as e:
                _raise_if_out_of_files(e)
                self.errors["create"] += 1
                raise StorageFailed(f"Loom could not reopen the stream: {_describe(e)}.") from e
            self._unrecorded.pop(stream_id, None)
            stream = LiveStream(self, replace(record, state="live", finished_ms=None,
                                              reason=None), data)
            stream.size = stream.synced = record.size
            stream.on_cut, stream.owner = on_cut, owner
            self._live[stream_id] = stream
            log.info("stream {stream_id} resumed at {size} bytes",
                     stream_id=stream_id, size=record.size)
            for observer in list(self._observers):
                observer(stream)
            for follower in self._resume_waiters.pop(stream_id, []):
                follower.stream_resumed(stream)
            return stream

    async def _wait_for_end(self, stream: LiveStream) -> None:
        """Wait (at most ENDING_WAIT seconds) for a stream that is ending to have ended."""
        try:
            await stream.when_ended().addTimeout(ENDING_WAIT, self._clock)
        except DeferredTimeout:
            raise StreamBusy(f"Stream {stream.id} is still being ended; try again.") from None

    async def discard(self, stream: LiveStream) -> bool:
        """Remove a stream its creator gave up on before a byte of it was stored.

        For a request whose body proved malformed before it held any data:
        nothing is left behind, so the same request can simply be retried.
        False (and nothing done) if the stream holds data or is no longer the
        one under its id.
        """
        async with self._locked(stream.id):
            if self._live.get(stream.id) is not stream or stream.size:
                return False
            stream.cut(DELETED)
            try:
                await self._runners.catalog(self._thd_delete, [(stream.id, stream.record.storage)])
            except (OSError, CatalogError) as e:
                self.errors["catalog"] += 1
                log.error("stream {stream_id}: removing it failed: {error}",
                          stream_id=stream.id, error=_describe(e))
                return False
            log.info("stream {stream_id} discarded: its request was malformed before any "
                     "data arrived", stream_id=stream.id)
            return True

    def wait_for_resume(self, stream_id: str, follower) -> None:
        """Tell ``follower.stream_resumed(stream)`` if the stream resumes (until it stops waiting)."""
        self._resume_waiters.setdefault(stream_id, []).append(follower)

    def stop_waiting(self, stream_id: str, follower) -> None:
        waiters = self._resume_waiters.get(stream_id)
        if waiters and follower in waiters:
            waiters.remove(follower)
            if not waiters:
                del self._resume_waiters[stream_id]

    def _abandon_resume(self, stream_id: str) -> None:
        for follower in self._resume_waiters.pop(stream_id, []):
            follower.resume_abandoned()

    async def _sweep(self) -> None:
        """Retention: delete finished streams older than ``retention``, a batch at a time."""
        cutoff = self._now_ms() - int(self.retention * 1000)
        while not self._stopped:  # a sweep in progress yields to a stopping store
            try:
                expired = await self._runners.catalog(self._thd_expire, cutoff, RETENTION_BATCH)
            except (OSError, CatalogError) as e:
                self.errors["catalog"] += 1
                log.error("retention sweep failed: {error}", error=_describe(e))
                return
            if expired:
                for stream_id in expired:
                    self._unrecorded.pop(stream_id, None)
                    self._abandon_resume(stream_id)
                shown = ", ".join(expired[:20])
                more = f" and {len(expired) - 20} more" if len(expired) > 20 else ""
                log.info("retention: deleted {count} streams finished more than {age} ago: "
                         "{ids}{more}", count=len(expired), age=_age(self.retention),
                         ids=shown, more=more)
            if len(expired) < RETENTION_BATCH:
                return

    def list_streams(self, **filters) -> list[StreamRecord]:
        """Catalog records matching ``filters`` (see Catalog.list), live ones as they are now."""
        records = self._list_records(**filters)
        current = []
        for record in records:
            live = self._live.get(record.id)
            if live is not None and live.record.storage == record.storage:
                record = replace(record, size=live.size)
            elif record.id in self._unrecorded:
                record = self._unrecorded[record.id]
            current.append(record)
        return current

    def _locked(self, stream_id: str):
        return _IdLock(self._locks, stream_id)

    # reading

    def open(self, stream_id: str) -> StreamHandle:
        live = self._live.get(stream_id)
        if live is not None:
            return StreamHandle(live.record, live.file.acquire(), live)
        try:
            record = self._unrecorded.get(stream_id) or self._get_record(stream_id)
        except CatalogError as e:
            log.error("reading the catalog failed: {error}", error=e)
            raise StorageFailed("Loom could not read its catalog.") from e
        if record is None:
            raise StreamNotFound(stream_id)
        data = self._open_data(record)
        available = data.size()
        if available < record.size:
            record = self._found_damaged(
                record, available, f"the data file holds {available} of {record.size} bytes"
            )
        return StreamHandle(record, data, None)

    def _found_damaged(self, record: StreamRecord, available: int, reason: str) -> StreamRecord:
        """A stream's file lost bytes behind Loom's back: record it damaged, serve what is left."""
        log.error("stream {stream_id} is damaged: {reason}", stream_id=record.id, reason=reason)
        damaged = replace(record, state=DAMAGED, size=available, reason=reason)

        def failed(failure):
            log.error("recording damage to {stream_id} failed: {error}",
                      stream_id=record.id, error=failure.getErrorMessage())

        self._runners.catalog(
            self._thd_record_end, record, DAMAGED, available, None, reason
        ).addErrback(failed)
        return damaged

    # what each store provides

    def _open_storage(self) -> None:
        raise NotImplementedError

    def _close_storage(self) -> None:
        raise NotImplementedError

    def _get_record(self, stream_id: str) -> StreamRecord | None:
        raise NotImplementedError

    def _open_data(self, record: StreamRecord):
        raise NotImplementedError

    def _thd_create(self, record: StreamRecord, force: bool):
        """Create the data file and the catalog row; return (file, replaced storage)."""
        raise NotImplementedError

    def _thd_record_end(self, record, state, size, at_ms, reason) -> bool:
        raise NotImplementedError

    def _thd_remove_data(self, storage: str) -> None:
        raise NotImplementedError

    def _thd_mark_clean_shutdown(self) -> None:
        raise NotImplementedError

    def _thd_delete(self, streams: list[tuple[str, str]]) -> list[str]:
        """Delete the rows, then the files; return the storages deleted."""
        raise NotImplementedError

    def _thd_reopen(self, record: StreamRecord):
        """Open an aborted or interrupted stream's file for appending; mark it live."""
        raise NotImplementedError

    def _thd_expire(self, before_ms: int, limit: int) -> list[str]:
        """Delete up to ``limit`` finished streams that ended before ``before_ms``; their ids."""
        raise NotImplementedError

    def _list_records(self, **filters) -> list[StreamRecord]:
        raise NotImplementedError

    def stream_count(self) -> int:
        """How many streams the catalog holds."""
        raise NotImplementedError

    def check_health(self) -> None:
        """Raise Unavailable unless streams can be read and written."""

    def _check_catalog(self) -> None:
        """Raise Unavailable if the catalog can record nothing more (it was deleted)."""


RETENTION_EVERY = 60.0  # seconds between retention sweeps
# How long a live stream's producer must have been silent before another
# connection (with its token) may take the stream over.
TAKEOVER_QUIET = 1.0
# How long an append waits for a stream whose producer just dropped to be ended.
ENDING_WAIT = 5.0
RETENTION_BATCH = 500


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


class _IdLock:
    """``async with``: one operation at a time per stream id (create, delete, resume)."""

    def __init__(self, locks: dict, stream_id: str):
        self._locks = locks
        self._id = stream_id

    async def __aenter__(self):
        self._lock = self._locks.setdefault(self._id, DeferredLock())
        await self._lock.acquire()

    async def __aexit__(self, *exc):
        self._lock.release()
        if not self._lock.locked and not self._lock.waiting:
            self._locks.pop(self._id, None)
        return False


def _raise_if_out_of_files(error: Exception) -> None:
    """Running out of file descriptors is a passing overload (503), not a storage failure."""
    if isinstance(error, OSError) and error.errno in (errno.EMFILE, errno.ENFILE):
        raise Unavailable("Loom has too many files open right now; try again shortly.",
                          {"Retry-After": "1"}) from error


def _describe(error: Exception) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error)


def new_storage_name(stream_id: str) -> str:
    """A file name for a new generation of ``stream_id``: never the raw id.

    The id is base32-encoded (so the name is safe on any file system and the
    id can be recovered from an orphaned file), then a random suffix makes
    each replacement a different file.
    """
    encoded = base64.b32encode(stream_id.encode("ascii")).decode("ascii").rstrip("=")
    return f"{encoded.lower()}.{secrets.token_hex(4)}"


def stream_id_of_storage(storage: str) -> str | None:
    """The stream id an (orphaned) storage name was made for, if it decodes."""
    encoded, _, _ = storage.partition(".")
    padded = encoded.upper() + "=" * (-len(encoded) % 8)
    try:
        return base64.b32decode(padded).decode("ascii")
    except (ValueError, UnicodeDecodeError):
        return None


DEFAULT_RESERVE = 8 * 1024 * 1024
ROOM_EVERY = 1.0  # seconds between looks for disk space while the disk is full
# With less free space than this (or than the reserve), a failed start-up
# write is taken for a full disk rather than a broken catalog.
_NEARLY_FULL = 1024 * 1024
INTERRUPTED_REASON = "Loom stopped while the stream was live"


class CatalogMismatch(CatalogError):
    """The catalog owns none of the data files: it is not this directory's catalog."""


@implementer(IStreamStore)
class DiskStore(_StoreBase):
    """Streams in ``<data_dir>/streams/<xx>/<storage>.data`` with a SQLite catalog.

    ``fs`` and ``crash`` are the fault-injection seams (see loom.faults).
    ``reserve`` is the size in bytes of the disk-space reserve (0: none, see
    loom.datadir.SpaceReserve). ``rebuild_catalog`` lets start-up rebuild a
    missing, empty or foreign catalog from the data files (CatalogRebuild)
    where it would otherwise refuse to start.
    """

    def __init__(self, data_dir: str, clock, runners: Runners, fs: FileSystem | None = None,
                 reserve: int = DEFAULT_RESERVE, rebuild_catalog: bool = False, **options):
        super().__init__(clock, runners, **options)
        self.data_dir = FilePath(os.path.abspath(data_dir))
        self._fs = fs or FileSystem()
        self._writer: Catalog | None = None
        self._reader: Catalog | None = None
        self._lock: DirectoryLock | None = None
        self.reserve = SpaceReserve(self.data_dir.child(RESERVE).path, reserve)
        self._rebuild_catalog = rebuild_catalog
        # While start-up's own writes wait for room on a full disk: why. Reads
        # are served meanwhile; nothing is created or resumed.
        self._waiting_for_room: str | None = None
        self._start_up_ends: dict[str, StreamRecord] = {}
        self._immutable_reader = False
        self._room_loop: LoopingCall | None = None

    @property
    def catalog_path(self) -> str:
        return self.data_dir.child(CATALOG).path

    @property
    def quarantine(self) -> FilePath:
        return self.data_dir.child("quarantine")

    def data_path(self, storage: str) -> FilePath:
        """Where the data of storage name ``storage`` lives."""
        return FilePath(stream_file(self.data_dir.path, storage))

    # life cycle

    def start(self) -> None:
        super().start()
        self._room_loop = LoopingCall(self._look_for_room)
        self._room_loop.clock = self._clock
        self._room_loop.start(ROOM_EVERY, now=False).addErrback(
            lambda f: log.failure("looking for disk space failed", f))

    async def stop(self) -> None:
        if self._room_loop is not None and self._room_loop.running:
            self._room_loop.stop()
        await super().stop()

    def _open_storage(self) -> None:
        self.data_dir.makedirs(ignoreExistingDirectory=True)
        # Before anything reads or changes the catalog or the files: a second
        # server on this directory would take the first one's live streams
        # for a crash's leftovers.
        self._lock = DirectoryLock.acquire(self.data_dir.path)
        self.data_dir.child("streams").makedirs(ignoreExistingDirectory=True)
        self.reserve.thd_adopt()
        if self.reserve.low():
            self._thd_make_room()  # opening the catalog and start-up's marks need room
        rebuilt = False
        while True:
            problem = catalog_problem(self.catalog_path, self.data_dir.child("streams").path)
            if problem is None:
                if not os.path.exists(self.catalog_path):
                    create_atomically(self.catalog_path, lambda path: Catalog(path).close())
                    log.info("created a new catalog {path}", path=self.catalog_path)
                try:
                    self._open_and_recover()
                    break
                except (NotACatalog, CatalogMismatch) as e:
                    self._close_catalogs()
                    problem = str(e)
            if not self._rebuild_catalog or rebuilt:
                raise DataDirectoryError(what_to_do(problem))
            CatalogRebuild(self, self._now_ms()).run(problem)
            rebuilt = True
        if self._rebuild_catalog and not rebuilt:
            log.warn("--rebuild-catalog: the catalog {path} is usable, so nothing was rebuilt",
                     path=self.catalog_path)
        if self._waiting_for_room is None and not self.reserve.thd_establish():
            log.warn("the disk holding {data_dir} has {free} free: new data is refused until "
                     "{needed} are free (the reserve: storageReserve)",
                     data_dir=self.data_dir.path, free=describe_size(self.reserve.free()),
                     needed=describe_size(self.reserve.needed))

    def _open_and_recover(self) -> None:
        try:
            self._writer = self._open_writer()
            self._reader = Catalog(self.catalog_path, readonly=True, create=False)
            Recovery(self, self._writer, self._now_ms()).run()
        except (NotACatalog, CatalogMismatch):
            raise
        except (CatalogError, OSError) as e:
            # (OSError: reconciliation moves files, and a directory takes room too.)
            if free_bytes(self.data_dir.path) >= max(self.reserve.size, _NEARLY_FULL):
                raise
            self._wait_for_room(e)

    def _open_writer(self) -> Catalog:
        return Catalog(self.catalog_path, create=False, make_room=self._thd_make_room)

    def _wait_for_room(self, error: Exception) -> None:
        """Start-up cannot write for want of room: serve reads, and finish once there is room.

        Streams the catalog still calls live are served as interrupted from
        memory until the catalog can say so. Nothing is created or resumed
        meanwhile, and no clean shutdown is recorded: a crash now leaves the
        catalog just as a crash before this start did.
        """
        if self._reader is None:
            self._reader = self._open_reader_without_room(error)
        problems = self._reader.integrity_problems()
        if problems:
            raise CatalogError(f"the catalog {self.catalog_path} is damaged: {problems[0]}")
        now = self._now_ms()
        for record in self._reader.records_in_state("live"):
            try:
                size = self.data_path(record.storage).getsize()
            except OSError:
                size = 0
            ended = replace(record, state=INTERRUPTED, size=size, finished_ms=now,
                            reason=INTERRUPTED_REASON)
            self._unrecorded[record.id] = self._start_up_ends[record.id] = ended
        self._waiting_for_room = f"the disk is full ({_describe(error)})"
        log.warn("the disk holding {data_dir} is full ({error}): Loom serves reads only, and "
                 "finishes starting once there is room", data_dir=self.data_dir.path,
                 error=_describe(error))

    def _open_reader_without_room(self, error: Exception) -> Catalog:
        try:
            return Catalog(self.catalog_path, readonly=True, create=False)
        except CatalogError:
            pass
        # No room even for SQLite's shared-memory file. Reading the file as it
        # is is right only if no write-ahead log holds commits it lacks.
        wal = self.catalog_path + "-wal"
        if os.path.exists(wal) and os.path.getsize(wal) > 0:
            raise CatalogError(f"the disk is full and the catalog cannot be opened: {error}")
        self._immutable_reader = True
        return Catalog(self.catalog_path, readonly=True, create=False, immutable=True)

    def _look_for_room(self):
        """Every second while the disk is full: finish starting, or make the reserve again."""
        if self._reader is None:
            return None
        if self._waiting_for_room is not None:
            d = self._runners.catalog(self._thd_finish_starting)
            d.addCallback(self._finished_starting)
        elif not self.reserve.accepts_data:
            d = self._runners.catalog(self._thd_restore_reserve)
        else:
            return None
        return d.addErrback(lambda f: log.failure("looking for disk space failed", f))

    def _thd_finish_starting(self):
        """Try start-up's writes again: (writer, reader) to swap in, "done", or None (no room)."""
        if self._writer is None:
            try:
                writer = self._open_writer()
            except CatalogError:
                return None
            reader = None
            if self._immutable_reader:
                try:
                    reader = Catalog(self.catalog_path, readonly=True, create=False)
                except CatalogError:
                    writer.close()
                    return None
            return writer, reader
        try:
            Recovery(self, self._writer, self._now_ms()).run()
        except CatalogMismatch as e:
            self._waiting_for_room = what_to_do(str(e))
            log.error("cannot finish starting: {problem}", problem=self._waiting_for_room)
            return None
        except (CatalogError, OSError):
            return None
        self._thd_restore_reserve()
        return "done"

    def _finished_starting(self, outcome):
        if outcome is None:
            return None
        if outcome != "done":
            writer, reader = outcome
            if self._reader is None:  # stopped meanwhile
                for catalog in outcome:
                    if catalog is not None:
                        catalog.close()
                return None
            # Swapped here, on the thread that reads through it; then the marks at once.
            self._writer = writer
            if reader is not None:
                old, self._reader = self._reader, reader
                old.close()
                self._immutable_reader = False
            return self._runners.catalog(self._thd_finish_starting).addCallback(
                self._finished_starting)
        self._waiting_for_room = None
        for stream_id, record in self._start_up_ends.items():
            if self._unrecorded.get(stream_id) is record:
                del self._unrecorded[stream_id]
        self._start_up_ends = {}
        log.info("there is room on the disk again: start-up is finished, new streams are accepted")
        return None

    def _thd_make_room(self) -> bool:
        """A bookkeeping commit failed: if the disk is full, give up the reserve so it can work."""
        if not self.reserve.low() or not self.reserve.thd_release():
            return False
        log.warn("the disk holding {data_dir} is full: Loom gave up its {size} reserve so that "
                 "the catalog can record how streams end and what is deleted; new data is "
                 "refused until {needed} are free", data_dir=self.data_dir.path,
                 size=describe_size(self.reserve.size), needed=describe_size(self.reserve.needed))
        return True

    def _thd_restore_reserve(self) -> None:
        if not self.reserve.accepts_data and self.reserve.thd_establish():
            log.info("there is room on the disk again: the reserve is made again and new data "
                     "is accepted")

    def _check_catalog(self) -> None:
        if self._reader is not None and not self._reader.in_place():
            raise Unavailable(
                f"The catalog file {self.catalog_path} was deleted or replaced while Loom was "
                "running: nothing more can be recorded, so new streams and deletions are "
                "refused. Restart Loom once the catalog is back (or with --rebuild-catalog).")

    def _thd_check_can_store(self) -> None:
        """Raise unless a stream's data may be stored now: catalog in place, start-up done, room."""
        self._check_catalog()
        if self._waiting_for_room is not None:
            raise OSError(errno.ENOSPC, "the disk is full and Loom has not finished starting")
        self._thd_restore_reserve()
        if not self.reserve.accepts_data:
            raise OSError(errno.ENOSPC, "the disk is full; new data is accepted again once "
                          f"{describe_size(self.reserve.needed)} are free")

    def _thd_writer(self) -> Catalog:
        if self._writer is None:
            raise CatalogError(self._waiting_for_room or "the catalog is not open")
        return self._writer

    def _close_catalogs(self) -> None:
        for catalog in (self._reader, self._writer):
            if catalog is not None:
                catalog.close()
        self._reader = self._writer = None

    def _close_storage(self) -> None:
        self._close_catalogs()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _get_record(self, stream_id: str) -> StreamRecord | None:
        return self._reader.get(stream_id)

    def _open_data(self, record: StreamRecord):
        try:
            fd = self._fs.open(self.data_path(record.storage).path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return MemoryFile(bytearray())  # nothing on disk: size() reports the loss
        except OSError as e:
            _raise_if_out_of_files(e)
            log.error("stream {stream_id}: opening its data failed: {error}",
                      stream_id=record.id, error=_describe(e))
            raise StorageFailed(f"Loom could not read stream {record.id}: {_describe(e)}.")
        return DataFile(fd, self._fs)

    def _thd_create(self, record: StreamRecord, force: bool):
        self._thd_check_can_store()
        writer = self._thd_writer()
        path = self.data_path(record.storage)
        directory = path.parent()
        directory.makedirs(ignoreExistingDirectory=True)
        fd = self._fs.open(
            path.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        )
        self._crash.reached("file-created")
        try:
            if force:
                replaced = writer.replace(record)
            else:
                writer.insert(record)
                replaced = None
        except BaseException:
            self._fs.close(fd)
            try:
                self._fs.unlink(path.path)
            except OSError:
                pass  # an orphan: reconciliation removes it
            raise
        return DataFile(fd, self._fs, directory.path, self.reserve), replaced

    def _thd_record_end(self, record, state, size, at_ms, reason) -> bool:
        return self._thd_writer().finish(record.id, record.storage, state, size, at_ms, reason)

    def _thd_remove_data(self, storages: list[str]) -> None:
        """Remove the files of ``storages`` (pending deletes), then forget them."""
        for storage in storages:
            try:
                self._fs.unlink(self.data_path(storage).path)
            except FileNotFoundError:
                pass
        self._thd_writer().forget_pending_deletes(storages)

    def _thd_mark_clean_shutdown(self) -> None:
        if self._waiting_for_room is not None:
            # Start-up's marks (and maybe its reconciliation) are still to do.
            raise CatalogError(f"start-up never finished: {self._waiting_for_room}")
        self._thd_writer().set_setting("clean_shutdown", "1")

    def _thd_delete(self, streams: list[tuple[str, str]]) -> list[str]:
        storages = self._thd_writer().delete(streams)
        try:
            self._thd_remove_data(storages)
        except CatalogError as e:
            # Rows and files are gone; only their pending-delete notes stay,
            # and the next start drops those.
            log.warn("deleted streams' notes could not be dropped: {error}", error=e)
        self._thd_restore_reserve()  # a deletion is how a full disk gets room again
        return storages

    def _thd_reopen(self, record: StreamRecord) -> DataFile:
        self._thd_check_can_store()
        path = self.data_path(record.storage)
        path.parent().makedirs(ignoreExistingDirectory=True)
        fd = self._fs.open(path.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC)
        try:
            # Bytes beyond the recorded size were never part of the stream.
            os.ftruncate(fd, record.size)
            if not self._thd_writer().reopen(record.id, record.storage):
                raise StreamNotFound(record.id)
        except BaseException:
            self._fs.close(fd)
            raise
        return DataFile(fd, self._fs, path.parent().path, self.reserve)

    def _thd_expire(self, before_ms: int, limit: int) -> list[str]:
        expired = self._thd_writer().expired(before_ms, limit)
        self._thd_delete(expired)
        return [stream_id for stream_id, _ in expired]

    def _list_records(self, **filters) -> list[StreamRecord]:
        return self._reader.list(**filters)

    def stream_count(self) -> int:
        return self._reader.count()

    def check_health(self) -> None:
        if self._reader is None:
            raise Unavailable("The store is not open.")
        self._check_catalog()
        try:
            self._reader.usable()
        except CatalogError as e:
            raise Unavailable(f"The catalog cannot be read: {e}") from e
        if self._waiting_for_room is not None:
            raise Unavailable(f"Loom serves reads only: it could not finish starting "
                              f"({self._waiting_for_room}).")
        streams = self.data_dir.child("streams").path
        if not os.access(streams, os.W_OK | os.X_OK):
            raise Unavailable(f"The data directory {streams} is not writable.")
        if not self.reserve.accepts_data:
            raise Unavailable("The data directory's file system is full: new data is refused "
                              f"until {describe_size(self.reserve.needed)} are free.")
        if os.statvfs(streams).f_bavail == 0:
            raise Unavailable("The data directory's file system is full.")

    async def _sync_streams(self, streams: list[LiveStream]) -> None:
        """Many streams: one syncfs of the data directory's file system, not one fsync each.

        Every fsync of an appended file commits the file system's journal; with
        hundreds of live streams that is hundreds of commits a second, where
        one syncfs does the same work at once. If syncfs fails (or does not
        exist), each stream is synced on its own, so a failure is pinned on the
        stream it belongs to.
        """
        if len(streams) > 1 and self._syncfs_works:
            targets = [(stream, stream.size) for stream in streams]
            try:
                await self._runners.io(self._thd_syncfs)
            except OSError as e:
                if e.errno == errno.ENOSYS:
                    self._syncfs_works = False
                else:
                    log.warn("syncfs failed ({error}): syncing streams one by one",
                             error=_describe(e))
            else:
                for stream, size in targets:
                    stream.synced = max(stream.synced, size)
                return
        await super()._sync_streams(streams)

    _syncfs_works = True

    def _thd_syncfs(self) -> None:
        fd = os.open(self.data_dir.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._fs.syncfs(fd)
        finally:
            os.close(fd)


class Recovery:
    """Reconciles the catalog with the files at start-up, before anything is served.

    Always: the catalog's integrity is checked, and streams left live become
    interrupted, sized by what is on disk. After an unclean shutdown, also:
    every row is compared with its file (a shorter or missing file makes the stream
    damaged; bytes beyond the recorded size are never served), and files no
    row owns are removed (empty, or an old generation of a replaced stream)
    or moved to ``quarantine/`` for an operator to look at.
    """

    def __init__(self, store: DiskStore, catalog: Catalog, now_ms: int):
        self._store = store
        self._catalog = catalog
        self._now_ms = now_ms

    def run(self) -> None:
        problems = self._catalog.integrity_problems()
        if problems:
            raise CatalogError(f"the catalog {self._catalog.path} is damaged: {problems[0]}")
        marker = self._catalog.get_setting("clean_shutdown")
        clean = marker == "1"
        files = None if clean else self._data_files()
        if files is not None:
            self._check_owns_files(files)  # before the first write
        if marker != "0":  # a needless write can fail on a full disk
            self._catalog.set_setting("clean_shutdown", "0")
        for storage in self._finish_deletes():
            if files is not None:
                files.pop(storage, None)
        self._interrupt_live_streams()
        if files is not None:
            self._reconcile(files)

    def _check_owns_files(self, files: dict[str, str]) -> None:
        """Refuse a catalog that owns none of the data files while some hold data.

        Loom never leaves such a directory (bytes are stored only once a
        stream's row is committed): it is an empty catalog, or another
        directory's, and reconciling would quarantine every stream.
        """
        owned = {storage for _, storage, _, _ in self._catalog.all_sizes()}
        if owned & files.keys():
            return
        gone = set(self._catalog.pending_deletes())
        strays = [path for storage, path in files.items()
                  if storage not in gone and os.stat(path).st_size > 0]
        if strays:
            raise CatalogMismatch(
                f"the catalog {self._catalog.path} lists none of the {len(strays)} data files "
                f"in {self._store.data_dir.child('streams').path}")

    def _finish_deletes(self) -> list[str]:
        """Files whose rows were deleted (or replaced) before a crash: remove them now."""
        pending = self._catalog.pending_deletes()
        for storage in pending:
            try:
                os.unlink(self._store.data_path(storage).path)
                log.info("removed the data of a deleted stream ({storage})", storage=storage)
            except FileNotFoundError:
                pass
        if pending:
            self._catalog.forget_pending_deletes(pending)
        return pending

    def _interrupt_live_streams(self) -> None:
        for record in self._catalog.records_in_state("live"):
            try:
                size = self._store.data_path(record.storage).getsize()
            except OSError:
                size = 0
                log.warn("stream {stream_id} was live but its data file is missing",
                         stream_id=record.id)
            self._catalog.finish(record.id, record.storage, INTERRUPTED, size, self._now_ms,
                                 INTERRUPTED_REASON)
            log.info("stream {stream_id} was live when Loom stopped: now interrupted, "
                     "{size} bytes", stream_id=record.id, size=size)

    def _data_files(self) -> dict[str, str]:
        files = {}
        for bucket in os.scandir(self._store.data_dir.child("streams").path):
            if bucket.is_dir(follow_symlinks=False):
                for entry in os.scandir(bucket.path):
                    if entry.name.endswith(".data") and entry.is_file(follow_symlinks=False):
                        files[entry.name[: -len(".data")]] = entry.path
        return files

    def _reconcile(self, files: dict[str, str]) -> None:
        owners = {}
        for stream_id, storage, size, _state in self._catalog.all_sizes():
            owners[stream_id] = storage
            path = files.pop(storage, None)
            found = os.stat(path).st_size if path else 0
            if found < size:
                reason = (f"the data file holds {found} of {size} bytes" if path
                          else f"the data file is missing ({size} bytes recorded)")
                log.error("stream {stream_id} is damaged: {reason}",
                          stream_id=stream_id, reason=reason)
                self._catalog.finish(stream_id, storage, DAMAGED, found, None, reason)
            elif found > size:
                log.warn("stream {stream_id}: {extra} bytes beyond its recorded end are "
                         "never served", stream_id=stream_id, extra=found - size)
        for storage, path in files.items():
            stream_id = stream_id_of_storage(storage)
            size = os.stat(path).st_size
            if size == 0 or (stream_id is not None and stream_id in owners):
                os.unlink(path)
                log.info("removed {path}: no stream owns it ({size} bytes)",
                         path=path, size=size)
            else:
                self._store.quarantine.makedirs(ignoreExistingDirectory=True)
                target = self._store.quarantine.child(os.path.basename(path)).path
                os.rename(path, target)
                log.warn("{path} ({size} bytes, stream {stream_id}) belongs to no stream "
                         "in the catalog: moved to {target}",
                         path=path, size=size, stream_id=stream_id, target=target)


class CatalogRebuild:
    """Makes a new catalog from the data files, for ``--rebuild-catalog``: only what they prove.

    A file in ``streams/`` that holds bytes, is named as Loom names data files
    and lies in the bucket its name hashes to proves that its stream existed
    (bytes are stored only after the stream's row was committed) and how many
    bytes reached the disk. Its metadata and how it ended lived only in the
    catalog: a rebuilt stream has metadata ``{}`` and is ``interrupted``, with
    a reason saying so. Empty files are removed (a stream that never got a byte
    cannot be told from a creation that never finished); files that prove
    nothing, and the generations of an id found more than once, go to
    ``quarantine/``. The old catalog files are set aside in ``quarantine/`` too.
    """

    REASON = ("rebuilt from its data file by --rebuild-catalog: its metadata and how it "
              "ended were lost")

    def __init__(self, store: DiskStore, now_ms: int):
        self._store = store
        self._now_ms = now_ms

    def run(self, problem: str) -> None:
        log.warn("rebuilding the catalog from the data files: {problem}", problem=problem)
        self._set_old_catalog_aside()
        found: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
        unproven, empty = [], 0
        for path in self._files():
            storage = os.path.basename(path)[: -len(".data")]
            stream_id = self._proven_id(storage, path)
            if stream_id is None:
                unproven.append(path)
            elif os.stat(path).st_size == 0:
                os.unlink(path)
                empty += 1
            else:
                found[stream_id].append((storage, path))
        records = []
        for stream_id, generations in sorted(found.items()):
            if len(generations) > 1:
                log.warn("stream {stream_id}: {count} data files claim it and none can be "
                         "proven current; all go to quarantine/", stream_id=stream_id,
                         count=len(generations))
                unproven += [path for _, path in generations]
                continue
            storage, path = generations[0]
            status = os.stat(path)
            at_ms = int(status.st_mtime * 1000)
            records.append(StreamRecord(
                id=stream_id, storage=storage, metadata="{}", state=INTERRUPTED,
                size=status.st_size, created_ms=at_ms, finished_ms=at_ms, reason=self.REASON,
            ))
        for path in unproven:
            self._quarantine(path)

        def make(path: str) -> None:
            catalog = Catalog(path)
            try:
                catalog.insert_all(records)
            finally:
                catalog.close()

        create_atomically(self._store.catalog_path, make)
        shown = ", ".join(record.id for record in records[:20])
        more = f" and {len(records) - 20} more" if len(records) > 20 else ""
        log.warn("rebuilt the catalog {path}: {count} streams restored as interrupted, "
                 "without metadata ({ids}{more}); {empty} empty files removed; {unproven} "
                 "files moved to quarantine/", path=self._store.catalog_path,
                 count=len(records), ids=shown or "none", more=more, empty=empty,
                 unproven=len(unproven))

    def _files(self) -> list[str]:
        files = []
        for bucket in os.scandir(self._store.data_dir.child("streams").path):
            if bucket.is_dir(follow_symlinks=False):
                for entry in os.scandir(bucket.path):
                    if entry.name.endswith(".data") and entry.is_file(follow_symlinks=False):
                        files.append(entry.path)
        return sorted(files)

    def _proven_id(self, storage: str, path: str) -> str | None:
        """The stream id the file was made for, if its name and place say so beyond doubt."""
        encoded, dot, suffix = storage.partition(".")
        if not dot or len(suffix) != 8 or any(c not in "0123456789abcdef" for c in suffix):
            return None
        stream_id = stream_id_of_storage(storage)
        if stream_id is None:
            return None
        try:
            validate_id(stream_id)
        except InvalidStreamId:
            return None
        if new_storage_name(stream_id).partition(".")[0] != encoded:
            return None  # not the encoding Loom writes
        if self._store.data_path(storage).path != path:
            return None  # not in the bucket its name hashes to
        return stream_id

    def _quarantine(self, path: str) -> None:
        self._store.quarantine.makedirs(ignoreExistingDirectory=True)
        target = self._store.quarantine.child(os.path.basename(path)).path
        os.rename(path, target)
        log.warn("{path} ({size} bytes) proves no stream: moved to {target}",
                 path=path, size=os.stat(target).st_size, target=target)

    def _set_old_catalog_aside(self) -> None:
        aside = self._store.quarantine.child(f"catalog-{self._now_ms}")
        for suffix in ("", *CATALOG_COMPANIONS):
            path = self._store.catalog_path + suffix
            if os.path.exists(path):
                aside.makedirs(ignoreExistingDirectory=True)
                os.rename(path, aside.child(os.path.basename(path)).path)
                log.warn("the old catalog file {path} is set aside in {aside}",
                         path=path, aside=aside.path)


@implementer(IStreamStore)
class MemoryStore(_StoreBase):
    """The same contract with everything in dictionaries: a fake for tests.

    ``records`` and ``files`` may be shared with a later MemoryStore to
    simulate a restart.
    """

    def __init__(self, clock, runners: Runners | None = None, records: dict | None = None,
                 files: dict | None = None, **options):
        super().__init__(clock, runners or InlineRunners(), **options)
        self.records: dict[str, StreamRecord] = {} if records is None else records
        self.files: dict[str, bytearray] = {} if files is None else files

    def _open_storage(self) -> None:
        for record in list(self.records.values()):
            if record.state == "live":
                size = len(self.files.get(record.storage, b""))
                self.records[record.id] = replace(
                    record, state=INTERRUPTED, size=size, finished_ms=self._now_ms(),
                    reason="Loom stopped while the stream was live",
                )

    def _close_storage(self) -> None:
        pass

    def _get_record(self, stream_id):
        return self.records.get(stream_id)

    def _open_data(self, record):
        return MemoryFile(self.files.setdefault(record.storage, bytearray()))

    def _thd_create(self, record, force):
        old = self.records.get(record.id)
        if old is not None and not force:
            raise StreamExists(record.id)
        self.records[record.id] = record
        self.files[record.storage] = bytearray()
        return MemoryFile(self.files[record.storage]), (old.storage if old else None)

    def _thd_record_end(self, record, state, size, at_ms, reason):
        current = self.records.get(record.id)
        if current is None or current.storage != record.storage:
            return False
        self.records[record.id] = replace(
            current, state=state, size=size, finished_ms=at_ms or current.finished_ms,
            reason=reason,
        )
        return True

    def _thd_remove_data(self, storages):
        for storage in storages:
            self.files.pop(storage, None)

    def _thd_mark_clean_shutdown(self):
        pass

    def _thd_delete(self, streams):
        storages = []
        for stream_id, storage in streams:
            current = self.records.get(stream_id)
            if current is not None and current.storage == storage:
                del self.records[stream_id]
                storages.append(storage)
        self._thd_remove_data(storages)
        return storages

    def _thd_reopen(self, record):
        data = self.files.setdefault(record.storage, bytearray())
        del data[record.size :]
        self.records[record.id] = replace(record, state="live", finished_ms=None, reason=None)
        return MemoryFile(data)

    def _thd_expire(self, before_ms, limit):
        expired = sorted(
            (r for r in self.records.values()
             if r.state != "live" and r.finished_ms is not None and r.finished_ms < before_ms),
            key=lambda r: r.finished_ms,
        )[:limit]
        self._thd_delete([(r.id, r.storage) for r in expired])
        return [r.id for r in expired]

    def stream_count(self):
        return len(self.records)

    def _list_records(self, state=None, since_ms=None, until_ms=None, meta=(), before=None,
                      limit=100):
        from loom.catalog import meta_rows

        def matches(record):
            if state is not None and record.state != state:
                return False
            if since_ms is not None and record.created_ms < since_ms:
                return False
            if until_ms is not None and record.created_ms >= until_ms:
                return False
            if before is not None and (record.created_ms, record.id) >= before:
                return False
            indexed = {(k, v) for _, k, v in meta_rows(record.id, record.metadata)}
            return all(pair in indexed for pair in meta)

        chosen = sorted(filter(matches, self.records.values()),
                        key=lambda r: (r.created_ms, r.id), reverse=True)
        return chosen[:limit]
