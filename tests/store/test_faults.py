"""Disk full and I/O errors: injected on every call in turn, and on a real full file system."""

import errno
import os
import subprocess
import uuid

import pytest
import pytest_twisted
import treq
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed

from loom.store import DiskStore, InlineRunners
from tests.helpers import (
    child_environment,
    chunk,
    cut_off,
    FaultyFileSystem,
    make_fake_site,
    mount_tmpfs,
    parse_response,
    raw_connect,
    start_producer,
    start_server_process,
    unavailable,
)

GONE = Failure(ConnectionDone())
# A reserve that fits a 4 MiB tmpfs (the default, 8 MiB, would not).
SMALL_RESERVE = child_environment(LOOM_STORAGE_RESERVE="256KiB")
CHUNKS_1 = [b"p1-chunk-%02d;" % i for i in range(10)]
CHUNKS_2 = [b"p2-%d;" % i for i in range(4)]


def run_scenario(tmp_path, faults: FaultyFileSystem, arm=None):
    """Two producers write while faults may strike; return what happened, for the checks."""
    clock = Clock()
    fake = make_fake_site(store=DiskStore(str(tmp_path), clock, InlineRunners(), fs=faults),
                          clock=clock)
    done, done_transport = fake.connect()
    done.dataReceived(b"POST /stream/done HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\n\r\nbaseline")
    assert done_transport.value().endswith(b"0\r\n\r\n")
    if arm:
        arm()
    outcomes = {}
    p1, t1 = fake.connect()
    p1.dataReceived(b"POST /stream/p1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    for index, piece in enumerate(CHUNKS_1):
        if not cut_off(t1):
            p1.dataReceived(chunk(piece))
        if index == 4:
            fake.clock.advance(1.0)  # an interval sync while the stream is live
    if not cut_off(t1):
        p1.dataReceived(b"0\r\n\r\n")
    p2, t2 = fake.connect()
    p2.dataReceived(b"POST /stream/p2 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    for piece in CHUNKS_2:
        if not cut_off(t2):
            p2.dataReceived(chunk(piece))
    if not cut_off(t2):
        p2.dataReceived(b"0\r\n\r\n")
    for name, channel, transport, sent in (("p1", p1, t1, CHUNKS_1), ("p2", p2, t2, CHUNKS_2)):
        if cut_off(transport):
            channel.connectionLost(GONE)
        outcomes[name] = (transport, b"".join(sent))
    return fake, outcomes


async def check_invariants(fake, outcomes, label):
    store = fake.store
    for name, (transport, sent) in outcomes.items():
        raw = transport.value()
        status = parse_response(raw)[0] if raw else None
        clean_end = status == 201 and raw.endswith(b"\r\n\r\n0\r\n\r\n")
        if status != 201:
            assert status == 507 or cut_off(transport), (label, name, raw[:80])
            continue
        channel, reader = fake.connect()
        channel.dataReceived(b"GET /stream/" + name.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        r_status, headers, body = parse_response(reader.value())
        assert r_status == 200, (label, name)
        state = headers["x-stream-state"]
        size = int(headers["content-length"])
        if clean_end:
            # A clean end is a promise: complete, with every byte.
            assert state == "complete" and body == sent, (label, name, state)
        else:
            assert cut_off(transport), (label, name)
            assert state != "complete", (label, name)
            assert body == sent[:size], (label, name)
        record = (await store.open(name)).record
        on_disk = os.path.getsize(store.data_path(record.storage).path)
        assert on_disk == size, (label, name, on_disk, size)  # exactly what reached the disk
    channel, reader = fake.connect()
    channel.dataReceived(b"GET /stream/done HTTP/1.1\r\nHost: x\r\n\r\n")
    assert parse_response(reader.value())[2] == b"baseline", label


def count_calls(tmp_path) -> dict[str, int]:
    faults = FaultyFileSystem()
    fake, _ = run_scenario(tmp_path / "dry-run", faults, arm=lambda: faults.calls.clear())
    fake.close()
    return dict(faults.calls)


@pytest_twisted.ensureDeferred
async def test_every_write_sync_and_create_failing_in_turn_keeps_the_promises(tmp_path):
    """ENOSPC and EIO on each write, fsync and file creation in turn: every invariant holds."""
    calls = count_calls(tmp_path)
    assert calls["write"] >= 14 and calls["fsync"] >= 4 and calls["open"] >= 2, calls
    errors = []
    observer = lambda event: event.get("log_failure") and errors.append(event)  # noqa: E731
    globalLogPublisher.addObserver(observer)
    scenarios = 0
    try:
        for op, count in sorted(calls.items()):
            for at in range(1, count + 1):
                for error in (errno.ENOSPC, errno.EIO):
                    label = f"{op} #{at} {errno.errorcode[error]}"
                    faults = FaultyFileSystem()
                    fake, outcomes = run_scenario(
                        tmp_path / uuid.uuid4().hex, faults,
                        arm=lambda f=faults, o=op, a=at, e=error: f.fail(o, a, e),
                    )
                    assert faults.failures, f"{label}: the fault never struck"
                    (await check_invariants(fake, outcomes, label))
                    # Space is back: a new stream works without a restart.
                    faults.heal()
                    channel, transport = fake.connect()
                    channel.dataReceived(b"POST /stream/after HTTP/1.1\r\nHost: x\r\n"
                                         b"Content-Length: 5\r\n\r\nfresh")
                    assert transport.value().endswith(b"0\r\n\r\n"), label
                    fake.close()
                    scenarios += 1
    finally:
        globalLogPublisher.removeObserver(observer)
    assert not errors, [e.get("log_format") for e in errors]
    print(f"{scenarios} fault scenarios, all invariants held")


_mount_tmpfs = mount_tmpfs


@pytest_twisted.ensureDeferred
async def test_a_really_full_file_system(tmp_path):
    """On a real 4 MiB tmpfs: filling it aborts the producer, keeps its bytes, and Loom recovers."""
    mount = tmp_path / "small"
    if not _mount_tmpfs(mount, "4m"):
        unavailable("cannot mount a tmpfs here (run as root, with mount permission)")
    try:
        server = await start_server_process(mount / "data", env=SMALL_RESERVE)
        try:
            big = await _fill_and_recover(server, mount)
        finally:
            await server.stop()
        log = server.process.text()
        assert "Unhandled" not in log and "Traceback" not in log, log[-2000:]
        # After a restart the aborted stream still holds exactly its stored bytes.
        restarted = await start_server_process(mount / "data", env=SMALL_RESERVE)
        try:
            response = await treq.get(restarted.url + "/stream/big")
            assert await response.content() == big
            assert response.headers.getRawHeaders("x-stream-state") == ["aborted"]
        finally:
            await restarted.stop()
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def _fill_and_recover(server, mount):
    first = await treq.post(server.url + "/stream/first", data=b"written before the disk filled")
    assert first.code == 201
    await first.content()
    # Leave about 1 MiB free, then stream 3 MiB into it.
    filler = mount / "filler"
    free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - 1024 * 1024))
    producer = await start_producer(server.port, b"big")
    sent = b""
    piece = bytes(range(256)) * 256  # 64 KiB
    for _ in range(48):
        if producer.closed.called:
            break
        producer.send(chunk(piece))
        sent += piece
    await producer.closed
    assert not bytes(producer.received).endswith(b"0\r\n\r\n")  # aborted, not ended cleanly
    # The stream may still be ending: a reader gets every byte, then a cut.
    follower = await treq.get(server.url + "/stream/big", unbuffered=True)
    if follower.headers.getRawHeaders("x-stream-state") == ["live"]:
        with pytest.raises(ResponseFailed):
            await treq.collect(follower, lambda data: None)
    else:
        await follower.content()
    response = await treq.get(server.url + "/stream/big")
    body = await response.content()
    assert response.headers.getRawHeaders("x-stream-state") == ["aborted"]
    assert 0 < len(body) < len(sent) and body == sent[: len(body)]
    files = [os.path.join(d, f) for d, _, names in os.walk(mount / "data" / "streams")
             for f in names]
    assert len(body) in [os.path.getsize(f) for f in files]  # exactly the bytes on disk
    # Reads of other streams keep working on the full disk.
    response = await treq.get(server.url + "/stream/first")
    assert await response.content() == b"written before the disk filled"
    # A new stream cannot be stored now: an explicit failure, never a silent success.
    full = await raw_connect(server.port)
    full.send(b"POST /stream/while-full HTTP/1.1\r\nHost: x\r\nContent-Length: 65536\r\n\r\n"
              + piece)
    await full.closed
    answer = bytes(full.received)
    assert answer.startswith(b"HTTP/1.1 507") or not answer.endswith(b"0\r\n\r\n"), answer[:100]
    # Space is freed: new streams work again without a restart.
    os.unlink(filler)
    again = await treq.post(server.url + "/stream/after", data=b"space is back")
    assert again.code == 201
    await again.content()
    response = await treq.get(server.url + "/stream/after")
    assert await response.content() == b"space is back"
    assert response.headers.getRawHeaders("x-stream-state") == ["complete"]
    return body
