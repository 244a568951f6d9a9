"""Start-up reconciliation of the catalog with the files, and rebuilding a lost catalog."""

from __future__ import annotations

import collections
import os
from typing import TYPE_CHECKING

from twisted.logger import Logger

from loom.errors import (
    InvalidStreamId,
)
from loom.ids import validate_id
from loom.model import (
    DAMAGED,
    INTERRUPTED,
    INTERRUPTED_REASON,
    StreamRecord,
    new_storage_name,
    stream_id_of_storage,
)
from loom.store.datadir import (
    CATALOG_COMPANIONS,
    create_atomically,
)
from loom.store.catalog_db import Catalog, CatalogError

if TYPE_CHECKING:
    from loom.store.disk import DataDirectory

log = Logger()


class CatalogMismatch(CatalogError):
    """The catalog owns none of the data files: it is not this directory's catalog."""


class Recovery:
    """Reconciles the catalog with the files at start-up, before anything is served.

    Always: the catalog's integrity is checked, and streams left live become
    interrupted, sized by what is on disk. After an unclean shutdown, also:
    every row is compared with its file (a shorter or missing file makes the stream
    damaged; bytes beyond the recorded size are never served), and files no
    row owns are removed (empty, or an old generation of a replaced stream)
    or moved to ``quarantine/`` for an operator to look at.
    """

    def __init__(self, directory: DataDirectory, catalog: Catalog, now_ms: int):
        self._directory = directory
        self._catalog = catalog
        self._now_ms = now_ms

    def run(self) -> None:
        problems = self._catalog.integrity_problems()
        if problems:
            raise CatalogError(f"the catalog {self._catalog.path} is damaged: {problems[0]}")
        marker = self._catalog.get_setting("clean_shutdown")
        clean = marker == "1"
        files = None if clean else self._data_files()
        if files is not None:
            self._check_owns_files(files)  # before the first write
        if marker != "0":  # a needless write can fail on a full disk
            self._catalog.set_setting("clean_shutdown", "0")
        for storage in self._finish_deletes():
            if files is not None:
                files.pop(storage, None)
        self._interrupt_live_streams()
        if files is not None:
            self._reconcile(files)

    def _check_owns_files(self, files: dict[str, str]) -> None:
        """Refuse a catalog that owns none of the data files while some hold data.

        Loom never leaves such a directory (bytes are stored only once a
        stream's row is committed): it is an empty catalog, or another
        directory's, and reconciling would quarantine every stream.
        """
        owned = {storage for _, storage, _, _ in self._catalog.all_sizes()}
        if owned & files.keys():
            return
        gone = set(self._catalog.pending_deletes())
        strays = [path for storage, path in files.items()
                  if storage not in gone and os.stat(path).st_size > 0]
        if strays:
            raise CatalogMismatch(
                f"the catalog {self._catalog.path} lists none of the {len(strays)} data files "
                f"in {self._directory.data_dir.child('streams').path}")

    def _finish_deletes(self) -> list[str]:
        """Files whose rows were deleted (or replaced) before a crash: remove them now."""
        pending = self._catalog.pending_deletes()
        for storage in pending:
            try:
                os.unlink(self._directory.data_path(storage).path)
                log.info("removed the data of a deleted stream ({storage})", storage=storage)
            except FileNotFoundError:
                pass
        if pending:
            self._catalog.forget_pending_deletes(pending)
        return pending

    def _interrupt_live_streams(self) -> None:
        for record in self._catalog.records_in_state("live"):
            try:
                size = self._directory.data_path(record.storage).getsize()
            except OSError:
                size = 0
                log.warn("stream {stream_id} was live but its data file is missing",
                         stream_id=record.id)
            self._catalog.finish(record.id, record.storage, INTERRUPTED, size, self._now_ms,
                                 INTERRUPTED_REASON)
            log.info("stream {stream_id} was live when Loom stopped: now interrupted, "
                     "{size} bytes", stream_id=record.id, size=size)

    def _data_files(self) -> dict[str, str]:
        files = {}
        for bucket in os.scandir(self._directory.data_dir.child("streams").path):
            if bucket.is_dir(follow_symlinks=False):
                for entry in os.scandir(bucket.path):
                    if entry.name.endswith(".data") and entry.is_file(follow_symlinks=False):
                        files[entry.name[: -len(".data")]] = entry.path
        return files

    def _reconcile(self, files: dict[str, str]) -> None:
        owners = {}
        for stream_id, storage, size, _state in self._catalog.all_sizes():
            owners[stream_id] = storage
            path = files.pop(storage, None)
            found = os.stat(path).st_size if path else 0
            if found < size:
                reason = (f"the data file holds {found} of {size} bytes" if path
                          else f"the data file is missing ({size} bytes recorded)")
                log.error("stream {stream_id} is damaged: {reason}",
                          stream_id=stream_id, reason=reason)
                self._catalog.finish(stream_id, storage, DAMAGED, found, None, reason)
            elif found > size:
                log.warn("stream {stream_id}: {extra} bytes beyond its recorded end are "
                         "never served", stream_id=stream_id, extra=found - size)
        for storage, path in files.items():
            stream_id = stream_id_of_storage(storage)
            size = os.stat(path).st_size
            if size == 0 or (stream_id is not None and stream_id in owners):
                os.unlink(path)
                log.info("removed {path}: no stream owns it ({size} bytes)",
                         path=path, size=size)
            else:
                self._directory.quarantine.makedirs(ignoreExistingDirectory=True)
                target = self._directory.quarantine.child(os.path.basename(path)).path
                os.rename(path, target)
                log.warn("{path} ({size} bytes, stream {stream_id}) belongs to no stream "
                         "in the catalog: moved to {target}",
                         path=path, size=size, stream_id=stream_id, target=target)


