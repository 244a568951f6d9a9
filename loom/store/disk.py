"""DiskStore: streams in a data directory, with a SQLite catalog."""

from __future__ import annotations

import errno
import os
from dataclasses import replace

from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.filepath import FilePath
from zope.interface import implementer

from loom.errors import (
    StorageFailed,
    StreamNotFound,
    Unavailable,
)
from loom.model import (
    INTERRUPTED,
    INTERRUPTED_REASON,
    StreamRecord,
)
from loom.store.datadir import (
    CATALOG,
    RESERVE,
    DataDirectoryError,
    DirectoryLock,
    SpaceReserve,
    catalog_problem,
    create_atomically,
    describe_size,
    free_bytes,
    stream_file,
    what_to_do,
)
from loom.store.faults import FileSystem
from loom.store.sqlite import Catalog, CatalogError, NotACatalog
from loom.store.files import DataFile
from loom.store.interfaces import IStreamStore
from loom.store.live import LiveStream
from loom.store.memory import MemoryFile
from loom.store.recovery import CatalogMismatch, CatalogRebuild, Recovery
from loom.store.streams import _StoreBase, _describe, _raise_if_out_of_files
from loom.store.threads import Runners

log = Logger()


DEFAULT_RESERVE = 8 * 1024 * 1024
ROOM_EVERY = 1.0  # seconds between looks for disk space while the disk is full
# With less free space than this (or than the reserve), a failed start-up
# write is taken for a full disk rather than a broken catalog.
_NEARLY_FULL = 1024 * 1024


