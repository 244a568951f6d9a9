"""DiskStore: streams in a data directory, with a SQLite catalog beside the files.

A ``DataDirectory`` owns the directory as a whole: its lock (one server at a
time), its catalog database (opened, checked, rebuilt on request), its
space reserve (so bookkeeping commits on a full disk) and start-up (recovery
before anything is served; on a disk too full even for that, reads only until
there is room). ``DiskStore`` is the stream store composed of the directory's
SQLite catalog, its file log and the in-process live signal.
"""

from __future__ import annotations

import errno
import os
import threading
from dataclasses import replace

from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.filepath import FilePath

from loom.errors import Unavailable
from loom.model import INTERRUPTED, INTERRUPTED_REASON, LIVE, StreamRecord
from loom.store.catalog_db import Catalog, CatalogError, NotACatalog
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
from loom.store.faults import CrashPoints, FileSystem
from loom.store.files import FileLog
from loom.store.recovery import CatalogMismatch, CatalogRebuild, Recovery
from loom.store.sqlite import SQLiteCatalog
from loom.store.streams import StreamStore, _describe
from loom.store.threads import Runners

log = Logger()

DEFAULT_RESERVE = 8 * 1024 * 1024
ROOM_EVERY = 1.0  # seconds between looks for disk space while the disk is full
# With less free space than this (or than the reserve), a failed start-up
# write is taken for a full disk rather than a broken catalog.
_NEARLY_FULL = 1024 * 1024


