"""Stream data files: append-only, shared by a stream's writer and its readers, and
FileLog, the byte log that keeps them."""

from __future__ import annotations

import errno
import os

from twisted.logger import Logger
from zope.interface import implementer

from loom.buffers import after
from loom.errors import Unavailable
from loom.store.datadir import describe_size, stream_file
from loom.store.faults import FileSystem
from loom.store.interfaces import IByteLog, IStreamData

log = Logger()


class PartialWrite(OSError):
    """A write failed after ``written`` bytes of the chunk reached the file."""

    def __init__(self, written: int, error: OSError):
        super().__init__(error.errno, error.strerror)
        self.written = written


# --- data files -------------------------------------------------------------


@implementer(IStreamData)
class DataFile:
    """An append-only data file shared by a stream's writer and its readers.

    The file stays open while anyone holds a reference (``acquire`` /
    ``release``), so a follower can finish reading a stream whose file was
    unlinked by a replace. Every OS call goes through ``fs``. Writes are
    refused while ``room`` (a SpaceReserve) does not accept data.
    """

    def __init__(self, fd: int, fs: FileSystem, directory: str | None = None, room=None,
                 on_closed=None):
        self._fd = fd
        self._fs = fs
        self._refs = 1
        self._unsynced_directory = directory
        self._room = room
        self._on_closed = on_closed  # told when the last reference let go

    def acquire(self) -> DataFile:
        self._refs += 1
        return self

    def release(self) -> None:
        self._refs -= 1
        if self._refs == 0:
            self._fs.close(self._fd)
            self._fd = -1
            if self._on_closed is not None:
                self._on_closed()

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




class _Missing:
    """The data of a stream whose file is gone: nothing to read."""

    def acquire(self):
        return self

    def release(self) -> None:
        pass

    def read(self, offset: int, size: int) -> bytes:
        return b""

    def size(self) -> int:
        return 0


MISSING = _Missing()


@implementer(IByteLog)
class FileLog:
    """The byte log of one node: ``<data dir>/streams/<xx>/<storage>.data``, one file per stream.

    Appends are committed when ``write`` returns (handed to the OS, before any
    reader sees them); blocking work (creating, reopening, removing, syncing
    files) runs in the I/O pool. ``room`` is the data directory's space
    reserve: while it is spent, no data is accepted. ``can_store`` raises if
    data may not be stored now for another reason (start-up unfinished);
    ``room_returned`` is told when files were removed (room may be back).
    """

    def __init__(self, data_dir: str, runners, fs: FileSystem | None = None, room=None,
                 crash=None, can_store=None, room_returned=None):
        self.data_dir = data_dir
        self._runners = runners
        self._fs = fs or FileSystem()
        self._room = room
        self._crash = crash
        self._can_store = can_store
        self._room_returned = room_returned  # told after files are removed: room may be back
        self._syncfs_works = True
        self._reading: dict[str, DataFile] = {}  # open for reading, shared by its readers

    def path(self, storage: str) -> str:
        return stream_file(self.data_dir, storage)

    # appending

    def create(self, storage: str):
        return self._runners.io(self._thd_create, storage)

    def _thd_create(self, storage: str) -> DataFile:
        self._check_can_store()
        path = self.path(storage)
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        fd = self._fs.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC)
        if self._crash is not None:
            self._crash.reached("file-created")
        return DataFile(fd, self._fs, directory, self._room)

    def reopen(self, storage: str, size: int):
        return self._runners.io(self._thd_reopen, storage, size)

    def _thd_reopen(self, storage: str, size: int) -> DataFile:
        self._check_can_store()
        path = self.path(storage)
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        fd = self._fs.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC)
        try:
            # Bytes beyond the recorded size were never part of the stream.
            os.ftruncate(fd, size)
        except BaseException:
            self._fs.close(fd)
            raise
        return DataFile(fd, self._fs, directory, self._room)

    def _check_can_store(self) -> None:
        if self._can_store is not None:
            self._can_store()

    def append(self, file: DataFile, offset: int, parts: list) -> None:
        file.write(parts)  # committed: handed to the OS
        return None

    # reading

    def open(self, storage: str):
        """The file to read (MISSING if there is none). Raises OSError if it cannot be.

        Readers of the same stream share one descriptor (a storage name never
        names another file): a thousand readers of a popular stream hold one
        file open, not a thousand."""
        shared = self._reading.get(storage)
        if shared is not None:
            return shared.acquire()
        try:
            fd = self._fs.open(self.path(storage), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return MISSING  # nothing on disk: its size (0) reports the loss
        file = DataFile(fd, self._fs, on_closed=lambda: self._reading.pop(storage, None))
        self._reading[storage] = file
        return file

    # syncing and removing

    def sync(self, file: DataFile):
        return self._runners.io(file.thd_sync)

    def sync_many(self, files: list[DataFile]):
        """One syncfs of the data directory's file system instead of one fsync each.

        Every fsync of an appended file commits the file system's journal; with
        hundreds of live streams that is hundreds of commits a second, where
        one syncfs does the same work at once. It fails (OSError) where it does
        not exist, and then the caller syncs each file on its own.
        """
        if not self._syncfs_works:
            from twisted.internet.defer import fail

            return fail(OSError(errno.ENOSYS, "syncfs is not available"))

        def unavailable(failure):
            if failure.check(OSError) and failure.value.errno == errno.ENOSYS:
                self._syncfs_works = False
            return failure

        return self._runners.io(self._thd_syncfs).addErrback(unavailable)

    def _thd_syncfs(self) -> None:
        fd = os.open(self.data_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._fs.syncfs(fd)
        finally:
            os.close(fd)

    def remove(self, storages: list[str]):
        return self._runners.io(self._thd_remove, storages)

    def _thd_remove(self, storages: list[str]) -> None:
        for storage in storages:
            try:
                self._fs.unlink(self.path(storage))
            except FileNotFoundError:
                pass
        if self._room_returned is not None:
            self._room_returned()  # a deletion is how a full disk gets room again

    def health(self) -> None:
        streams = os.path.join(self.data_dir, "streams")
        if not os.access(streams, os.W_OK | os.X_OK):
            raise Unavailable(f"The data directory {streams} is not writable.")
        if self._room is not None and not self._room.accepts_data:
            raise Unavailable("The data directory's file system is full: new data is refused "
                              f"until {describe_size(self._room.needed)} are free.")
        if os.statvfs(streams).f_bavail == 0:
            raise Unavailable("The data directory's file system is full.")
