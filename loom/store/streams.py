"""StreamStore: where streams live, composed of a catalog, a byte log and a live signal.

A stream is a catalog record plus its bytes in the byte log. While its
producer is connected it is also a LiveStream in the live signal's registry:
the producer appends to it, followers subscribe to it and are woken when it
grows or ends. Readers always read by offset; a wake-up is only a hint that
there is more.

The store itself does what no single role can: one operation at a time per
stream id (create, replace, resume, delete), creating a stream's bytes before
its record and removing them after, ending and reopening streams, and
remembering the ends the catalog could not take yet (a full disk) to serve
and retry them. Which backend plays each role is the caller's choice: see
DiskStore (loom.store.disk) and MemoryStore (loom.store.memory).

This module is longer than most (about 620 lines): every operation that spans
the roles, and the order of its steps that durability depends on, is here in
one place, under the one per-stream lock; the roles themselves, housekeeping
and the live stream are in modules of their own.
"""

from __future__ import annotations

import collections
import errno
import math
from dataclasses import dataclass, replace
from typing import Any, Callable

from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from loom.errors import (
    Forbidden,
    OffsetMismatch,
    StorageFailed,
    StreamBusy,
    StreamExists,
    StreamNotFound,
    StreamNotResumable,
    Unavailable,
)
from loom.ids import IdGenerator
from loom.model import (
    ABORTED,
    DAMAGED,
    DELETED,
    LIVE,
    REPLACED,
    RESUMABLE,
    StreamRecord,
    new_storage_name,
)
from loom.store.catalog_db import CatalogError
from loom.store.faults import CrashPoints
from loom.store.housekeeping import Housekeeping
from loom.store.interfaces import IStreamStore
from loom.store.live import LiveStream
from loom.store.signal import LocalSignal
from loom.store.threads import InlineRunners, Runners

log = Logger()

# How long a live stream's producer must have been silent before another
# connection (with its token) may take the stream over.
TAKEOVER_QUIET = 1.0
# How long an append waits for a stream whose producer just dropped to be ended.
ENDING_WAIT = 5.0


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
        return LIVE if self.live is not None else self.record.state

    @property
    def size(self) -> int:
        """Bytes readable now: the live stream's committed size, or the recorded final size."""
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


