"""The data directory as a whole: one server at a time, and a catalog that is
really there.

Everything here blocks (file-system calls); the store calls it at start-up.
"""

from __future__ import annotations

import errno
import fcntl
import os
from typing import Callable

CATALOG = "catalog.sqlite3"
# What SQLite keeps beside the catalog in WAL mode.
CATALOG_COMPANIONS = ("-wal", "-shm")


class DataDirectoryError(Exception):
    """The data directory cannot be used as it is; the message says why and what to do."""


# --- one server per data directory ---------------------------------------------


class DirectoryLock:
    """An exclusive ``flock`` on the data directory itself, held while the store is open.

    The kernel drops it when its descriptor closes, so it goes with the process
    however that ends (``kill -9`` included). Locking the directory rather
    than a file in it means there is no lock file to delete or to fill a disk.
    """

    def __init__(self, fd: int, path: str):
        self._fd = fd
        self.path = path

    @classmethod
    def acquire(cls, path: str) -> DirectoryLock:
        """Lock ``path`` or raise DataDirectoryError naming the process that holds it."""
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = lock_holder(fd)
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise DataDirectoryError(
                    f"the data directory {path} cannot be locked: {e.strerror}") from e
            if holder == os.getpid():
                who = "this process"
            elif holder is not None:
                who = f"another Loom process (pid {holder})"
            else:
                who = "another Loom process"
            raise DataDirectoryError(
                f"the data directory {path} is in use by {who}; one data directory "
                "serves one Loom at a time") from None
        return cls(fd, path)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing drops the lock
            self._fd = -1


def lock_holder(fd: int) -> int | None:
    """The pid holding a flock on the file of ``fd``, from /proc/locks (Linux); None if unknown."""
    status = os.fstat(fd)
    device = f"{os.major(status.st_dev):02x}:{os.minor(status.st_dev):02x}:{status.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            for line in f:
                fields = line.split()
                # "1: FLOCK  ADVISORY  WRITE 1234 00:2c:5678 0 EOF"; "->" marks waiters.
                if "->" in fields or len(fields) < 6:
                    continue
                if fields[1] == "FLOCK" and fields[5] == device:
                    return int(fields[4])
    except (OSError, ValueError):
        pass
    return None


# --- is the catalog there? ---------------------------------------------------------


def stream_file_count(streams_dir: str) -> int:
    """How many files ``streams/`` holds (in its buckets): stream data, whatever its state."""
    count = 0
    try:
        buckets = list(os.scandir(streams_dir))
    except FileNotFoundError:
        return 0
    for bucket in buckets:
        if bucket.is_dir(follow_symlinks=False):
            count += sum(1 for entry in os.scandir(bucket.path)
                         if entry.is_file(follow_symlinks=False))
    return count


def catalog_problem(catalog_path: str, streams_dir: str) -> str | None:
    """Why the catalog file cannot be trusted as it is, or None (present, or a fresh install).

    A fresh install is no catalog, no write-ahead log and no stream data. A
    missing catalog beside data, or an empty one, is never taken for one: a new
    catalog would make every stream an orphan.
    """
    try:
        size = os.stat(catalog_path).st_size
    except FileNotFoundError:
        size = None
    if size == 0:
        return f"the catalog {catalog_path} is empty (0 bytes)"
    if size is not None:
        return None
    files = stream_file_count(streams_dir)
    if files:
        return f"the catalog {catalog_path} is missing but {streams_dir} holds {files} files"
    for suffix in CATALOG_COMPANIONS:
        if os.path.exists(catalog_path + suffix) and os.path.getsize(catalog_path + suffix):
            return f"the catalog {catalog_path} is missing but its {suffix[1:]} file is not"
    return None


def what_to_do(problem: str) -> str:
    """A catalog problem and the operator's two ways out, in one line."""
    return (f"{problem}: restore the catalog from a backup, or start Loom once with "
            "--rebuild-catalog to rebuild it from the data files (stream metadata is lost)")


def create_atomically(path: str, make: Callable[[str], None]) -> None:
    """Make a file at ``path`` with ``make(temporary path)``, then rename it into place.

    Whoever finds ``path`` finds it complete: a crash part-way leaves only the
    temporary file, which the next attempt removes.
    """
    temporary = path + ".new"
    for leftover in (temporary, *(temporary + suffix for suffix in CATALOG_COMPANIONS)):
        try:
            os.unlink(leftover)
        except FileNotFoundError:
            pass
    make(temporary)
    for suffix in CATALOG_COMPANIONS:
        if os.path.exists(temporary + suffix):
            raise OSError(errno.EBUSY, f"{temporary + suffix} is still there after closing")
    fd = os.open(temporary, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(temporary, path)
    sync_directory(os.path.dirname(path))


def sync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
