"""The store's three roles in memory: a catalog and a byte log in dictionaries, for tests.

``MemoryStore`` composes them with the in-process live signal; give a later
MemoryStore the same ``records`` and ``files`` to simulate a restart.

Every answer goes through the store's runners: with ``InlineRunners`` it is
there at once (as the local backend's), with ``loom.testing.NextTurnRunners``
only on a later turn of the reactor, as a networked backend's would be. How
the byte log confirms appends is chosen by ``commits``: ``"now"`` (as a local
file does: ``append`` returns None), ``"later"`` (through the runners) or
``"manual"`` (held until the test calls ``commit()``). The stream store must
wake followers, and let its producer go on, only once an append is committed.
"""

from __future__ import annotations

import errno

from dataclasses import replace

from twisted.internet.defer import Deferred
from zope.interface import implementer

from loom.errors import StreamExists
from loom.model import INTERRUPTED, INTERRUPTED_REASON, LIVE, StreamRecord, meta_rows
from loom.store.files import MISSING
from loom.store.interfaces import IByteLog, ICatalog, IStreamData
from loom.store.streams import StreamStore
from loom.store.threads import InlineRunners, Runners

COMMITS = ("now", "later", "manual")


@implementer(IStreamData)
class MemoryFile:
    """A stream's bytes in memory, read and written like a DataFile: counted references
    included, so that the contract suite catches a release too many (which would close a
    real file under its readers) as surely as a use after the last release."""

    def __init__(self, data: bytearray):
        self._data = data
        self._refs = 1

    def acquire(self) -> MemoryFile:
        self._check_open()
        self._refs += 1
        return self

    def release(self) -> None:
        if self._refs == 0:
            raise RuntimeError("a stream's file was released more often than acquired")
        self._refs -= 1

    def _check_open(self) -> None:
        if self._refs == 0:
            raise OSError(errno.EBADF, "the stream's file was used after its last release")

    def write(self, parts: list) -> None:
        self._check_open()
        for part in parts:
            self._data += part

    def read(self, offset: int, size: int) -> bytes:
        self._check_open()
        return bytes(self._data[offset : offset + size])

    def size(self) -> int:
        self._check_open()
        return len(self._data)

    def thd_sync(self) -> None:
        pass


@implementer(ICatalog)
class MemoryCatalog:
    """Records in a dictionary. ``sizes(storage)`` tells how many bytes a stream holds,
    for the streams a "crash" left live; ``clock`` times their end."""

    def __init__(self, records: dict | None = None, sizes=None, clock=None,
                 runners: Runners | None = None):
        self.records: dict[str, StreamRecord] = {} if records is None else records
        self._sizes = sizes
        self._clock = clock
        self._runners = runners or InlineRunners()

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
        return self._runners.read(self.records.get, stream_id)

    def add(self, record, replace):
        def add():
            old = self.records.get(record.id)
            if old is not None and not replace:
                raise StreamExists(record.id)
            self.records[record.id] = record
            return old.storage if old else None

        return self._runners.catalog(add)

    def finish(self, record, state, size, finished_ms, reason):
        def finish():
            current = self.records.get(record.id)
            if current is None or current.storage != record.storage:
                return False
            self.records[record.id] = replace(
                current, state=state, size=size,
                finished_ms=current.finished_ms if finished_ms is None else finished_ms, reason=reason,
            )
            return True

        return self._runners.catalog(finish)

    def reopen(self, record):
        def reopen():
            current = self.records.get(record.id)
            if current is None or current.storage != record.storage:
                return False
            self.records[record.id] = replace(current, state=LIVE, finished_ms=None,
                                              reason=None)
            return True

        return self._runners.catalog(reopen)

    def delete(self, streams, finished_before_ms=None):
        def delete():
            storages = []
            for stream_id, storage in streams:
                current = self.records.get(stream_id)
                if current is not None and current.storage == storage and (
                        finished_before_ms is None
                        or (current.state != LIVE and current.finished_ms is not None
                            and current.finished_ms < finished_before_ms)):
                    del self.records[stream_id]
                    storages.append(storage)
            return storages

        return self._runners.catalog(delete)

    def forget_deletes(self, storages):
        return self._runners.catalog(lambda: None)

    def expired(self, before_ms, limit):
        def expired():
            old = sorted(
                (r for r in self.records.values()
                 if r.state != LIVE and r.finished_ms is not None and r.finished_ms < before_ms),
                key=lambda r: r.finished_ms,
            )[:limit]
            return [(r.id, r.storage) for r in old]

        return self._runners.read(expired)

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

        def listing():
            chosen = sorted(filter(matches, self.records.values()),
                            key=lambda r: (r.created_ms, r.id), reverse=True)
            return chosen[:limit]

        return self._runners.read(listing)

    def count(self):
        return self._runners.read(len, self.records)

    def health(self):
        return self._runners.read(lambda: None)

    def mark_clean_shutdown(self):
        return self._runners.catalog(lambda: None)


@implementer(IByteLog)
class MemoryLog:
    """Streams' bytes in a dictionary of bytearrays, by storage name.

    An append is handed over at once (readers of the file can see it);
    ``commits`` says when it is confirmed (see the module's docstring).
    """

    def __init__(self, files: dict | None = None, runners: Runners | None = None,
                 commits: str = "now"):
        if commits not in COMMITS:
            raise ValueError(f"commits must be one of {', '.join(COMMITS)}, not {commits!r}")
        self.files: dict[str, bytearray] = {} if files is None else files
        self._runners = runners or InlineRunners()
        self._commits = commits
        self.pending: list[Deferred] = []

    def size_of(self, storage: str) -> int:
        return len(self.files.get(storage, b""))

    def create(self, storage):
        def create():
            self.files[storage] = bytearray()
            return MemoryFile(self.files[storage])

        return self._runners.io(create)

    def reopen(self, storage, size):
        def reopen():
            data = self.files.setdefault(storage, bytearray())
            del data[size:]
            return MemoryFile(data)

        return self._runners.io(reopen)

    def open(self, storage):
        data = self.files.get(storage)
        return MISSING if data is None else MemoryFile(data)

    def append(self, file, offset, parts):
        file.write(parts)
        if self._commits == "now":
            return None
        if self._commits == "later":
            return self._runners.io(lambda: None)
        d = Deferred()
        self.pending.append(d)
        return d

    def commit(self) -> None:
        """Commit every append made so far, in order (``commits="manual"``)."""
        pending, self.pending = self.pending, []
        for d in pending:
            d.callback(None)

    def refuse(self, error: Exception) -> None:
        """Refuse every append waiting for its commit, as a networked log that lost them
        would (``commits="manual"``)."""
        pending, self.pending = self.pending, []
        for d in pending:
            d.errback(error)

    def sync(self, file):
        return self._runners.io(file.thd_sync)

    def sync_many(self, files):
        return self._runners.io(lambda: None)

    def remove(self, storages):
        def remove():
            for storage in storages:
                self.files.pop(storage, None)

        return self._runners.io(remove)

    def health(self) -> None:
        pass


class MemoryStore(StreamStore):
    """A stream store in memory: the same contract as DiskStore, for tests."""

    def __init__(self, clock, runners: Runners | None = None, records: dict | None = None,
                 files: dict | None = None, commits: str = "now", **options):
        runners = runners or InlineRunners()
        byte_log = MemoryLog(files, runners, commits)
        catalog = MemoryCatalog(records, byte_log.size_of, clock, runners)
        super().__init__(catalog, byte_log, clock, runners, **options)
        self.records, self.files = catalog.records, byte_log.files
