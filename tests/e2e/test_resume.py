"""Resume, inspect and manage on loopback: real servers, real clients, real crashes."""

import socket
import sys

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater

from loom.client import Busy, LoomClient, ServerAborted, SizeMismatch, StreamNotFound
from loom.store import TAKEOVER_QUIET
from tests.helpers import (
    body,
    chunk,
    guard,
    open_push,
    raw_connect,
    REPO,
    spawn,
    start_producer,
    start_server,
    start_server_process,
)

STREAM = [sys.executable, str(REPO / "bin" / "stream")]


@pytest_twisted.ensureDeferred
async def test_followers_across_the_gap_see_one_continuous_stream(tmp_path):
    """Producer drops, then appends within the window: followers get one clean stream."""
    server = await start_server(tmp_path / "data", resume_window=30)
    try:
        client = LoomClient(server.url)
        spy = await raw_connect(server.port)  # says when the server has recorded the abort
        spy.send(b"GET /spy HTTP/1.0\r\n\r\n")
        await spy.wait_for(b"\r\n\r\n")
        producer = await start_producer(server.port, b"gap", b"before the gap\n")
        received = bytearray()
        first = Deferred()

        def collect(data):
            received.extend(data)
            if not first.called:
                first.callback(None)

        following = Deferred.fromCoroutine(client.follow("gap", collect))
        await guard(first)
        producer.transport.abortConnection()  # the network drops
        await spy.wait_for(b"END gap aborted 15")
        info = await client.head("gap")
        assert (info.state, info.size) == ("aborted", 15)
        with_wrong_offset = Deferred.fromCoroutine(
            client.push(body(b"x"), "gap", append_at=3))
        try:
            await with_wrong_offset
        except SizeMismatch as e:
            assert e.size == 15
        result = await client.push(body(b"after the gap\n"), "gap", append_at=info.size)
        assert result.bytes_sent == 14
        outcome = await guard(following)
        assert bytes(received) == b"before the gap\nafter the gap\n"
        assert outcome.state == "complete"
        spy.transport.loseConnection()
    finally:
        await server.service.stopService()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest_twisted.ensureDeferred
async def test_stream_resume_survives_a_server_crash_and_restart(tmp_path):
    """loom-stream (resuming by default): the server is killed mid-stream and restarted;
    nothing is lost or doubled, and the stream ends complete."""
    port = _free_port()
    data_dir = tmp_path / "data"
    listen = f"tcp:{port}:interface=127.0.0.1"
    server = await start_server_process(data_dir, "--listen", listen)
    url = f"http://127.0.0.1:{port}"
    tool = spawn(STREAM + [url, "resumable"])
    try:
        tool.write(b"line 1\n")
        await tool.protocol.wait_for_output("stream resumable: ")
        reader = await raw_connect(port)
        reader.send(b"GET /stream/resumable HTTP/1.0\r\n\r\n")
        await reader.wait_for(b"line 1\n")  # stored
        await server.stop("KILL")
        tool.write(b"line 2, written while the server was down\n")
        await tool.protocol.wait_for_output("connection refused; resuming in")
        server = await start_server_process(data_dir, "--listen", listen)
        await tool.protocol.wait_for_output("resumed stream resumable at byte 7", seconds=60)
        tool.write(b"line 3\n")
        tool.close_stdin()
        ended = await tool.wait(60)
        assert ended.exit_code == 0, tool.text()
        response = await treq.get(f"{url}/stream/resumable")
        assert await response.content() == (
            b"line 1\nline 2, written while the server was down\nline 3\n")
        assert response.headers.getRawHeaders("x-stream-state") == ["complete"]
    finally:
        if tool.protocol.exit_code is None and tool.protocol.exit_signal is None:
            tool.signal("KILL")
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_stream_resume_waits_for_a_server_that_is_not_up_yet(tmp_path):
    """loom-stream --resume started before the server: it retries, then creates the stream
    from the first byte once the server is up."""
    port = _free_port()
    listen = f"tcp:{port}:interface=127.0.0.1"
    url = f"http://127.0.0.1:{port}"
    tool = spawn(STREAM + [url, "early-bird", "--resume"])
    server = None
    try:
        tool.write(b"written before the server started\n")
        await tool.protocol.wait_for_output("connection refused; retrying in")
        server = await start_server_process(tmp_path / "data", "--listen", listen)
        await tool.protocol.wait_for_output("stream early-bird: ", seconds=60)
        tool.write(b"and after\n")
        tool.close_stdin()
        ended = await tool.wait(60)
        assert ended.exit_code == 0, tool.text()
        response = await treq.get(f"{url}/stream/early-bird")
        assert await response.content() == b"written before the server started\nand after\n"
        assert response.headers.getRawHeaders("x-stream-state") == ["complete"]
    finally:
        if tool.protocol.exit_code is None and tool.protocol.exit_signal is None:
            tool.signal("KILL")
        if server is not None:
            await server.stop()


