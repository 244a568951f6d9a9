"""SQLiteCatalog: the catalog of one node, a SQLite database beside the stream files.

Writes go through one connection in the catalog thread, in order; reads go
through a connection per reader thread (SQLite's WAL mode lets them run beside
the writer), so a listing over hundreds of thousands of streams never runs on
the reactor thread. The connections themselves, and start-up, belong to the
data directory (loom.store.disk); this is the ICatalog the stream store uses.
"""

from __future__ import annotations

import threading
from typing import Callable

from twisted.internet.defer import Deferred
from zope.interface import implementer

from loom.errors import Unavailable
from loom.model import StreamRecord
from loom.store.catalog_db import Catalog, CatalogError
from loom.store.interfaces import ICatalog


@implementer(ICatalog)
class SQLiteCatalog:
    """``writer()`` gives the writing connection (raising CatalogError while there is
    none); ``open_reader()`` makes a reading one; ``check`` raises Unavailable when the
    catalog cannot be used (deleted under the server, start-up unfinished); ``open`` and
    ``close`` open and close the database (the data directory's start-up and end);
    ``before_clean_shutdown`` raises CatalogError when no clean shutdown may be recorded."""

    def __init__(self, runners, writer: Callable[[], Catalog],
                 open_reader: Callable[[], Catalog], check: Callable[[], None],
                 open: Callable[[], None], close: Callable[[], None],
                 before_clean_shutdown: Callable[[], None] | None = None):
        self._runners = runners
        self._writer = writer
        self._open_reader = open_reader
        self._check = check
        self._open_database = open
        self._close_database = close
        self._before_clean_shutdown = before_clean_shutdown
        self._readers: list[Catalog] = []
        self._local = threading.local()
        self._generation = 0  # bumped when the database's connections are renewed
        self._lock = threading.Lock()

    def open(self) -> None:
        self._open_database()

    def close(self) -> None:
        self.renew_readers()
        self._close_database()

    def renew_readers(self) -> None:
        """Close every reading connection; each thread opens a new one when it next reads."""
        with self._lock:
            readers, self._readers = self._readers, []
            self._generation += 1
        for reader in readers:
            reader.close()

    def _reader(self) -> Catalog:
        """This thread's reading connection."""
        local = self._local
        if getattr(local, "generation", None) != self._generation:
            reader = self._open_reader()
            with self._lock:
                self._readers.append(reader)
                local.reader, local.generation = reader, self._generation
        return local.reader

    def _read(self, method: str, *args, **kwargs) -> Deferred:
        return self._runners.read(lambda: getattr(self._reader(), method)(*args, **kwargs))

    def _write(self, method: str, *args) -> Deferred:
        return self._runners.catalog(lambda: getattr(self._writer(), method)(*args))

    # reading

    def get(self, stream_id: str) -> Deferred:
        return self._read("get", stream_id)

    def list(self, state=None, since_ms=None, until_ms=None, meta=(), before=None,
             limit=100) -> Deferred:
        return self._read("list", state=state, since_ms=since_ms, until_ms=until_ms, meta=meta,
                          before=before, limit=limit)

    def count(self) -> Deferred:
        return self._read("count")

    def health(self) -> Deferred:
        def check():
            self._check()
            try:
                self._reader().usable()
            except CatalogError as e:
                raise Unavailable(f"The catalog cannot be read: {e}") from e

        return self._runners.read(check)

    # writing

    def add(self, record: StreamRecord, replace: bool) -> Deferred:
        def add():
            writer = self._writer()
            if replace:
                return writer.replace(record)
            writer.insert(record)  # StreamExists if the id is taken
            return None

        return self._runners.catalog(add)

    def finish(self, record: StreamRecord, state: str, size: int, finished_ms: int | None,
               reason: str | None) -> Deferred:
        return self._write("finish", record.id, record.storage, state, size, finished_ms, reason)

    def reopen(self, record: StreamRecord) -> Deferred:
        return self._write("reopen", record.id, record.storage)

    def delete(self, streams: list[tuple[str, str]],
               finished_before_ms: int | None = None) -> Deferred:
        return self._write("delete", streams, finished_before_ms)

    def forget_deletes(self, storages: list[str]) -> Deferred:
        return self._write("forget_pending_deletes", storages)

    def expired(self, before_ms: int, limit: int) -> Deferred:
        return self._write("expired", before_ms, limit)

    def mark_clean_shutdown(self) -> Deferred:
        def mark():
            if self._before_clean_shutdown is not None:
                self._before_clean_shutdown()
            self._writer().set_setting("clean_shutdown", "1")

        return self._runners.catalog(mark)