class DataDirectory:
    """``<data_dir>``: ``catalog.sqlite3``, ``streams/<xx>/<storage>.data``, ``reserve``.

    ``reserve`` is the size in bytes of the disk-space reserve (0: none, see
    loom.store.datadir.SpaceReserve). ``rebuild_catalog`` lets start-up rebuild
    a missing, empty or foreign catalog from the data files (CatalogRebuild)
    where it would otherwise refuse to start. ``unrecorded`` is the store's
    map of ends the catalog has not taken yet: start-up on a full disk puts
    the ends of the streams it could not mark interrupted there.
    """

    def __init__(self, data_dir: str, clock, runners: Runners, reserve: int = DEFAULT_RESERVE,
                 rebuild_catalog: bool = False):
        self.data_dir = FilePath(os.path.abspath(data_dir))
        self._clock = clock
        self._runners = runners
        self.reserve = SpaceReserve(self.data_dir.child(RESERVE).path, reserve)
        self._reserve_lock = threading.Lock()  # reserve changes come from two pools
        self._rebuild_catalog = rebuild_catalog
        self._writer: Catalog | None = None
        self._reader: Catalog | None = None  # the directory's own (checks, start-up)
        self._lock: DirectoryLock | None = None
        # While start-up's own writes wait for room on a full disk: why. Reads
        # are served meanwhile; nothing is created or resumed.
        self._waiting_for_room: str | None = None
        self._start_up_ends: dict[str, StreamRecord] = {}
        self.immutable_reader = False
        self._room_loop: LoopingCall | None = None
        self.unrecorded: dict[str, StreamRecord] = {}
        self.on_readers_renewed = None  # called when reading connections must be made anew

    @property
    def catalog_path(self) -> str:
        return self.data_dir.child(CATALOG).path

    @property
    def quarantine(self) -> FilePath:
        return self.data_dir.child("quarantine")

    def data_path(self, storage: str) -> FilePath:
        """Where the data of storage name ``storage`` lives."""
        return FilePath(stream_file(self.data_dir.path, storage))

    def now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    # opening and closing

    def open(self) -> None:
        """Lock the directory, open (or make) its catalog and reconcile it with the files."""
        self.data_dir.makedirs(ignoreExistingDirectory=True)
        # Before anything reads or changes the catalog or the files: a second
        # server on this directory would take the first one's live streams
        # for a crash's leftovers.
        self._lock = DirectoryLock.acquire(self.data_dir.path)
        self.data_dir.child("streams").makedirs(ignoreExistingDirectory=True)
        self.reserve.thd_adopt()
        if self.reserve.low():
            self.thd_make_room()  # opening the catalog and start-up's marks need room
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
            CatalogRebuild(self, self.now_ms()).run(problem)
            rebuilt = True
        if self._rebuild_catalog and not rebuilt:
            log.warn("--rebuild-catalog: the catalog {path} is usable, so nothing was rebuilt",
                     path=self.catalog_path)
        if self._waiting_for_room is None and not self.reserve.thd_establish():
            log.warn("the disk holding {data_dir} has {free} free: new data is refused until "
                     "{needed} are free (the reserve: storageReserve)",
                     data_dir=self.data_dir.path, free=describe_size(self.reserve.free()),
                     needed=describe_size(self.reserve.needed))

    def close(self) -> None:
        self._close_catalogs()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _close_catalogs(self) -> None:
        for catalog in (self._reader, self._writer):
            if catalog is not None:
                catalog.close()
        self._reader = self._writer = None
        if self.on_readers_renewed is not None:
            self.on_readers_renewed()

    def _open_and_recover(self) -> None:
        try:
            self._writer = self._open_writer()
            self._reader = Catalog(self.catalog_path, readonly=True, create=False)
            Recovery(self, self._writer, self.now_ms()).run()
        except (NotACatalog, CatalogMismatch):
            raise
        except (CatalogError, OSError) as e:
            # (OSError: reconciliation moves files, and a directory takes room too.)
            if free_bytes(self.data_dir.path) >= max(self.reserve.size, _NEARLY_FULL):
                raise
            self._wait_for_room(e)

    def _open_writer(self) -> Catalog:
        return Catalog(self.catalog_path, create=False, make_room=self.thd_make_room)

    def open_reader(self) -> Catalog:
        """A new reading connection (one per reader thread)."""
        return Catalog(self.catalog_path, readonly=True, create=False,
                       immutable=self.immutable_reader)

    def thd_writer(self) -> Catalog:
        if self._writer is None:
            raise CatalogError(self._waiting_for_room or "the catalog is not open")
        return self._writer

    # a full disk at start-up

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
        now = self.now_ms()
        for record in self._reader.records_in_state(LIVE):
            try:
                size = self.data_path(record.storage).getsize()
            except OSError:
                size = 0
            ended = replace(record, state=INTERRUPTED, size=size, finished_ms=now,
                            reason=INTERRUPTED_REASON)
            self.unrecorded[record.id] = self._start_up_ends[record.id] = ended
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
        self.immutable_reader = True
        return Catalog(self.catalog_path, readonly=True, create=False, immutable=True)

    def start_looking_for_room(self) -> None:
        self._room_loop = LoopingCall(self._look_for_room)
        self._room_loop.clock = self._clock
        self._room_loop.start(ROOM_EVERY, now=False).addErrback(
            lambda f: log.failure("looking for disk space failed", f))

    def stop_looking_for_room(self) -> None:
        if self._room_loop is not None and self._room_loop.running:
            self._room_loop.stop()

    def _look_for_room(self):
        """Every second while the disk is full: finish starting, or make the reserve again."""
        if self._reader is None:
            return None
        if self._waiting_for_room is not None:
            d = self._runners.catalog(self._thd_finish_starting)
            d.addCallback(self._finished_starting)
        elif not self.reserve.accepts_data:
            d = self._runners.catalog(self.thd_restore_reserve)
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
            if self.immutable_reader:
                try:
                    reader = Catalog(self.catalog_path, readonly=True, create=False)
                except CatalogError:
                    writer.close()
                    return None
            return writer, reader
        try:
            Recovery(self, self._writer, self.now_ms()).run()
        except CatalogMismatch as e:
            self._waiting_for_room = what_to_do(str(e))
            log.error("cannot finish starting: {problem}", problem=self._waiting_for_room)
            return None
        except (CatalogError, OSError):
            return None
        self.thd_restore_reserve()
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
                self.immutable_reader = False
                if self.on_readers_renewed is not None:
                    self.on_readers_renewed()
            return self._runners.catalog(self._thd_finish_starting).addCallback(
                self._finished_starting)
        self._waiting_for_room = None
        for stream_id, record in self._start_up_ends.items():
            if self.unrecorded.get(stream_id) is record:
                del self.unrecorded[stream_id]
        self._start_up_ends = {}
        log.info("there is room on the disk again: start-up is finished, new streams are accepted")
        return None

    # the reserve

    def thd_make_room(self) -> bool:
        """A bookkeeping commit failed: if the disk is full, give up the reserve so it can work."""
        with self._reserve_lock:  # the catalog thread and the I/O pool both get here
            if not self.reserve.low() or not self.reserve.thd_release():
                return False
        log.warn("the disk holding {data_dir} is full: Loom gave up its {size} reserve so that "
                 "the catalog can record how streams end and what is deleted; new data is "
                 "refused until {needed} are free", data_dir=self.data_dir.path,
                 size=describe_size(self.reserve.size), needed=describe_size(self.reserve.needed))
        return True

    def thd_restore_reserve(self) -> None:
        with self._reserve_lock:
            restored = not self.reserve.accepts_data and self.reserve.thd_establish()
        if restored:
            log.info("there is room on the disk again: the reserve is made again and new data "
                     "is accepted")

    # what the store's roles ask

    def check(self) -> None:
        """Raise Unavailable unless the catalog can be used (for /health, before a delete)."""
        if self._reader is None:
            raise Unavailable("The store is not open.")
        if not self._reader.in_place():
            raise Unavailable(
                f"The catalog file {self.catalog_path} was deleted or replaced while Loom was "
                "running: nothing more can be recorded, so new streams and deletions are "
                "refused. Restart Loom once the catalog is back (or with --rebuild-catalog).")
        if self._waiting_for_room is not None:
            raise Unavailable(f"Loom serves reads only: it could not finish starting "
                              f"({self._waiting_for_room}).")

    def thd_check_can_store(self) -> None:
        """Raise unless a stream's data may be stored now: catalog in place, start-up done, room."""
        if self._reader is not None and not self._reader.in_place():
            self.check()
        if self._waiting_for_room is not None:
            raise OSError(errno.ENOSPC, "the disk is full and Loom has not finished starting")
        self.thd_restore_reserve()
        if not self.reserve.accepts_data:
            raise OSError(errno.ENOSPC, "the disk is full; new data is accepted again once "
                          f"{describe_size(self.reserve.needed)} are free")

    def thd_clean_shutdown_allowed(self) -> None:
        if self._waiting_for_room is not None:
            # Start-up's marks (and maybe its reconciliation) are still to do.
            raise CatalogError(f"start-up never finished: {self._waiting_for_room}")


