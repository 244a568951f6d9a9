"""Crash at every named point of the storage path, every time it is reached; restart; check.

Each run SIGKILLs a real server at the N-th time it reaches a point:
file created / row not yet committed; chunk written / not yet synced; synced /
not yet marked complete; marked complete / producer not yet answered.
"""

import pytest
import pytest_twisted
import treq

from loom.store.faults import CRASH_POINTS
from tests.helpers import chunk, crashing_twistd, raw_connect, start_server_process
from tests.soak.invariants import check_data_dir

STREAMS = [b"s1", b"s2", b"s3"]
CHUNKS = [b"chunk-%d\n" % i for i in range(4)]
# How often the workload reaches each point: once per stream, or once per chunk.
REACHED = {"file-created": 3, "written": 3 * len(CHUNKS), "synced": 3, "recorded": 3}
CASES = [(point, n) for point in CRASH_POINTS for n in range(1, REACHED[point] + 1)]


async def produce_until_the_crash(server) -> dict[bytes, bool]:
    """Write the streams one after another, one chunk at a time (each its own append:
    the next is sent when a follower has the previous); return which streams got a
    clean end before the crash."""
    clean = {}
    for stream_id in STREAMS:
        producer = await raw_connect(server.port)
        producer.send(b"POST /stream/" + stream_id + b" HTTP/1.1\r\nHost: x\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n")
        closed = producer.closed
        await producer.wait_for(lambda got, c=closed: b"201 Created" in got or c.called)
        if closed.called:
            clean[stream_id] = False
            break
        follower = await raw_connect(server.port)
        follower.send(b"GET /stream/" + stream_id + b" HTTP/1.0\r\n\r\n")
        sent = b""
        for piece in CHUNKS:
            producer.send(chunk(piece))
            sent += piece
            gone = follower.closed
            await follower.wait_for(lambda got, s=sent, g=gone: got.endswith(s) or g.called)
            if gone.called:
                break
        producer.send(b"0\r\n\r\n")
        await producer.wait_for(lambda got, c=closed: got.endswith(b"0\r\n\r\n") or c.called)
        ended = bytes(producer.received).endswith(b"0\r\n\r\n")
        clean[stream_id] = ended
        producer.transport.loseConnection()
        follower.transport.loseConnection()
        if not ended:
            break
    return clean


@pytest.mark.slow
@pytest.mark.parametrize("point, n", CASES, ids=[f"{p}-{n}" for p, n in CASES])
@pytest_twisted.ensureDeferred
async def test_crash_at_each_point_then_restart(tmp_path, point, n):
    """After a crash at any point, the invariants hold and every clean end is complete."""
    data_dir = tmp_path / "data"
    server = await start_server_process(data_dir, twistd=crashing_twistd(point, n))
    clean = await produce_until_the_crash(server)
    ended = await server.process.wait()
    assert ended.exit_signal == 9, f"the server did not crash at {point}:{n}"
    restarted = await start_server_process(data_dir)
    try:
        streams = check_data_dir(str(data_dir))
        for stream_id, was_clean in clean.items():
            if was_clean:
                response = await treq.get(f"{restarted.url}/stream/{stream_id.decode()}")
                assert await response.content() == b"".join(CHUNKS)
                assert response.headers.getRawHeaders("x-stream-state") == ["complete"]
        for stream_id, (_state, size) in streams.items():
            response = await treq.get(f"{restarted.url}/stream/{stream_id}")
            body = await response.content()
            assert len(body) == size and b"".join(CHUNKS).startswith(body)
    finally:
        await restarted.stop()
