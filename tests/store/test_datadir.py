"""One server per data directory, and a catalog that is really there (or refused, or rebuilt)."""

import os
import sqlite3
import time

import pytest
import pytest_twisted
import treq
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from loom.store.datadir import DataDirectoryError
from loom.errors import StorageFailed, StreamNotFound, Unavailable
from loom.store import DiskStore, InlineRunners, new_storage_name
from tests.helpers import chunk, Follow, spawn, start_producer, start_server_process, TWISTD
from loom.testing import crash, read_all


def open_store(path, **options):
    store = DiskStore(str(path), Clock(), InlineRunners(), **options)
    store.start()
    return store


def logged(f):
    """Run ``f()``; return what it returned and the log lines it produced."""
    lines = []
    observer = lambda event: lines.append(formatEvent(event))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        return f(), lines
    finally:
        globalLogPublisher.removeObserver(observer)


def row_state(data_dir, stream_id):
    with sqlite3.connect(os.path.join(str(data_dir), "catalog.sqlite3")) as db:
        row = db.execute("SELECT state FROM streams WHERE id = ?", (stream_id,)).fetchone()
    return row and row[0]


def refusal(process) -> str:
    """The one line a server that refused to start printed (twistd logs it from stderr)."""
    lines = [line for line in process.text().splitlines() if "loom: " in line]
    assert len(lines) == 1 and "Traceback" not in process.text(), process.text()
    return lines[0]


def files_in(directory) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), directory)
                  for d, _, names in os.walk(directory) for f in names)


# --- one server per data directory --------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_second_store_on_a_directory_in_use_touches_nothing(tmp_path):
    """A second store on a locked directory refuses before recovery; the live stream goes on."""
    first = open_store(tmp_path / "data")
    stream = (await first.create("live", "{}"))
    stream.append(b"before;")
    with pytest.raises(DataDirectoryError) as caught:
        open_store(tmp_path / "data")
    assert "is in use by this process" in str(caught.value)
    assert str(tmp_path / "data") in str(caught.value)
    assert row_state(tmp_path / "data", "live") == "live"
    stream.append(b"after;")
    (await stream.complete())
    assert (await read_all(first, "live")) == (b"before;after;", "complete")
    crash(first)  # the first process is gone: its lock with it
    assert (await read_all(open_store(tmp_path / "data"), "live")) == (b"before;after;", "complete")


@pytest_twisted.ensureDeferred
async def test_a_second_server_refuses_with_one_line_until_the_first_is_killed(tmp_path):
    """A second twistd refuses in one line naming the directory and pid; kill -9 frees the lock."""
    data = tmp_path / "data"
    first = await start_server_process(data)
    producer = await start_producer(first.port, b"live", b"before;")
    follower = Follow()
    await follower.start(first.url + "/stream/live")
    await follower.until(len(b"before;"))
    started = time.monotonic()
    second = spawn(TWISTD + ["-n", "--pidfile=", "loom", "--data-dir", str(data),
                             "--listen", "tcp:0:interface=127.0.0.1"], cwd=str(tmp_path))
    ended = await second.wait()  # (before the lock, it started and served)
    print(f"second server refused and exited in {time.monotonic() - started:.2f} s")
    assert ended.exit_code == 1, second.text()
    line = refusal(second)
    assert f"loom: the data directory {data} is in use" in line
    assert f"(pid {first.process.pid})" in line
    assert row_state(data, "live") == "live"  # no recovery ran
    producer.send(chunk(b"after;") + b"0\r\n\r\n")
    await producer.wait_for(b"0\r\n\r\n")  # a clean end: complete
    response = await treq.get(first.url + "/stream/live")
    assert await response.content() == b"before;after;"
    assert response.headers.getRawHeaders("x-stream-state") == ["complete"]
    late = await start_producer(first.port, b"late", b"unfinished")
    await first.stop("KILL")
    assert first.process.protocol.exit_signal == 9
    third = await start_server_process(data)
    try:
        response = await treq.get(third.url + "/stream/late")
        assert await response.content() == b"unfinished"
        assert response.headers.getRawHeaders("x-stream-state") == ["interrupted"]
        response = await treq.get(third.url + "/stream/live")
        assert await response.content() == b"before;after;"
    finally:
        await third.stop()
        late.transport.abortConnection()


# --- a catalog that is not there is never a fresh install ---------------------------------


