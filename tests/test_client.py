"""loom.client against a real server on loopback."""

import json

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Factory
from twisted.internet.ssl import Certificate

from loom.client import (
    CannotConnect,
    LoomClient,
    RequestFailed,
    ServerAborted,
    StreamExists,
    StreamNotFound,
    Unauthorized,
)
from tests.helpers import (
    body,
    chunk,
    ControlledBody,
    ErrorPage,
    guard,
    make_tls_files,
    open_push,
    start_producer,
    start_server,
)


@pytest_twisted.ensureDeferred
async def test_push_reports_creation_before_the_body_ends(server):
    """on_created fires with the id while the body is still open; push returns at the end."""
    client = LoomClient(server.url)
    source = ControlledBody()
    created = Deferred()
    pushed = Deferred.fromCoroutine(
        client.push(source, "early", metadata={"k": "v"}, on_created=created.callback)
    )
    info = await guard(created)
    assert info.stream_id == "early" and not info.replaced
    assert info.url == server.url + "/stream/early"
    assert not pushed.called
    await guard(source.started)
    source.write(b"part one, ")
    source.write(b"part two")
    source.end()
    result = await guard(pushed)
    assert (result.stream_id, result.bytes_sent) == ("early", 18)
    response = await treq.get(server.url + "/stream/early")
    assert await response.content() == b"part one, part two"
    assert response.headers.getRawHeaders("x-stream-metadata") == ['{"k":"v"}']


@pytest_twisted.ensureDeferred
async def test_push_with_generated_id_and_force(server):
    """Without an id the server's id is returned; force replaces and says so."""
    client = LoomClient(server.url)
    result = await client.push(body(b"generated"))
    assert result.stream_id.startswith("loom-")
    await client.push(body(b"one"), "forced")
    with pytest.raises(StreamExists, match="^stream forced already exists$"):
        await client.push(body(b"two"), "forced")
    replaced = await client.push(body(b"three"), "forced", force=True)
    assert replaced.replaced


@pytest_twisted.ensureDeferred
async def test_follow_hands_over_chunks_as_they_arrive(server):
    """follow() passes each chunk to the callback as it arrives and reports the end."""
    producer = await start_producer(server.port, b"f", b"first\n")
    received, first = [], Deferred()

    def callback(data):
        received.append(data)
        if not first.called:
            first.callback(None)

    client = LoomClient(server.url)
    following = Deferred.fromCoroutine(client.follow("f", callback))
    await guard(first)
    producer.send(chunk(b"second\n") + b"0\r\n\r\n")
    result = await guard(following)
    assert b"".join(received) == b"first\nsecond\n"
    assert (result.state, result.bytes_received) == ("complete", 13)
    notail = []
    result = await client.follow("f", notail.append, notail=True)
    assert b"".join(notail) == b"first\nsecond\n" and result.state == "complete"
    producer.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_follow_raises_when_the_producer_vanishes(server):
    """A stream that ends uncleanly makes follow() raise ServerAborted."""
    producer = await start_producer(server.port, b"v", b"data")
    got_data = Deferred()
    client = LoomClient(server.url)
    following = Deferred.fromCoroutine(
        client.follow("v", lambda d: got_data.called or got_data.callback(None)))
    await guard(got_data)
    producer.transport.abortConnection()
    with pytest.raises(ServerAborted):
        await guard(following)


@pytest_twisted.ensureDeferred
async def test_push_raises_when_the_server_cuts_the_stream(server):
    """A push whose stream is replaced by someone else raises ServerAborted."""
    client = LoomClient(server.url)
    _, pushed = await open_push(client, "cut", b"doomed")
    await client.push(body(b"winner"), "cut", force=True)
    with pytest.raises(ServerAborted, match="server aborted the stream"):
        await guard(pushed)


