"""The store's three roles in memory: a catalog and a byte log in dictionaries, for tests.

``MemoryStore`` composes them with the in-process live signal; give a later
MemoryStore the same ``records`` and ``files`` to simulate a restart.
``MemoryLog(commits="manual")`` holds every append uncommitted until the test
calls ``commit()``: the asynchronous side of the byte-log contract that a
networked log has.
"""

from __future__ import annotations

from dataclasses import replace

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from loom.errors import StreamExists
from loom.model import INTERRUPTED, INTERRUPTED_REASON, LIVE, StreamRecord, meta_rows
from loom.store.interfaces import IByteLog, ICatalog
from loom.store.streams import StreamStore


class MemoryFile:
    """A stream's bytes in memory, read and written like a DataFile."""

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


@implementer(ICatalog)
class MemoryCatalog:
    """Records in a dictionary. ``sizes(storage)`` tells how many bytes a stream holds,
    for the streams a "crash" left live; ``clock`` times their end."""

    def __init__(self, records: dict | None = None, sizes=None, clock=None):
        self.records: dict[str, StreamRecord] = {} if records is None else records
        self._sizes = sizes
        self._clock = clock

    def open(self) -> None:
        """A restart: streams left live become interrupted, sized by their bytes."""
        now_ms = int(self._clock.seconds() * 1000) if self._clock is not None else None
        for record in list(self.records.values()):
            if record.state == LIVE:
                size = self._sizes(record.storage) if self._sizes is not None else record.size
                self.records[record.id] = replace(
                    record, state=INTERRUPTED, size=size, finished_ms=now_ms,
                    reason=INTERRUPTED_REASON,
                )

    def close(self) -> None:
        pass

    def get(self, stream_id):
        return succeed(self.records.get(stream_id))

    def add(self, record, replace):
        old = self.records.get(record.id)
        if old is not None and not replace:
            return fail(StreamExists(record.id))
        self.records[record.id] = record
        return succeed(old.storage if old else None)

    def finish(self, record, state, size, finished_ms, reason):
        current = self.records.get(record.id)
        if current is None or current.storage != record.storage:
            return succeed(False)
        self.records[record.id] = replace(
            current, state=state, size=size, finished_ms=finished_ms or current.finished_ms,
            reason=reason,
        )
        return succeed(True)

    def reopen(self, record):
        current = self.records.get(record.id)
        if current is None or current.storage != record.storage:
            return succeed(False)
        self.records[record.id] = replace(current, state=LIVE, finished_ms=None, reason=None)
        return succeed(True)

    def delete(self, streams):
        storages = []
        for stream_id, storage in streams:
            current = self.records.get(stream_id)
            if current is not None and current.storage == storage:
                del self.records[stream_id]
                storages.append(storage)
        return succeed(storages)

    def forget_deletes(self, storages):
        return succeed(None)

    def expired(self, before_ms, limit):
        expired = sorted(
            (r for r in self.records.values()
             if r.state != LIVE and r.finished_ms is not None and r.finished_ms < before_ms),
            key=lambda r: r.finished_ms,
        )[:limit]
        return succeed([(r.id, r.storage) for r in expired])

    def list(self, state=None, since_ms=None, until_ms=None, meta=(), before=None, limit=100):
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
        return succeed(chosen[:limit])

    def count(self):
        return succeed(len(self.records))

    def health(self):
        return succeed(None)

    def mark_clean_shutdown(self):
        return succeed(None)


@implementer(IByteLog)
class MemoryLog:
    """Streams' bytes in a dictionary of bytearrays, by storage name.

    With ``commits="manual"`` an append is handed over at once (readers of the
    file can see it) but committed only when ``commit()`` is called: the stream
    store must wake followers, and let its producer go on, only then.
    """

    def __init__(self, files: dict | None = None, commits: str = "now"):
        self.files: dict[str, bytearray] = {} if files is None else files
        self._manual = commits == "manual"
        self.pending: list[Deferred] = []

    def size_of(self, storage: str) -> int:
        return len(self.files.get(storage, b""))

    def create(self, storage):
        self.files[storage] = bytearray()
        return succeed(MemoryFile(self.files[storage]))

    def reopen(self, storage, size):
        data = self.files.setdefault(storage, bytearray())
        del data[size:]
        return succeed(MemoryFile(data))

    def open(self, storage):
        return MemoryFile(self.files.setdefault(storage, bytearray()))

    def append(self, file, offset, parts):
        file.write(parts)
        if not self._manual:
            return None
        d = Deferred()
        self.pending.append(d)
        return d

    def commit(self) -> None:
        """Commit every append made so far, in order."""
        pending, self.pending = self.pending, []
        for d in pending:
            d.callback(None)

    def sync(self, file):
        return succeed(None)

    def sync_many(self, files):
        return succeed(None)

    def remove(self, storages):
        for storage in storages:
            self.files.pop(storage, None)
        return succeed(None)

    def health(self) -> None:
        pass


class MemoryStore(StreamStore):
    """A stream store in memory: the same contract as DiskStore, for tests."""

    def __init__(self, clock, runners=None, records: dict | None = None,
                 files: dict | None = None, commits: str = "now", **options):
        byte_log = MemoryLog(files, commits)
        catalog = MemoryCatalog(records, byte_log.size_of, clock)
        super().__init__(catalog, byte_log, clock, runners, **options)
        self.records, self.files = catalog.records, byte_log.files