class DiskStore(StreamStore):
    """Streams in a data directory: its SQLite catalog, its files, the in-process signal.

    ``fs`` and ``crash`` are the fault-injection seams (see loom.store.faults);
    ``reserve`` and ``rebuild_catalog`` are the DataDirectory's.
    """

    def __init__(self, data_dir: str, clock, runners: Runners, fs: FileSystem | None = None,
                 reserve: int = DEFAULT_RESERVE, rebuild_catalog: bool = False, **options):
        directory = DataDirectory(data_dir, clock, runners, reserve, rebuild_catalog)
        crash = options.get("crash") or CrashPoints()
        options["crash"] = crash
        files = FileLog(directory.data_dir.path, runners, fs, room=directory.reserve,
                        crash=crash, can_store=directory.thd_check_can_store,
                        room_returned=directory.thd_restore_reserve)
        catalog = SQLiteCatalog(runners, writer=directory.thd_writer,
                                open_reader=directory.open_reader, check=directory.check,
                                open=directory.open, close=directory.close,
                                before_clean_shutdown=directory.thd_clean_shutdown_allowed)
        super().__init__(catalog, files, clock, runners, **options)
        directory.unrecorded = self.unrecorded
        directory.on_readers_renewed = catalog.renew_readers
        self.directory = directory
        self.data_dir = directory.data_dir
        self.reserve = directory.reserve

    @property
    def catalog_path(self) -> str:
        return self.directory.catalog_path

    @property
    def quarantine(self) -> FilePath:
        return self.directory.quarantine

    def data_path(self, storage: str) -> FilePath:
        return self.directory.data_path(storage)

    def start(self) -> None:
        super().start()
        self.directory.start_looking_for_room()

    async def stop(self) -> None:
        self.directory.stop_looking_for_room()
        await super().stop()
