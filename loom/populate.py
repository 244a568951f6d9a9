"""Fill a data directory with many finished streams quickly: for benchmarks and soak tests."""

from __future__ import annotations

import os
import sqlite3

from loom.store.catalog_db import Catalog
from loom.store.datadir import DirectoryLock
from loom.store import DiskStore, InlineRunners, new_storage_name


def populate(data_dir: str, count: int, size: int = 64, prefix: str = "stored") -> list[str]:
    """Add ``count`` complete streams of ``size`` bytes each; return their ids.

    Rows are inserted in one transaction and files written directly, so a
    hundred thousand streams take seconds, not minutes.
    """
    os.makedirs(os.path.join(data_dir, "streams"), exist_ok=True)
    lock = DirectoryLock.acquire(data_dir)  # never under a running server
    try:
        return _populate(data_dir, count, size, prefix)
    finally:
        lock.release()


def _populate(data_dir: str, count: int, size: int, prefix: str) -> list[str]:
    Catalog(os.path.join(data_dir, "catalog.sqlite3")).close()  # create the schema
    layout = DiskStore(data_dir, clock=None, runners=InlineRunners())
    ids, rows, made = [], [], set()
    payload = (b"x" * (size - 1) + b"\n") if size else b""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    for index in range(count):
        stream_id = f"{prefix}-{index:07d}"
        storage = new_storage_name(stream_id)
        path = layout.data_path(storage).path
        directory = os.path.dirname(path)
        if directory not in made:
            os.makedirs(directory, exist_ok=True)
            made.add(directory)
        fd = os.open(path, flags, 0o644)
        try:
            os.write(fd, payload)
        finally:
            os.close(fd)
        ids.append(stream_id)
        rows.append((stream_id, storage, f'{{"n":{index}}}', "complete", size,
                     1_700_000_000_000 + index, 1_700_000_000_000 + index))
    with sqlite3.connect(os.path.join(data_dir, "catalog.sqlite3")) as db:
        db.executemany(
            "INSERT INTO streams (id, storage, metadata, state, size, created_ms, finished_ms) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
    return ids
