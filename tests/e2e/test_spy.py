"""/spy on a real server: headers at once, nothing left behind, bounded memory."""

import os
import re

import pytest_twisted
import treq
from twisted.internet.defer import gatherResults

from tests.helpers import (
    ChunkPump,
    chunk,
    raw_connect,
    start_producer,
    start_server_process,
)

MiB = 1024 * 1024


@pytest_twisted.ensureDeferred
async def test_spy_sends_its_headers_before_any_stream_exists(server):
    """GET /spy answers at once even when no stream is active (the original hung)."""
    client = await raw_connect(server.port)
    client.send(b"GET /spy HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await client.wait_for(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Content-Type: text/plain; charset=utf-8\r\n" in head
    client.transport.loseConnection()


def _open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest_twisted.ensureDeferred
async def test_200_spy_clients_leave_nothing_behind(server):
    """200 spy clients come and go: zero observers, listeners, timers or files remain."""
    store = server.service.store
    producer = await start_producer(server.port, b"busy", b"held partial line")
    stream = store.live_streams()[0]
    files_before = _open_files()
    clients = []
    for _ in range(200):
        client = await raw_connect(server.port)
        client.send(b"GET /spy HTTP/1.1\r\nHost: x\r\n\r\n")
        clients.append(client)
    await gatherResults([c.wait_for(b"START busy") for c in clients])
    assert store.observer_count == 200 and stream.listener_count == 200
    producer.send(chunk(b" and more"))  # every spy now holds a partial line and a timer
    for client in clients:
        # Half-close and wait for the server to close: it has then let go.
        client.transport.loseWriteConnection()
    await gatherResults([c.closed for c in clients])
    assert store.observer_count == 0
    assert stream.listener_count == 0
    from twisted.internet import reactor

    assert not [call for call in reactor.getDelayedCalls()
                if "flush_partials" in repr(call.func)]
    assert _open_files() <= files_before
    producer.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_stalled_spy_client_costs_no_memory_and_loses_nothing_silently(tmp_path):
    """100 MiB through two streams while a spy client stops reading: RSS grows < 20 MiB,
    and every byte is either shown later or counted in a SKIP line."""
    server = await start_server_process(tmp_path / "data")
    try:
        spy = await raw_connect(server.port)
        spy.send(b"GET /spy HTTP/1.1\r\nHost: x\r\n\r\n")
        await spy.wait_for(b"\r\n\r\n")
        producers = []
        for name in (b"one", b"two"):
            producers.append(await start_producer(server.port, name))
        await spy.wait_for(b"START two")
        spy.transport.pauseProducing()  # the spy client stops reading
        baseline = server.rss_kib()
        line = b"y" * 99 + b"\n"
        piece = line * 655
        pumps = [ChunkPump(p, 50 * MiB, lambda: piece) for p in producers]
        for pump in pumps:
            pump.start()
        await gatherResults([pump.finished for pump in pumps])
        await gatherResults([p.wait_for(b"0\r\n\r\n") for p in producers])
        growth_mib = (server.peak_rss_kib() - baseline) / 1024
        spy.transport.resumeProducing()
        await spy.wait_for(lambda got: got.count(b"END ") == 2)
        text = bytes(spy.received).decode("utf-8", "replace")
        for name in ("one", "two"):
            total = int(re.search(rf"END {name} complete (\d+)", text).group(1))
            shown = len(re.findall(rf"^{name} \| y{{99}}\r?$", text, re.M)) * 100
            skipped = sum(int(n) for n in re.findall(rf"^SKIP {name} (\d+) bytes", text, re.M))
            assert shown + skipped == total, (name, shown, skipped, total)
        assert "SKIP" in text
        print(f"server memory grew {growth_mib:.1f} MiB with a stalled spy client")
        assert growth_mib < 20, f"server memory grew {growth_mib:.1f} MiB"
        for producer in producers:
            producer.transport.loseConnection()
        spy.transport.loseConnection()
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_spy_over_treq_with_colour(server):
    """?color paints START, data and END lines in one colour per stream."""
    response = await treq.get(server.url + "/spy?color", unbuffered=True)
    seen = bytearray()
    from twisted.internet.defer import Deferred

    done = Deferred()

    def collect(data):
        seen.extend(data)
        if b"END painted" in seen and not done.called:
            done.callback(None)

    collecting = treq.collect(response, collect)
    posted = await treq.post(server.url + "/stream/painted", data=b"colour me\n")
    await posted.content()
    await done
    codes = set(re.findall(rb"\x1b\[(?:1;)?(\d+)m", bytes(seen))) - {b"0"}
    assert len(codes) == 1
    assert bytes(seen).count(b"\x1b[0m") == 3
    collecting.cancel()
