"""Every limit is configurable and answers clearly (Clock, raw bytes through a real channel)."""

import os
import sys

import pytest
import pytest_twisted
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from tests.helpers import (
    FakeTCPTransport,
    chunk,
    cut_off,
    dechunk,
    json_body,
    make_fake_site,
    parse_response,
    raw_connect,
    spawn,
    start_server,
)
from loom.testing import read_all

GONE = Failure(ConnectionDone())


def post(stream_id=b"s1", headers=b""):
    return (b"POST /stream/" + stream_id + b" HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked\r\n" + headers + b"\r\n")


@pytest.mark.parametrize("size", [9 * 1024, 20 * 1024, 40 * 1024])
def test_oversized_metadata_is_413_even_beyond_twisteds_16_kib_line_limit(tmp_path, size):
    """Metadata over the limit gets a JSON 413, also past 16 KiB where Twisted drops silently."""
    fake = make_fake_site(data_dir=str(tmp_path), max_metadata_bytes=40 * 1024 - 1)
    fake_small = make_fake_site(data_dir=str(tmp_path / "b"))
    metadata = b'{"a": "' + b"x" * (size - 9) + b'"}'
    for site, expected in ((fake_small, 413), (fake, 413 if size >= 40 * 1024 else 201)):
        channel, transport = site.connect()
        channel.dataReceived(post(headers=b"X-Stream-Metadata: " + metadata + b"\r\n"))
        status, headers, body = parse_response(transport.value())
        assert status == expected, (size, transport.value()[:200])
        if status == 413:
            assert "limit" in json_body(body)["error"]


def test_a_head_beyond_every_limit_is_431_not_a_silent_drop(tmp_path):
    """A header line or head larger than Loom accepts is answered 431 JSON, then closed."""
    fake = make_fake_site(data_dir=str(tmp_path))
    channel, transport = fake.connect()
    channel.dataReceived(b"GET /stream/x HTTP/1.1\r\nX-Big: " + b"y" * 70000 + b"\r\n\r\n")
    status, _, body = parse_response(transport.value())
    assert status == 431 and "too" in json_body(body)["error"]
    channel, transport = fake.connect()
    channel.dataReceived(b"GET /stream/x HTTP/1.1\r\n" + b"X-Many: " + b"z" * 1000 + b"\r\n")
    for _ in range(70):
        channel.dataReceived(b"X-More: " + b"z" * 1000 + b"\r\n")
    assert parse_response(transport.value())[0] == 431


def test_duplicate_metadata_headers_are_refused(tmp_path):
    """Two X-Stream-Metadata headers are ambiguous: 400, no stream."""
    fake = make_fake_site(data_dir=str(tmp_path))
    channel, transport = fake.connect()
    channel.dataReceived(post(headers=b'X-Stream-Metadata: {"a":1}\r\nX-Stream-Metadata: {}\r\n'))
    assert parse_response(transport.value())[0] == 400
    assert fake.store.live_streams() == []


def test_slowloris_is_closed_after_the_header_deadline(tmp_path):
    """A client trickling its head a byte a second is answered 408 and closed on time."""
    fake = make_fake_site(data_dir=str(tmp_path), header_timeout=10, idle_timeout=60)
    channel, transport = fake.connect()
    head = b"GET /stream/x HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 100
    for index in range(9):
        channel.dataReceived(head[index:index + 1])
        fake.clock.advance(1)
    assert transport.value() == b""  # the idle timeout alone would never fire
    channel.dataReceived(head[9:10])
    fake.clock.advance(1.5)
    status, _, body = parse_response(transport.value())
    assert status == 408 and "in time" in json_body(body)["error"]
    assert transport.write_closed or transport.disconnecting
    channel.dataReceived(head[10:])  # still trickling: ignored
    assert transport.value().count(b"HTTP/1.1") == 1


def test_header_deadline_does_not_touch_a_slow_body_or_a_long_response(tmp_path):
    """The deadline covers the head only: a slow producer body or a long GET are not cut."""
    fake = make_fake_site(data_dir=str(tmp_path), header_timeout=10)
    channel, transport = fake.connect()
    channel.dataReceived(post() + chunk(b"a"))
    fake.clock.advance(60)
    channel.dataReceived(chunk(b"b"))
    assert not transport.disconnecting and not transport.write_closed
    reader, reader_transport = fake.connect()
    reader.dataReceived(b"GET /stream/s1 HTTP/1.1\r\nHost: x\r\n\r\n")
    fake.clock.advance(60)
    assert not reader_transport.disconnecting