@implementer(IStreamStore)
class DiskStore(_StoreBase):
    """Streams in ``<data_dir>/streams/<xx>/<storage>.data`` with a SQLite catalog.

    ``fs`` and ``crash`` are the fault-injection seams (see loom.store.faults).
    ``reserve`` is the size in bytes of the disk-space reserve (0: none, see loom.store.datadir.SpaceReserve). ``rebuild_catalog`` lets start-up rebuild a
    missing, empty or foreign catalog from the data files (CatalogRebuild)
    where it would otherwise refuse to start.
    """

    def __init__(self, data_dir: str, clock, runners: Runners, fs: FileSystem | None = None,
                 reserve: int = DEFAULT_RESERVE, rebuild_catalog: bool = False, **options):
        super().__init__(clock, runners, **options)
        self.data_dir = FilePath(os.path.abspath(data_dir))
        self._fs = fs or FileSystem()
        self._writer: Catalog | None = None
        self._reader: Catalog | None = None
        self._lock: DirectoryLock | None = None
        self.reserve = SpaceReserve(self.data_dir.child(RESERVE).path, reserve)
        self._rebuild_catalog = rebuild_catalog
        # While start-up's own writes wait for room on a full disk: why. Reads
        # are served meanwhile; nothing is created or resumed.
        self._waiting_for_room: str | None = None
        self._start_up_ends: dict[str, StreamRecord] = {}
        self._immutable_reader = False
        self._room_loop: LoopingCall | None = None

    @property
    def catalog_path(self) -> str:
        return self.data_dir.child(CATALOG).path

    @property
    def quarantine(self) -> FilePath:
        return self.data_dir.child("quarantine")

    def data_path(self, storage: str) -> FilePath:
        """Where the data of storage name ``storage`` lives."""
        return FilePath(stream_file(self.data_dir.path, storage))

    # life cycle

    def start(self) -> None:
        super().start()
        self._room_loop = LoopingCall(self._look_for_room)
        self._room_loop.clock = self._clock
        self._room_loop.start(ROOM_EVERY, now=False).addErrback(
            lambda f: log.failure("looking for disk space failed", f))

    async def stop(self) -> None:
        if self._room_loop is not None and self._room_loop.running:
            self._room_loop.stop()
        await super().stop()

    def _open_storage(self) -> None:
        self.data_dir.makedirs(ignoreExistingDirectory=True)
        # Before anything reads or changes the catalog or the files: a second
        # server on this directory would take the first one's live streams
        # for a crash's leftovers.
        self._lock = DirectoryLock.acquire(self.data_dir.path)
        self.data_dir.child("streams").makedirs(ignoreExistingDirectory=True)
        self.reserve.thd_adopt()
        if self.reserve.low():
            self._thd_make_room()  # opening the catalog and start-up's marks need room
        rebuilt = False
        while True:
            problem = catalog_problem(self.catalog_path, self.data_dir.child("streams").path)
            if problem is None:
                if not os.path.exists(self.catalog_path):
                    create_atomically(self.catalog_path, lambda path: Catalog(path).close())
                    log.info("created a new catalog {path}", path=self.catalog_path)
                try:
                    self._open_and_recover()
                    break
                except (NotACatalog, CatalogMismatch) as e:
                    self._close_catalogs()
                    problem = str(e)
            if not self._rebuild_catalog or rebuilt:
                raise DataDirectoryError(what_to_do(problem))
            CatalogRebuild(self, self._now_ms()).run(problem)
            rebuilt = True
        if self._rebuild_catalog and not rebuilt:
            log.warn("--rebuild-catalog: the catalog {path} is usable, so nothing was rebuilt",
                     path=self.catalog_path)
        if self._waiting_for_room is None and not self.reserve.thd_establish():
            log.warn("the disk holding {data_dir} has {free} free: new data is refused until "
                     "{needed} are free (the reserve: storageReserve)",
                     data_dir=self.data_dir.path, free=describe_size(self.reserve.free()),
                     needed=describe_size(self.reserve.needed))

    def _open_and_recover(self) -> None:
        try:
            self._writer = self._open_writer()
            self._reader = Catalog(self.catalog_path, readonly=True, create=False)
            Recovery(self, self._writer, self._now_ms()).run()
        except (NotACatalog, CatalogMismatch):
            raise
        except (CatalogError, OSError) as e:
            # (OSError: reconciliation moves files, and a directory takes room too.)
            if free_bytes(self.data_dir.path) >= max(self.reserve.size, _NEARLY_FULL):
                raise
            self._wait_for_room(e)

    def _open_writer(self) -> Catalog:
        return Catalog(self.catalog_path, create=False, make_room=self._thd_make_room)

    def _wait_for_room(self, error: Exception) -> None:
        """Start-up cannot write for want of room: serve reads, and finish once there is room.

        Streams the catalog still calls live are served as interrupted from
        memory until the catalog can say so. Nothing is created or resumed
        meanwhile, and no clean shutdown is recorded: a crash now leaves the
        catalog just as a crash before this start did.
        """
        if self._reader is None:
            self._reader = self._open_reader_without_room(error)
        problems = self._reader.integrity_problems()
        if problems:
            raise CatalogError(f"the catalog {self.catalog_path} is damaged: {problems[0]}")
        now = self._now_ms()
        for record in self._reader.records_in_state("live"):
            try:
                size = self.data_path(record.storage).getsize()
            except OSError:
                size = 0
            ended = replace(record, state=INTERRUPTED, size=size, finished_ms=now,
                            reason=INTERRUPTED_REASON)
            self._unrecorded[record.id] = self._start_up_ends[record.id] = ended
        self._waiting_for_room = f"the disk is full ({_describe(error)})"
        log.warn("the disk holding {data_dir} is full ({error}): Loom serves reads only, and "
                 "finishes starting once there is room", data_dir=self.data_dir.path,
                 error=_describe(error))

    def _open_reader_without_room(self, error: Exception) -> Catalog:
        try:
            return Catalog(self.catalog_path, readonly=True, create=False)
        except CatalogError:
            pass
        # No room even for SQLite's shared-memory file. Reading the file as it
        # is is right only if no write-ahead log holds commits it lacks.
        wal = self.catalog_path + "-wal"
        if os.path.exists(wal) and os.path.getsize(wal) > 0:
            raise CatalogError(f"the disk is full and the catalog cannot be opened: {error}")
        self._immutable_reader = True
        return Catalog(self.catalog_path, readonly=True, create=False, immutable=True)

    def _look_for_room(self):
        """Every second while the disk is full: finish starting, or make the reserve again."""
        if self._reader is None:
            return None
        if self._waiting_for_room is not None:
            d = self._runners.catalog(self._thd_finish_starting)
            d.addCallback(self._finished_starting)
        elif not self.reserve.accepts_data:
            d = self._runners.catalog(self._thd_restore_reserve)
        else:
            return None
        return d.addErrback(lambda f: log.failure("looking for disk space failed", f))

    def _thd_finish_starting(self):
        """Try start-up's writes again: (writer, reader) to swap in, "done", or None (no room)."""
        if self._writer is None:
            try:
                writer = self._open_writer()
            except CatalogError:
                return None
            reader = None
            if self._immutable_reader:
                try:
                    reader = Catalog(self.catalog_path, readonly=True, create=False)
                except CatalogError:
                    writer.close()
                    return None
            return writer, reader
        try:
            Recovery(self, self._writer, self._now_ms()).run()
        except CatalogMismatch as e:
            self._waiting_for_room = what_to_do(str(e))
            log.error("cannot finish starting: {problem}", problem=self._waiting_for_room)
            return None
        except (CatalogError, OSError):
            return None
        self._thd_restore_reserve()
        return "done"

    def _finished_starting(self, outcome):
        if outcome is None:
            return None
        if outcome != "done":
            writer, reader = outcome
            if self._reader is None:  # stopped meanwhile
                for catalog in outcome:
                    if catalog is not None:
                        catalog.close()
                return None
            # Swapped here, on the thread that reads through it; then the marks at once.
            self._writer = writer
            if reader is not None:
                old, self._reader = self._reader, reader
                old.close()
                self._immutable_reader = False
            return self._runners.catalog(self._thd_finish_starting).addCallback(
                self._finished_starting)
        self._waiting_for_room = None
        for stream_id, record in self._start_up_ends.items():
            if self._unrecorded.get(stream_id) is record:
                del self._unrecorded[stream_id]
        self._start_up_ends = {}
        log.info("there is room on the disk again: start-up is finished, new streams are accepted")
        return None

    def _thd_make_room(self) -> bool:
        """A bookkeeping commit failed: if the disk is full, give up the reserve so it can work."""
        if not self.reserve.low() or not self.reserve.thd_release():
            return False
        log.warn("the disk holding {data_dir} is full: Loom gave up its {size} reserve so that "
                 "the catalog can record how streams end and what is deleted; new data is "
                 "refused until {needed} are free", data_dir=self.data_dir.path,
                 size=describe_size(self.reserve.size), needed=describe_size(self.reserve.needed))
        return True

    def _thd_restore_reserve(self) -> None:
        if not self.reserve.accepts_data and self.reserve.thd_establish():
            log.info("there is room on the disk again: the reserve is made again and new data "
                     "is accepted")

    def _check_catalog(self) -> None:
        if self._reader is not None and not self._reader.in_place():
            raise Unavailable(
                f"The catalog file {self.catalog_path} was deleted or replaced while Loom was "
                "running: nothing more can be recorded, so new streams and deletions are "
                "refused. Restart Loom once the catalog is back (or with --rebuild-catalog).")

    def _thd_check_can_store(self) -> None:
        """Raise unless a stream's data may be stored now: catalog in place, start-up done, room."""
        self._check_catalog()
        if self._waiting_for_room is not None:
            raise OSError(errno.ENOSPC, "the disk is full and Loom has not finished starting")
        self._thd_restore_reserve()
        if not self.reserve.accepts_data:
            raise OSError(errno.ENOSPC, "the disk is full; new data is accepted again once "
                          f"{describe_size(self.reserve.needed)} are free")

    def _thd_writer(self) -> Catalog:
        if self._writer is None:
            raise CatalogError(self._waiting_for_room or "the catalog is not open")
        return self._writer

    def _close_catalogs(self) -> None:
        for catalog in (self._reader, self._writer):
            if catalog is not None:
                catalog.close()
        self._reader = self._writer = None

    def _close_storage(self) -> None:
        self._close_catalogs()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _get_record(self, stream_id: str) -> StreamRecord | None:
        return self._reader.get(stream_id)

    def _open_data(self, record: StreamRecord):
        try:
            fd = self._fs.open(self.data_path(record.storage).path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return MemoryFile(bytearray())  # nothing on disk: size() reports the loss
        except OSError as e:
            _raise_if_out_of_files(e)
            log.error("stream {stream_id}: opening its data failed: {error}",
                      stream_id=record.id, error=_describe(e))
            raise StorageFailed(f"Loom could not read stream {record.id}: {_describe(e)}.")
        return DataFile(fd, self._fs)

    def _thd_create(self, record: StreamRecord, force: bool):
        self._thd_check_can_store()
        writer = self._thd_writer()
        path = self.data_path(record.storage)
        directory = path.parent()
        directory.makedirs(ignoreExistingDirectory=True)
        fd = self._fs.open(
            path.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        )
        self._crash.reached("file-created")
        try:
            if force:
                replaced = writer.replace(record)
            else:
                writer.insert(record)
                replaced = None
        except BaseException:
            self._fs.close(fd)
            try:
                self._fs.unlink(path.path)
            except OSError:
                pass  # an orphan: reconciliation removes it
            raise
        return DataFile(fd, self._fs, directory.path, self.reserve), replaced

    def _thd_record_end(self, record, state, size, at_ms, reason) -> bool:
        return self._thd_writer().finish(record.id, record.storage, state, size, at_ms, reason)

    def _thd_remove_data(self, storages: list[str]) -> None:
        """Remove the files of ``storages`` (pending deletes), then forget them."""
        for storage in storages:
            try:
                self._fs.unlink(self.data_path(storage).path)
            except FileNotFoundError:
                pass
        self._thd_writer().forget_pending_deletes(storages)

    def _thd_mark_clean_shutdown(self) -> None:
        if self._waiting_for_room is not None:
            # Start-up's marks (and maybe its reconciliation) are still to do.
            raise CatalogError(f"start-up never finished: {self._waiting_for_room}")
        self._thd_writer().set_setting("clean_shutdown", "1")

    def _thd_delete(self, streams: list[tuple[str, str]]) -> list[str]:
        storages = self._thd_writer().delete(streams)
        try:
            self._thd_remove_data(storages)
        except CatalogError as e:
            # Rows and files are gone; only their pending-delete notes stay,
            # and the next start drops those.
            log.warn("deleted streams' notes could not be dropped: {error}", error=e)
        self._thd_restore_reserve()  # a deletion is how a full disk gets room again
        return storages

    def _thd_reopen(self, record: StreamRecord) -> DataFile:
        self._thd_check_can_store()
        path = self.data_path(record.storage)
        path.parent().makedirs(ignoreExistingDirectory=True)
        fd = self._fs.open(path.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC)
        try:
            # Bytes beyond the recorded size were never part of the stream.
            os.ftruncate(fd, record.size)
            if not self._thd_writer().reopen(record.id, record.storage):
                raise StreamNotFound(record.id)
        except BaseException:
            self._fs.close(fd)
            raise
        return DataFile(fd, self._fs, path.parent().path, self.reserve)

    def _thd_expire(self, before_ms: int, limit: int) -> list[str]:
        expired = self._thd_writer().expired(before_ms, limit)
        self._thd_delete(expired)
        return [stream_id for stream_id, _ in expired]

    def _list_records(self, **filters) -> list[StreamRecord]:
        return self._reader.list(**filters)

    def stream_count(self) -> int:
        return self._reader.count()

    def check_health(self) -> None:
        if self._reader is None:
            raise Unavailable("The store is not open.")
        self._check_catalog()
        try:
            self._reader.usable()
        except CatalogError as e:
            raise Unavailable(f"The catalog cannot be read: {e}") from e
        if self._waiting_for_room is not None:
            raise Unavailable(f"Loom serves reads only: it could not finish starting "
                              f"({self._waiting_for_room}).")
        streams = self.data_dir.child("streams").path
        if not os.access(streams, os.W_OK | os.X_OK):
            raise Unavailable(f"The data directory {streams} is not writable.")
        if not self.reserve.accepts_data:
            raise Unavailable("The data directory's file system is full: new data is refused "
                              f"until {describe_size(self.reserve.needed)} are free.")
        if os.statvfs(streams).f_bavail == 0:
            raise Unavailable("The data directory's file system is full.")

    async def _sync_streams(self, streams: list[LiveStream]) -> None:
        """Many streams: one syncfs of the data directory's file system, not one fsync each.

        Every fsync of an appended file commits the file system's journal; with
        hundreds of live streams that is hundreds of commits a second, where
        one syncfs does the same work at once. If syncfs fails (or does not
        exist), each stream is synced on its own, so a failure is pinned on the
        stream it belongs to.
        """
        if len(streams) > 1 and self._syncfs_works:
            targets = [(stream, stream.size) for stream in streams]
            try:
                await self._runners.io(self._thd_syncfs)
            except OSError as e:
                if e.errno == errno.ENOSYS:
                    self._syncfs_works = False
                else:
                    log.warn("syncfs failed ({error}): syncing streams one by one",
                             error=_describe(e))
            else:
                for stream, size in targets:
                    stream.synced = max(stream.synced, size)
                return
        await super()._sync_streams(streams)

    _syncfs_works = True

    def _thd_syncfs(self) -> None:
        fd = os.open(self.data_dir.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._fs.syncfs(fd)
        finally:
            os.close(fd)

