"""End to end on loopback: a real Loom server, real clients (treq, curl, raw sockets)."""

import json
import time

import pytest
import pytest_twisted
import treq
from twisted.internet.defer import gatherResults
from twisted.web.client import ResponseFailed

from tests.helpers import (
    chunk,
    CURL,
    Follow,
    guard,
    raw_connect,
    run,
    spawn,
    start_producer,
    start_server,
)

@pytest_twisted.ensureDeferred
async def test_201_arrives_while_the_body_is_still_open(server):
    """A producer that sends headers and one chunk, then waits, receives the 201 with its id."""
    producer = await raw_connect(server.port)
    producer.send(b"POST /stream/wait HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                  + chunk(b"one chunk"))
    received = await producer.wait_for(b"\r\n\r\n")
    assert received.startswith(b"HTTP/1.1 201 Created\r\n")
    assert b"X-Stream-Id: wait\r\n" in received and b"Location: /stream/wait\r\n" in received
    producer.send(b"0\r\n\r\n")
    await producer.wait_for(b"0\r\n\r\n")  # the response ends cleanly once stored
    body = await (await treq.get(server.url + "/stream/wait")).content()
    assert body == b"one chunk"
    producer.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_live_chunks_reach_a_follower_within_tens_of_milliseconds(server):
    """Each chunk a producer sends reaches a live follower within tens of milliseconds."""
    producer = await start_producer(server.port, b"fast")
    follower = Follow()
    await follower.start(server.url + "/stream/fast")
    delays = []
    for index in range(30):
        line = b"line %d\n" % index
        sent = time.monotonic()
        producer.send(chunk(line))
        arrived = await follower.until(len(follower.data) + len(line))
        delays.append(arrived - sent)
    producer.send(b"0\r\n\r\n")
    await guard(follower.done)
    assert follower.data == b"".join(b"line %d\n" % i for i in range(30))
    assert max(delays) < 0.1, delays
    producer.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_forty_concurrent_posts_get_forty_distinct_ids(server):
    """40 simultaneous POST /stream get 40 distinct generated ids."""
    responses = await gatherResults(
        [treq.post(server.url + "/stream", data=b"x%d" % i) for i in range(40)],
        consumeErrors=True,
    )
    ids = {r.headers.getRawHeaders("x-stream-id")[0] for r in responses}
    assert [r.code for r in responses] == [201] * 40
    assert len(ids) == 40
    await gatherResults([r.content() for r in responses])


@pytest_twisted.ensureDeferred
async def test_original_readme_curl_examples(server, tmp_path):
    """The original README's curl commands work as documented."""
    file_txt = tmp_path / "file.txt"
    file_txt.write_bytes(b"contents of file.txt\n" * 100)
    code, out, err = await run(CURL + [
        "-i", "-X", "POST", "-H", 'x-stream-metadata:{"meta": true}',
        server.url + "/stream/", "--data-binary", "@" + str(file_txt)])
    assert code == 0, err
    assert b"201 Created" in out
    stream_id = [line.split(b": ")[1].strip() for line in out.split(b"\r\n")
                 if line.lower().startswith(b"x-stream-id")][0].decode()
    code, out, err = await run(CURL + ["--no-buffer", f"{server.url}/stream/{stream_id}"])
    assert (code, out) == (0, file_txt.read_bytes())
    code, out, err = await run(CURL + [f"{server.url}/stream/{stream_id}?notail"])
    assert (code, out) == (0, file_txt.read_bytes())
    code, out, err = await run(CURL + ["-i", f"{server.url}/stream/{stream_id}"])
    assert b'X-Stream-Metadata: {"meta":true}' in out
    code, out, err = await run(CURL + ["-i", f"{server.url}/stream/unknown-id"])
    assert b"404 Not Found" in out
    assert b'{"error": "The stream with ID unknown-id does not exist"}' in out
    code, out, err = await run(CURL + ["-i", "-X", "POST", f"{server.url}/stream/{stream_id}",
                                       "--data-binary", "again"])
    assert b"409 Conflict" in out and b"Specify force=true query param to override." in out
    code, out, err = await run(CURL + ["-i", "-X", "POST",
                                       f"{server.url}/stream/{stream_id}?force=true",
                                       "--data-binary", "replaced"])
    assert b"X-Stream-Replaced: true" in out
    code, out, err = await run(CURL + [f"{server.url}/stream/{stream_id}"])
    assert out == b"replaced"


@pytest_twisted.ensureDeferred
async def test_large_upload_with_content_length_round_trips(server, tmp_path):
    """A 20 MiB file uploaded by curl (Expect: 100-continue) is stored byte for byte."""
    import os

    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(20 * 1024 * 1024))
    code, out, err = await run(CURL + ["-X", "POST", server.url + "/stream/blob",
                                       "--data-binary", "@" + str(blob)])
    assert code == 0, err
    body = await (await treq.get(server.url + "/stream/blob")).content()
    assert body == blob.read_bytes()