@pytest_twisted.async_fixture
async def used(tmp_path):
    """A data directory with two complete streams, left as by kill -9."""
    store = open_store(tmp_path / "data")
    for stream_id, data in (("one", b"first stream"), ("two", b"second stream")):
        stream = (await store.create(stream_id, '{"n": 1}'))
        stream.append(data)
        (await stream.complete())
    crash(store)
    return tmp_path / "data"


def _refused(data_dir, expected):
    before = files_in(data_dir / "streams")
    with pytest.raises(DataDirectoryError) as caught:
        open_store(data_dir)
    message = str(caught.value)
    assert expected in message and "--rebuild-catalog" in message and "\n" not in message
    assert files_in(data_dir / "streams") == before  # nothing moved or removed
    assert not (data_dir / "quarantine").exists()
    return message


def test_an_empty_catalog_refuses_to_start(used):
    """A 0-byte catalog is refused with what to do, and not one data file is touched."""
    (used / "catalog.sqlite3").write_bytes(b"")
    _refused(used, "is empty (0 bytes)")


def test_a_missing_catalog_beside_data_refuses_to_start(used):
    """No catalog but data files: refused, naming how many files there are."""
    os.unlink(used / "catalog.sqlite3")
    message = _refused(used, "is missing")
    assert "holds 2 files" in message


def test_a_catalog_without_a_streams_table_refuses_to_start(used):
    """A valid SQLite file that is not a Loom catalog is not made one."""
    os.unlink(used / "catalog.sqlite3")
    with sqlite3.connect(used / "catalog.sqlite3") as db:
        db.execute("CREATE TABLE other (x)")
    _refused(used, "holds no streams table")


def test_a_catalog_that_knows_none_of_the_files_refuses_to_start(used, tmp_path):
    """Another directory's (or a new, empty) catalog is refused, not every stream quarantined."""
    crash(open_store(tmp_path / "elsewhere"))
    os.replace(tmp_path / "elsewhere" / "catalog.sqlite3", used / "catalog.sqlite3")
    _refused(used, "lists none of the 2 data files")


@pytest_twisted.ensureDeferred
async def test_a_fresh_directory_gets_a_whole_catalog(tmp_path):
    """No catalog and no data: a fresh install, with the catalog made whole before it appears."""
    store, lines = logged(lambda: open_store(tmp_path / "data"))
    assert any("created a new catalog" in line for line in lines)
    assert (await store.stream_count()) == 0
    crash(store)
    assert sorted(os.listdir(tmp_path / "data")) == ["catalog.sqlite3", "reserve", "streams"]


def test_a_write_ahead_log_without_its_catalog_refuses_to_start(tmp_path):
    """A catalog's WAL with no catalog may hold commits: refused, though no stream file exists."""
    data = tmp_path / "data"
    os.makedirs(data)
    (data / "catalog.sqlite3-wal").write_bytes(b"frames of commits")
    _refused(data, "write-ahead log")


@pytest_twisted.ensureDeferred
async def test_a_shared_memory_file_alone_is_no_reason_to_refuse(tmp_path):
    """SQLite's -shm file holds no data: beside no catalog and no streams it is a fresh start."""
    data = tmp_path / "data"
    os.makedirs(data)
    (data / "catalog.sqlite3-shm").write_bytes(b"\0\0\0")
    assert (await open_store(data).stream_count()) == 0


@pytest_twisted.ensureDeferred
async def test_rebuild_catalog_restores_only_what_the_files_prove(used):
    """--rebuild-catalog restores proven streams as interrupted; the rest goes or is quarantined."""
    store = open_store(used)
    one = store.data_path((await store.open("one")).record.storage).path
    two = (await store.open("two")).record.storage
    crash(store)

    def put(path, data):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)

    empty = store.data_path(new_storage_name("never-written")).path
    put(empty, b"")
    unnamed = os.path.join(os.path.dirname(one), "not-a-loom-name.data")
    put(unnamed, b"?")
    misplaced = os.path.join(str(used / "streams"), "zz", os.path.basename(one))
    put(misplaced[: -len(".data")] + "x.data", b"a name Loom never writes")
    generation = store.data_path(two.partition(".")[0] + ".0000abcd").path
    put(generation, b"another generation of two")
    os.unlink(used / "catalog.sqlite3")
    _refused(used, "is missing")
    store, lines = logged(lambda: open_store(used, rebuild_catalog=True))
    assert (await read_all(store, "one")) == (b"first stream", "interrupted")
    record = (await store.open("one")).record
    assert record.metadata == "{}" and "--rebuild-catalog" in record.reason
    with pytest.raises(StreamNotFound):
        (await store.open("two"))  # two files claim it: neither is proven current
    assert (await store.stream_count()) == 1
    assert sorted(os.listdir(used / "quarantine")) == sorted([
        "not-a-loom-name.data", os.path.basename(misplaced)[: -len(".data")] + "x.data",
        two + ".data", os.path.basename(generation)])
    assert not os.path.exists(empty)
    assert any("rebuilt the catalog" in line and "1 streams restored" in line
               for line in lines)
    crash(store)
    assert (await read_all(open_store(used), "one")) == (b"first stream", "interrupted")


