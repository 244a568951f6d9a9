"""Stream data files: append-only, shared by a stream's writer and its readers."""

from __future__ import annotations

import errno
import os

from twisted.logger import Logger

from loom.buffers import after
from loom.store.faults import FileSystem

log = Logger()


class PartialWrite(OSError):
    """A write failed after ``written`` bytes of the chunk reached the file."""

    def __init__(self, written: int, error: OSError):
        super().__init__(error.errno, error.strerror)
        self.written = written


# --- data files -------------------------------------------------------------


class DataFile:
    """An append-only data file shared by a stream's writer and its readers.

    The file stays open while anyone holds a reference (``acquire`` /
    ``release``), so a follower can finish reading a stream whose file was
    unlinked by a replace. Every OS call goes through ``fs``. Writes are
    refused while ``room`` (a SpaceReserve) does not accept data.
    """

    def __init__(self, fd: int, fs: FileSystem, directory: str | None = None, room=None):
        self._fd = fd
        self._fs = fs
        self._refs = 1
        self._unsynced_directory = directory
        self._room = room

    def acquire(self) -> DataFile:
        self._refs += 1
        return self

    def release(self) -> None:
        self._refs -= 1
        if self._refs == 0:
            self._fs.close(self._fd)
            self._fd = -1

    def write(self, parts: list) -> None:
        """Hand every byte of ``parts`` to the OS, or raise PartialWrite saying how much got there."""
        if self._room is not None and not self._room.accepts_data:
            # The disk filled up and its reserve went to the catalog: that room
            # is for recording how streams end, not for more data.
            raise PartialWrite(0, OSError(errno.ENOSPC, "the disk is full"))
        written = 0
        while parts:
            try:
                done = (self._fs.writev(self._fd, parts) if len(parts) > 1
                        else self._fs.write(self._fd, parts[0]))
            except InterruptedError:
                continue
            except OSError as e:
                raise PartialWrite(written, e) from e
            written += done
            parts = after(parts, done)

    def read(self, offset: int, size: int) -> bytes:
        return self._fs.pread(self._fd, size, offset)

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def thd_sync(self) -> None:
        """fsync the data (and, the first time, the directory entry). Blocks."""
        self._fs.fsync(self._fd)
        if self._unsynced_directory is not None:
            fd = self._fs.open(self._unsynced_directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                self._fs.fsync(fd)
            finally:
                self._fs.close(fd)
            self._unsynced_directory = None


