"""The SQLite catalog: one row per stream, naming its data file, state and size.

Every method blocks. The store calls the writing ones from its single catalog
thread and reads from a separate connection; SQLite's WAL mode lets the two
work side by side. Writes are committed with ``synchronous=FULL`` so that a
stream marked complete stays complete after a power loss.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from loom.errors import StreamExists

STATES = ("live", "complete", "aborted", "interrupted")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS streams (
    id          TEXT PRIMARY KEY,
    storage     TEXT NOT NULL UNIQUE,
    metadata    TEXT NOT NULL,
    state       TEXT NOT NULL
                CHECK (state IN ('live', 'complete', 'aborted', 'interrupted')),
    size        INTEGER NOT NULL DEFAULT 0 CHECK (size >= 0),
    created_ms  INTEGER NOT NULL,
    finished_ms INTEGER
);
CREATE INDEX IF NOT EXISTS streams_by_state ON streams (state);
"""


@dataclass(frozen=True)
class StreamRecord:
    """A catalog row. ``metadata`` is the stored JSON text."""

    id: str
    storage: str
    metadata: str
    state: str
    size: int
    created_ms: int
    finished_ms: int | None = None


_COLUMNS = "id, storage, metadata, state, size, created_ms, finished_ms"


class Catalog:
    """A connection to the catalog database at ``path``."""

    def __init__(self, path: str, *, readonly: bool = False):
        self.path = path
        self._db = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=10.0
        )
        self._db.execute("PRAGMA busy_timeout = 10000")
        if not readonly:
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")
            self._db.executescript(_SCHEMA)
        else:
            self._db.execute("PRAGMA query_only = ON")

    def close(self) -> None:
        self._db.close()

    def get(self, stream_id: str) -> StreamRecord | None:
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM streams WHERE id = ?", (stream_id,)
        ).fetchone()
        return StreamRecord(*row) if row else None

    def records_in_state(self, state: str) -> list[StreamRecord]:
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM streams WHERE state = ?", (state,)
        ).fetchall()
        return [StreamRecord(*row) for row in rows]

    def insert(self, record: StreamRecord) -> None:
        """Add a new stream; StreamExists if its id is taken."""
        try:
            self._db.execute(
                f"INSERT INTO streams ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                _values(record),
            )
        except sqlite3.IntegrityError:
            if self.get(record.id) is not None:
                raise StreamExists(record.id)
            raise

    def replace(self, record: StreamRecord) -> str | None:
        """Put ``record`` in place of any stream with its id, in one transaction.

        Returns the storage name of the stream it replaced, if there was one,
        so the caller can delete that file once the new row is committed.
        """
        with _transaction(self._db):
            old = self.get(record.id)
            self._db.execute("DELETE FROM streams WHERE id = ?", (record.id,))
            self._db.execute(
                f"INSERT INTO streams ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                _values(record),
            )
        return old.storage if old else None

    def finish(
        self, stream_id: str, storage: str, state: str, size: int, finished_ms: int
    ) -> bool:
        """Record how a stream ended; False if the row now belongs to a newer stream."""
        cursor = self._db.execute(
            "UPDATE streams SET state = ?, size = ?, finished_ms = ? "
            "WHERE id = ? AND storage = ?",
            (state, size, finished_ms, stream_id, storage),
        )
        return cursor.rowcount == 1

    def delete(self, stream_id: str, storage: str) -> bool:
        cursor = self._db.execute(
            "DELETE FROM streams WHERE id = ? AND storage = ?", (stream_id, storage)
        )
        return cursor.rowcount == 1

    def count(self) -> int:
        return self._db.execute("SELECT count(*) FROM streams").fetchone()[0]


def _values(record: StreamRecord) -> tuple:
    return (
        record.id,
        record.storage,
        record.metadata,
        record.state,
        record.size,
        record.created_ms,
        record.finished_ms,
    )


class _transaction:
    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def __enter__(self):
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind, value, traceback):
        self._db.execute("ROLLBACK" if kind else "COMMIT")
        return False