@pytest_twisted.ensureDeferred
async def test_rebuild_sets_an_empty_catalog_aside(used):
    """The empty catalog a rebuild replaces is kept in quarantine/, not deleted."""
    (used / "catalog.sqlite3").write_bytes(b"")
    store = open_store(used, rebuild_catalog=True)
    assert (await read_all(store, "one")) == (b"first stream", "interrupted")
    [aside] = [name for name in os.listdir(used / "quarantine") if name.startswith("catalog-")]
    assert os.listdir(used / "quarantine" / aside) == ["catalog.sqlite3"]


@pytest_twisted.ensureDeferred
async def test_rebuild_catalog_leaves_a_usable_catalog_alone(used):
    """With a usable catalog, --rebuild-catalog changes nothing and says so."""
    store, lines = logged(lambda: open_store(used, rebuild_catalog=True))
    assert (await read_all(store, "one")) == (b"first stream", "complete")
    assert (await store.open("one")).metadata_json == '{"n": 1}'
    assert any("nothing was rebuilt" in line for line in lines)


# --- a catalog deleted or replaced under a running server ----------------------------------


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("how", ["deleted", "replaced"])
async def test_a_catalog_gone_while_running_stops_every_record(tmp_path, how):
    """A catalog deleted or replaced while running: 503, nothing more recorded, reads go on."""
    data = tmp_path / "data"
    store = open_store(data)
    done = (await store.create("done", "{}"))
    done.append(b"stored")
    (await done.complete())
    live = (await store.create("live", "{}"))
    live.append(b"live bytes")
    catalog = data / "catalog.sqlite3"
    if how == "deleted":
        os.unlink(catalog)
    else:
        crash(open_store(tmp_path / "other"))
        os.replace(tmp_path / "other" / "catalog.sqlite3", catalog)
    with pytest.raises(Unavailable) as caught:
        (await store.check_health())
    assert "deleted or replaced while Loom was running" in caught.value.message
    with pytest.raises(Unavailable):
        (await store.create("new", "{}"))
    with pytest.raises(Unavailable):
        (await store.delete("live"))
    assert live.outcome is None  # not cut off for a deletion that cannot happen
    assert (await read_all(store, "done")) == (b"stored", "complete")
    with pytest.raises(StorageFailed):
        (await live.complete())
    assert live.outcome == "aborted"
    with pytest.raises(StreamNotFound):
        (await store.open("new"))


@pytest_twisted.ensureDeferred
async def test_a_server_whose_catalog_is_deleted_answers_503(tmp_path):
    """twistd: a deleted catalog gives 503s, a one-line refusal, then --rebuild-catalog works."""
    data = tmp_path / "data"
    server = await start_server_process(data)
    try:
        response = await treq.post(server.url + "/stream/kept", data=b"kept bytes")
        assert response.code == 201
        await response.content()
        assert (await treq.get(server.url + "/health")).code == 200
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(f"{data}/catalog.sqlite3{suffix}"):
                os.unlink(f"{data}/catalog.sqlite3{suffix}")
        response = await treq.get(server.url + "/health")
        assert response.code == 503
        assert "catalog" in (await response.json())["error"]
        response = await treq.post(server.url + "/stream/new", data=b"lost")
        assert response.code == 503
        assert "deleted or replaced" in (await response.json())["error"]
        response = await treq.get(server.url + "/stream/kept")
        assert await response.content() == b"kept bytes"
    finally:
        await server.stop()
    refused = spawn(TWISTD + ["-n", "--pidfile=", "loom", "--data-dir", str(data), "-p", "0"],
                    cwd=str(tmp_path))
    ended = await refused.wait()
    assert ended.exit_code == 1
    line = refusal(refused)
    assert "is missing" in line and "--rebuild-catalog" in line
    rebuilt = await start_server_process(data, "--rebuild-catalog")
    try:
        response = await treq.get(rebuilt.url + "/stream/kept")
        assert await response.content() == b"kept bytes"
        assert response.headers.getRawHeaders("x-stream-state") == ["interrupted"]
    finally:
        await rebuilt.stop()
