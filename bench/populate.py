"""Fill a data directory with many finished streams quickly: for benchmarks and soak tests.

    python -m bench.populate DATA_DIR COUNT [--size N] [--no-files] [--branches N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable

from loom.model import COMPLETE, StreamRecord, new_storage_name
from loom.store.catalog_db import Catalog
from loom.store.datadir import CATALOG, DirectoryLock, stream_file

START_MS = 1_700_000_000_000


def branch_metadata(branches: int) -> Callable[[int], dict]:
    """Metadata like a CI's: ``n``, a ``job`` shared by a hundred streams, and a ``branch``
    of which the first (``main``) holds half of all streams."""
    def metadata(index: int) -> dict:
        branch = "main" if index % 2 == 0 or branches < 2 else f"feature-{index % branches}"
        return {"n": index, "job": f"job-{index // 100}", "branch": branch}

    return metadata


def populate(data_dir: str, count: int, size: int = 64, prefix: str = "stored",
             metadata: Callable[[int], dict] | None = None, files: bool = True) -> list[str]:
    """Add ``count`` complete streams of ``size`` bytes each, created a millisecond apart;
    return their ids. ``metadata(index)`` gives each stream's metadata (default ``{"n":
    index}``). Without ``files`` only the catalog is written, and marked cleanly shut down
    so that start-up does not take every stream for damaged: for listing benchmarks only.

    Rows go in one transaction and files are written directly, so a hundred
    thousand streams take seconds, not minutes.
    """
    os.makedirs(os.path.join(data_dir, "streams"), exist_ok=True)
    lock = DirectoryLock.acquire(data_dir)  # never under a running server
    try:
        return _populate(data_dir, count, size, prefix, metadata or (lambda n: {"n": n}), files)
    finally:
        lock.release()


def _populate(data_dir, count, size, prefix, metadata, files) -> list[str]:
    ids, records, made = [], [], set()
    payload = (b"x" * (size - 1) + b"\n") if size else b""
    for index in range(count):
        stream_id = f"{prefix}-{index:07d}"
        storage = new_storage_name(stream_id)
        if files:
            path = stream_file(data_dir, storage)
            directory = os.path.dirname(path)
            if directory not in made:
                os.makedirs(directory, exist_ok=True)
                made.add(directory)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, payload)
            finally:
                os.close(fd)
        ids.append(stream_id)
        records.append(StreamRecord(
            id=stream_id, storage=storage, state=COMPLETE, size=size,
            metadata=json.dumps(metadata(index), separators=(",", ":")),
            created_ms=START_MS + index, finished_ms=START_MS + index))
    catalog = Catalog(os.path.join(data_dir, CATALOG))
    try:
        catalog.insert_all(records)
        if not files:
            catalog.set_setting("clean_shutdown", "1")
    finally:
        catalog.close()
    return ids


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.populate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir")
    parser.add_argument("count", type=int)
    parser.add_argument("--size", type=int, default=64, help="bytes per stream (default 64)")
    parser.add_argument("--no-files", action="store_true",
                        help="write the catalog only (for listing benchmarks)")
    parser.add_argument("--branches", type=int, default=0,
                        help="give streams CI-like metadata over this many branches")
    args = parser.parse_args(argv)
    metadata = branch_metadata(args.branches) if args.branches else None
    ids = populate(args.data_dir, args.count, args.size, metadata=metadata,
                   files=not args.no_files)
    print(f"{len(ids)} streams in {args.data_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