@pytest_twisted.ensureDeferred
async def test_duplicate_large_upload_gets_409_not_a_reset(server, tmp_path):
    """A 409 to a large upload reaches the client; nothing of the body is stored."""
    import os

    await (await treq.post(server.url + "/stream/taken", data=b"first")).content()
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(5 * 1024 * 1024))
    code, out, err = await run(CURL + ["-i", "-X", "POST", "-H", "Expect:",
                                       server.url + "/stream/taken",
                                       "--data-binary", "@" + str(blob)])
    assert b"409 Conflict" in out, (out[:200], err)
    body = await (await treq.get(server.url + "/stream/taken")).content()
    assert body == b"first"


@pytest_twisted.ensureDeferred
async def test_curl_follower_exits_non_zero_when_the_producer_vanishes(server):
    """A follower of a stream whose producer disconnects gets its bytes and a failed transfer."""
    producer = await start_producer(server.port, b"gone", b"some data")
    follower = Follow()
    await follower.start(server.url + "/stream/gone")
    await follower.until(9)
    curl = spawn(CURL + ["--no-buffer", server.url + "/stream/gone"])
    await curl.protocol.wait_for_output("some data")  # attached and caught up
    producer.transport.abortConnection()
    result = await curl.wait()
    assert result.exit_code == 18 and bytes(result.out) == b"some data"
    with pytest.raises(ResponseFailed):
        await guard(follower.done)
    status = await treq.get(server.url + "/stream/gone?notail")
    assert status.headers.getRawHeaders("x-stream-state") == ["aborted"]
    await status.content()


@pytest_twisted.ensureDeferred
async def test_force_replace_ends_old_followers_and_removes_old_bytes(server):
    """Force-replacing a live stream cuts its producer and followers; only new bytes remain."""
    producer = await start_producer(server.port, b"r", b"old bytes")
    follower = Follow()
    await follower.start(server.url + "/stream/r")
    await follower.until(9)
    response = await treq.post(server.url + "/stream/r?force=true", data=b"new bytes")
    assert response.code == 201
    assert response.headers.getRawHeaders("x-stream-replaced") == ["true"]
    await response.content()
    await producer.closed  # the old producer was cut off
    with pytest.raises(ResponseFailed):
        await guard(follower.done)  # the old follower did not get a clean end
    body = await (await treq.get(server.url + "/stream/r")).content()
    assert body == b"new bytes"


@pytest_twisted.ensureDeferred
async def test_bearer_tokens_end_to_end(tmp_path):
    """With tokens configured, curl needs the token; 401 carries WWW-Authenticate."""
    running = await start_server(tmp_path / "data", tokens=("sekrit-token1", "sekrit-token2"))
    try:
        url = running.url + "/stream/secret"
        code, out, err = await run(CURL + ["-i", "-X", "POST", url, "--data-binary", "x"])
        assert b"401 Unauthorized" in out and b'WWW-Authenticate: Bearer realm="loom"' in out
        code, out, err = await run(CURL + ["-X", "POST", "-H", "Authorization: Bearer sekrit-token1",
                                           url, "--data-binary", "classified"])
        assert code == 0
        code, out, err = await run(CURL + ["-H", "Authorization: Bearer sekrit-token2", url])
        assert out == b"classified"
        code, out, err = await run(CURL + ["-i", "-H", "Authorization: Bearer token3", url])
        assert b"401" in out and b"classified" not in out
    finally:
        await running.service.stopService()


@pytest_twisted.ensureDeferred
async def test_non_ascii_metadata_round_trips(server):
    """Metadata with non-ASCII text comes back as the same JSON value."""
    metadata = {"title": "Größe ✓ 構築", "n": 1}
    response = await treq.post(
        server.url + "/stream/meta",
        data=b"x",
        headers={b"X-Stream-Metadata": json.dumps(metadata, ensure_ascii=False).encode()},
    )
    assert response.code == 201
    await response.content()
    response = await treq.get(server.url + "/stream/meta")
    assert json.loads(response.headers.getRawHeaders("x-stream-metadata")[0]) == metadata
    await response.content()


