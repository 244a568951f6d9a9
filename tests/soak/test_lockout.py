"""Nobody locks everyone out: hostile and heavy clients against a real ``twistd loom``.

Each test is bounded in time (well under a minute) and prints what it measured.
"""

from __future__ import annotations

import sys
import time

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import LoopingCall

from tests.helpers import (
    RawClient,
    chunk,
    raw_connect,
    spawn,
    start_producer,
    start_server_process,
)

pytestmark = pytest.mark.slow


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


async def health_latencies(port: int, seconds: float) -> list[float]:
    """/health asked again and again on one keep-alive connection, each as soon as the last
    was answered, for ``seconds``: the latencies in ms."""
    probe = await raw_connect(port)
    latencies = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        answered = len(probe.received)
        started = time.monotonic()
        probe.send(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        await probe.wait_for(lambda got, seen=answered: got.count(b"}\n", seen) >= 1)
        latencies.append((time.monotonic() - started) * 1000)
        del probe.received[:]
    probe.transport.loseConnection()
    return latencies


@pytest_twisted.ensureDeferred
async def test_bodies_trickled_on_gets_hold_no_connection(tmp_path):
    """A thousand unauthenticated GETs that trickle a body fill every connection slot only
    for as long as it takes to refuse them: each is answered at once and closed, and a
    client with a token is served while they keep trickling."""
    server = await start_server_process(tmp_path / "data", "-c", str(_tokens(tmp_path)),
                                        env=_env(LOOM_MAX_CONNECTIONS="1000",
                                                 LOOM_MAX_CONNECTIONS_PER_CLIENT="0"))
    try:
        started = time.monotonic()
        attackers = []
        for _ in range(1000):
            attacker = await raw_connect(server.port)
            attacker.send(b"GET /stream/x HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
            attackers.append(attacker)
        answers = await gatherResults([a.wait_for(b"\r\n\r\n") for a in attackers])
        assert all(answer.split()[1] in (b"400", b"401") for answer in answers)
        trickle = LoopingCall(lambda: [a.transport.write(b"x") for a in attackers
                                       if a.transport.connected])
        trickle.start(0.1)
        try:
            await gatherResults([a.closed for a in attackers])  # the server closes them all
            closed_after = time.monotonic() - started
            client = await raw_connect(server.port)
            client.send(b"GET /streams HTTP/1.1\r\nHost: x\r\n"
                        b"Authorization: Bearer sekrit-lockout\r\n\r\n")
            assert (await client.wait_for(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        finally:
            trickle.stop()
        print(f"\n1,000 trickling GETs answered and closed {closed_after:.2f} s after the first")
        assert closed_after < 20
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_one_address_cannot_fill_the_server(tmp_path):
    """Past maxConnectionsPerClient one address is refused with 503 while another is served."""
    server = await start_server_process(tmp_path / "data", env=_env(
        LOOM_MAX_CONNECTIONS="300", LOOM_MAX_CONNECTIONS_PER_CLIENT="100"))
    try:
        greedy = [await raw_connect(server.port) for _ in range(150)]
        await gatherResults([c.wait_for(b"\r\n\r\n") for c in greedy[100:]])
        assert all(c.received.startswith(b"HTTP/1.1 503") for c in greedy[100:])
        other = RawClient()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", server.port,
                                      bindAddress=("127.0.0.2", 0))
        await connectProtocol(endpoint, other)
        other.send(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await other.wait_for(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        assert not any(c.received for c in greedy[:100])  # held, not refused
        for client in greedy:
            client.transport.abortConnection()
        other.transport.loseConnection()
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_progress_bars_and_spies_leave_health_answering_fast(tmp_path):
    """600 live streams redrawing progress bars four times a second, watched by 10 /spy
    clients: /health still answers in milliseconds."""
    server = await start_server_process(tmp_path / "data",
                                        env=_env(LOOM_MAX_CONNECTIONS_PER_CLIENT="0"))
    try:
        producers = [await start_producer(server.port, b"bar-%d" % i) for i in range(600)]
        spies = []
        for _ in range(10):
            spy = await raw_connect(server.port)
            spy.send(b"GET /spy HTTP/1.1\r\nHost: x\r\n\r\n")
            spy.dataReceived = lambda data: None  # read and drop
            spies.append(spy)
        step = [0]

        def redraw():
            step[0] += 1
            bar = b"\r[%-20s] %3d%%" % (b"#" * (step[0] % 21), step[0] % 100)
            for producer in producers:
                producer.transport.write(chunk(bar))

        load = LoopingCall(redraw)
        load.start(0.25)
        try:
            latencies = await health_latencies(server.port, 6.0)
        finally:
            load.stop()
        p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
        print(f"\n600 progress bars x 10 spies: /health p50 {p50:.1f} ms, p99 {p99:.1f} ms "
              f"over {len(latencies)} requests")
        assert p50 < 20 and p99 < 300
        for client in producers + spies:
            client.transport.abortConnection()
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_a_producer_of_one_byte_chunks_leaves_health_answering_fast(tmp_path):
    """A producer sending one-byte chunks as fast as it can (another process, its own
    core): /health answers within tens of milliseconds, and the stream keeps every byte."""
    server = await start_server_process(tmp_path / "data")
    blaster = spawn([sys.executable, "-c", BLASTER, str(server.port)])
    try:
        await blaster.protocol.wait_for_output("blasting")
        follower = await raw_connect(server.port)
        follower.send(b"GET /stream/bytes HTTP/1.1\r\nHost: x\r\n\r\n")
        await follower.wait_for(b"\r\n\r\n")
        latencies = await health_latencies(server.port, 6.0)
        p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
        blaster.close_stdin()  # it ends the stream cleanly and prints what it sent
        sent = int((await blaster.protocol.wait_for_output(r"sent (\d+)")).group(1))
        await blaster.wait()
        await follower.wait_for(lambda got: got.endswith(b"\r\n0\r\n\r\n"))
        print(f"\none-byte chunks flat out ({sent} in 6 s): /health p50 {p50:.1f} ms, "
              f"p99 {p99:.1f} ms over {len(latencies)} requests")
        assert p99 < 80
        body = bytes(follower.received).partition(b"\r\n\r\n")[2]
        assert _dechunked_size(body) == sent
        follower.transport.loseConnection()
    finally:
        await server.stop()


BLASTER = """
import socket, sys, threading
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"POST /stream/bytes HTTP/1.1\\r\\nHost: x\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\n")
assert s.recv(1000).startswith(b"HTTP/1.1 201")
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
print("blasting", flush=True)
sent = 0
while not stop.is_set():
    s.sendall(b"1\\r\\nx\\r\\n" * 16)
    sent += 16
s.sendall(b"0\\r\\n\\r\\n")
print("sent", sent, flush=True)
while not s.recv(65536).endswith(b"0\\r\\n\\r\\n"):
    pass
"""


def _dechunked_size(body: bytes) -> int:
    size, position = 0, 0
    while True:
        line_end = body.index(b"\r\n", position)
        length = int(body[position:line_end], 16)
        if length == 0:
            return size
        size += length
        position = line_end + 2 + length + 2


def _tokens(tmp_path):
    path = tmp_path / "tokens.yml"
    path.write_text("tokens:\n  - sekrit-lockout\n")
    return path


def _env(**settings):
    from tests.helpers import child_environment

    return child_environment(**settings)

