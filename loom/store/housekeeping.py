"""What the stream store does by itself, on a timer: syncs, retention, retried ends.

* the interval sync (``fsync: interval``): every live stream with unsynced bytes,
  all in one sync of the file system where the byte log can, each on its own
  where it cannot (so a failure is pinned on its stream);
* retention: finished streams older than ``retention`` deleted, a batch at a
  time, each batch logged;
* ends the catalog could not take (a full disk): tried again every second
  until it does.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from loom.store.catalog_db import CatalogError

if TYPE_CHECKING:
    from loom.store.streams import StreamStore

log = Logger()

RETENTION_EVERY = 60.0  # seconds between retention sweeps
RETENTION_BATCH = 500
RETRY_EVERY = 1.0  # seconds between tries to record the ends the catalog refused


class Housekeeping:
    def __init__(self, store: StreamStore, fsync_interval: float, retention: float | None):
        self._store = store
        self._fsync_interval = fsync_interval
        self.retention = retention
        self._loops: list[LoopingCall] = []
        self._retry_loop: LoopingCall | None = None
        self._retry_round: Deferred | None = None
        self._sync_round: Deferred | None = None

    def _loop(self, f, every: float, now: bool) -> LoopingCall:
        loop = LoopingCall(f)
        loop.clock = self._store.clock
        loop.start(every, now=now).addErrback(
            lambda failure: log.failure("housekeeping failed", failure))
        return loop

    def start(self) -> None:
        if self._store.fsync == "interval":
            self._loops.append(self._loop(self.sync_live_streams, self._fsync_interval, False))
        if self.retention:
            self._loops.append(self._loop(self.sweep, RETENTION_EVERY, True))

    def stop_loops(self) -> None:
        for loop in self._loops:
            if loop.running:
                loop.stop()

    async def stop(self) -> None:
        self.stop_loops()
        if self._sync_round is not None:
            await self._sync_round

    async def settled(self) -> None:
        """Wait for the sync round and the retry of refused ends that are running, if any
        (for tests: a round started by a clock's tick may finish on another thread)."""
        for round_ in (self._sync_round, self._retry_round):
            if round_ is not None:
                await _when_done(round_)

    # the interval sync

    def sync_live_streams(self) -> None:
        """One round of the interval policy: sync every stream with unsynced bytes."""
        if self._sync_round is not None:
            return  # the previous round is still running; skip, don't pile up
        dirty = [s for s in self._store.live_streams() if s.written > s.synced]
        if not dirty:
            return

        def done(_):
            self._sync_round = None

        self._sync_round = Deferred.fromCoroutine(self._sync(dirty))
        self._sync_round.addErrback(lambda f: log.failure("a sync round failed", f))
        self._sync_round.addCallback(done)

    async def _sync(self, streams) -> None:
        if len(streams) > 1:
            targets = [(stream, stream.written) for stream in streams]
            try:
                await self._store.log.sync_many([stream.file for stream in streams])
            except OSError as e:
                if e.errno != errno.ENOSYS:
                    log.warn("syncfs failed ({error}): syncing streams one by one",
                             error=e.strerror or e)
            else:
                for stream, size in targets:
                    stream.synced_by_many(size)
                return
        await DeferredList([stream.sync() for stream in streams], consumeErrors=True)

    # retention

    async def sweep(self) -> None:
        """Retention: delete finished streams older than ``retention``, a batch at a time."""
        store = self._store
        cutoff = store.now_ms() - int(self.retention * 1000)
        while not store.stopped:  # a sweep in progress yields to a stopping store
            deleted: list[str] = []
            try:
                expired = await store.catalog.expired(cutoff, RETENTION_BATCH)
                if expired:
                    # Only what is still expired when deleted: a stream resumed since the
                    # query above is live again, and stays.
                    deleted = await store.delete_records(expired, finished_before_ms=cutoff)
            except Exception as e:
                store.errors["catalog"] += 1
                log.error("retention sweep failed: {error}", error=e)
                return
            if deleted:
                ids = [stream_id for stream_id, storage in expired if storage in deleted]
                for stream_id in ids:
                    store.signal.abandon(stream_id)
                shown = ", ".join(ids[:20])
                more = f" and {len(ids) - 20} more" if len(ids) > 20 else ""
                log.info("retention: deleted {count} streams finished more than {age} ago: "
                         "{ids}{more}", count=len(ids), age=_age(self.retention), ids=shown,
                         more=more)
            if len(expired) < RETENTION_BATCH:
                return

    # ends the catalog refused

    def stop_retrying(self) -> None:
        if self._retry_loop is not None and self._retry_loop.running:
            self._retry_loop.stop()

    def retry_later(self) -> None:
        if self._retry_loop is None or not self._retry_loop.running:
            self._retry_loop = self._loop(self._retry_round_now, RETRY_EVERY, False)

    def _retry_round_now(self) -> Deferred:
        def done(result):
            self._retry_round = None
            return result

        self._retry_round = Deferred.fromCoroutine(self.retry_unrecorded())
        return self._retry_round.addBoth(done)

    async def retry_unrecorded(self) -> None:
        """Try again to write down the ends the catalog refused earlier."""
        store = self._store
        for stream_id, record in list(store.unrecorded.items()):
            try:
                await store.catalog.finish(record, record.state, record.size,
                                           record.finished_ms, record.reason)
            except CatalogError:
                return  # still failing: try again on the next round
            if store.unrecorded.get(stream_id) is record:
                del store.unrecorded[stream_id]
                log.info("stream {stream_id}: its end is recorded at last ({state}, "
                         "{size} bytes)", stream_id=stream_id, state=record.state,
                         size=record.size)
        if not store.unrecorded and self._retry_loop is not None and self._retry_loop.running:
            self._retry_loop.stop()


def _when_done(d: Deferred) -> Deferred:
    """A Deferred that fires (with None) when ``d`` does, leaving ``d``'s result to its
    other callbacks (awaiting ``d`` itself would take it)."""
    done: Deferred = Deferred()

    def passing(result):
        done.callback(None)
        return result

    d.addBoth(passing)
    return done


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