def test_excess_connections_get_503_and_the_others_are_undisturbed(tmp_path):
    """Beyond maxConnections a connection gets a quick 503 and is closed."""
    fake = make_fake_site(data_dir=str(tmp_path), max_connections=2)
    first, first_transport = fake.connect()
    second, _ = fake.connect()
    third = fake.site.buildProtocol(None)
    from tests.helpers import FakeTCPTransport

    transport = FakeTCPTransport()
    third.makeConnection(transport)
    status, _, body = parse_response(transport.value())
    assert status == 503 and "too many connections" in json_body(body)["error"]
    assert transport.disconnecting
    first.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert parse_response(first_transport.value())[0] == 200
    first.connectionLost(GONE)
    fourth, fourth_transport = fake.connect()  # a slot is free again
    fourth.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert parse_response(fourth_transport.value())[0] == 200


def test_one_client_cannot_fill_the_server(tmp_path):
    """Beyond maxConnectionsPerClient, that address gets 503 while others are served; a
    slot it frees is its again."""
    fake = make_fake_site(data_dir=str(tmp_path), max_connections=10,
                          max_connections_per_client=2)
    greedy = [fake.connect(host="10.0.0.1") for _ in range(2)]
    third = fake.site.buildProtocol(IPv4Address("TCP", "10.0.0.1", 1))
    transport = FakeTCPTransport()
    third.makeConnection(transport)
    status, headers, body = parse_response(transport.value())
    assert status == 503 and "This client has too many" in json_body(body)["error"]
    assert headers["retry-after"] == "1" and transport.disconnecting
    other, other_transport = fake.connect(host="10.0.0.2")
    other.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert parse_response(other_transport.value())[0] == 200
    greedy[0][0].connectionLost(GONE)
    again, again_transport = fake.connect(host="10.0.0.1")
    again.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert parse_response(again_transport.value())[0] == 200
    assert fake.site._per_client == {"10.0.0.1": 2, "10.0.0.2": 1}


@pytest.mark.parametrize("file_limit, wanted, allowed", [
    (20000, 10000, 9968), (1048576, 10000, 10000), (256, 10000, 96), (70, 10000, 3),
    (10, 5, 1),
])
def test_connections_fit_the_open_file_limit(file_limit, wanted, allowed):
    """maxConnections is lowered to what the open-file limit allows, with a warning."""
    from loom.service import connection_budget

    got, warning = connection_budget(wanted, file_limit)
    assert got == allowed
    assert (warning is None) == (allowed == wanted)
    if warning:
        assert f"lowered to {allowed}" in warning and "ulimit" in warning


