"""The SQLite catalog database: one row per stream, naming its data file, state and size.

Every method blocks. The store calls the writing ones from its single catalog
thread and reads from a separate connection; SQLite's WAL mode lets the two
work side by side. Writes are committed with ``synchronous=FULL`` so that a
stream marked complete stays complete after a power loss.

Any SQLite failure (disk full, I/O error, corruption) surfaces as
``CatalogError``, which the store reports as a storage failure.

Every write first checks that the path still names the file that was opened:
a catalog deleted or replaced under a running server would otherwise take
commits that no restart ever sees. A write that keeps the books (how a stream
ended, a deletion, start-up marks) may ask ``make_room`` for space once when
it fails, and is tried again if room was made (see loom.store.datadir.SpaceReserve).

About 530 lines: the schema, its migrations and every query on it
belong together, so that a change to one is checked against the others.
"""

from __future__ import annotations

import functools
import os
import sqlite3
from typing import Callable
from urllib.parse import quote

from twisted.logger import Logger

from loom.errors import StreamExists
from loom.model import STATES, StreamRecord, meta_rows

log = Logger(namespace="loom.store")

SCHEMA_VERSION = 4

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS streams (
    id          TEXT PRIMARY KEY,
    storage     TEXT NOT NULL UNIQUE,
    metadata    TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN {STATES!r}),
    size        INTEGER NOT NULL DEFAULT 0 CHECK (size >= 0),
    created_ms  INTEGER NOT NULL,
    finished_ms INTEGER,
    reason      TEXT
);
CREATE TABLE IF NOT EXISTS settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

# Version 3: metadata filters answered by an index, listing and retention by
# indexes, and deletions that survive a crash between the row and the file.
# Version 4: every listing walks an index in creation order, newest first, and
# stops after ``limit`` rows: a metadata value's rows carry their stream's
# creation time, and the state index is ordered by it too.
_SCHEMA_V3 = """
CREATE TABLE IF NOT EXISTS stream_meta (
    stream_id  TEXT NOT NULL,
    key        TEXT NOT NULL,
    value      TEXT NOT NULL,
    created_ms INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS stream_meta_by_stream ON stream_meta (stream_id);
CREATE INDEX IF NOT EXISTS streams_by_created ON streams (created_ms, id);
CREATE INDEX IF NOT EXISTS streams_by_finished ON streams (finished_ms);
CREATE TABLE IF NOT EXISTS pending_deletes (
    storage TEXT PRIMARY KEY
);
"""
_SCHEMA_V4 = """
DROP INDEX IF EXISTS stream_meta_by_value;
DROP INDEX IF EXISTS streams_by_state;
CREATE INDEX IF NOT EXISTS stream_meta_by_value_created
    ON stream_meta (key, value, created_ms, stream_id);
CREATE INDEX IF NOT EXISTS streams_by_state_created ON streams (state, created_ms, id);
"""


class CatalogError(Exception):
    """The catalog database failed (disk full, I/O error, corruption)."""


class CatalogGone(CatalogError):
    """The catalog's path no longer names the file this connection opened."""


class NotACatalog(CatalogError):
    """The file opened as the catalog holds no streams table (empty or not Loom's)."""


_COLUMNS = "id, storage, metadata, state, size, created_ms, finished_ms, reason"
_COLUMNS_OF_S = ", ".join("s." + column for column in _COLUMNS.split(", "))
_PLACEHOLDERS = ", ".join("?" * len(_COLUMNS.split(", ")))


def _guarded(method):
    """Turn sqlite3 failures into CatalogError with the operation named."""

    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as e:
            raise CatalogError(f"catalog {method.__name__} failed: {e}") from e

    wrapper.__name__ = method.__name__
    wrapper.__doc__ = method.__doc__
    return wrapper


def _writes(keeps_books: bool):
    """A catalog write: refused with CatalogGone once the file was deleted or
    replaced; if ``keeps_books``, tried once more after ``make_room`` made room."""

    def decorate(method):
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            self.check_in_place()
            try:
                return method(self, *args, **kwargs)
            except sqlite3.Error as e:
                if not (keeps_books and self._make_room is not None and self._make_room()):
                    raise CatalogError(f"catalog {method.__name__} failed: {e}") from e
            try:
                return method(self, *args, **kwargs)
            except sqlite3.Error as e:
                raise CatalogError(f"catalog {method.__name__} failed: {e}") from e

        return wrapper

    return decorate


def _identity(path: str) -> tuple[int, int] | None:
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return None
    return status.st_dev, status.st_ino


