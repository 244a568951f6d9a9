"""A really full disk (a small tmpfs): deletes, reads, ends and restarts keep working."""

import os
import time

import pytest
import pytest_twisted
import treq
from twisted.internet.task import Clock

from loom.store.catalog_db import Catalog
from loom.store.datadir import SpaceReserve
from loom.errors import StorageFailed, Unavailable
from loom.store import DiskStore, InlineRunners
from tests.helpers import (
    child_environment,
    chunk,
    fill_up,
    mount_tmpfs,
    start_producer,
    start_server_process,
    unavailable,
    unmount,
)
from loom.testing import crash, read_all

KiB = 1024
MiB = 1024 * KiB
RESERVE = 256 * KiB


def test_the_reserve_needs_room_twice_over_and_is_given_up_only_on_a_nearly_full_disk(tmp_path):
    """The reserve is made only with twice its size free, and given up only when space is short."""
    room = [7 * MiB]
    reserve = SpaceReserve(str(tmp_path / "reserve"), 4 * MiB, free=lambda: room[0])
    reserve.thd_adopt()
    assert not reserve.accepts_data
    assert not reserve.thd_establish()  # 7 MiB free: not twice 4 MiB
    room[0] = 8 * MiB
    assert reserve.thd_establish() and reserve.accepts_data
    assert os.stat(tmp_path / "reserve").st_blocks * 512 >= 4 * MiB
    assert not reserve.low()
    room[0] = 1 * MiB
    assert reserve.low() and reserve.thd_release()
    assert not reserve.accepts_data and not os.path.exists(tmp_path / "reserve")
    assert not reserve.thd_release()  # nothing left to give
    again = SpaceReserve(str(tmp_path / "reserve"), 4 * MiB, free=lambda: 9 * MiB)
    assert again.thd_establish()
    later = SpaceReserve(str(tmp_path / "reserve"), 4 * MiB, free=lambda: 0)
    later.thd_adopt()  # a reserve left by an earlier run counts
    assert later.held
    none = SpaceReserve(str(tmp_path / "none"), 0, free=lambda: 0)
    assert none.accepts_data and not none.low() and not none.thd_release()


@pytest.fixture
def disk(tmp_path):
    """A 4 MiB tmpfs, unmounted after the test."""
    mount = tmp_path / "small"
    if not mount_tmpfs(mount, "4m"):
        unavailable("cannot mount a tmpfs here (run as root, with mount permission)")
    yield mount
    unmount(mount)


class Runs:
    """Successive DiskStores over one data directory on the small disk."""

    def __init__(self, mount, reserve=RESERVE):
        self.path = str(mount / "data")
        self.clock = Clock()
        self.reserve = reserve
        self.store = None

    def start(self, reserve=None):
        self.store = DiskStore(self.path, self.clock, InlineRunners(),
                               reserve=self.reserve if reserve is None else reserve)
        self.store.start()
        return self.store

    def crash(self):
        crash(self.store)  # as after kill -9

    async def stop(self):
        (await self.store.stop())

    def setting(self, key):
        catalog = self.peek()
        try:
            return catalog.get_setting(key)
        finally:
            catalog.close()

    def peek(self) -> Catalog:
        """The catalog as it is on disk, read without needing a byte of room."""
        path = os.path.join(self.path, "catalog.sqlite3")
        wal = path + "-wal"
        quiet = not os.path.exists(wal) or os.path.getsize(wal) == 0
        return Catalog(path, readonly=True, create=False, immutable=quiet)


async def store_stream(store, stream_id, data):
    stream = (await store.create(stream_id, '{"kept": true}'))
    stream.append(data)
    (await stream.complete())


def free(mount) -> int:
    status = os.statvfs(mount)
    return status.f_bavail * status.f_frsize


async def fail_for_want_of_room(stream):
    """Append until the disk refuses, then abort the stream as the ingest does."""
    with pytest.raises(StorageFailed) as caught:
        for _ in range(200):
            stream.append(b"x" * (64 * KiB))
    (await stream.abort(f"storing the data failed: {caught.value}"))


@pytest_twisted.ensureDeferred
async def test_delete_on_a_full_disk_frees_its_space(disk):
    """With not one byte free, DELETE commits (the reserve makes room) and frees the space."""
    runs = Runs(disk)
    store = runs.start()
    (await store_stream(store, "big", b"b" * (1024 * KiB)))
    (await store_stream(store, "keep", b"kept"))
    fill_up(disk)
    assert free(disk) == 0
    (await store.delete("big"))
    assert free(disk) > 512 * KiB
    assert store.reserve.held  # room enough: the reserve is made again at once
    assert (await read_all(store, "keep")) == (b"kept", "complete")
    stream = (await store.create("after", "{}"))  # no restart needed
    stream.append(b"new")
    (await stream.complete())


