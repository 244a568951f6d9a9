"""A large catalog being listed never stalls a follower: catalog reads run off the reactor
thread, and every listing walks an index newest first, stopping after its page."""

import sys

import pytest_twisted
from twisted.internet.threads import deferToThread

from bench.listing_load import follow_latency, percentile
from bench.populate import branch_metadata, populate
from tests.helpers import REPO, spawn, start_server_process

STREAMS = 300_000
# Half the streams are on main, a feature branch holds one in a hundred and a job a
# hundred; the state matches them all. Pages of the default size (100): bench W6 measures
# pages of a thousand too.
LISTINGS = [
    "/streams?meta.branch=main",
    "/streams?meta.branch=feature-7",
    "/streams?meta.job=job-1234&meta.branch=main",
    "/streams?state=complete&meta.branch=main",
]
SECONDS = 3.0


@pytest_twisted.ensureDeferred
async def test_a_follower_keeps_its_pace_while_a_large_catalog_is_listed(tmp_path):
    """300,000 streams, listings with metadata filters in a loop from another process: a
    follower of a live stream still gets each chunk within 5 ms (p99)."""
    data = tmp_path / "data"
    populate(str(data), STREAMS, size=0, files=False, metadata=branch_metadata(50))
    server = await start_server_process(data)
    hammer = spawn([sys.executable, "-m", "bench.listing_load", "hammer", str(server.port),
                    *LISTINGS], cwd=str(REPO))
    try:
        await hammer.protocol.wait_for_output(r"\b10 listings")  # the load is on
        before = _listings(hammer)
        latencies = await deferToThread(follow_latency, server.port, "live", SECONDS)
        listed = _listings(hammer) - before
    finally:
        hammer.transport.signalProcess("KILL")
        await server.stop()
    p50, p99 = percentile(latencies, 0.5) * 1000, percentile(latencies, 0.99) * 1000
    print(f"follower delivery with listings running: p50 {p50:.2f} ms, p99 {p99:.2f} ms, "
          f"{len(latencies)} chunks, {listed} listings meanwhile")
    assert listed >= 100, "the listings did not run while the follower was measured"
    assert p99 < 5, f"p99 {p99:.2f} ms (p50 {p50:.2f} ms)"


def _listings(hammer) -> int:
    """How many listings the hammer has had answered (it tells every tenth)."""
    return hammer.protocol.out.decode().count(" listings") * 10
