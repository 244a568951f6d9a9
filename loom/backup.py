"""``loom-backup``: a consistent copy of a data directory while Loom runs, and a check of one.

    loom-backup /var/lib/loom /backup/loom-2026-11-28     # copy (Loom may be running)
    loom-backup --check /backup/loom-2026-11-28           # is this a whole data directory?

The copy is consistent because of the order: first the catalog, through
SQLite's online backup API (a snapshot of one moment, taken beside Loom's own
writes), then the data file of every stream that snapshot names. Stream files
only ever grow (bytes are appended before the catalog records them) or go
away with their stream, so each file holds at least what the snapshot
recorded: a finished stream is copied up to its recorded size, a stream that
was live is copied whole (when the copy is started as Loom, it becomes
``interrupted`` with what it holds, as after a crash). A stream deleted between
the snapshot and the copy of its file is dropped from the copy's catalog.

To restore: stop Loom, put the copy in place of the data directory, start Loom.
"""

from __future__ import annotations

import argparse
import os
from contextlib import closing
import shutil
import sqlite3
import sys
import time
from urllib.parse import quote

from loom import __version__
from loom.store.datadir import CATALOG, stream_file

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2


def backup(source: str, target: str, say=print) -> int:
    """Copy the data directory ``source`` to ``target`` (which must not exist), saying how it
    goes; return how many streams were left out because they were deleted meanwhile."""
    catalog = os.path.join(source, CATALOG)
    if not os.path.isfile(catalog):
        raise BackupError(f"{source} holds no {CATALOG}: not a Loom data directory")
    if os.path.exists(target):
        raise BackupError(f"{target} exists already: give a new directory to copy into")
    os.makedirs(os.path.join(target, "streams"))
    copy_path = os.path.join(target, CATALOG)
    with closing(_connect(catalog, "ro")) as live, closing(_connect(copy_path, "rwc")) as copy:
        live.backup(copy)  # one consistent moment, whatever Loom writes meanwhile
    with closing(_connect(copy_path, "rw")) as copy:
        rows = copy.execute("SELECT id, storage, state, size FROM streams").fetchall()
        gone, copied, started, shown = [], 0, time.monotonic(), time.monotonic()
        for index, (stream_id, storage, state, size) in enumerate(rows, start=1):
            try:
                copied += _copy_file(stream_file(source, storage), stream_file(target, storage),
                                     None if state == "live" else size)
            except FileNotFoundError:
                gone.append((stream_id, storage))
            if time.monotonic() - shown >= 2:
                shown = time.monotonic()
                say(f"loom-backup: {index} of {len(rows)} streams, {copied / 2**20:.0f} MiB")
        copy.execute("BEGIN IMMEDIATE")
        for stream_id, storage in gone:
            copy.execute("DELETE FROM streams WHERE id = ? AND storage = ?", (stream_id, storage))
            copy.execute("DELETE FROM stream_meta WHERE stream_id = ?", (stream_id,))
        # The copy's first start compares every stream with its file.
        copy.execute("INSERT INTO settings (key, value) VALUES ('clean_shutdown', '0') "
                     "ON CONFLICT (key) DO UPDATE SET value = excluded.value")
        copy.execute("COMMIT")
    say(f"loom-backup: copied {len(rows) - len(gone)} streams ({copied / 2**20:.1f} MiB) "
        f"to {target} in {time.monotonic() - started:.1f} s"
        + (f"; {len(gone)} deleted meanwhile were left out" if gone else ""))
    return len(gone)


def check(data_dir: str) -> list[str]:
    """What is wrong with ``data_dir`` as a whole data directory: nothing, for a good one."""
    catalog = os.path.join(data_dir, CATALOG)
    if not os.path.isfile(catalog):
        return [f"{data_dir} holds no {CATALOG}"]
    problems = []
    with closing(_connect(catalog, "ro")) as db:
        verdict = db.execute("PRAGMA integrity_check").fetchall()
        if verdict != [("ok",)]:
            problems.append(f"the catalog is damaged: {verdict[0][0]}")
        rows = db.execute("SELECT id, storage, state, size FROM streams").fetchall()
    owned = set()
    for stream_id, storage, state, size in rows:
        path = stream_file(data_dir, storage)
        owned.add(os.path.abspath(path))
        try:
            held = os.path.getsize(path)
        except FileNotFoundError:
            if size:
                problems.append(f"stream {stream_id}: its data file is missing ({size} bytes "
                                "recorded)")
            continue
        if held < size:
            problems.append(f"stream {stream_id} ({state}): its file holds {held} of the "
                            f"{size} bytes recorded")
    streams = os.path.join(data_dir, "streams")
    for folder, _, names in os.walk(streams):
        for name in names:
            path = os.path.abspath(os.path.join(folder, name))
            if path not in owned:
                problems.append(f"{path} belongs to no stream of the catalog")
    return problems


class BackupError(Exception):
    """The backup cannot be made; the message says why."""


def _connect(path: str, mode: str) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{quote(os.path.abspath(path))}?mode={mode}", uri=True,
                           isolation_level=None, timeout=30.0)


def _copy_file(source: str, target: str, size: int | None) -> int:
    """Copy ``size`` bytes (None: all) of ``source`` to ``target``, synced; bytes copied."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(source, "rb") as reader, open(target, "wb") as writer:
        if size is None:
            shutil.copyfileobj(reader, writer, 1024 * 1024)
        else:
            left = size
            while left:
                block = reader.read(min(left, 1024 * 1024))
                if not block:
                    raise BackupError(f"{source} holds fewer bytes than its stream records")
                writer.write(block)
                left -= len(block)
        writer.flush()
        os.fsync(writer.fileno())
        return writer.tell()


HELP = __doc__.split("\n\n", 2)[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="loom-backup", description=__doc__.split("\n", 1)[0].split(": ", 1)[1],
        epilog=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"loom-backup {__version__}")
    parser.add_argument("--check", metavar="DIR", help="check a data directory or a copy")
    parser.add_argument("source", nargs="?", help="the data directory to copy")
    parser.add_argument("target", nargs="?", help="a new directory to copy it into")
    args = parser.parse_args(argv)
    try:
        if args.check:
            if args.source or args.target:
                parser.error("--check takes one directory and nothing else")
            problems = check(args.check)
            for problem in problems:
                print(f"loom-backup: {problem}", file=sys.stderr)
            if not problems:
                print(f"loom-backup: {args.check} is a whole data directory")
            return EXIT_PROBLEMS if problems else EXIT_OK
        if not (args.source and args.target):
            parser.error("give the data directory and a new directory to copy it into")
        backup(args.source, args.target)
        problems = check(args.target)
        for problem in problems:
            print(f"loom-backup: the copy: {problem}", file=sys.stderr)
        return EXIT_PROBLEMS if problems else EXIT_OK
    except (BackupError, sqlite3.Error, OSError) as e:
        print(f"loom-backup: {e}", file=sys.stderr)
        return EXIT_PROBLEMS


if __name__ == "__main__":
    sys.exit(main())