@pytest_twisted.ensureDeferred
async def test_clear_errors(server, tmp_path):
    """401, 404, 409 and refused connections become distinct, readable exceptions."""
    secured = await start_server(tmp_path / "secured", tokens=("sekrit-right",))
    try:
        with pytest.raises(Unauthorized, match="unauthorized"):
            await LoomClient(secured.url, token="wrong").push(body(b"x"), "a")
        with pytest.raises(Unauthorized):
            await LoomClient(secured.url).follow("a", lambda d: None)
        result = await LoomClient(secured.url, token="sekrit-right").push(body(b"ok"), "a")
        assert result.bytes_sent == 2
    finally:
        await secured.service.stopService()
    with pytest.raises(StreamNotFound, match="stream nope does not exist"):
        await LoomClient(server.url).follow("nope", lambda d: None)
    port = server.port
    await server.service.stopService()
    with pytest.raises(CannotConnect, match="connection refused"):
        await LoomClient(f"http://127.0.0.1:{port}").push(body(b"x"), "a")
    with pytest.raises(CannotConnect, match="connection refused"):
        await LoomClient(f"http://127.0.0.1:{port}").follow("a", lambda d: None)


@pytest_twisted.ensureDeferred
async def test_push_and_follow_over_tls(tmp_path):
    """Push and follow work over https with the server's certificate trusted."""
    key, cert = make_tls_files(tmp_path)
    from loom.config import Config
    from loom.service import LoomService

    config = Config(listen=(f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}",),
                    data_dir=str(tmp_path / "data"))
    service = LoomService(config, reactor)
    service.startService()
    try:
        port = service.ports[0].getHost().port
        with open(cert, "rb") as f:
            trust = Certificate.loadPEM(f.read())
        client = LoomClient(f"https://localhost:{port}", trust_root=trust)
        result = await client.push(body(b"secret over tls"), "tls")
        assert result.bytes_sent == 15
        received = []
        await client.follow("tls", received.append)
        assert b"".join(received) == b"secret over tls"
        with pytest.raises(CannotConnect):
            await LoomClient(f"https://localhost:{port}").push(body(b"x"), "untrusted")
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_spy_streams_into_a_callback(server):
    """spy() hands /spy's lines to a callback as streams appear."""
    client = LoomClient(server.url)
    seen = bytearray()
    done = Deferred()
    connected = Deferred()

    def callback(data):
        seen.extend(data)
        if b"END s complete" in seen and not done.called:
            done.callback(None)

    spying = Deferred.fromCoroutine(
        client.spy(callback, on_connected=lambda: connected.callback(None)))
    await guard(connected)
    await client.push(body(b"hello\n"), "s")
    await guard(done)
    assert bytes(seen) == b"START s {}\ns | hello\nEND s complete 6\n"
    spying.cancel()
    with pytest.raises(CancelledError):
        await spying


