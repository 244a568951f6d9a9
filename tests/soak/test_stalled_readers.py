"""1,000 readers that stop reading while a producer writes: what each costs the server."""

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol

from tests.helpers import (
    DIRECT_SEND,
    ChunkPump,
    child_environment,
    dechunk,
    guard,
    parse_response,
    start_producer,
    start_server_process,
)

KiB, MiB = 1024, 1024 * 1024
READERS = 1000
SPIES = 10  # of the readers, /spy clients; the others follow the stream
SAMPLE = 20  # stalled followers that read again, and must get every byte
LINES = 32 * 1024
# 3.2 MiB: far more than a reader's kernel buffers hold (readerSendBuffer, 256 KiB,
# doubled by Linux, and the client's receive buffer), and less than a spy's max lag.
PAYLOAD = b"".join(b"%07d %s\n" % (index, b"x" * 91) for index in range(LINES))
STREAM = b"soak"

# The server's settings, as twistd's environment: the one place to extend them.
SERVER_SETTINGS = {
    # Every reader here comes from 127.0.0.1. The per-client connection cap is being
    # added elsewhere; until it lands the server only warns that it does not know it.
    "LOOM_MAX_CONNECTIONS_PER_CLIENT": str(2 * READERS),
}


class Reader(Protocol):
    """Sends one request, then takes what comes, until the test stops it reading."""

    def __init__(self, request: bytes):
        self.request = request
        self.received = bytearray()
        self.head = guard(Deferred())
        self._end_marker = None
        self._ended = None

    def connectionMade(self):
        self.transport.write(self.request)

    def dataReceived(self, data: bytes):
        self.received += data
        if not self.head.called and b"\r\n\r\n" in self.received:
            self.head.callback(self)
        if self._ended is not None and self.received.endswith(self._end_marker):
            ended, self._ended = self._ended, None
            ended.callback(self)

    def read_until(self, marker: bytes, seconds: float) -> Deferred:
        """Read again; fire once what was received ends with ``marker``."""
        self._end_marker, self._ended = marker, guard(Deferred(), seconds)
        self.transport.resumeProducing()
        return self._ended


class Counter(Protocol):
    """An HTTP/1.0 follower that reads everything; ``done`` fires when the server closed the
    response after ``total`` body bytes (the stream ended), with the body's length."""

    def __init__(self, total: int):
        self.left = total
        self.head = bytearray()
        self.done = guard(Deferred(), 60)

    def connectionMade(self):
        self.transport.write(b"GET /stream/" + STREAM + b" HTTP/1.0\r\n\r\n")

    def dataReceived(self, data: bytes):
        if self.head is not None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            data, self.head = bytes(self.head[end + 4:]), None
        self.left -= len(data)

    def connectionLost(self, reason):
        self.done.callback(-self.left if self.head is None else None)


def connect(port: int, protocol: Protocol) -> Deferred:
    return connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), protocol)


async def readers_served(port: int) -> int:
    """Followers and /spy clients the server is serving now (from /metrics)."""
    reader = await connect(port, Reader(b"GET /metrics HTTP/1.0\r\n\r\n"))
    await guard(reader.head)
    reader.transport.loseConnection()
    await guard(closed(reader))
    served = 0
    for line in reader.received.decode().splitlines():
        if line.startswith(("loom_followers ", "loom_spy_clients ")):
            served += int(float(line.split()[1]))
    return served


def closed(protocol: Protocol) -> Deferred:
    d = Deferred()
    lost = protocol.connectionLost

    def connection_lost(reason):
        lost(reason)
        d.callback(None)

    protocol.connectionLost = connection_lost
    if protocol.transport is None or not protocol.transport.connected:
        d.callback(None)
    return d


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_1000_stalled_readers_cost_a_few_kib_each_and_give_it_back(tmp_path):
    """1,000 stalled readers cost < 8 KiB each beyond an idle reader (< 32 KiB in all),
    readers that read again get every byte, and the memory comes back when they leave."""
    server = await start_server_process(tmp_path / "data",
                                        env=child_environment(**SERVER_SETTINGS))
    try:
        producer = await start_producer(server.port, STREAM)
        before = server.rss_kib()
        readers = []
        for start in range(0, READERS, 100):
            batch = []
            for index in range(start, min(start + 100, READERS)):
                target = b"/spy" if index < SPIES else b"/stream/" + STREAM
                batch.append(connect(server.port, Reader(
                    b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")))
            for reader in await gatherResults(batch):
                await reader.head
                reader.transport.pauseProducing()  # from now on it reads nothing
                readers.append(reader)
        idle = server.rss_kib()

        counter = await connect(server.port, Counter(len(PAYLOAD)))
        stream = iter(PAYLOAD[i:i + 64 * KiB] for i in range(0, len(PAYLOAD), 64 * KiB))
        pump = ChunkPump(producer, len(PAYLOAD), lambda: next(stream))
        pump.start()
        await pump.finished
        # The whole stream reached a reader that reads, and its response ended (so it is
        # no longer served); the server hands each append to every reader before it reads
        # on, so every stalled reader was offered it all, and is still being served.
        assert await counter.done == 0
        assert await readers_served(server.port) == READERS
        stalled = server.rss_kib()
        peak = server.peak_rss_kib()

        # Some read again: byte-exact, then a clean end (followers) or the END line (spy).
        await guard(producer.wait_for(b"0\r\n\r\n"), 60)  # the stream is complete
        sample = readers[:SPIES] + readers[SPIES:SPIES + SAMPLE]
        spy_end = b"END %s complete %d\n\r\n" % (STREAM, len(PAYLOAD))  # and the chunk's CRLF
        await gatherResults([
            reader.read_until(spy_end if index < SPIES else b"\r\n0\r\n\r\n", 120)
            for index, reader in enumerate(sample)
        ])
        shown = [f"{STREAM.decode()} | {line.decode()}" for line in PAYLOAD.splitlines()]
        for reader in sample[:SPIES]:
            text = dechunk(parse_response(bytes(reader.received))[2])[0].decode()
            assert [line for line in text.splitlines() if " | " in line] == shown
        for reader in sample[SPIES:]:
            assert dechunk(parse_response(bytes(reader.received))[2]) == (PAYLOAD, True)

        for reader in readers:
            reader.transport.abortConnection()
        producer.transport.loseConnection()
        for _ in range(1000):
            if await readers_served(server.port) == 0:
                break
        else:
            raise AssertionError("the server still serves readers that left")
        after = server.rss_kib()
    finally:
        await server.stop()

    per_reader = (stalled - before) / READERS
    beyond_idle = (stalled - idle) / READERS
    print(f"{READERS} stalled readers: {per_reader:.1f} KiB each "
          f"({(idle - before) / READERS:.1f} idle + {beyond_idle:.1f} stalled); "
          f"+{(stalled - before) / KiB:.1f} MiB while stalled (peak +{(peak - before) / KiB:.1f}),"
          f" +{(after - before) / KiB:.1f} MiB after they left")
    if not DIRECT_SEND:
        # directSend off: each stalled reader's transport holds what Twisted buffers before
        # it pauses the follower (64 KiB) and one slice (16 KiB) more, as over TLS; and
        # the C library keeps the freed buffers (measured: +85 KiB per reader, +92 MiB
        # kept after the thousand left). That is the price of the mode, documented.
        assert beyond_idle < 64 + 16 + 8
        return
    assert beyond_idle < 8
    assert per_reader < 32
    # What stalling cost is given back; CPython keeps the arenas that held the readers'
    # objects for reuse, as it does after as many idle readers.
    assert after - idle < 4 * KiB
