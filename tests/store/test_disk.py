"""What only the disk backend has: files named for their streams, writes that fail part-way,
syncs that fail after a syncfs, and blocking work kept off the reactor thread."""

import errno
import os
import threading

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from loom.errors import StorageFailed
from loom.model import ABORTED, COMPLETE
from loom.store import DataFile, DiskStore, FileLog, InlineRunners, ThreadRunners
from loom.store import stream_id_of_storage
from loom.store.catalog_db import Catalog
from loom.store.faults import FileSystem
from loom.testing import FaultyFileSystem, append, crash, make_fake_site, read_all
from tests.helpers import chunk, cut_off, parse_response


@pytest_twisted.ensureDeferred
async def test_storage_names_are_not_raw_ids_and_decode(disk_stores):
    """Data files are named by an encoding of the id, never the id itself."""
    store = disk_stores.make()
    stream = await store.create("a.b", "{}")
    storage = stream.record.storage
    assert "a.b" not in storage
    assert stream_id_of_storage(storage) == "a.b"
    path = store.data_path(storage)
    assert os.path.exists(path.path) and path.path.startswith(str(disk_stores.tmp_path))


@pytest_twisted.ensureDeferred
async def test_replacing_a_stream_removes_its_old_file(disk_stores):
    """A forced replace leaves no file of the old stream on disk."""
    store = disk_stores.make()
    old = await store.create("s1", "{}")
    await append(old, b"old")
    old_path = store.data_path(old.record.storage)
    assert os.path.exists(old_path.path)
    await store.create("s1", "{}", force=True)
    assert not os.path.exists(old_path.path)
    files = [f for _, _, names in os.walk(disk_stores.tmp_path / "data" / "streams")
             for f in names]
    assert len(files) == 1


@pytest_twisted.ensureDeferred
async def test_readers_of_a_stream_share_one_descriptor(tmp_path):
    """However many readers a finished stream has, it is open once; the file is closed when
    the last reader lets go, and opened again for the next."""
    class Counting(FileSystem):
        opened = closed = 0

        def open(self, path, flags, mode=0o644):
            Counting.opened += 1
            return super().open(path, flags, mode)

        def close(self, fd):
            Counting.closed += 1
            super().close(fd)

    store = DiskStore(str(tmp_path / "data"), Clock(), InlineRunners(), fs=Counting())
    store.start()
    stream = await store.create("s1", "{}")
    await append(stream, b"shared bytes")
    await stream.complete()
    opened, closed = Counting.opened, Counting.closed
    handles = [await store.open("s1") for _ in range(100)]
    assert Counting.opened == opened + 1
    assert [h.read(0, 6) for h in handles[:2]] == [b"shared", b"shared"]
    for handle in handles[:-1]:
        handle.close()
    assert Counting.closed == closed  # one reader still reads
    assert handles[-1].read(7, 5) == b"bytes"
    handles[-1].close()
    assert Counting.closed == closed + 1
    again = await store.open("s1")
    assert Counting.opened == opened + 2 and again.read(0, 12) == b"shared bytes"
    again.close()
    await store.stop()