@pytest_twisted.ensureDeferred
async def test_the_largest_metadata_loom_accepts_its_own_client_reads_back(tmp_path):
    """Metadata at the highest maxMetadataBytes, all escaped non-ASCII, is read back whole
    by Loom's client (HEAD and GET), within the 16 KiB header lines it can parse."""
    from loom.config import MAX_METADATA_LIMIT

    server = await start_server(tmp_path / "data", max_metadata_bytes=MAX_METADATA_LIMIT)
    try:
        client = LoomClient(server.url)
        metadata = {"who": "\u00e9" * ((MAX_METADATA_LIMIT - 12) // 6)}
        assert len(json.dumps(metadata, separators=(",", ":"))) <= MAX_METADATA_LIMIT
        await client.push(body(b"x"), "meta", metadata=metadata)
        assert (await client.head("meta")).metadata == metadata
        assert (await client.follow("meta", lambda data: None)).metadata == metadata
        with pytest.raises(RequestFailed) as refused:  # one character more: refused
            await client.push(body(b"x"), "more", metadata={"who": metadata["who"] + "\u00e9"})
        assert refused.value.status == 413
    finally:
        await server.service.stopService()


@pytest_twisted.ensureDeferred
async def test_errors_never_mention_command_line_options(tmp_path):
    """The library's messages speak of the server and the stream, never of a tool's options
    (--force, --token, ...): they are for any program."""
    secured = await start_server(tmp_path / "data", tokens=("sekrit-all",))
    try:
        client = LoomClient(secured.url, token="sekrit-all")
        await client.push(body(b"abc"), "taken")
        failures = []
        for attempt in (lambda: client.push(body(b"x"), "taken"),
                        lambda: LoomClient(secured.url, token="sekrit-no").push(body(b"x"), "y"),
                        lambda: client.push(body(b"x"), "taken", append_at=1),
                        lambda: client.follow("missing", lambda data: None)):
            with pytest.raises(Exception) as failure:
                await attempt()
            failures.append(str(failure.value))
        assert failures == ["stream taken already exists", "unauthorized",
                            "server answered 409: Stream taken is complete: only an aborted "
                            "or interrupted stream can be appended to.",
                            "stream missing does not exist"]
        assert not [message for message in failures if "--" in message]
    finally:
        await secured.service.stopService()


@pytest_twisted.ensureDeferred
async def test_an_untrusted_or_misnamed_certificate_is_its_own_error(tmp_path):
    """A certificate that is not trusted, or not valid for the host's name, is
    UntrustedCertificate (not worth retrying), for pushing and for reading alike."""
    from loom.client import UntrustedCertificate

    key, cert = make_tls_files(tmp_path, with_ip=False)  # valid for localhost only
    from loom.config import Config
    from loom.service import LoomService

    service = LoomService(Config(
        listen=(f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}",),
        data_dir=str(tmp_path / "data")), reactor)
    service.startService()
    try:
        port = service.ports[0].getHost().port
        with open(cert, "rb") as f:
            trust = Certificate.loadPEM(f.read())
        for client, message in [
            (LoomClient(f"https://localhost:{port}"),
             f"the TLS certificate of localhost:{port} is not trusted (certificate verify "
             "failed)"),
            (LoomClient(f"https://127.0.0.1:{port}", trust_root=trust),
             f"the TLS certificate of 127.0.0.1:{port} is not valid for that name"),
        ]:
            for attempt in (lambda: client.push(body(b"x"), "tls"),
                            lambda: client.follow("tls", lambda data: None)):
                with pytest.raises(UntrustedCertificate) as failure:
                    await attempt()
                assert str(failure.value) == message
                assert isinstance(failure.value, CannotConnect)
                assert not failure.value.retryable
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_proxys_error_page_is_summarised_in_one_line():
    """An HTML error page from a proxy becomes RequestFailed with one line (status and
    proxy, no HTML), marked as not from Loom; a 502 is retryable."""
    port = reactor.listenTCP(0, Factory.forProtocol(ErrorPage), interface="127.0.0.1")
    try:
        client = LoomClient(f"http://127.0.0.1:{port.getHost().port}")
        for attempt in (lambda: client.push(body(b"x"), "p"),
                        lambda: client.follow("p", lambda data: None),
                        lambda: client.spy(lambda data: None)):
            with pytest.raises(RequestFailed) as failure:
                await attempt()
            assert str(failure.value) == (
                "502 Bad Gateway from the proxy nginx/1.25.3, not from Loom")
            assert failure.value.status == 502 and not failure.value.from_loom
            assert failure.value.retryable
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_an_upload_notices_a_vanished_server(server):
    """A push's connection has TCP keepalive and a two-minute limit on unacknowledged data,
    so a black-holed network ends it (and a resume can follow) instead of hanging."""
    import socket

    from twisted.internet import tcp

    client = LoomClient(server.url)
    source, pushing = await open_push(client, "watched", b"x")
    [channel] = list(server.service.site.channels)
    client_port = channel.transport.getPeer().port
    [upload] = [reader for reader in reactor.getReaders()
                if isinstance(reader, tcp.Client) and reader.getHost().port == client_port]
    sock = upload.getHandle()
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 60
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 120_000
    source.end()
    await guard(pushing)
