"""Streaming uploads through a real LoomChannel fed raw bytes (Clock, StringTransport).

These pin the behaviour Loom builds on twisted.web internals: if a Twisted
upgrade changes them, these fail loudly.
"""

import errno
import os

import pytest
import pytest_twisted
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from loom.store import ABORTED, COMPLETE, DiskStore
from tests.helpers import (
    chunk,
    cut_off,
    dechunk,
    json_body,
    make_fake_site,
    ManualRunners,
    parse_response,
)
from loom.testing import MemoryStore, read_all

POST_CHUNKED = (
    b"POST %s HTTP/1.1\r\nHost: loom\r\nTransfer-Encoding: chunked\r\n%s\r\n"
)


def post(path=b"/stream/s1", extra=b""):
    return POST_CHUNKED % (path, extra)

GONE = Failure(ConnectionDone())


@pytest.fixture
def fake(tmp_path):
    return make_fake_site(data_dir=str(tmp_path / "data"))


@pytest_twisted.ensureDeferred
async def test_201_is_sent_before_the_body_ends(fake):
    """Headers plus one chunk get the 201 with id and location while the body is still open."""
    channel, transport = fake.connect()
    channel.dataReceived(post() + chunk(b"first line\n"))
    status, headers, body = parse_response(transport.value())
    assert status == 201
    assert headers["x-stream-id"] == "s1"
    assert headers["location"] == "/stream/s1"
    assert headers["transfer-encoding"] == "chunked"
    assert body == b""  # the response is open and empty
    assert (await read_all(fake.store, "s1")) == (b"first line\n", "live")
    channel.dataReceived(chunk(b"second\n"))
    assert (await read_all(fake.store, "s1")) == (b"first line\nsecond\n", "live")
    channel.dataReceived(b"0\r\n\r\n")
    assert transport.value().endswith(b"\r\n\r\n0\r\n\r\n")
    assert (await read_all(fake.store, "s1")) == (b"first line\nsecond\n", "complete")
    assert not transport.disconnecting  # keep-alive


@pytest_twisted.ensureDeferred
async def test_each_chunk_is_stored_before_the_next_is_read(fake):
    """Every chunk is in the stream (handed to the OS) as soon as it has been received."""
    channel, transport = fake.connect()
    channel.dataReceived(post())
    for index in range(50):
        piece = b"%d\n" % index
        channel.dataReceived(chunk(piece))
        data, _ = (await read_all(fake.store, "s1"))
        assert data.endswith(piece)


@pytest_twisted.ensureDeferred
async def test_content_length_body_arriving_in_pieces(fake):
    """A Content-Length body is stored as it arrives and ends the stream when complete."""
    channel, transport = fake.connect()
    channel.dataReceived(b"POST /stream/cl HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n01234")
    assert parse_response(transport.value())[0] == 201
    assert (await read_all(fake.store, "cl")) == (b"01234", "live")
    channel.dataReceived(b"56789")
    assert (await read_all(fake.store, "cl")) == (b"0123456789", "complete")


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("path", [b"/stream", b"/stream/"])
async def test_post_without_id_gets_a_generated_one(fake, path):
    """POST /stream and POST /stream/ create a stream with a generated id."""
    channel, transport = fake.connect()
    channel.dataReceived(post(path) + chunk(b"x") + b"0\r\n\r\n")
    status, headers, _ = parse_response(transport.value())
    assert status == 201
    assert headers["x-stream-id"].startswith("loom-")
    assert headers["location"] == "/stream/" + headers["x-stream-id"]
    assert (await read_all(fake.store, headers["x-stream-id"])) == (b"x", "complete")


