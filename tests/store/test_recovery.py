"""Start-up reconciliation: damaged files, missing rows, orphans, a damaged catalog."""

import os
import sqlite3

import pytest
import pytest_twisted
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from loom.store.catalog_db import CatalogError
from loom.errors import StreamNotFound
from loom.store import DiskStore, InlineRunners
from loom.testing import crash, read_all


class Restarts:
    """A DiskStore over one directory that can crash (no stop) or stop cleanly, then reopen."""

    def __init__(self, path):
        self.path = str(path)
        self.clock = Clock()
        self.store = None
        self.log: list[str] = []

    def open(self):
        observer = lambda event: self.log.append(formatEvent(event))  # noqa: E731
        globalLogPublisher.addObserver(observer)
        try:
            self.store = DiskStore(self.path, self.clock, InlineRunners())
            self.store.start()
        finally:
            globalLogPublisher.removeObserver(observer)
        return self.store

    def crash(self):
        crash(self.store)  # the process died: nothing orderly happened

    async def stop(self):
        (await self.store.stop())

    async def file_of(self, stream_id):
        handle = (await self.store.open(stream_id))
        handle.close()
        return self.store.data_path(handle.record.storage).path


async def populate(store):
    for stream_id, data in (("keep", b"untouched"), ("victim", b"0123456789")):
        stream = (await store.create(stream_id, "{}"))
        stream.append(data)
        (await stream.complete())


@pytest_twisted.async_fixture
async def disk(tmp_path):
    disk = Restarts(tmp_path / "data")
    (await populate(disk.open()))
    return disk


@pytest_twisted.ensureDeferred
async def test_truncated_file_makes_the_stream_damaged_and_serves_what_remains(disk):
    """A data file cut short: the stream becomes damaged, sized by the file; others untouched."""
    path = (await disk.file_of("victim"))
    disk.crash()
    os.truncate(path, 4)
    store = disk.open()
    assert (await read_all(store, "victim")) == (b"0123", "damaged")
    assert "holds 4 of 10 bytes" in (await store.open("victim")).record.reason
    assert (await read_all(store, "keep")) == (b"untouched", "complete")
    assert any("victim is damaged" in line for line in disk.log)


@pytest_twisted.ensureDeferred
async def test_file_extended_with_garbage_never_serves_the_garbage(disk):
    """Bytes appended behind Loom's back are never served; the stream stays complete."""
    path = (await disk.file_of("victim"))
    disk.crash()
    with open(path, "ab") as f:
        f.write(b"GARBAGE")
    store = disk.open()
    assert (await read_all(store, "victim")) == (b"0123456789", "complete")
    assert any("never served" in line for line in disk.log)


@pytest_twisted.ensureDeferred
async def test_missing_file_makes_the_stream_damaged_and_empty(disk):
    """A vanished data file: damaged, no bytes served, the reason says why."""
    path = (await disk.file_of("victim"))
    disk.crash()
    os.unlink(path)
    store = disk.open()
    assert (await read_all(store, "victim")) == (b"", "damaged")
    assert "missing" in (await store.open("victim")).record.reason


@pytest_twisted.ensureDeferred
async def test_missing_catalog_row_quarantines_its_file(disk):
    """A file no row owns is moved to quarantine/, logged, and never served."""
    path = (await disk.file_of("victim"))
    disk.crash()
    with sqlite3.connect(os.path.join(disk.path, "catalog.sqlite3")) as db:
        db.execute("DELETE FROM streams WHERE id = 'victim'")
    store = disk.open()
    with pytest.raises(StreamNotFound):
        (await store.open("victim"))
    assert not os.path.exists(path)
    quarantined = os.listdir(os.path.join(disk.path, "quarantine"))
    assert quarantined == [os.path.basename(path)]
    with open(os.path.join(disk.path, "quarantine", quarantined[0]), "rb") as f:
        assert f.read() == b"0123456789"
    assert any("moved to" in line and "victim" in line for line in disk.log)
    assert (await read_all(store, "keep")) == (b"untouched", "complete")


@pytest_twisted.ensureDeferred
async def test_empty_orphans_and_old_generations_are_removed(disk):
    """An empty orphan and a replaced stream's leftover file are simply removed."""
    store = disk.store
    keep_path = (await disk.file_of("keep"))
    directory = os.path.dirname(keep_path)
    empty = os.path.join(directory, "mfrgg.00000000.data")  # an id's name, never committed
    open(empty, "wb").close()
    leftover = keep_path[: -len("12345678.data")] + "deadbeef.data"
    with open(leftover, "wb") as f:
        f.write(b"an old generation of keep")
    assert store
    disk.crash()
    disk.open()
    assert not os.path.exists(empty) and not os.path.exists(leftover)
    assert not os.path.exists(os.path.join(disk.path, "quarantine"))


@pytest_twisted.ensureDeferred
async def test_after_a_clean_stop_a_truncated_file_is_caught_when_read(disk):
    """Damage after a clean shutdown (no start-up scan) is found at read time."""
    path = (await disk.file_of("victim"))
    (await disk.stop())
    os.truncate(path, 3)
    store = disk.open()
    assert not any("damaged" in line for line in disk.log)  # a clean start does not scan
    assert (await read_all(store, "victim")) == (b"012", "damaged")
    disk.crash()
    assert (await read_all(disk.open(), "victim")) == (b"012", "damaged")  # and it was recorded


@pytest_twisted.ensureDeferred
async def test_a_damaged_catalog_stops_start_up_with_a_clear_error(disk):
    """A corrupted catalog is detected at start-up, which refuses with one clear line."""
    (await disk.stop())  # the WAL is checkpointed into the main file
    catalog = os.path.join(disk.path, "catalog.sqlite3")
    size = os.path.getsize(catalog)
    assert size > 4096
    with open(catalog, "r+b") as f:
        f.seek(4096)
        f.write(b"\xff" * (size - 4096))
    with pytest.raises(CatalogError) as caught:
        disk.open()
    assert "catalog" in str(caught.value)
    assert "\n" not in str(caught.value)