@implementer(IStreamStore)
class StreamStore:
    """Streams kept by ``catalog`` (ICatalog) and ``log`` (IByteLog), live ones announced by
    ``signal`` (ILiveSignal; an in-process one by default); blocking work runs through
    ``runners`` (inline by default)."""

    def __init__(
        self,
        catalog,
        log,
        clock,
        runners: Runners | None = None,
        signal=None,
        fsync: str = "interval",
        fsync_interval: float = 1.0,
        max_stream_bytes: int | None = None,
        crash: CrashPoints | None = None,
        resume_window: float | None = None,
        retention: float | None = None,
    ):
        self.clock = clock
        self._catalog = catalog
        self.log = log
        self.signal = signal or LocalSignal()
        self.runners = runners or InlineRunners()
        self.fsync = fsync
        self.max_stream_bytes = max_stream_bytes
        self.resume_window = resume_window
        self.crash = crash or CrashPoints()
        # Plain counters for /metrics (cheap enough for the hot path).
        self.bytes_in = 0
        self.errors: collections.Counter = collections.Counter()
        self.on_sync: Callable[[float], None] | None = None
        self._locks: dict[str, DeferredLock] = {}
        self._new_id = IdGenerator(clock)
        # Ends the catalog could not commit (disk full): served from here and
        # retried until the catalog takes them.
        self.unrecorded: dict[str, StreamRecord] = {}
        self.housekeeping = Housekeeping(self, fsync_interval, retention)
        self.stopped = False

    @property
    def catalog(self):
        return self._catalog

    @property
    def retention(self) -> float | None:
        return self.housekeeping.retention

    @retention.setter
    def retention(self, value: float | None) -> None:
        self.housekeeping.retention = value

    def now_ms(self) -> int:
        return int(self.clock.seconds() * 1000)

    # life cycle

    def start(self) -> None:
        self.runners.start()
        try:
            self._catalog.open()
        except BaseException:
            self.runners.stop()  # no thread may keep a failed start-up alive
            self._catalog.close()
            raise
        self.housekeeping.start()

    async def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        await self.housekeeping.stop()
        self.signal.abandon_all()
        streams = self.signal.live_streams()
        endings = []
        for stream in streams:
            # Start ending the stream first, so that cutting its producer's
            # connection below cannot turn it into an aborted stream.
            endings.append(Deferred.fromCoroutine(stream.interrupt()))
            if stream.on_cut is not None:
                stream.on_cut("interrupted")
        clean = True
        for stream, ending in zip(streams, endings):
            try:
                await ending
            except Exception as e:
                clean = False
                log.warn("stream {stream_id} could not be recorded as interrupted: {error}",
                         stream_id=stream.id, error=e)
        await self.housekeeping.retry_unrecorded()
        self.housekeeping.stop_retrying()
        if clean and not self.unrecorded:
            try:
                await self._catalog.mark_clean_shutdown()
            except CatalogError as e:
                log.warn("could not record a clean shutdown: {error}", error=e)
        self.runners.stop()
        self._catalog.close()

    def observe_sync(self, seconds: float, result) -> None:
        """Hear how long a sync took (for /metrics), and count failures."""
        if isinstance(result, Failure):
            self.errors["sync"] += 1
        elif self.on_sync is not None:
            self.on_sync(seconds)

    # the live registry

    def live_streams(self) -> list[LiveStream]:
        return self.signal.live_streams()

    def observe(self, observer: Callable[[LiveStream], None]) -> None:
        self.signal.observe(observer)

    def unobserve(self, observer: Callable[[LiveStream], None]) -> None:
        self.signal.unobserve(observer)

    @property
    def observer_count(self) -> int:
        return self.signal.observer_count

    def wait_for_resume(self, stream_id: str, follower) -> None:
        """Tell ``follower.stream_resumed(stream)`` if the stream resumes (until it stops
        waiting)."""
        self.signal.wait_for_resume(stream_id, follower)

    def stop_waiting(self, stream_id: str, follower) -> None:
        self.signal.stop_waiting(stream_id, follower)

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
            if not force and (self.signal.get(stream_id) is not None
                              or stream_id in self.unrecorded
                              or await self._record(stream_id) is not None):
                raise StreamExists(stream_id)
            record = StreamRecord(id=stream_id, storage=new_storage_name(stream_id),
                                  metadata=metadata_json, state=LIVE, size=0,
                                  created_ms=self.now_ms())
            # The bytes first, then the record: a crash between leaves an empty
            # file no record names, which start-up removes; never a record
            # without its file.
            data = await self._storage_step("create the stream", "create", stream_id,
                                            self.log.create,
                                            record.storage)
            try:
                replaced_storage = await self._catalog.add(record, force)
            except BaseException as e:
                data.release()
                await self._forget_bytes([record.storage], stream_id, record=False)
                if isinstance(e, (OSError, CatalogError)):
                    self._failed("create", stream_id, e)
                raise
            self.unrecorded.pop(stream_id, None)
            self.signal.abandon(stream_id)  # a new stream: old followers cannot go on
            old = self.signal.get(stream_id)
            stream = self._live(record, data, on_cut, owner)
            stream.replaced = replaced_storage is not None
            if old is not None:
                old.cut(REPLACED)
            # Live at once: a reader must not find the new record without its stream
            # while the old bytes are being removed.
            self.signal.register(stream)
            if replaced_storage is not None:
                await self._forget_bytes([replaced_storage], stream_id)
                log.info("stream {stream_id} replaced", stream_id=stream_id)
            return stream

    def _live(self, record: StreamRecord, data, on_cut, owner) -> LiveStream:
        stream = LiveStream(self, record, data)
        stream.on_cut, stream.owner = on_cut, owner
        return stream

    async def _storage_step(self, what: str, kind: str, stream_id: str, step, *args):
        """Run a step that makes a stream's bytes or record; a failure is StorageFailed (or
        Unavailable when the server is out of files, a passing overload), counted as
        ``kind`` and logged for ``stream_id``."""
        try:
            return await step(*args)
        except (OSError, CatalogError) as e:
            _raise_if_out_of_files(e)
            self._failed(kind, stream_id, e)
            raise StorageFailed(f"Loom could not {what}: {_describe(e)}.") from e

    def _failed(self, kind: str, stream_id: str, error: Exception) -> None:
        self.errors[kind] += 1
        log.error("stream {stream_id}: {kind} failed: {error}", stream_id=stream_id, kind=kind,
                  error=_describe(error))

    async def _forget_bytes(self, storages: list[str], stream_id: str,
                            record: bool = True) -> None:
        """Remove the bytes of ``storages``; then, if their records noted them as pending
        deletes, forget the notes. A failure leaves them for start-up to remove."""
        try:
            await self.log.remove(storages)
            if record:
                await self._catalog.forget_deletes(storages)
        except (OSError, CatalogError) as e:
            log.warn("stream {stream_id}: removing old data failed, start-up will: {error}",
                     stream_id=stream_id, error=_describe(e))

    async def record_end(self, stream: LiveStream, state: str, reason: str | None) -> bool:
        """Record how ``stream`` ended; False if its id names another stream by now."""
        finished_ms = self.now_ms()
        ok = await self._catalog.finish(stream.record, state, stream.size, finished_ms, reason)
        if ok:
            stream.record = replace(stream.record, state=state, size=stream.size,
                                    finished_ms=finished_ms, reason=reason)
            log.info("stream {stream_id} {state}, {size} bytes{why}", stream_id=stream.id,
                     state=state, size=stream.size, why=f" ({reason})" if reason else "")
        return ok

    def remember_unrecorded(self, stream: LiveStream, reason: str) -> None:
        """The catalog could not record ``stream``'s end: serve it from memory, and retry."""
        self.unrecorded[stream.id] = replace(stream.record, state=ABORTED, size=stream.size,
                                             finished_ms=self.now_ms(), reason=reason)
        self.housekeeping.retry_later()

    # deleting and resuming

    async def delete(self, stream_id: str) -> None:
        """Remove a stream: its live producer and followers are cut, its record and bytes go.

        The record and a pending-delete note are committed together, so a crash
        before the bytes are gone still ends with them gone.
        """
        async with self._locked(stream_id):
            await self._catalog.health()  # before cutting anyone off for nothing
            live = self.signal.get(stream_id)
            record = live.record if live else self.unrecorded.get(stream_id)
            if record is None:
                record = await self._record(stream_id)
            if record is None:
                raise StreamNotFound(stream_id)
            if live is not None:
                live.cut(DELETED)
            self.signal.abandon(stream_id)
            try:
                deleted = await self.delete_records([(stream_id, record.storage)])
            except StorageFailed:
                if live is not None:
                    # Cut, yet still recorded live: serve it as aborted (with its bytes)
                    # and keep trying to record that, rather than live with no producer.
                    self.remember_unrecorded(live, "the catalog could not delete the stream")
                raise
            if not deleted:
                raise StreamNotFound(stream_id)
            log.info("stream {stream_id} deleted", stream_id=stream_id)

    async def delete_records(self, streams: list[tuple[str, str]],
                             finished_before_ms: int | None = None) -> list[str]:
        """Delete (id, storage) records, then their bytes; the storages deleted (with
        ``finished_before_ms``, only streams still finished before then: see ICatalog)."""
        try:
            storages = await self._catalog.delete(streams, finished_before_ms)
        except (OSError, CatalogError) as e:
            self.errors["catalog"] += 1
            raise StorageFailed(f"Loom could not delete the stream: {_describe(e)}.") from e
        # Only now: if the delete failed, an end the catalog has not taken yet
        # must go on being served and retried.
        for stream_id, storage in streams:
            if storage in storages:
                self.unrecorded.pop(stream_id, None)
        if storages:
            await self._forget_bytes(storages, streams[0][0])
        return storages

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
            live = self.signal.get(stream_id)
            if live is not None and live.closing:
                await self._wait_for_end(live)
                live = self.signal.get(stream_id)
            if live is not None:
                return self._take_over(live, offset, on_cut, owner)
            record = self.unrecorded.get(stream_id) or await self._record(stream_id)
            if record is None:
                raise StreamNotFound(stream_id)
            if record.state not in RESUMABLE:
                raise StreamNotResumable(
                    f"Stream {stream_id} is {record.state}: only an aborted or interrupted "
                    "stream can be appended to.")
            if offset != record.size:
                raise OffsetMismatch(stream_id, record.size)
            data = await self._storage_step("reopen the stream", "resume", stream_id,
                                            self.log.reopen,
                                            record.storage, record.size)
            try:
                reopened = await self._catalog.reopen(record)
            except BaseException as e:
                data.release()
                if isinstance(e, (OSError, CatalogError)):
                    self._failed("create", stream_id, e)
                    raise StorageFailed(
                        f"Loom could not reopen the stream: {_describe(e)}.") from e
                raise
            if not reopened:
                data.release()
                raise StreamNotFound(stream_id)
            self.unrecorded.pop(stream_id, None)
            stream = self._live(replace(record, state=LIVE, finished_ms=None, reason=None),
                                data, on_cut, owner)
            stream.starts_at(record.size)
            log.info("stream {stream_id} resumed at {size} bytes", stream_id=stream_id,
                     size=record.size)
            self.signal.register(stream)
            self.signal.resumed(stream)
            return stream

    def _take_over(self, live: LiveStream, offset: int, on_cut, owner) -> LiveStream:
        if owner != live.owner:
            raise Forbidden(f"Stream {live.id} is being written with another token; only "
                            "that token may take it over.")
        if offset != live.size:
            raise OffsetMismatch(live.id, live.size)
        silent = self.clock.seconds() - live.active_at
        if silent < TAKEOVER_QUIET:
            raise StreamBusy(
                f"Stream {live.id} is being written by another producer (heard from "
                f"{silent:.1f} s ago); it can be taken over once that producer has been "
                f"silent for {TAKEOVER_QUIET:g} s.", retry_after=math.ceil(TAKEOVER_QUIET))
        live.take_over()
        live.on_cut, live.active_at = on_cut, self.clock.seconds()
        log.info("stream {stream_id} taken over at {size} bytes", stream_id=live.id,
                 size=live.size)
        return live

    async def _wait_for_end(self, stream: LiveStream) -> None:
        """Wait (at most ENDING_WAIT seconds) for a stream that is ending to have ended."""
        try:
            await stream.when_ended().addTimeout(ENDING_WAIT, self.clock)
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
            if self.signal.get(stream.id) is not stream or stream.written:
                return False
            stream.cut(DELETED)
            try:
                await self.delete_records([(stream.id, stream.record.storage)])
            except StorageFailed as e:
                log.error("stream {stream_id}: removing it failed: {error}",
                          stream_id=stream.id, error=e)
                # Cut, yet still recorded live: served as aborted (empty) and retried.
                self.remember_unrecorded(stream, "the catalog could not remove the stream")
                return False
            log.info("stream {stream_id} discarded: its request was malformed before any "
                     "data arrived", stream_id=stream.id)
            return True

    def _locked(self, stream_id: str):
        return _IdLock(self._locks, stream_id)

    # reading

    async def _record(self, stream_id: str) -> StreamRecord | None:
        try:
            return await self._catalog.get(stream_id)
        except CatalogError as e:
            log.error("reading the catalog failed: {error}", error=e)
            raise StorageFailed("Loom could not read its catalog.") from e

    async def open(self, stream_id: str) -> StreamHandle:
        """A StreamHandle to read the stream; StreamNotFound if there is none."""
        live = self.signal.get(stream_id)
        if live is not None:
            return live.reader()
        record = self.unrecorded.get(stream_id) or await self._record(stream_id)
        live = self.signal.get(stream_id)  # it may have gone live meanwhile
        if live is not None:
            return live.reader()
        if record is not None and record.state == LIVE and stream_id not in self.unrecorded:
            # Recorded live, yet not live here: its creation (or resumption) committed the
            # record and has not registered the stream yet. It holds the id's lock until
            # it has: wait for that, and look again.
            async with self._locked(stream_id):
                pass
            live = self.signal.get(stream_id)
            if live is not None:
                return live.reader()
            record = await self._record(stream_id)
        if record is None:
            raise StreamNotFound(stream_id)
        try:
            data = self.log.open(record.storage)
        except OSError as e:
            _raise_if_out_of_files(e)
            log.error("stream {stream_id}: opening its data failed: {error}",
                      stream_id=record.id, error=_describe(e))
            raise StorageFailed(f"Loom could not read stream {record.id}: {_describe(e)}.")
        available = data.size()
        if available < record.size:
            # Deleted or replaced since its record was read (the read ran on another
            # thread)? Then it is not damaged: it is gone, or another stream now.
            current = await self._record(stream_id)
            if current is None or current.storage != record.storage:
                data.release()
                if current is None:
                    raise StreamNotFound(stream_id)
                return await self.open(stream_id)
            record = self._found_damaged(
                record, available, f"the data file holds {available} of {record.size} bytes")
        return StreamHandle(record, data, None)

    def _found_damaged(self, record: StreamRecord, available: int, reason: str) -> StreamRecord:
        """A stream's bytes went missing behind Loom's back: record it damaged, serve the rest."""
        log.error("stream {stream_id} is damaged: {reason}", stream_id=record.id, reason=reason)

        def failed(failure):
            log.error("recording damage to {stream_id} failed: {error}",
                      stream_id=record.id, error=failure.getErrorMessage())

        self._catalog.finish(record, DAMAGED, available, None, reason).addErrback(failed)
        return replace(record, state=DAMAGED, size=available, reason=reason)

    async def list_streams(self, **filters) -> list[StreamRecord]:
        """Records matching ``filters`` (see loom.web.listing), live ones as they are now."""
        try:
            records = await self._catalog.list(**filters)
        except CatalogError as e:
            log.error("listing the catalog failed: {error}", error=e)
            raise StorageFailed("Loom could not read its catalog.") from e
        current = []
        for record in records:
            live = self.signal.get(record.id)
            if live is not None and live.record.storage == record.storage:
                record = replace(record, size=live.size)
            elif record.id in self.unrecorded:
                record = self.unrecorded[record.id]
            current.append(record)
        return current

    async def stream_count(self) -> int:
        return await self._catalog.count()

    async def check_health(self) -> None:
        """Fail with Unavailable unless streams can be read and written."""
        await self._catalog.health()
        self.log.health()


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