@pytest_twisted.ensureDeferred
async def test_empty_body_creates_an_empty_complete_stream(fake):
    """A POST with Content-Length: 0 creates a complete, empty stream."""
    channel, transport = fake.connect()
    channel.dataReceived(b"POST /stream/e HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    status, _, body = parse_response(transport.value())
    assert status == 201 and dechunk(body) == (b"", True)
    assert (await read_all(fake.store, "e")) == (b"", "complete")


@pytest_twisted.ensureDeferred
async def test_duplicate_id_is_409_then_the_connection_closes(fake):
    """A taken id answers 409 with the contract's error, stores nothing and closes."""
    channel, transport = fake.connect()
    channel.dataReceived(post() + chunk(b"original") + b"0\r\n\r\n")
    channel2, transport2 = fake.connect()
    channel2.dataReceived(post() + chunk(b"intruder"))
    status, headers, body = parse_response(transport2.value())
    assert status == 409
    assert headers["content-type"] == "application/json"
    assert json_body(body) == {
        "error": "The stream with ID s1 already exists. Specify force=true query param to override."
    }
    assert transport2.write_closed  # half-closed; the rest of the body is drained
    # Whatever else the client sends is ignored, even a whole new request.
    channel2.dataReceived(chunk(b"more") + b"0\r\n\r\nGET /stream/s1 HTTP/1.1\r\n\r\n")
    assert transport2.value().count(b"HTTP/1.1") == 1
    assert (await read_all(fake.store, "s1")) == (b"original", "complete")
    fake.clock.advance(5)
    assert transport2.disconnecting


@pytest_twisted.ensureDeferred
async def test_force_replaces_and_cuts_the_old_producer(fake):
    """?force=true replaces a live stream: 201 with X-Stream-Replaced, old producer aborted."""
    old_channel, old_transport = fake.connect()
    old_channel.dataReceived(post() + chunk(b"old"))
    channel, transport = fake.connect()
    channel.dataReceived(post(b"/stream/s1?force=true") + chunk(b"new"))
    status, headers, _ = parse_response(transport.value())
    assert status == 201 and headers["x-stream-replaced"] == "true"
    assert cut_off(old_transport)  # not a clean end
    assert not old_transport.value().endswith(b"0\r\n\r\n")
    channel.dataReceived(b"0\r\n\r\n")
    assert (await read_all(fake.store, "s1")) == (b"new", "complete")


def test_expect_100_continue_is_sent_only_when_accepted(fake):
    """100 Continue precedes the 201; a refused request gets its error without a 100."""
    channel, transport = fake.connect()
    channel.dataReceived(post(extra=b"Expect: 100-continue\r\n"))
    assert transport.value().startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created")
    channel2, transport2 = fake.connect()
    channel2.dataReceived(post(extra=b"Expect: 100-continue\r\n"))
    assert transport2.value().startswith(b"HTTP/1.1 409 Conflict")


@pytest_twisted.ensureDeferred
async def test_malformed_chunk_mid_body_aborts_instead_of_injecting_a_400(fake):
    """A bad chunk after the 201 aborts the connection; the stream keeps what came before."""
    channel, transport = fake.connect()
    channel.dataReceived(post() + chunk(b"good"))
    before = transport.value()
    channel.dataReceived(b"zz\r\nbad\r\n")
    assert cut_off(transport)
    assert transport.value() == before  # no "400 Bad Request" spliced into the 201
    channel.connectionLost(GONE)
    assert (await read_all(fake.store, "s1")) == (b"good", "aborted")


def test_malformed_request_before_any_response_gets_a_json_400(fake):
    """A malformed header block is answered with a JSON 400 and the connection closes."""
    channel, transport = fake.connect()
    channel.dataReceived(b"POST /stream/x HTTP/1.1\r\nContent-Length: nope\r\n\r\n")
    status, headers, body = parse_response(transport.value())
    assert status == 400 and "error" in json_body(body)
    assert transport.write_closed or transport.disconnecting


@pytest_twisted.ensureDeferred
async def test_producer_disconnect_mid_body_aborts_the_stream(fake):
    """A producer that disconnects mid-body leaves an aborted stream with all its bytes."""
    channel, transport = fake.connect()
    channel.dataReceived(post() + chunk(b"partial "))
    channel.dataReceived(chunk(b"data"))
    channel.connectionLost(GONE)
    assert (await read_all(fake.store, "s1")) == (b"partial data", ABORTED)


@pytest_twisted.ensureDeferred
async def test_silent_producer_is_not_cut_off_for_ten_minutes(fake):
    """The 60 s keep-alive idle timeout does not apply while a body streams in."""
    idle_channel, idle_transport = fake.connect()
    fake.clock.advance(61)
    assert idle_transport.disconnecting  # an idle connection is closed...
    channel, transport = fake.connect()
    channel.dataReceived(post() + chunk(b"start"))
    fake.clock.advance(600)
    assert not transport.disconnecting  # ...but a quiet producer is not
    channel.dataReceived(chunk(b" end") + b"0\r\n\r\n")
    assert (await read_all(fake.store, "s1")) == (b"start end", COMPLETE)
    fake.clock.advance(61)  # afterwards, keep-alive idleness counts again
    assert transport.disconnecting


def test_producer_idle_timeout_is_honoured(tmp_path):
    """A producer silent longer than producerIdleTimeout is disconnected; its stream aborted."""
    fake = make_fake_site(data_dir=str(tmp_path), producer_idle_timeout=3600)
    channel, transport = fake.connect()
    channel.dataReceived(post() + chunk(b"x"))
    fake.clock.advance(3599)
    assert not transport.disconnecting
    fake.clock.advance(2)
    assert transport.disconnecting


@pytest.mark.parametrize(
    "target",
    [b"/stream/..", b"/stream/.", b"/stream/%2E%2E", b"/stream/a%2Fb", b"/stream/%2F",
     b"/stream/..%2F..%2Fetc", b"/stream/a%00b", b"/stream/.hidden",
     b"/stream/" + b"x" * 129, b"/stream/caf%C3%A9", b"/stream/a%20b"],
)
def test_invalid_ids_are_400_and_create_nothing(tmp_path, target):
    """Hostile ids are refused with 400 and nothing is created anywhere."""
    fake = make_fake_site(data_dir=str(tmp_path / "data"))
    before = sorted(os.walk(tmp_path))
    channel, transport = fake.connect()
    channel.dataReceived(POST_CHUNKED % (target, b"") + chunk(b"data"))
    status, _, body = parse_response(transport.value())
    assert status == 400 and "error" in json_body(body)
    assert sorted(os.walk(tmp_path)) == before


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "metadata, status",
    [(b"{nope", 400), (b'{"a": NaN}', 400), (b'{"a": Infinity}', 400), (b"[1]", 400),
     (b"[" * 3000 + b"]" * 3000, 400), (b'{"a": "' + b"x" * 9000 + b'"}', 413)],
)
async def test_bad_metadata_is_refused_and_no_stream_is_created(fake, metadata, status):
    """Invalid, non-finite, non-object, deep or oversized metadata: 4xx JSON, no stream."""
    channel, transport = fake.connect()
    channel.dataReceived(post(extra=b"X-Stream-Metadata: " + metadata + b"\r\n") + chunk(b"d"))
    got, _, body = parse_response(transport.value())
    assert got == status and "error" in json_body(body)
    assert fake.store.live_streams() == []
    from loom.errors import StreamNotFound

    with pytest.raises(StreamNotFound):
        (await fake.store.open("s1"))