def _final(out: bytes) -> tuple[bytes, dict[str, str], bytes]:
    """The final response in ``curl -i`` output (past any ``100 Continue``): status line,
    headers with lower-cased names, body."""
    while out.startswith(b"HTTP/1.1 100"):
        out = out.split(b"\r\n\r\n", 1)[1]
    head, _, body = out.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    return status.encode(), {k.lower(): v for k, v in (x.split(": ", 1) for x in lines)}, body


@pytest_twisted.ensureDeferred
async def test_readme_resume_and_manage_curl_examples(server, tmp_path):
    """The README's curl commands for ranges, offsets, HEAD, appends, listing and DELETE."""
    log = bytes(range(256)) * 8  # 2048 bytes
    code, out, err = await run(CURL + ["-X", "POST", "-H", 'X-Stream-Metadata: {"branch":"main"}',
                                       server.url + "/stream/build-42", "--data-binary", "@-"],
                               stdin=log)
    assert code == 0, err
    url = server.url + "/stream/build-42"

    code, out, err = await run(CURL + ["-i", "-H", "Range: bytes=0-1023", url])
    status, headers, body = _final(out)
    assert status == b"HTTP/1.1 206 Partial Content" and body == log[:1024]
    assert headers["content-range"] == "bytes 0-1023/2048"
    assert headers["accept-ranges"] == "bytes"
    code, out, err = await run(CURL + ["-H", "Range: bytes=-500", url])
    assert (code, out) == (0, log[-500:])
    code, out, err = await run(CURL + ["-i", "-H", "Range: bytes=4096-", url])
    status, headers, _ = _final(out)
    assert status.startswith(b"HTTP/1.1 416") and headers["content-range"] == "bytes */2048"
    code, out, err = await run(CURL + ["--no-buffer", url + "?offset=2000"])
    assert (code, out) == (0, log[2000:])

    code, out, err = await run(CURL + ["-I", url])
    status, headers, body = _final(out)
    assert (status, body) == (b"HTTP/1.1 200 OK", b"")
    assert (headers["x-stream-size"], headers["x-stream-state"]) == ("2048", "complete")
    assert headers["content-length"] == "2048"

    # A producer that vanished mid-body; its follower is cut (no resume window here).
    producer = await start_producer(server.port, b"build-43", b"first half\n")
    follower = await raw_connect(server.port)
    follower.send(b"GET /stream/build-43 HTTP/1.0\r\n\r\n")
    await follower.wait_for(b"first half\n")
    producer.transport.abortConnection()
    await follower.closed
    append = CURL + ["-i", "-T", "-", "-X", "POST"]
    target = server.url + "/stream/build-43?append=true"
    code, out, err = await run(append + ["-H", "X-Stream-Offset: 5", target], stdin=b"x")
    status, headers, _ = _final(out)
    assert status.startswith(b"HTTP/1.1 416") and headers["x-stream-size"] == "11"
    code, out, err = await run(append + ["-H", "X-Stream-Offset: 11", target],
                               stdin=b"second half\n")
    status, headers, _ = _final(out)
    assert code == 0 and status == b"HTTP/1.1 200 OK", out  # appended, not created
    assert headers["x-stream-offset"] == "11"
    code, out, err = await run(CURL + ["-i", server.url + "/stream/build-43"])
    _, headers, body = _final(out)
    assert body == b"first half\nsecond half\n" and headers["x-stream-state"] == "complete"

    code, out, err = await run(CURL + [server.url + "/streams?state=complete&meta.branch=main"])
    listing = json.loads(out)
    assert [s["id"] for s in listing["streams"]] == ["build-42"]
    assert listing["streams"][0]["metadata"] == {"branch": "main"}

    # DELETE cuts a live producer off and ends its follower without the final chunk.
    producer = await start_producer(server.port, b"build-44", b"doomed\n")
    reader = spawn(CURL + ["--no-buffer", server.url + "/stream/build-44"])
    await reader.protocol.wait_for_output("doomed")
    code, out, err = await run(CURL + ["-i", "-X", "DELETE", server.url + "/stream/build-44"])
    assert out.startswith(b"HTTP/1.1 204")
    assert (await reader.wait()).exit_code == 18  # transfer closed with data outstanding
    await producer.closed
    code, out, err = await run(CURL + ["-i", "-X", "DELETE", server.url + "/stream/build-44"])
    assert out.startswith(b"HTTP/1.1 404")

    code, out, err = await run(CURL + [server.url + "/health"])
    assert json.loads(out) == {"status": "ok"}
    code, out, err = await run(CURL + [server.url + "/metrics"])
    assert b"loom_streams 2.0" in out and b"loom_streams_live 0.0" in out
