"""One server per data directory."""

import os
import sqlite3
import time

import pytest
import pytest_twisted
import treq
from twisted.internet.task import Clock

from loom.datadir import DataDirectoryError
from loom.store import DiskStore, InlineRunners
from tests.helpers import TWISTD, chunk, spawn, start_producer, start_server_process
from tests.test_e2e import Follow
from tests.test_store import read_all, result


def open_store(path, **options):
    store = DiskStore(str(path), Clock(), InlineRunners(), **options)
    store.start()
    return store


def row_state(data_dir, stream_id):
    with sqlite3.connect(os.path.join(str(data_dir), "catalog.sqlite3")) as db:
        row = db.execute("SELECT state FROM streams WHERE id = ?", (stream_id,)).fetchone()
    return row and row[0]


def refusal(process) -> str:
    """The one line a server that refused to start printed (twistd logs it from stderr)."""
    lines = [line for line in process.text().splitlines() if "loom: " in line]
    assert len(lines) == 1 and "Traceback" not in process.text(), process.text()
    return lines[0]


# --- one server per data directory --------------------------------------------------


def test_a_second_store_on_a_directory_in_use_touches_nothing(tmp_path):
    """A second store on a locked directory refuses before recovery; the live stream goes on."""
    first = open_store(tmp_path / "data")
    stream = result(first.create("live", "{}"))
    stream.append(b"before;")
    with pytest.raises(DataDirectoryError) as caught:
        open_store(tmp_path / "data")
    assert "is in use by this process" in str(caught.value)
    assert str(tmp_path / "data") in str(caught.value)
    assert row_state(tmp_path / "data", "live") == "live"
    stream.append(b"after;")
    result(stream.complete())
    assert read_all(first, "live") == (b"before;after;", "complete")
    first._close_storage()  # the first process is gone: its lock with it
    assert read_all(open_store(tmp_path / "data"), "live") == (b"before;after;", "complete")


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
