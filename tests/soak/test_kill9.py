"""kill -9 under load: 20 producers, 2 followers each, 10,000 streams at rest; restart; check."""

import random
import time

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults

from bench.populate import populate
from tests.helpers import chunk, guard, raw_connect, start_server_process
from tests.soak.invariants import check_data_dir

PRODUCERS = 20
FOLLOWERS_EACH = 2
AT_REST = 10_000
FIGURES: dict[int, dict] = {}


class RandomProducer:
    """Sends random bytes in random chunk sizes until its connection dies."""

    def __init__(self, client, rng: random.Random):
        self.client = client
        self.rng = rng
        self.sent = bytearray()
        self._paused = False

    def start(self):
        self.client.transport.registerProducer(self, True)
        self._write()

    def _write(self):
        if self._paused or self.client.closed.called:
            return
        size = self.rng.choice((1, 7, 100, 1500, 4096, 16384, 65536))
        piece = self.rng.randbytes(size)
        self.client.send(chunk(piece))
        self.sent += piece
        reactor.callLater(self.rng.random() * 0.01, self._write)

    def pauseProducing(self):
        self._paused = True

    def resumeProducing(self):
        self._paused = False
        self._write()

    def stopProducing(self):
        self._paused = True


class CountingFollower:
    def __init__(self, on_data):
        self.received = bytearray()
        self._on_data = on_data

    def collect(self, data):
        self.received += data
        self._on_data(len(data))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest_twisted.ensureDeferred
async def test_kill_9_under_load(tmp_path, seed):
    """Every stream keeps a prefix of what was sent, at least what followers saw; start < 2 s."""
    rng = random.Random(seed)
    data_dir = tmp_path / "data"
    populate(str(data_dir), AT_REST, size=32)
    server = await start_server_process(data_dir)
    producers, followers = {}, {}
    threshold = rng.randint(2, 12) * 1024 * 1024  # the "random moment": this many bytes seen
    seen = [0]
    killed = Deferred()

    def on_data(size):
        seen[0] += size
        if seen[0] >= threshold and not killed.called:
            server.process.signal("KILL")
            killed.callback(None)

    for index in range(PRODUCERS):
        stream_id = f"load-{index:02d}"
        client = await raw_connect(server.port)
        client.send(f"POST /stream/{stream_id} HTTP/1.1\r\nHost: x\r\n"
                    "Transfer-Encoding: chunked\r\n\r\n".encode())
        await client.wait_for(b"201 Created")
        producers[stream_id] = RandomProducer(client, random.Random(rng.random()))
        followers[stream_id] = []
        for _ in range(FOLLOWERS_EACH):
            follower = CountingFollower(on_data)
            response = await treq.get(f"{server.url}/stream/{stream_id}", unbuffered=True)
            follower.done = treq.collect(response, follower.collect)
            follower.done.addErrback(lambda failure: None)  # cut by the crash: expected
            followers[stream_id].append(follower)
    for producer in producers.values():
        producer.start()
    await guard(killed, 120)
    ended = await server.process.wait()
    assert ended.exit_signal == 9
    await gatherResults([p.client.closed for p in producers.values()])

    started = time.monotonic()
    restarted = await start_server_process(data_dir)
    probe = await treq.get(f"{restarted.url}/stream/stored-0004242")
    await probe.content()
    start_seconds = time.monotonic() - started
    try:
        streams = check_data_dir(str(data_dir))
        assert sum(1 for s in streams.values() if s[0] == "complete") == AT_REST
        stored_total = 0
        for stream_id, producer in producers.items():
            response = await treq.get(f"{restarted.url}/stream/{stream_id}")
            body = await response.content()
            assert response.headers.getRawHeaders("x-stream-state") == ["interrupted"]
            assert bytes(producer.sent).startswith(body), f"{stream_id}: not a prefix of what was sent"
            for follower in followers[stream_id]:
                assert len(body) >= len(follower.received), f"{stream_id}: a follower saw more"
                assert body.startswith(bytes(follower.received))
            stored_total += len(body)
    finally:
        await restarted.stop()
    assert start_seconds < 2.0, f"serving took {start_seconds:.2f} s after start"
    FIGURES[seed] = {"killed_after_bytes_seen": seen[0], "stored_bytes": stored_total,
                     "restart_to_first_response_s": round(start_seconds, 3)}
    print(f"seed {seed}: {FIGURES[seed]}")