@pytest_twisted.ensureDeferred
async def test_running_out_of_files_is_a_503_not_a_reset(tmp_path):
    """With 200 open files allowed and maxConnections 10000, 150 readers that stop reading
    (each holding a socket and a data file): every one gets an answer, a 200 or a 503."""
    data = tmp_path / "data"
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (200, 200)); "
            "from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()")
    argv = [sys.executable, "-c", code, "--nodaemon", "--pidfile=", "loom", "--data-dir",
            str(data), "--listen", "tcp:0:interface=127.0.0.1"]
    process = spawn(argv, cwd=str(tmp_path))
    try:
        match = await process.protocol.wait_for_output(r"Loom ready: .* listening on .*:(\d+)")
        port = int(match.group(1))
        assert "allows 68 connections" in process.text()
        producer = await raw_connect(port)
        producer.send(b"POST /stream/big HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                      % (8 * 1024 * 1024) + b"x" * (8 * 1024 * 1024))
        await producer.wait_for(b"\r\n0\r\n\r\n")  # stored and complete
        producer.transport.loseConnection()
        readers = []
        for _ in range(150):
            reader = await raw_connect(port)
            reader.send(b"GET /stream/big HTTP/1.1\r\nHost: x\r\n\r\n")
            readers.append(reader)
        heads = [await reader.wait_for(b"\r\n\r\n") for reader in readers]
        statuses = [int(head.split()[1]) for head in heads]
        assert set(statuses) == {200, 503}, statuses
        assert 60 <= statuses.count(200) <= 68
        for reader in readers:
            reader.transport.abortConnection()
    finally:
        process.signal("TERM")
        await process.wait()


def test_content_length_over_the_stream_limit_is_413_before_any_201(tmp_path):
    """A body declared larger than maxStreamBytes is refused with 413; nothing is created."""
    fake = make_fake_site(data_dir=str(tmp_path), max_stream_bytes=100)
    channel, transport = fake.connect()
    channel.dataReceived(b"POST /stream/big HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n\r\n")
    status, _, body = parse_response(transport.value())
    assert status == 413 and "limited to 100 bytes" in json_body(body)["error"]
    assert fake.store.live_streams() == []


@pytest_twisted.ensureDeferred
async def test_a_stream_reaching_the_limit_is_cut_at_exactly_the_limit(tmp_path):
    """A chunked stream is stored up to the limit and not one byte more, then marked aborted."""
    fake = make_fake_site(data_dir=str(tmp_path), max_stream_bytes=100)
    channel, transport = fake.connect()
    channel.dataReceived(post() + chunk(b"x" * 60))
    channel.dataReceived(chunk(b"y" * 60))
    assert cut_off(transport)  # not ended cleanly
    channel.connectionLost(GONE)
    data, state = (await read_all(fake.store, "s1"))
    assert data == b"x" * 60 + b"y" * 40 and state == "aborted"
    stream_file = fake.store.data_path((await fake.store.open("s1")).record.storage).path
    assert os.path.getsize(stream_file) == 100
    reader, reader_transport = fake.connect()
    reader.dataReceived(b"GET /stream/s1 HTTP/1.1\r\nHost: x\r\n\r\n")
    headers = parse_response(reader_transport.value())[1]
    assert headers["x-stream-reason"] == "the size limit of 100 bytes was reached"


def test_a_stalled_reader_is_let_go_but_a_quiet_stream_is_not(tmp_path):
    """A follower that accepts nothing while data waits is dropped; one on a quiet stream is not."""
    fake = make_fake_site(data_dir=str(tmp_path), stalled_reader_timeout=120)
    producer, _ = fake.connect()
    producer.dataReceived(post() + chunk(b"first"))
    quiet, quiet_transport = fake.connect()
    quiet.dataReceived(b"GET /stream/s1 HTTP/1.1\r\nHost: x\r\n\r\n")
    stuck, stuck_transport = fake.connect()
    stuck.dataReceived(b"GET /stream/s1 HTTP/1.1\r\nHost: x\r\n\r\n")
    stuck.pauseProducing()  # its client stopped reading
    fake.clock.advance(119)
    assert not stuck_transport.disconnected
    fake.clock.advance(2)
    assert stuck_transport.disconnected
    assert not quiet_transport.disconnecting and not quiet_transport.disconnected
    assert fake.store.live_streams()[0].listener_count == 1
    producer.dataReceived(chunk(b" more"))
    assert dechunk(parse_response(quiet_transport.value())[2])[0] == b"first more"


def test_a_stalled_spy_is_let_go(tmp_path):
    """A /spy client that stops reading for the timeout is dropped and leaves nothing behind."""
    fake = make_fake_site(data_dir=str(tmp_path), stalled_reader_timeout=60)
    spy, spy_transport = fake.connect()
    spy.dataReceived(b"GET /spy HTTP/1.1\r\nHost: x\r\n\r\n")
    spy.pauseProducing()
    fake.clock.advance(61)
    assert spy_transport.disconnected
    spy.connectionLost(GONE)
    assert fake.store.observer_count == 0


@pytest_twisted.ensureDeferred
async def test_connection_limit_on_a_real_server(tmp_path):
    """On loopback, the connection beyond the limit is answered 503 and closed at once."""
    server = await start_server(tmp_path / "data", max_connections=3)
    try:
        held = [await raw_connect(server.port) for _ in range(3)]
        held[0].send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await held[0].wait_for(b"200 OK")
        extra = await raw_connect(server.port)
        await extra.closed
        assert bytes(extra.received).startswith(b"HTTP/1.1 503 Service Unavailable")
        for client in held:
            client.transport.loseConnection()
    finally:
        await server.service.stopService()


@pytest_twisted.ensureDeferred
async def test_readers_get_a_capped_kernel_send_buffer(tmp_path):
    """A reader's socket send buffer is capped (Linux doubles the value set); 0 leaves it alone."""
    import socket

    for setting, expected in ((256 * 1024, 512 * 1024), (None, None)):
        server = await start_server(tmp_path / f"data-{setting}", reader_send_buffer=setting)
        try:
            producer = await raw_connect(server.port)
            producer.send(b"POST /stream/s HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            await producer.wait_for(b"201 Created")
            reader = await raw_connect(server.port)
            reader.send(b"GET /stream/s HTTP/1.1\r\nHost: x\r\n\r\n")
            await reader.wait_for(b"\r\n\r\n")
            sizes = {
                channel.transport.getHandle().getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
                for channel in server.service.site.channels
            }
            if expected:
                assert expected in sizes  # the reader's
            else:
                assert 512 * 1024 not in sizes
            producer.transport.loseConnection()
            reader.transport.loseConnection()
        finally:
            await server.service.stopService()