class CatalogRebuild:
    """Makes a new catalog from the data files, for ``--rebuild-catalog``: only what they prove.

    A file in ``streams/`` that holds bytes, is named as Loom names data files
    and lies in the bucket its name hashes to proves that its stream existed
    (bytes are stored only after the stream's row was committed) and how many
    bytes reached the disk. Its metadata and how it ended lived only in the
    catalog: a rebuilt stream has metadata ``{}`` and is ``interrupted``, with
    a reason saying so. Empty files are removed (a stream that never got a byte
    cannot be told from a creation that never finished); files that prove
    nothing, and the generations of an id found more than once, go to
    ``quarantine/``. The old catalog files are set aside in ``quarantine/`` too.
    """

    REASON = ("rebuilt from its data file by --rebuild-catalog: its metadata and how it "
              "ended were lost")

    def __init__(self, directory: DataDirectory, now_ms: int):
        self._directory = directory
        self._now_ms = now_ms

    def run(self, problem: str) -> None:
        log.warn("rebuilding the catalog from the data files: {problem}", problem=problem)
        self._set_old_catalog_aside()
        found: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
        unproven, empty = [], 0
        for path in self._files():
            storage = os.path.basename(path)[: -len(".data")]
            stream_id = self._proven_id(storage, path)
            if stream_id is None:
                unproven.append(path)
            elif os.stat(path).st_size == 0:
                os.unlink(path)
                empty += 1
            else:
                found[stream_id].append((storage, path))
        records = []
        for stream_id, generations in sorted(found.items()):
            if len(generations) > 1:
                log.warn("stream {stream_id}: {count} data files claim it and none can be "
                         "proven current; all go to quarantine/", stream_id=stream_id,
                         count=len(generations))
                unproven += [path for _, path in generations]
                continue
            storage, path = generations[0]
            status = os.stat(path)
            at_ms = int(status.st_mtime * 1000)
            records.append(StreamRecord(
                id=stream_id, storage=storage, metadata="{}", state=INTERRUPTED,
                size=status.st_size, created_ms=at_ms, finished_ms=at_ms, reason=self.REASON,
            ))
        for path in unproven:
            self._quarantine(path)

        def make(path: str) -> None:
            catalog = Catalog(path)
            try:
                catalog.insert_all(records)
            finally:
                catalog.close()

        create_atomically(self._directory.catalog_path, make)
        shown = ", ".join(record.id for record in records[:20])
        more = f" and {len(records) - 20} more" if len(records) > 20 else ""
        log.warn("rebuilt the catalog {path}: {count} streams restored as interrupted, "
                 "without metadata ({ids}{more}); {empty} empty files removed; {unproven} "
                 "files moved to quarantine/", path=self._directory.catalog_path,
                 count=len(records), ids=shown or "none", more=more, empty=empty,
                 unproven=len(unproven))

    def _files(self) -> list[str]:
        files = []
        for bucket in os.scandir(self._directory.data_dir.child("streams").path):
            if bucket.is_dir(follow_symlinks=False):
                for entry in os.scandir(bucket.path):
                    if entry.name.endswith(".data") and entry.is_file(follow_symlinks=False):
                        files.append(entry.path)
        return sorted(files)

    def _proven_id(self, storage: str, path: str) -> str | None:
        """The stream id the file was made for, if its name and place say so beyond doubt."""
        encoded, dot, suffix = storage.partition(".")
        if not dot or len(suffix) != 8 or any(c not in "0123456789abcdef" for c in suffix):
            return None
        stream_id = stream_id_of_storage(storage)
        if stream_id is None:
            return None
        try:
            validate_id(stream_id)
        except InvalidStreamId:
            return None
        if new_storage_name(stream_id).partition(".")[0] != encoded:
            return None  # not the encoding Loom writes
        if self._directory.data_path(storage).path != path:
            return None  # not in the bucket its name hashes to
        return stream_id

    def _quarantine(self, path: str) -> None:
        self._directory.quarantine.makedirs(ignoreExistingDirectory=True)
        target = self._directory.quarantine.child(os.path.basename(path)).path
        os.rename(path, target)
        log.warn("{path} ({size} bytes) proves no stream: moved to {target}",
                 path=path, size=os.stat(target).st_size, target=target)

    def _set_old_catalog_aside(self) -> None:
        aside = self._directory.quarantine.child(f"catalog-{self._now_ms}")
        for suffix in ("", *CATALOG_COMPANIONS):
            path = self._directory.catalog_path + suffix
            if os.path.exists(path):
                aside.makedirs(ignoreExistingDirectory=True)
                os.rename(path, aside.child(os.path.basename(path)).path)
                log.warn("the old catalog file {path} is set aside in {aside}",
                         path=path, aside=aside.path)