@pytest_twisted.ensureDeferred
async def test_a_write_failing_part_way_keeps_exactly_the_bytes_written(disk_stores,
                                                                        monkeypatch):
    """ENOSPC part-way through a chunk: the stream's size is what reached the file."""
    store = disk_stores.make()
    stream = await store.create("s1", "{}")
    await append(stream, b"12345")
    real_write = os.write
    calls = []

    def short_then_full(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[:3]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("loom.store.faults.os.write", short_then_full)
    with pytest.raises(StorageFailed, match="No space left"):
        await append(stream, b"abcdef")
    monkeypatch.setattr("loom.store.faults.os.write", real_write)
    assert stream.size == 8
    await stream.abort()
    assert await read_all(store, "s1") == (b"12345abc", ABORTED)


@pytest_twisted.ensureDeferred
async def test_fsync_never_does_not_sync(disk_stores):
    """With fsync: never, completing a stream issues no sync at all."""
    store = disk_stores.make(fsync="never")
    stream = await store.create("s1", "{}")
    await append(stream, b"abc")
    stream.file.thd_sync = lambda: pytest.fail("synced despite fsync: never")
    disk_stores.clock.advance(10)
    await stream.complete()
    assert await read_all(store, "s1") == (b"abc", COMPLETE)


@pytest_twisted.ensureDeferred
async def test_a_crash_between_deleting_the_row_and_the_file_still_removes_the_file(
        disk_stores):
    """The row and a pending-delete note commit together; the next start removes the file."""
    store = disk_stores.make()
    await (await store.create("s1", "{}")).complete()
    handle = await store.open("s1")
    handle.close()
    path = store.data_path(handle.record.storage).path
    store.log.remove = lambda storages: succeed(None)  # the process dies before the unlink
    await store.delete("s1")
    assert os.path.exists(path)
    crash(store)
    disk_stores.make()
    assert not os.path.exists(path)


async def _two_streams_synced_by_syncfs(tmp_path, faults):
    """A store with two live streams whose bytes one interval round covered with syncfs."""
    clock = Clock()
    store = DiskStore(str(tmp_path / "data"), clock, InlineRunners(), fs=faults)
    store.start()
    streams = [await store.create(name, "{}") for name in ("a", "b")]
    for stream in streams:
        await append(stream, b"bytes of " + stream.id.encode())
    syncs = faults.calls.get("fsync", 0)
    clock.advance(1.0)
    await store.housekeeping.settled()
    assert faults.calls["fsync"] == syncs + 1  # one syncfs for both
    assert all(stream.synced == stream.size for stream in streams)
    return store, clock, streams


@pytest_twisted.ensureDeferred
async def test_a_stream_is_complete_only_after_its_own_fsync(tmp_path):
    """syncfs covered the bytes, but the stream's own fsync then fails (as after a write-back
    error syncfs did not report): the stream ends aborted, never complete."""
    faults = FaultyFileSystem()
    store, _, (a, b) = await _two_streams_synced_by_syncfs(tmp_path, faults)
    faults.fail("fsync", 1, errno.EIO)
    with pytest.raises(StorageFailed):
        await a.complete()
    assert a.outcome == ABORTED
    assert (await read_all(store, "a"))[1] == ABORTED
    faults.heal()
    await b.complete()  # the other stream's own fsync works: complete
    assert (await read_all(store, "b"))[1] == COMPLETE


def test_a_producer_whose_stream_fails_its_final_fsync_is_cut_off(tmp_path):
    """Through the HTTP edge: the body ends after a syncfs round covered it, the stream's own
    fsync fails, and the producer gets no clean end of its response."""
    faults, clock = FaultyFileSystem(), Clock()
    fake = make_fake_site(store=DiskStore(str(tmp_path / "data"), clock, InlineRunners(),
                                          fs=faults), clock=clock)
    producers = []
    for name in (b"a", b"b"):
        channel, transport = fake.connect()
        channel.dataReceived(b"POST /stream/" + name + b" HTTP/1.1\r\nHost: x\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n" + chunk(b"data"))
        assert parse_response(transport.value())[0] == 201
        producers.append((channel, transport))
    clock.advance(1.0)  # the interval round: one syncfs covers both streams
    faults.fail("fsync", 1, errno.EIO)
    channel, transport = producers[0]
    channel.dataReceived(b"0\r\n\r\n")
    assert cut_off(transport)
    assert not transport.value().endswith(b"0\r\n\r\n")


def test_listing_queries_walk_an_index_newest_first(tmp_path):
    """Every kind of listing walks one index in creation order and stops after its page:
    no temporary sort of every match, whatever the filters."""
    catalog = Catalog(str(tmp_path / "c.sqlite3"))
    meta = (("branch", "main"),)
    for filters, index in (
        ({}, "streams_by_created"),
        ({"state": "complete"}, "streams_by_state_created"),
        ({"meta": meta}, "stream_meta_by_value_created"),
        ({"meta": meta, "state": "live"}, "stream_meta_by_value_created"),
        ({"meta": meta + (("job", "7"),), "since_ms": 1, "until_ms": 9, "before": (5, "x")},
         "stream_meta_by_value_created"),
        ({"state": "live", "since_ms": 1, "before": (5, "x")}, "streams_by_state_created"),
    ):
        plan = catalog.explain_list(**filters)
        assert index in plan.splitlines()[0], (filters, plan)
        assert "TEMP B-TREE" not in plan and "SCAN stream_meta" not in plan, (filters, plan)
    catalog.close()


def test_a_version_3_catalog_is_upgraded_in_place(tmp_path):
    """A catalog from before the creation-ordered indexes gets them, its metadata rows their
    streams' creation times, and lists as before."""
    import sqlite3

    path = str(tmp_path / "c.sqlite3")
    with sqlite3.connect(path) as db:
        db.executescript("""
            CREATE TABLE streams (id TEXT PRIMARY KEY, storage TEXT NOT NULL UNIQUE,
                metadata TEXT NOT NULL, state TEXT NOT NULL, size INTEGER NOT NULL DEFAULT 0,
                created_ms INTEGER NOT NULL, finished_ms INTEGER, reason TEXT);
            CREATE INDEX streams_by_state ON streams (state);
            CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE stream_meta (stream_id TEXT NOT NULL, key TEXT NOT NULL,
                value TEXT NOT NULL);
            CREATE INDEX stream_meta_by_value ON stream_meta (key, value, stream_id);
            CREATE INDEX stream_meta_by_stream ON stream_meta (stream_id);
            CREATE INDEX streams_by_created ON streams (created_ms, id);
            CREATE INDEX streams_by_finished ON streams (finished_ms);
            CREATE TABLE pending_deletes (storage TEXT PRIMARY KEY);
            PRAGMA user_version = 3;
        """)
        for n in range(3):
            db.execute("INSERT INTO streams VALUES (?, ?, ?, 'complete', 0, ?, ?, NULL)",
                       (f"s{n}", f"st{n}", '{"b":"main"}', 1000 + n, 2000 + n))
            db.execute("INSERT INTO stream_meta VALUES (?, 'b', 'main')", (f"s{n}",))
    said = []
    globalLogPublisher.addObserver(said.append)
    try:
        catalog = Catalog(path)
    finally:
        globalLogPublisher.removeObserver(said.append)
    # The upgrade says so (on a large catalog it takes seconds), once.
    assert [formatEvent(e) for e in said if "upgrading" in formatEvent(e)] == [
        f"upgrading the catalog {path} from schema 3 to 4, once: about 9 s per million "
        "streams"]
    try:
        assert [r.id for r in catalog.list(meta=(("b", "main"),), limit=2)] == ["s2", "s1"]
        assert [r.id for r in catalog.list(meta=(("b", "main"),), before=(1001, "s1"))] == [
            "s0"]
        plan = catalog.explain_list(meta=(("b", "main"),))
        assert "stream_meta_by_value_created" in plan
    finally:
        catalog.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 4
        assert db.execute("SELECT stream_id, created_ms FROM stream_meta ORDER BY 1").fetchall(
        ) == [("s0", 1000), ("s1", 1001), ("s2", 1002)]
        indexes = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE "
                                                "type = 'index' AND sql IS NOT NULL")}
        assert "stream_meta_by_value" not in indexes and "streams_by_state" not in indexes