def test_pipelined_get_after_a_post_is_answered(fake):
    """A GET pipelined after a complete POST on the same connection is served."""
    channel, transport = fake.connect()
    channel.dataReceived(post() + chunk(b"abc") + b"0\r\n\r\nGET /stream/s1 HTTP/1.1\r\nHost: x\r\n\r\n")
    responses = transport.value().split(b"HTTP/1.1 ")
    assert responses[1].startswith(b"201") and responses[2].startswith(b"200")
    assert responses[2].endswith(b"\r\n\r\nabc")


@pytest_twisted.ensureDeferred
async def test_storage_failure_after_201_aborts_the_producer(fake, monkeypatch):
    """ENOSPC while appending: the producer's connection is aborted, not ended cleanly."""
    channel, transport = fake.connect()
    channel.dataReceived(post() + chunk(b"ok "))

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("loom.store.faults.os.write", full)
    channel.dataReceived(chunk(b"lost"))
    assert cut_off(transport)
    monkeypatch.undo()
    channel.connectionLost(GONE)
    assert (await read_all(fake.store, "s1")) == (b"ok ", ABORTED)


def test_fsync_always_stops_reading_until_the_chunk_is_synced(tmp_path):
    """With fsync: always the producer is not read from while a sync is outstanding."""

    runners, clock = ManualRunners(), Clock()
    fake = make_fake_site(store=DiskStore(str(tmp_path), clock, runners, fsync="always"),
                          clock=clock)
    channel, transport = fake.connect()
    channel.dataReceived(post() + chunk(b"one"))
    runners.run_next()  # the stream's file is made
    assert transport.producerState == "paused" and len(runners.pending) == 1
    runners.run_next()
    assert transport.producerState == "producing"
    stream = fake.store.live_streams()[0]
    assert stream.synced == 3


