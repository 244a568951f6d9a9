"""The seams where storage can fail: file-system calls and named crash points.

The disk store does every file-system call through a ``FileSystem`` and
announces each step of a stream's life to ``CrashPoints``. In production
these are the plain OS calls and no-ops. Tests swap in a file system that
fails the Nth call with ENOSPC or EIO, and crash points that kill the
process at a chosen step (loom.testing), to prove the durability promise
step by step. Nothing in a production server arms a crash point.
"""

from __future__ import annotations

import ctypes
import errno
import os

try:
    _syncfs = ctypes.CDLL(None, use_errno=True).syncfs
except (OSError, AttributeError):  # not Linux
    _syncfs = None

# The steps of a stream's life at which a crash is worth testing.
CRASH_POINTS = (
    "file-created",  # data file exists, catalog row not yet committed
    "written",  # a chunk was handed to the OS, not yet synced
    "synced",  # the final sync is done, the stream is not yet marked complete
    "recorded",  # the catalog says complete, the producer has not been answered
)


class FileSystem:
    """The OS calls the disk store makes; every one may raise OSError."""

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        return os.open(path, flags, mode)

    def write(self, fd: int, data) -> int:
        return os.write(fd, data)

    def writev(self, fd: int, buffers) -> int:
        return os.writev(fd, buffers)

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        return os.pread(fd, size, offset)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def syncfs(self, fd: int) -> None:
        """Sync the whole file system holding ``fd`` (Linux); OSError where unavailable."""
        if _syncfs is None:
            raise OSError(errno.ENOSYS, "syncfs is not available")
        if _syncfs(fd) != 0:
            error = ctypes.get_errno()
            raise OSError(error, os.strerror(error))

    def close(self, fd: int) -> None:
        os.close(fd)

    def unlink(self, path: str) -> None:
        os.unlink(path)


class CrashPoints:
    """Announcements of a stream's steps; this one ignores them."""

    def reached(self, point: str) -> None:
        pass
