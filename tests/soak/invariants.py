"""What must hold in a data directory after any crash and restart."""

from __future__ import annotations

import os
import sqlite3


def check_data_dir(data_dir: str) -> dict[str, tuple[str, int]]:
    """Check the durability invariants of a (restarted) data directory; return id -> (state, size).

    * ``PRAGMA integrity_check`` is ok;
    * no stream is left live;
    * every row's file holds at least the bytes the row claims (or the row claims none);
    * every data file belongs to a row (orphans were removed or quarantined).
    """
    catalog = os.path.join(data_dir, "catalog.sqlite3")
    with sqlite3.connect(catalog) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        rows = db.execute("SELECT id, storage, state, size FROM streams").fetchall()
    files = {}
    for directory, _, names in os.walk(os.path.join(data_dir, "streams")):
        for name in names:
            files[name[: -len(".data")]] = os.path.getsize(os.path.join(directory, name))
    streams = {}
    for stream_id, storage, state, size in rows:
        assert state != "live", f"{stream_id} is still live"
        on_disk = files.pop(storage, None)
        assert size == 0 or (on_disk is not None and on_disk >= size), (
            f"{stream_id} claims {size} bytes, the disk has {on_disk}")
        streams[stream_id] = (state, size)
    assert not files, f"files without a catalog row: {sorted(files)}"
    return streams
