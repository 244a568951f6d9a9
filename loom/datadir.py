"""The data directory as a whole: one server at a time.

Everything here blocks (file-system calls); the store calls it at start-up.
"""

from __future__ import annotations

import errno
import fcntl
import os
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
