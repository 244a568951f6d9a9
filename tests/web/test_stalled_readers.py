"""Readers that stop reading: what the server holds for them, and what they get afterwards.

A real loopback TCP socket carries the response, but no reactor runs: the test
does what the reactor would (``doWrite`` when the socket is writable), so every
step is deterministic and visible.
"""

import random
import select
import socket
from types import SimpleNamespace

import pytest
from twisted.internet import tcp
from twisted.internet.testing import MemoryReactorClock

from loom.web.channel import SLICE as _SLICE
from tests.helpers import (
    chunk,
    dechunk,
    fake_get,
    fake_produce,
    FakeTCPTransport,
    make_fake_site,
    parse_response,
)

# All the server may queue in user space for a stalled reader of a chunked response:
# the rest of a chunk's head ("%x\r\n") or of the CRLF that ends a chunk.
FRAMING = 12
GUARD_SECONDS = 10.0


@pytest.fixture(params=[True, False], ids=["direct-send", "no-direct-send"])
def fake(tmp_path, request):
    """A site with the direct send on (the default) and off: each promise below is checked
    both ways, with the bound each way has (see ``held_back``)."""
    return make_fake_site(data_dir=str(tmp_path), direct_send=request.param)


def held_back(fake, transport) -> int:
    """The most the server may queue in user space for a stalled reader: only framing when
    it sends to the socket directly; else what Twisted's transport buffers before pausing
    the follower (its buffer size), one slice more, and framing (the TLS fallback)."""
    if fake.site.direct_send:
        return FRAMING
    return transport.bufferSize + _SLICE + FRAMING


def tcp_reader(fake):
    """A channel on the server end of a real loopback TCP connection, its transport on a
    fake reactor: (client socket, channel, transport, reactor). The client's receive
    buffer is small, so that the server's side fills quickly."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(listener.getsockname())
    server_socket, address = listener.accept()
    client.setblocking(False)
    server_socket.setblocking(False)
    reactor = MemoryReactorClock()
    channel = fake.site.buildProtocol(address)
    port = SimpleNamespace(_realPortNumber=listener.getsockname()[1])  # for its repr
    transport = tcp.Server(server_socket, channel, address, port, 1, reactor)
    channel.makeConnection(transport)
    listener.close()
    return client, channel, transport, reactor


def queued(transport) -> int:
    """Bytes waiting in the transport's user-space buffer."""
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


def run_writes(transport, reactor) -> None:
    """What the reactor does for a transport waiting to write, while its socket is writable."""
    poller = select.poll()  # not select(): a long run may hold descriptors above 1023
    poller.register(transport.socket, select.POLLOUT)
    while transport in reactor.getWriters() and poller.poll(0):
        transport.doWrite()


def read_available(client, into: bytearray) -> None:
    while True:
        try:
            data = client.recv(65536)
        except BlockingIOError:
            return
        assert data, "the server closed the connection"
        into += data


@pytest.mark.parametrize("direct_send", [True, False])
def test_the_direct_send_can_be_switched_off(tmp_path, direct_send):
    """With the direct send on, a follower's bytes go to the socket as they are handed over;
    off (directSend: false), they wait in Twisted's transport for the reactor's next write."""
    fake = make_fake_site(data_dir=str(tmp_path), direct_send=direct_send)
    producer, _ = fake_produce(fake, end=False)
    client, channel, transport, reactor = tcp_reader(fake)
    channel.dataReceived(b"GET /stream/s1 HTTP/1.1\r\nHost: x\r\n\r\n")
    run_writes(transport, reactor)  # the response's head
    received = bytearray()
    read_available(client, received)
    producer.dataReceived(chunk(b"a line\n"))
    if direct_send:
        assert queued(transport) == 0 and transport not in reactor.getWriters()
    else:
        assert queued(transport) > 0 and transport in reactor.getWriters()
        run_writes(transport, reactor)
    poller = select.poll()
    poller.register(client, select.POLLIN)
    assert poller.poll(GUARD_SECONDS * 1000)
    read_available(client, received)
    assert received.endswith(b"\r\na line\n\r\n")
    client.close()


def test_a_reader_whose_socket_is_full_is_handed_no_stream_bytes(fake):
    """While a reader's socket takes nothing, its follower waits, paused, at its offset: the
    transport holds no stream bytes (with the direct send; without it, at most its own
    buffer and a slice), however much the stream grows."""
    producer, _ = fake_produce(fake, end=False)
    client, channel, transport, reactor = tcp_reader(fake)
    channel.dataReceived(b"GET /stream/s1 HTTP/1.1\r\nHost: x\r\n\r\n")
    follower = channel._requestProducer
    rng = random.Random(1)
    for _ in range(40):
        producer.dataReceived(chunk(rng.randbytes(65536)))
        run_writes(transport, reactor)
    assert follower.offset < 40 * 65536  # the socket is full: the reader stalled
    assert queued(transport) <= held_back(fake, transport)
    assert transport in reactor.getWriters()  # waiting for the socket, not for more data
    producer.dataReceived(chunk(b"more"))
    assert queued(transport) <= held_back(fake, transport)
    client.close()