@pytest_twisted.ensureDeferred
async def test_sighup_reloads_tokens_without_dropping_connections(tmp_path):
    """After SIGHUP the new tokens apply; a follower connected with an old one carries on."""
    config = tmp_path / "loom.yml"
    config.write_text("tokens:\n  - sekrit-old\n")
    server = await start_server_process(tmp_path / "data", "-c", str(config))
    try:
        old = {"Authorization": "Bearer sekrit-old"}
        producer = await raw_connect(server.port)
        producer.send(b"POST /stream/hup HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sekrit-old"
                      b"\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk(b"first\n"))
        await producer.wait_for(b"201 Created")
        follower = await raw_connect(server.port)
        follower.send(b"GET /stream/hup HTTP/1.0\r\nAuthorization: Bearer sekrit-old\r\n\r\n")
        await follower.wait_for(b"first\n")
        config.write_text("tokens:\n  - sekrit-new\n  - {token: sekrit-reader, scopes: [read]}\n")
        server.process.signal("HUP")
        await server.process.protocol.wait_for_output("tokens reloaded: 2 configured")
        response = await treq.get(server.url + "/stream/hup?notail", headers=old)
        assert response.code == 401
        await response.content()
        response = await treq.get(server.url + "/stream/hup?notail",
                                  headers={"Authorization": "Bearer sekrit-reader"})
        assert response.code == 200 and await response.content() == b"first\n"
        producer.send(chunk(b"second\n") + b"0\r\n\r\n")  # the old connections go on
        await follower.closed
        assert bytes(follower.received).endswith(b"first\nsecond\n")
        config.write_text("tokens: [oops\n")
        server.process.signal("HUP")
        await server.process.protocol.wait_for_output("reload failed, keeping the current tokens")
        response = await treq.get(server.url + "/health")
        assert response.code == 200
        await response.content()
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_connections_use_tcp_keepalive(server):
    """Every connection has TCP keepalive on, so a quiet follower is not dropped as idle."""
    client = await raw_connect(server.port)
    client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await client.wait_for(b"\r\n\r\n")
    [channel] = list(server.service.site.channels)
    sock = channel.transport.getHandle()
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 60
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_client_head_list_and_delete(server):
    """LoomClient.head, list_streams and delete speak the new routes."""
    client = LoomClient(server.url)
    await client.push(body(b"abc"), "one", metadata={"team": "core"})
    await client.push(body(b"defg"), "two", metadata={"team": "web"})
    info = await client.head("two")
    assert (info.state, info.size, info.metadata) == ("complete", 4, {"team": "web"})
    listing = await client.list_streams(meta={"team": "core"})
    assert [s["id"] for s in listing["streams"]] == ["one"]
    await client.delete("one")
    with pytest.raises(StreamNotFound):
        await client.head("one")
    listing = await client.list_streams(limit=10)
    assert [s["id"] for s in listing["streams"]] == ["two"]


@pytest_twisted.ensureDeferred
async def test_a_live_stream_can_be_taken_over_by_a_resuming_producer(server):
    """An append at the exact size takes over a stream whose old producer the server still sees."""
    client = LoomClient(server.url)
    _, pushing = await open_push(client, "zombie", b"12345")
    # Once a follower from byte 4 sees the fifth byte, all five are stored.
    reader = await raw_connect(server.port)
    reader.send(b"GET /stream/zombie?offset=4 HTTP/1.0\r\n\r\n")
    await reader.wait_for(b"5")
    info = await client.head("zombie")
    assert (info.state, info.size) == ("live", 5)
    # Its producer was heard from just now: not yet (and the server says when).
    with pytest.raises(Busy) as busy:
        await client.push(body(b"678"), "zombie", append_at=5)
    assert busy.value.status == 409 and busy.value.retry_after == TAKEOVER_QUIET
    await deferLater(reactor, busy.value.retry_after, lambda: None)  # as Retry-After asks
    result = await client.push(body(b"678"), "zombie", append_at=5)
    assert result.stream_id == "zombie"
    with pytest.raises(ServerAborted):  # the old producer was cut off
        await guard(pushing)
    response = await treq.get(server.url + "/stream/zombie")
    assert await response.content() == b"12345678"
    assert response.headers.getRawHeaders("x-stream-state") == ["complete"]


@pytest_twisted.ensureDeferred
async def test_two_producers_appending_at_once_never_interleave(tmp_path):
    """Two producers append to one stream at the same offset at the same moment, 40 times:
    each time exactly one gets 200 and writes, the other gets 409 with Retry-After, and the
    stream holds the winner's bytes alone."""
    server = await start_server(tmp_path / "data")
    try:
        spy = await raw_connect(server.port)  # its END lines say when a stream has ended
        spy.send(b"GET /spy HTTP/1.0\r\n\r\n")
        await spy.wait_for(b"\r\n\r\n")
        for round_ in range(40):
            stream_id = b"race-%d" % round_
            producer = await start_producer(server.port, stream_id, b"base\n")
            await spy.wait_for(stream_id + b" | base\n")
            producer.transport.abortConnection()  # dropped: the stream becomes aborted
            await spy.wait_for(b"END " + stream_id + b" aborted 5")
            racers = [await raw_connect(server.port) for _ in range(2)]
            for racer, payload in zip(racers, (b"AAAA", b"BBBB")):
                racer.transport.write(
                    b"POST /stream/" + stream_id + b"?append=true HTTP/1.1\r\nHost: x\r\n"
                    b"X-Stream-Offset: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                    + chunk(payload * 64) + b"0\r\n\r\n")
            answers = await gatherResults([r.wait_for(b"\r\n\r\n") for r in racers])
            statuses = [int(answer.split()[1]) for answer in answers]
            assert sorted(statuses) == [200, 409], (round_, answers)
            assert b"Retry-After: 1" in answers[statuses.index(409)]
            winner = racers[statuses.index(200)]
            await winner.wait_for(lambda got: got.endswith(b"\r\n0\r\n\r\n"))  # complete
            response = await treq.get(f"{server.url}/stream/{stream_id.decode()}")
            stored = await response.content()
            assert stored in (b"base\n" + b"AAAA" * 64, b"base\n" + b"BBBB" * 64), round_
            assert response.headers.getRawHeaders("x-stream-state") == ["complete"]
            for racer in racers:
                racer.transport.loseConnection()
        spy.transport.loseConnection()
    finally:
        await server.service.stopService()
