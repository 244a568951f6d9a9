"""The clients people use, following a live stream as docs/http-api.md says to: each gets
every byte of a stream that ends cleanly, and each reports one that is cut off."""

from __future__ import annotations

import sys

import pytest
import pytest_twisted

from tests.helpers import (
    child_environment,
    chunk,
    program,
    spawn,
    start_producer,
    start_server,
)

REQUESTS = """
import sys, requests
try:
    response = requests.get(sys.argv[1], stream=True, timeout=(10, None))
    for data in response.iter_content(chunk_size=None):
        sys.stdout.buffer.write(data); sys.stdout.flush()
except requests.exceptions.ChunkedEncodingError as e:
    print("\\nerror:", type(e).__name__, flush=True); sys.exit(3)
"""

HTTPX = """
import sys, httpx
try:
    with httpx.stream("GET", sys.argv[1], timeout=httpx.Timeout(10, read=None)) as response:
        for data in response.iter_raw():
            sys.stdout.buffer.write(data); sys.stdout.flush()
except httpx.RemoteProtocolError as e:
    print("\\nerror:", type(e).__name__, flush=True); sys.exit(3)
"""

NODE = """
const response = await fetch(process.argv[1]);  // node -e: argv[1] is the first argument
const reader = response.body.getReader();
try {
  for (;;) {
    const {done, value} = await reader.read();
    if (done) break;
    process.stdout.write(value);
  }
} catch (e) {
  console.log("\\nerror:", e.message);
  process.exit(3);
}
"""


def client_argv(name: str, url: str) -> list[str]:
    if name == "curl":
        return [program("curl", "apt-get install curl"), "-sS", "--no-buffer", url]
    if name == "wget":
        return [program("wget", "apt-get install wget"), "-q", "-O", "-", "--read-timeout=0",
                "--tries=1", url]
    if name == "wget-retrying":
        return [program("wget", "apt-get install wget"), "-q", "-O", "-", "--read-timeout=0",
                "--waitretry=0", url]
    if name == "requests":
        return [sys.executable, "-c", REQUESTS, url]
    if name == "httpx":
        return [sys.executable, "-c", HTTPX, url]
    node = program("node", "apt-get install nodejs")
    return [node, "--input-type=module", "-e", NODE, url]


# How each reports a stream that was cut off: its exit status.
CUT_OFF = {"curl": 18, "wget": 4, "requests": 3, "httpx": 3, "node": 3,
           # wget retries with a Range, gets the rest of the (now aborted) stream, and exits 0:
           # docs/http-api.md says to use --tries=1.
           "wget-retrying": 0}


@pytest.mark.parametrize("name", sorted(CUT_OFF))
@pytest.mark.parametrize("ending", ["clean", "cut off"])
@pytest_twisted.ensureDeferred
async def test_a_client_follows_a_live_stream_and_sees_how_it_ends(tmp_path, name, ending):
    """Each client, set up as the docs say, prints the lines as they arrive; a clean end
    exits 0 with every byte, a cut-off stream gives the documented error status."""
    server = await start_server(tmp_path / "data")
    try:
        producer = await start_producer(server.port, b"s", b"first line\n")
        client = spawn(client_argv(name, f"{server.url}/stream/s"), env=child_environment())
        await client.protocol.wait_for_output("first line")  # following, live
        producer.transport.write(chunk(b"second line\n"))
        await client.protocol.wait_for_output("second line")
        if ending == "clean":
            producer.transport.write(b"0\r\n\r\n")
        else:
            producer.transport.abortConnection()
        ended = await client.wait()
        output = bytes(ended.out)
        assert output.startswith(b"first line\nsecond line\n"), output
        if ending == "clean":
            assert (ended.exit_code, output) == (0, b"first line\nsecond line\n"), client.text()
        else:
            assert ended.exit_code == CUT_OFF[name], client.text()
    finally:
        await server.service.stopService()


@pytest_twisted.ensureDeferred
async def test_an_http_1_0_follower_of_a_cut_off_stream_gets_a_reset(tmp_path):
    """HTTP/1.0 has no chunking, so a clean close would look like the end of the stream: a
    cut-off stream resets an HTTP/1.0 follower's connection; a clean end closes it cleanly."""
    from twisted.internet.error import ConnectionDone, ConnectionLost

    from tests.helpers import raw_connect

    server = await start_server(tmp_path / "data")
    try:
        for stream_id, cut in ((b"cut", True), (b"clean", False)):
            producer = await start_producer(server.port, stream_id, b"first line\n")
            follower = await raw_connect(server.port)
            follower.send(b"GET /stream/" + stream_id + b" HTTP/1.0\r\n\r\n")
            await follower.wait_for(b"first line\n")
            if cut:
                producer.transport.abortConnection()
            else:
                producer.transport.write(b"0\r\n\r\n")
            await follower.closed
            expected = ConnectionLost if cut else ConnectionDone
            assert follower.reason.check(expected), (stream_id, follower.reason)
            assert b"Transfer-Encoding" not in bytes(follower.received)
    finally:
        await server.service.stopService()