@pytest_twisted.ensureDeferred
async def test_file_work_and_every_catalog_read_and_write_run_in_threads(tmp_path,
                                                                          monkeypatch):
    """fsync, file creation and every catalog call (writes and reads: open, listing,
    counting, health) run off the reactor thread."""
    seen = []

    def recording(owner, name):
        real = getattr(owner, name)

        def record(*args, **kwargs):
            seen.append((name, threading.current_thread() is threading.main_thread()))
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, record)

    recording(DataFile, "thd_sync")
    recording(FileLog, "_thd_create")
    for name in ("insert", "finish", "get", "list", "count", "usable"):
        recording(Catalog, name)
    store = DiskStore(str(tmp_path), reactor, ThreadRunners(reactor))
    store.start()
    seen.clear()  # start-up runs before the reactor serves anything
    try:
        stream = await store.create("s", "{}")
        await append(stream, b"data")
        await stream.complete()
        (await store.open("s")).close()
        await store.list_streams(meta=(("a", "b"),))
        await store.stream_count()
        await store.check_health()
    finally:
        await store.stop()
    names = {name for name, _ in seen}
    assert {"thd_sync", "_thd_create", "insert", "finish", "get", "list", "count",
            "usable"} <= names, names
    assert [name for name, on_main in seen if on_main] == []
