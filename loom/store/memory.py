"""MemoryStore: the same contract with everything in dictionaries, a fake for tests."""

from __future__ import annotations

from dataclasses import replace

from twisted.logger import Logger
from zope.interface import implementer

from loom.errors import (
    StreamExists,
)
from loom.model import (
    INTERRUPTED,
    StreamRecord,
)
from loom.store.interfaces import IStreamStore
from loom.store.streams import _StoreBase
from loom.store.threads import InlineRunners, Runners

log = Logger()


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
        from loom.model import meta_rows

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