class Catalog:
    """A connection to the catalog database at ``path``.

    ``create`` lets SQLite make the file (and the schema) if there is none;
    without it a missing file fails and a file with no streams table raises
    NotACatalog. ``immutable`` (read-only) reads the file without SQLite's
    shared-memory file, for a disk too full to hold one, and is only right
    when no write-ahead log holds commits. ``make_room`` is asked for space
    when a bookkeeping write fails.
    """

    def __init__(self, path: str, *, readonly: bool = False, create: bool = True,
                 immutable: bool = False, make_room: Callable[[], bool] | None = None):
        self.path = path
        self._make_room = make_room
        self._db = None
        try:
            self._open(readonly, create, immutable)
        except sqlite3.Error as e:
            self.close()
            raise CatalogError(f"catalog __init__ failed: {e}") from e
        except CatalogError:
            self.close()
            raise

    def _open(self, readonly: bool, create: bool, immutable: bool) -> None:
        if immutable:
            mode = "ro&immutable=1"
        else:
            mode = "rwc" if create else "rw"
        self._db = sqlite3.connect(
            f"file:{quote(os.path.abspath(self.path))}?mode={mode}", uri=True,
            isolation_level=None, check_same_thread=False, timeout=10.0,
        )
        # The file this connection holds: writes stop if the path ever names another.
        self._identity = _identity(self.path)
        self._db.execute("PRAGMA busy_timeout = 10000")
        if not readonly:
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")
            self._migrate(create)
        else:
            self._db.execute("PRAGMA query_only = ON")
            if not create and not self._has_streams_table():
                raise NotACatalog(f"the catalog {self.path} holds no streams table")

    def _has_streams_table(self) -> bool:
        return self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'streams'"
        ).fetchone() is not None

    def in_place(self) -> bool:
        """Whether the catalog's path still names the file this connection opened."""
        return self._identity is not None and _identity(self.path) == self._identity

    def check_in_place(self) -> None:
        if not self.in_place():
            raise CatalogGone(f"the catalog file {self.path} was deleted or replaced "
                              "while Loom was running")

    def _migrate(self, create: bool) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        exists = self._has_streams_table()
        if not exists and not create:
            raise NotACatalog(f"the catalog {self.path} holds no streams table")
        if exists and version < SCHEMA_VERSION:
            log.info("upgrading the catalog {path} from schema {old} to {new}, once: about 9 s "
                     "per million streams", path=self.path, old=version, new=SCHEMA_VERSION)
        if exists and version < 2:
            # Version 1 had no reason column and no 'damaged' state; SQLite
            # cannot alter a CHECK constraint, so the table is rebuilt.
            with _transaction(self._db):
                self._db.execute("ALTER TABLE streams RENAME TO streams_v1")
                self._db.executescript(_SCHEMA.replace("IF NOT EXISTS ", ""))
                self._db.execute(
                    "INSERT INTO streams (id, storage, metadata, state, size, created_ms, "
                    "finished_ms) SELECT id, storage, metadata, state, size, created_ms, "
                    "finished_ms FROM streams_v1"
                )
                self._db.execute("DROP TABLE streams_v1")
        else:
            self._db.executescript(_SCHEMA)
        if exists and version == 3:
            with _transaction(self._db):
                self._db.execute("ALTER TABLE stream_meta ADD COLUMN created_ms INTEGER "
                                 "NOT NULL DEFAULT 0")
                self._db.execute("UPDATE stream_meta SET created_ms = (SELECT created_ms FROM "
                                 "streams WHERE id = stream_meta.stream_id)")
        self._db.executescript(_SCHEMA_V3)  # (executescript commits: not in a transaction)
        if exists and version < 3:
            with _transaction(self._db):
                rows = self._db.execute("SELECT id, metadata, created_ms FROM streams")
                self._db.execute("DELETE FROM stream_meta")
                self._db.executemany(_INSERT_META, [
                    meta for stream_id, text, created_ms in rows.fetchall()
                    for meta in _meta_values(stream_id, text, created_ms)])
        if version < SCHEMA_VERSION:
            self._db.executescript(_SCHEMA_V4)
        if version != SCHEMA_VERSION:
            # Only when it changes: on a full disk, every needless write can fail.
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        if self._db is not None:
            self._db.close()

    @_guarded
    def get(self, stream_id: str) -> StreamRecord | None:
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM streams WHERE id = ?", (stream_id,)
        ).fetchone()
        return StreamRecord(*row) if row else None

    @_guarded
    def records_in_state(self, state: str) -> list[StreamRecord]:
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM streams WHERE state = ?", (state,)
        ).fetchall()
        return [StreamRecord(*row) for row in rows]

    @_guarded
    def all_sizes(self) -> list[tuple[str, str, int, str]]:
        """(id, storage, size, state) of every stream: what reconciliation checks."""
        return self._db.execute("SELECT id, storage, size, state FROM streams").fetchall()

    @_writes(keeps_books=False)
    def insert(self, record: StreamRecord) -> None:
        """Add a new stream; StreamExists if its id is taken."""
        try:
            with _transaction(self._db):
                self._db.execute(
                    f"INSERT INTO streams ({_COLUMNS}) VALUES ({_PLACEHOLDERS})",
                    _values(record),
                )
                self._insert_meta(record)
        except sqlite3.IntegrityError:
            if self.get(record.id) is not None:
                raise StreamExists(record.id) from None
            raise

    @_writes(keeps_books=False)
    def insert_all(self, records: list[StreamRecord]) -> None:
        """Add many new streams in one transaction (a rebuilt catalog)."""
        with _transaction(self._db):
            for record in records:
                self._db.execute(
                    f"INSERT INTO streams ({_COLUMNS}) VALUES ({_PLACEHOLDERS})",
                    _values(record),
                )
                self._insert_meta(record)

    def _insert_meta(self, record: StreamRecord) -> None:
        self._db.executemany(_INSERT_META, _meta_values(record.id, record.metadata,
                                                        record.created_ms))

    @_writes(keeps_books=False)
    def replace(self, record: StreamRecord) -> str | None:
        """Put ``record`` in place of any stream with its id, in one transaction.

        Returns the storage name of the stream it replaced, if there was one,
        so the caller can delete that file once the new row is committed.
        """
        with _transaction(self._db):
            old = self.get(record.id)
            self._db.execute("DELETE FROM streams WHERE id = ?", (record.id,))
            self._db.execute("DELETE FROM stream_meta WHERE stream_id = ?", (record.id,))
            if old is not None:
                # Until its file is gone, the old data is a pending delete.
                self._db.execute("INSERT OR IGNORE INTO pending_deletes VALUES (?)",
                                 (old.storage,))
            self._db.execute(
                f"INSERT INTO streams ({_COLUMNS}) VALUES ({_PLACEHOLDERS})", _values(record)
            )
            self._insert_meta(record)
        return old.storage if old else None

    @_writes(keeps_books=True)
    def finish(
        self,
        stream_id: str,
        storage: str,
        state: str,
        size: int,
        finished_ms: int | None,
        reason: str | None = None,
    ) -> bool:
        """Record how a stream ended; False if the row now belongs to a newer stream."""
        cursor = self._db.execute(
            "UPDATE streams SET state = ?, size = ?, finished_ms = coalesce(?, finished_ms), "
            "reason = ? WHERE id = ? AND storage = ?",
            (state, size, finished_ms, reason, stream_id, storage),
        )
        return cursor.rowcount == 1

    @_writes(keeps_books=False)
    def reopen(self, stream_id: str, storage: str) -> bool:
        """A resumed stream is live again; False if the row now belongs to another stream."""
        cursor = self._db.execute(
            "UPDATE streams SET state = 'live', finished_ms = NULL, reason = NULL "
            "WHERE id = ? AND storage = ?",
            (stream_id, storage),
        )
        return cursor.rowcount == 1

    @_writes(keeps_books=True)
    def delete(self, streams: list[tuple[str, str]],
               finished_before_ms: int | None = None) -> list[str]:
        """Delete (id, storage) streams in one transaction; return the storages deleted.

        Each storage is recorded as a pending delete, so that its file is
        removed even if the process dies before it gets to it. With
        ``finished_before_ms`` (retention), only a stream still finished before
        then is deleted: one resumed since it was found expired is left alone.
        """
        deleted = []
        only_expired = ("" if finished_before_ms is None else
                        " AND state != 'live' AND finished_ms < ?")
        with _transaction(self._db):
            for stream_id, storage in streams:
                cursor = self._db.execute(
                    "DELETE FROM streams WHERE id = ? AND storage = ?" + only_expired,
                    (stream_id, storage) + (() if finished_before_ms is None
                                            else (finished_before_ms,)),
                )
                if cursor.rowcount == 1:
                    self._db.execute("DELETE FROM stream_meta WHERE stream_id = ?", (stream_id,))
                    self._db.execute("INSERT OR IGNORE INTO pending_deletes VALUES (?)",
                                     (storage,))
                    deleted.append(storage)
        return deleted

    @_guarded
    def pending_deletes(self) -> list[str]:
        return [row[0] for row in self._db.execute("SELECT storage FROM pending_deletes")]

    @_writes(keeps_books=True)
    def forget_pending_deletes(self, storages: list[str]) -> None:
        """The files of ``storages`` are gone."""
        self._db.executemany("DELETE FROM pending_deletes WHERE storage = ?",
                             [(storage,) for storage in storages])

    @_guarded
    def expired(self, before_ms: int, limit: int) -> list[tuple[str, str]]:
        """(id, storage) of finished streams that ended before ``before_ms``, oldest first."""
        return self._db.execute(
            "SELECT id, storage FROM streams WHERE state != 'live' AND finished_ms < ? "
            "ORDER BY finished_ms LIMIT ?",
            (before_ms, limit),
        ).fetchall()

    @_guarded
    def list(
        self,
        state: str | None = None,
        since_ms: int | None = None,
        until_ms: int | None = None,
        meta: tuple[tuple[str, str], ...] = (),
        before: tuple[int, str] | None = None,
        limit: int = 100,
    ) -> list[StreamRecord]:
        """Streams matching every filter, newest first, at most ``limit``.

        ``before`` is a (created_ms, id) cursor: only streams strictly older
        are listed, so pages stay stable while new streams are created.

        Each query walks one index in creation order, newest first, and stops
        after ``limit`` matches, however many streams the catalog holds: the
        first metadata filter's value index, else the state's, else the
        creation index. Further filters are checked row by row.
        """
        if meta:
            (key, value), others = meta[0], meta[1:]
            sql = (f"SELECT {_COLUMNS_OF_S} FROM stream_meta AS m "
                   "INDEXED BY stream_meta_by_value_created CROSS JOIN streams AS s "
                   "ON s.id = m.stream_id WHERE m.key = ? AND m.value = ?")
            created, stream_id, parameters = "m.created_ms", "m.stream_id", [key, value]
            if state is not None:
                sql += " AND s.state = ?"
                parameters.append(state)
            for key, value in others:
                sql += (" AND EXISTS (SELECT 1 FROM stream_meta AS o WHERE o.key = ? AND "
                        "o.value = ? AND o.created_ms = s.created_ms AND o.stream_id = s.id)")
                parameters += [key, value]
        elif state is not None:
            sql = (f"SELECT {_COLUMNS} FROM streams INDEXED BY streams_by_state_created "
                   "WHERE state = ?")
            created, stream_id, parameters = "created_ms", "id", [state]
        else:
            sql = f"SELECT {_COLUMNS} FROM streams INDEXED BY streams_by_created WHERE 1"
            created, stream_id, parameters = "created_ms", "id", []
        if since_ms is not None:
            sql += f" AND {created} >= ?"
            parameters.append(since_ms)
        if until_ms is not None:
            sql += f" AND {created} < ?"
            parameters.append(until_ms)
        if before is not None:
            sql += f" AND ({created} < ? OR ({created} = ? AND {stream_id} < ?))"
            parameters += [before[0], before[0], before[1]]
        sql += f" ORDER BY {created} DESC, {stream_id} DESC LIMIT ?"
        rows = self._db.execute(sql, (*parameters, limit)).fetchall()
        return [StreamRecord(*row) for row in rows]

    def explain_list(self, **filters) -> str:
        """SQLite's plan for a listing query (for tests: the indexes are used)."""
        saved, self._db = self._db, _Explaining(self._db)
        try:
            self.list(**filters)
            return self._db.plan
        finally:
            self._db = saved

    @_guarded
    def usable(self) -> None:
        """Raise CatalogError unless the database answers a query."""
        self._db.execute("SELECT 1 FROM streams LIMIT 1").fetchall()

    @_guarded
    def count(self) -> int:
        return self._db.execute("SELECT count(*) FROM streams").fetchone()[0]

    @_guarded
    def integrity_problems(self) -> list[str]:
        """What ``PRAGMA quick_check`` finds wrong; empty when the database is sound."""
        rows = self._db.execute("PRAGMA quick_check").fetchall()
        return [] if rows == [("ok",)] else [row[0] for row in rows]

    @_guarded
    def get_setting(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    @_writes(keeps_books=True)
    def set_setting(self, key: str, value: str) -> None:
        self._db.execute(
            "INSERT INTO settings (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )


_INSERT_META = "INSERT INTO stream_meta (stream_id, key, value, created_ms) VALUES (?, ?, ?, ?)"


def _meta_values(stream_id: str, metadata_json: str, created_ms: int) -> list[tuple]:
    return [(*row, created_ms) for row in meta_rows(stream_id, metadata_json)]


def _values(record: StreamRecord) -> tuple:
    return (
        record.id,
        record.storage,
        record.metadata,
        record.state,
        record.size,
        record.created_ms,
        record.finished_ms,
        record.reason,
    )


class _Explaining:
    """Runs a query's EXPLAIN QUERY PLAN instead of the query."""

    def __init__(self, db):
        self._db = db
        self.plan = ""

    def execute(self, sql, parameters=()):
        rows = self._db.execute("EXPLAIN QUERY PLAN " + sql, parameters).fetchall()
        self.plan = "\n".join(row[-1] for row in rows)
        return self._db.execute("SELECT 1 WHERE 0")


class _transaction:
    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def __enter__(self):
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind, value, traceback):
        if not kind:
            self._db.execute("COMMIT")
        elif self._db.in_transaction:
            # SQLite may already have rolled back (a full disk does that): then
            # a ROLLBACK would fail and hide the error that matters.
            self._db.execute("ROLLBACK")
        return False
