"""The SQLite catalog: one row per stream, naming its data file, state and size.

Every method blocks. The store calls the writing ones from its single catalog
thread and reads from a separate connection; SQLite's WAL mode lets the two
work side by side. Writes are committed with ``synchronous=FULL`` so that a
stream marked complete stays complete after a power loss.

Any SQLite failure (disk full, I/O error, corruption) surfaces as
``CatalogError``, which the store reports as a storage failure.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from loom.errors import StreamExists

STATES = ("live", "complete", "aborted", "interrupted", "damaged")
SCHEMA_VERSION = 2

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
CREATE INDEX IF NOT EXISTS streams_by_state ON streams (state);
CREATE TABLE IF NOT EXISTS settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


class CatalogError(Exception):
    """The catalog database failed (disk full, I/O error, corruption)."""


@dataclass(frozen=True)
class StreamRecord:
    """A catalog row. ``metadata`` is the stored JSON text; ``reason`` explains an odd state."""

    id: str
    storage: str
    metadata: str
    state: str
    size: int
    created_ms: int
    finished_ms: int | None = None
    reason: str | None = None


_COLUMNS = "id, storage, metadata, state, size, created_ms, finished_ms, reason"
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


class Catalog:
    """A connection to the catalog database at ``path``."""

    @_guarded
    def __init__(self, path: str, *, readonly: bool = False):
        self.path = path
        self._db = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=10.0
        )
        self._db.execute("PRAGMA busy_timeout = 10000")
        if not readonly:
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")
            self._migrate()
        else:
            self._db.execute("PRAGMA query_only = ON")

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        exists = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'streams'"
        ).fetchone()
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
        self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
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

    @_guarded
    def insert(self, record: StreamRecord) -> None:
        """Add a new stream; StreamExists if its id is taken."""
        try:
            self._db.execute(
                f"INSERT INTO streams ({_COLUMNS}) VALUES ({_PLACEHOLDERS})", _values(record)
            )
        except sqlite3.IntegrityError:
            if self.get(record.id) is not None:
                raise StreamExists(record.id) from None
            raise

    @_guarded
    def replace(self, record: StreamRecord) -> str | None:
        """Put ``record`` in place of any stream with its id, in one transaction.

        Returns the storage name of the stream it replaced, if there was one,
        so the caller can delete that file once the new row is committed.
        """
        with _transaction(self._db):
            old = self.get(record.id)
            self._db.execute("DELETE FROM streams WHERE id = ?", (record.id,))
            self._db.execute(
                f"INSERT INTO streams ({_COLUMNS}) VALUES ({_PLACEHOLDERS})", _values(record)
            )
        return old.storage if old else None

    @_guarded
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

    @_guarded
    def delete(self, stream_id: str, storage: str) -> bool:
        cursor = self._db.execute(
            "DELETE FROM streams WHERE id = ? AND storage = ?", (stream_id, storage)
        )
        return cursor.rowcount == 1

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

    @_guarded
    def set_setting(self, key: str, value: str) -> None:
        self._db.execute(
            "INSERT INTO settings (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )


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


class _transaction:
    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def __enter__(self):
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind, value, traceback):
        self._db.execute("ROLLBACK" if kind else "COMMIT")
        return False
