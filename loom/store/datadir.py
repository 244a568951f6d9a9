"""The data directory as a whole: one server at a time, a catalog that is really
there, and room for the catalog's bookkeeping when the disk is full.

Everything here blocks (file-system calls); the store calls it at start-up or
from its catalog thread.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
from typing import Callable

from twisted.logger import Logger

log = Logger()

CATALOG = "catalog.sqlite3"
RESERVE = "reserve"
# What SQLite keeps beside the catalog in WAL mode.
CATALOG_COMPANIONS = ("-wal", "-shm")


def stream_file(data_dir: str, storage: str) -> str:
    """Where the data of the stream stored as ``storage`` lives in ``data_dir``:
    ``streams/<xx>/<storage>.data``, ``xx`` spreading the files over 256 folders."""
    bucket = hashlib.sha256(storage.encode("ascii")).hexdigest()[:2]
    return os.path.join(data_dir, "streams", bucket, storage + ".data")


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
    wal = catalog_path + "-wal"
    if os.path.exists(wal) and os.path.getsize(wal):
        return f"the catalog {catalog_path} is missing but its write-ahead log {wal} is not"
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


# --- room for the books on a full disk ------------------------------------------


def free_bytes(path: str) -> int:
    """Bytes an unprivileged writer may still use on the file system holding ``path``."""
    status = os.statvfs(path)
    return status.f_bavail * status.f_frsize


class SpaceReserve:
    """A preallocated file Loom deletes so that the catalog can keep its books on a full disk.

    When a bookkeeping commit (how a stream ended, a deletion, the start-up
    marks) fails on a nearly full disk, the reserve is given up and the commit
    tried again. While it is spent, no stream data is accepted
    (``accepts_data`` is False), so the room it freed goes to the catalog and
    not to the next chunk. It is made again once the file system has room for
    it twice over. A size of 0 turns all of this off.
    """

    def __init__(self, path: str, size: int, free: Callable[[], int] | None = None):
        self.path = path
        self.size = size
        self._free = free or (lambda: free_bytes(os.path.dirname(path)))
        self.held = False

    @property
    def accepts_data(self) -> bool:
        return self.held or not self.size

    @property
    def needed(self) -> int:
        """Free bytes needed before the reserve is made again."""
        return 2 * self.size

    def free(self) -> int:
        return self._free()

    def low(self) -> bool:
        """Whether the file system is so full that a failed commit is likely for want of room."""
        return self.size > 0 and self._free() < self.size

    def thd_adopt(self) -> None:
        """Count a reserve left by an earlier run (at start-up)."""
        try:
            os.unlink(self.path + ".new")  # half made when a run died: room for nothing
        except FileNotFoundError:
            pass
        try:
            self.held = self.size > 0 and os.stat(self.path).st_blocks * 512 >= self.size
        except FileNotFoundError:
            self.held = False

    def thd_establish(self) -> bool:
        """Make the reserve if the disk has room for it twice over; whether it is held."""
        if self.accepts_data:
            return True
        if self._free() < self.needed:
            return False
        temporary = self.path + ".new"
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                _allocate(fd, self.size)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(temporary, self.path)
        except OSError as e:
            log.warn("could not make the disk-space reserve {path}: {error}",
                     path=self.path, error=e.strerror)
            try:
                os.unlink(temporary)
            except OSError:
                pass
            return False
        self.held = True
        return True

    def thd_release(self) -> bool:
        """Give the reserve up; whether that freed anything."""
        if not self.held:
            return False
        self.held = False
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return False
        # Some file systems hand freed blocks out again only once the unlink is committed.
        sync_directory(os.path.dirname(self.path))
        return True


def _allocate(fd: int, size: int) -> None:
    try:
        os.posix_fallocate(fd, 0, size)
        return
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    # No fallocate here: write the bytes. Random, so that a compressing file
    # system cannot store them in less than ``size``.
    block = os.urandom(1 << 16)
    written = 0
    while written < size:
        written += os.write(fd, block[: size - written])


def describe_size(size: int) -> str:
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor:
            return f"{size / factor:g} {unit}"
    return f"{size} bytes"