@pytest_twisted.ensureDeferred
async def test_an_abort_for_a_full_disk_is_recorded_and_survives_a_restart(disk):
    """An abort for a full disk is committed with its reason and kept across a restart on it."""
    runs = Runs(disk)
    store = runs.start()
    (await store_stream(store, "first", b"before"))
    stream = (await store.create("big", "{}"))
    fill_up(disk, "filler-1")
    (await fail_for_want_of_room(stream))
    assert not store.unrecorded  # recorded, not held in memory
    size = stream.size
    (await runs.stop())
    fill_up(disk, "filler-2")  # whatever the stop freed is taken too
    store = runs.start()
    handle = (await store.open("big"))
    assert (handle.state, handle.size) == ("aborted", size)
    assert "No space left on device" in handle.record.reason
    handle.close()
    assert (await read_all(store, "first")) == (b"before", "complete")


@pytest_twisted.ensureDeferred
async def test_while_the_reserve_is_spent_no_data_is_stored_until_room_returns(disk):
    """While the reserve is spent no data is stored; freed space lets new streams in at once."""
    runs = Runs(disk)
    store = runs.start()
    other = (await store.create("other", "{}"))
    other.append(b"before")
    big = (await store.create("big", "{}"))
    filler = fill_up(disk)
    (await fail_for_want_of_room(big))
    assert not store.reserve.held and free(disk) > 0
    with pytest.raises(StorageFailed):
        other.append(b"would eat the room kept for the catalog")
    (await other.abort("storing the data failed"))
    assert (await read_all(store, "other")) == (b"before", "aborted")
    with pytest.raises(StorageFailed) as caught:
        (await store.create("refused", "{}"))
    assert "the disk is full" in str(caught.value)
    with pytest.raises(Unavailable) as caught:
        (await store.check_health())
    assert "full" in caught.value.message
    os.unlink(filler)
    stream = (await store.create("after", "{}"))
    stream.append(b"room again")
    (await stream.complete())
    (await store.check_health())
    assert store.reserve.held


@pytest_twisted.ensureDeferred
async def test_start_up_on_a_full_disk_serves_reads(disk):
    """A clean restart with not one byte free starts on its reserve and serves reads."""
    runs = Runs(disk)
    store = runs.start()
    (await store_stream(store, "kept", b"kept bytes"))
    (await runs.stop())
    filler = fill_up(disk)
    store = runs.start()
    assert (await read_all(store, "kept")) == (b"kept bytes", "complete")
    with pytest.raises(StorageFailed):
        (await store.create("refused", "{}"))
    assert runs.setting("clean_shutdown") == "0"  # cleared before anything can be created
    os.unlink(filler)
    (await store_stream(store, "after", b"room again"))


@pytest_twisted.ensureDeferred
async def test_start_up_with_no_room_and_no_reserve_waits_for_room(disk):
    """A restart on a full disk with no reserve serves reads, then finishes when room returns."""
    runs = Runs(disk)
    store = runs.start()
    (await store_stream(store, "kept", b"kept bytes"))
    live = (await store.create("was-live", '{"job": 1}'))
    live.append(b"live bytes")
    big = (await store.create("big", "{}"))
    fill_up(disk, "filler-1")
    (await fail_for_want_of_room(big))  # spends the reserve
    runs.crash()
    filler = fill_up(disk, "filler-2")
    store = runs.start()
    assert (await read_all(store, "kept")) == (b"kept bytes", "complete")
    assert (await read_all(store, "was-live")) == (b"live bytes", "interrupted")
    assert (await read_all(store, "big"))[1] == "aborted"
    with pytest.raises(StorageFailed) as caught:
        (await store.create("refused", "{}"))
    assert "not finished starting" in str(caught.value)
    with pytest.raises(Unavailable) as caught:
        (await store.check_health())
    assert "reads only" in caught.value.message
    runs.clock.advance(1.0)  # still no room: still waiting
    with pytest.raises(StorageFailed):
        (await store.create("refused", "{}"))
    os.unlink(filler)
    os.unlink(disk / "filler-1")
    runs.clock.advance(1.0)  # the catalog is opened for writing, and start-up's marks made
    (await store_stream(store, "after", b"room again"))
    (await store.check_health())
    runs.crash()
    store = runs.start()  # the catalog itself now says interrupted
    assert (await read_all(store, "was-live")) == (b"live bytes", "interrupted")
    assert (await store.open("was-live")).metadata_json == '{"job": 1}'