@pytest_twisted.ensureDeferred
async def test_chunk_extensions_and_trailers_are_accepted(fake):
    """Chunk extensions and trailer fields do not end up in the stream."""
    channel, transport = fake.connect()
    channel.dataReceived(post() + b"3;name=value\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\n")
    assert (await read_all(fake.store, "s1")) == (b"abc", COMPLETE)


@pytest_twisted.ensureDeferred
async def test_http_10_producer(fake):
    """An HTTP/1.0 producer with Content-Length works; the connection closes at the end."""
    channel, transport = fake.connect()
    channel.dataReceived(b"POST /stream/old HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc")
    assert transport.value().startswith(b"HTTP/1.0 201 Created")
    assert (await read_all(fake.store, "old")) == (b"abc", COMPLETE)
    assert transport.disconnecting


def test_unknown_routes_and_methods_are_json(fake):
    """Unknown paths are 404 JSON; unsupported methods 405 JSON with Allow."""
    channel, transport = fake.connect()
    channel.dataReceived(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _, body = parse_response(transport.value())
    assert status == 404 and "error" in json_body(body)
    channel, transport = fake.connect()
    channel.dataReceived(b"PUT /stream/x HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    status, headers, body = parse_response(transport.value())
    assert status == 405 and "POST" in headers["allow"] and "error" in json_body(body)
    channel, transport = fake.connect()
    channel.dataReceived(b"GET /stream/x/ HTTP/1.1\r\nHost: x\r\n\r\n")
    assert parse_response(transport.value())[0] == 404


@pytest_twisted.ensureDeferred
async def test_failed_background_sync_aborts_the_producer(fake):
    """A failed interval fsync aborts the producer's connection and records the stream aborted."""
    channel, transport = fake.connect()
    channel.dataReceived(post() + chunk(b"data"))
    stream = fake.store.live_streams()[0]

    def broken():
        raise OSError(errno.EIO, "Input/output error")

    stream.file.thd_sync = broken
    fake.clock.advance(1.0)
    assert cut_off(transport)
    channel.connectionLost(GONE)
    assert (await read_all(fake.store, "s1")) == (b"data", ABORTED)


def test_unexpected_errors_are_json_500(fake, monkeypatch):
    """A bug while rendering gives a JSON 500, not an HTML traceback page."""
    monkeypatch.setattr(fake.store, "open", lambda stream_id: 1 / 0)
    channel, transport = fake.connect()
    channel.dataReceived(b"GET /stream/x HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = parse_response(transport.value())
    assert status == 500 and headers["content-type"] == "application/json"
    assert b"Traceback" not in body and "error" in json_body(body)


@pytest_twisted.ensureDeferred
async def test_ingest_stops_reading_while_appends_wait_to_be_committed():
    """A log that confirms appends later (as a networked one does): the producer's
    connection is not read while an append waits for its confirmation, followers see only
    confirmed bytes, and the stream ends complete once everything is confirmed."""
    clock = Clock()
    store = MemoryStore(clock, commits="manual")
    fake = make_fake_site(store=store, clock=clock)
    channel, transport = fake.connect()
    channel.dataReceived(post() + chunk(b"one;"))
    assert parse_response(transport.value())[0] == 201
    assert transport.producerState == "paused"
    follower, reader = fake.connect()
    follower.dataReceived(b"GET /stream/s1 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert dechunk(parse_response(reader.value())[2]) == (b"", False)

    store.log.commit()
    assert transport.producerState == "producing"
    assert dechunk(parse_response(reader.value())[2]) == (b"one;", False)

    channel.dataReceived(chunk(b"two;") + b"0\r\n\r\n")
    assert transport.producerState == "paused"
    assert not transport.value().endswith(b"0\r\n\r\n")  # not complete before it is confirmed
    store.log.commit()
    assert transport.value().endswith(b"0\r\n\r\n")
    assert dechunk(parse_response(reader.value())[2]) == (b"one;two;", True)
    assert await read_all(store, "s1") == (b"one;two;", COMPLETE)