def test_a_stalled_reader_that_reads_again_gets_every_byte_in_order(fake):
    """A reader stalled again and again, with chunks cut anywhere by a full socket, gets
    exactly the stream and a clean end; nothing but framing is ever queued for it."""
    producer, _ = fake_produce(fake, end=False)
    client, channel, transport, reactor = tcp_reader(fake)
    channel.dataReceived(b"GET /stream/s1 HTTP/1.1\r\nHost: x\r\n\r\n")
    rng = random.Random(2)
    sent, received = bytearray(), bytearray()
    for index in range(300):
        piece = rng.randbytes(rng.choice((1, 100, 4000, 70000)))
        producer.dataReceived(chunk(piece))
        sent += piece
        run_writes(transport, reactor)
        assert queued(transport) <= held_back(fake, transport)
        if index % 30 == 29:
            read_available(client, received)  # the reader takes a little now and then
            run_writes(transport, reactor)
    producer.dataReceived(b"0\r\n\r\n")
    poller = select.poll()
    poller.register(client, select.POLLIN)
    poller.register(transport.socket, select.POLLOUT)
    while not received.endswith(b"\r\n0\r\n\r\n"):
        ready = poller.poll(GUARD_SECONDS * 1000)
        assert ready, "neither readable nor writable: the response is stuck"
        read_available(client, received)
        run_writes(transport, reactor)
        assert queued(transport) <= held_back(fake, transport)
    status, _, body = parse_response(bytes(received))
    assert status == 200 and dechunk(body) == (bytes(sent), True)
    client.close()


class _WireRecorder:
    """Stands in for a channel's sending: takes at most ``budget`` bytes (None: all)."""

    def __init__(self, budget):
        self.budget = budget
        self.wire = bytearray()

    def send_some(self, parts, size):
        data = b"".join(bytes(part) for part in parts)
        assert len(data) == size
        take = size if self.budget is None else min(size, self.budget)
        if self.budget is not None:
            self.budget -= take
        self.wire += data[:take]
        return take

    def write_framing(self, data):
        self.wire += data


def _cuts(size: int) -> list[int]:
    head = len(b"%x\r\n" % size)
    wire = head + size + 2
    return sorted({0, *range(1, head + 1), head + 1, head + size // 2, head + size - 1,
                   head + size, head + size + 1, wire})


@pytest.mark.parametrize("size, cut", [(size, cut) for size in (5, 20000) for cut in _cuts(size)])
@pytest.mark.parametrize("rest_in", [None, 7])
def test_a_chunk_cut_anywhere_is_completed_before_anything_else(fake, size, cut, rest_in):
    """Wherever the connection cuts a response chunk (in its head, payload or CRLF), the
    rest is sent first when offered again, at once or in pieces: the wire decodes exactly."""
    fake_produce(fake, end=False)
    channel, _ = fake_get(fake)
    request = channel.requests[0]
    recorder = _WireRecorder(cut)
    channel.send_some, channel.write_framing = recorder.send_some, recorder.write_framing
    rng = random.Random(size * 1000 + cut)
    data = rng.randbytes(size) + rng.randbytes(300)
    offset = request.write_body([data[:size]], size)
    recorder.budget = None
    while offset < len(data):
        end = len(data) if rest_in is None else min(len(data), offset + rest_in)
        offset += request.write_body([memoryview(data)[offset:end]], end - offset)
    assert dechunk(bytes(recorder.wire)) == (data, False)


class PausingTransport(FakeTCPTransport):
    """A transport that is not plain TCP (TLS, say): it takes every write and, as Twisted's
    transports do, pauses its producer once more than 64 KiB wait in its buffer."""

    paused = False

    def write(self, data):
        super().write(data)
        if len(self.value()) > 65536 and not self.paused:
            self.paused = True
            self.producer.pauseProducing()

    def writeSequence(self, data):
        self.write(b"".join(data))

    def drain(self) -> bytes:
        """The client reads everything; the transport resumes its producer."""
        data = self.value()
        self.clear()
        if self.paused:
            self.paused = False
            self.producer.resumeProducing()
        return data


def test_a_transport_that_is_not_plain_tcp_holds_one_slice_past_its_pause_threshold(fake):
    """Over TLS and the like, a stalled reader's transport holds at most its 64 KiB threshold
    and one slice more; once the reader reads again it gets the whole stream."""
    data = random.Random(3).randbytes(1024 * 1024)
    producer, _ = fake_produce(fake, data=data, end=False)
    transport = PausingTransport()
    fake_get(fake, transport=transport)
    head = transport.value().index(b"\r\n\r\n") + 4
    assert transport.paused and len(transport.value()) - head <= 65536 + _SLICE + FRAMING
    received = bytearray(transport.drain())
    producer.dataReceived(b"0\r\n\r\n")
    for _ in range(1000):
        if received.endswith(b"\r\n0\r\n\r\n"):
            break
        assert len(transport.value()) <= 65536 + _SLICE + FRAMING
        received += transport.drain()
    assert dechunk(parse_response(bytes(received))[2]) == (data, True)