@pytest_twisted.ensureDeferred
async def test_a_stop_while_waiting_for_room_records_no_clean_shutdown(disk):
    """Start-up that could not write its marks must not be followed by a clean-shutdown mark."""
    runs = Runs(disk)
    store = runs.start()
    live = (await store.create("was-live", "{}"))
    live.append(b"live bytes")
    big = (await store.create("big", "{}"))
    fill_up(disk, "filler-1")
    (await fail_for_want_of_room(big))
    runs.crash()
    fill_up(disk, "filler-2")
    runs.start()
    (await runs.stop())
    assert runs.setting("clean_shutdown") == "0"
    assert [r.state for r in _records(runs) if r.id == "was-live"] == ["live"]


@pytest_twisted.ensureDeferred
async def test_start_up_on_a_full_disk_without_room_for_sqlite_reads_the_catalog_as_it_is(disk):
    """With no room even for SQLite's shared memory, reads are served from the catalog as it is."""
    runs = Runs(disk, reserve=0)
    store = runs.start()
    (await store_stream(store, "kept", b"kept bytes"))
    (await runs.stop())
    filler = fill_up(disk)
    store = runs.start()
    assert store.directory.immutable_reader
    assert (await read_all(store, "kept")) == (b"kept bytes", "complete")
    assert [r.id for r in (await store.list_streams())] == ["kept"]
    with pytest.raises(StorageFailed):
        (await store.create("refused", "{}"))
    os.unlink(filler)
    runs.clock.advance(1.0)  # the catalog is opened for writing, and start-up's marks made
    assert not store.directory.immutable_reader
    (await store_stream(store, "after", b"room again"))
    assert (await read_all(store, "kept")) == (b"kept bytes", "complete")


def _records(runs):
    catalog = runs.peek()
    try:
        return catalog.list(limit=1000)
    finally:
        catalog.close()


# --- the same with a real server ----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_server_on_a_full_disk_deletes_reads_and_restarts(disk):
    """twistd on a full tmpfs: DELETE frees space, reasons survive, a restart serves reads."""
    env = child_environment(LOOM_STORAGE_RESERVE="256KiB")
    data = disk / "data"
    server = await start_server_process(data, env=env)
    try:
        for name in (b"old", b"kept"):
            response = await treq.post(server.url + "/stream/" + name.decode(),
                                       data=name * 100_000)
            assert response.code == 201
            await response.content()
        producer = await start_producer(server.port, b"big", b"first bytes")
        fill_up(disk, "filler-1")
        for _ in range(64):
            if producer.closed.called:
                break
            producer.send(chunk(b"z" * 65536))
        await producer.closed
        assert not bytes(producer.received).endswith(b"0\r\n\r\n")  # aborted
        before = free(disk)
        response = await treq.delete(server.url + "/stream/old")
        assert response.code == 204, await response.content()
        print(f"DELETE on the full disk freed {(free(disk) - before) // KiB} KiB")
        assert free(disk) - before > 128 * KiB  # its 293 KiB, less what the catalog took
    finally:
        await server.stop()
    fill_up(disk, "filler-2")
    started = time.monotonic()
    restarted = await start_server_process(data, env=env)
    print(f"restart on the full disk: ready in {time.monotonic() - started:.2f} s")
    try:
        response = await treq.get(restarted.url + "/stream/big")
        body = await response.content()
        assert response.headers.getRawHeaders("x-stream-state") == ["aborted"]
        assert "No space left on device" in response.headers.getRawHeaders("x-stream-reason")[0]
        assert len(body) > 0
        response = await treq.get(restarted.url + "/stream/kept")
        assert await response.content() == b"kept" * 100_000
        response = await treq.get(restarted.url + "/health")
        assert response.code == 503 and "full" in (await response.json())["error"]
        response = await treq.post(restarted.url + "/stream/refused", data=b"x")
        assert response.code == 507
        assert "the disk is full" in (await response.json())["error"]
        for name in ("filler-1", "filler-2"):
            os.unlink(disk / name)
        freed = time.monotonic()
        waited = "serves reads only" in restarted.process.text()
        if waited:
            # The reserve had gone to the first run's books: this start could
            # not write (nor even make SQLite's shared memory) and waited.
            await restarted.process.protocol.wait_for_output("start-up is finished")
        response = await treq.post(restarted.url + "/stream/after", data=b"room again")
        assert response.code == 201
        await response.content()
        print(f"space freed to a new stream stored: {time.monotonic() - freed:.2f} s"
              f" ({'start-up had waited for room' if waited else 'start-up used the reserve'})")
        response = await treq.get(restarted.url + "/health")
        assert response.code == 200
    finally:
        await restarted.stop()
    log = server.process.text() + restarted.process.text()
    assert "Traceback" not in log and "Unhandled" not in log, log[-3000:]
