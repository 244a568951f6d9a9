"""StreamStore: where streams live, on disk (DiskStore) or in memory (MemoryStore).

A stream is a catalog record plus an append-only data file. While its producer
is connected it is also a LiveStream in the store's registry: the producer
appends to it, followers subscribe to it and are woken when it grows or ends.
Readers always read by offset; a wake-up is only a hint that there is more.

Blocking work (creating files, fsync, catalog commits) runs through a
``Runners`` object: threads in production, inline calls under test fakes.
"""

from __future__ import annotations

import collections
import errno
import math
from dataclasses import dataclass, replace
from typing import Any, Callable

from twisted.internet.defer import Deferred, DeferredList, DeferredLock
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

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
    INTERRUPTED,
    REPLACED,
    StreamRecord,
    new_storage_name,
)
from loom.store.faults import CrashPoints
from loom.store.sqlite import CatalogError
from loom.store.live import LiveStream
from loom.store.threads import Runners

log = Logger()


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

