"""``X-Stream-Respond: at-end``: the producer's answer held back until its body is stored.

What a reverse proxy in front of Loom asks for (docs/deployment.md): raw bytes
through a real LoomChannel, on a Clock.
"""

import errno

import pytest
import pytest_twisted
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from loom.store import ABORTED, COMPLETE
from tests.helpers import (
    chunk,
    cut_off,
    dechunk,
    json_body,
    make_fake_site,
    parse_response,
)
from loom.testing import read_all

AT_END = b"X-Stream-Respond: at-end\r\n"


def post(path=b"/stream/s1", extra=b""):
    return (b"POST %s HTTP/1.1\r\nHost: loom\r\nTransfer-Encoding: chunked\r\n%s\r\n"
            % (path, extra))


@pytest.fixture
def fake(tmp_path):
    return make_fake_site(data_dir=str(tmp_path / "data"))


@pytest_twisted.ensureDeferred
async def test_the_201_comes_whole_once_the_body_is_stored(fake):
    """Nothing is answered while the body streams (it is stored live); then 201, ended."""
    channel, transport = fake.connect()
    channel.dataReceived(post(extra=AT_END) + chunk(b"first\n"))
    channel.dataReceived(chunk(b"second\n"))
    assert transport.value() == b""
    assert (await read_all(fake.store, "s1")) == (b"first\nsecond\n", "live")
    channel.dataReceived(b"0\r\n\r\n")
    status, headers, body = parse_response(transport.value())
    assert status == 201
    assert headers["x-stream-id"] == "s1" and headers["location"] == "/stream/s1"
    assert dechunk(body) == (b"", True)
    assert (await read_all(fake.store, "s1")) == (b"first\nsecond\n", COMPLETE)
    assert not transport.disconnecting  # keep-alive, as with the early 201


@pytest_twisted.ensureDeferred
async def test_a_generated_id_is_told_at_the_end(fake):
    """POST /stream with at-end: the generated id arrives with the 201, at the end."""
    channel, transport = fake.connect()
    channel.dataReceived(post(b"/stream", AT_END) + chunk(b"x"))
    assert transport.value() == b""
    channel.dataReceived(b"0\r\n\r\n")
    status, headers, _ = parse_response(transport.value())
    assert status == 201 and headers["x-stream-id"].startswith("loom-")
    assert (await read_all(fake.store, headers["x-stream-id"])) == (b"x", COMPLETE)


def test_100_continue_still_goes_out_when_the_stream_exists(fake):
    """A client waiting for 100 Continue gets it at once; the 201 follows the body."""
    channel, transport = fake.connect()
    channel.dataReceived(post(extra=AT_END + b"Expect: 100-continue\r\n"))
    assert transport.value() == b"HTTP/1.1 100 Continue\r\n\r\n"
    channel.dataReceived(chunk(b"data") + b"0\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created")


@pytest_twisted.ensureDeferred
async def test_a_stream_cut_before_its_answer_gets_a_cut_201(fake, monkeypatch):
    """Storing fails before the answer: the 201's headers go out, then the response is cut
    (no last chunk), as for a producer that had its 201 at once: not a proxy's 502."""
    channel, transport = fake.connect()
    channel.dataReceived(post(extra=AT_END) + chunk(b"kept "))

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("loom.store.faults.os.write", full)
    channel.dataReceived(chunk(b"lost"))
    monkeypatch.undo()
    status, headers, body = parse_response(transport.value())
    assert status == 201 and headers["x-stream-id"] == "s1"
    assert cut_off(transport) and dechunk(body) == (b"", False)
    channel.connectionLost(Failure(ConnectionDone()))
    assert (await read_all(fake.store, "s1")) == (b"kept ", ABORTED)


def test_a_replaced_stream_cuts_its_waiting_producer(fake):
    """?force=true replacing a stream whose producer waits for its answer cuts that one."""
    old_channel, old_transport = fake.connect()
    old_channel.dataReceived(post(extra=AT_END) + chunk(b"old"))
    channel, transport = fake.connect()
    channel.dataReceived(post(b"/stream/s1?force=true", AT_END) + chunk(b"new") + b"0\r\n\r\n")
    assert parse_response(old_transport.value())[0] == 201 and cut_off(old_transport)
    status, headers, _ = parse_response(transport.value())
    assert status == 201 and headers["x-stream-replaced"] == "true"


def test_http_10_cut_before_the_answer_is_reset(fake):
    """On HTTP/1.0 (no last chunk to withhold) a cut stream resets the connection."""
    channel, transport = fake.connect()
    channel.dataReceived(b"POST /stream/old HTTP/1.0\r\nContent-Length: 9\r\n" + AT_END
                         + b"\r\nabc")
    channel2, _ = fake.connect()
    channel2.dataReceived(b"DELETE /stream/old HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.disconnected  # reset, never closed as if complete


@pytest_twisted.ensureDeferred
async def test_an_append_is_answered_200_at_the_end(fake):
    """A resumed stream's 200 (with X-Stream-Offset) is held back the same way."""
    channel, _ = fake.connect()
    channel.dataReceived(post() + chunk(b"12345"))
    channel.connectionLost(Failure(ConnectionDone()))
    channel, transport = fake.connect()
    channel.dataReceived(post(b"/stream/s1?append=true", AT_END + b"X-Stream-Offset: 5\r\n")
                         + chunk(b"678"))
    assert transport.value() == b""
    channel.dataReceived(b"0\r\n\r\n")
    status, headers, _ = parse_response(transport.value())
    assert status == 200 and headers["x-stream-offset"] == "5"
    assert (await read_all(fake.store, "s1")) == (b"12345678", COMPLETE)


@pytest_twisted.ensureDeferred
async def test_http_10_at_end_answers_then_closes(fake):
    """HTTP/1.0 (nginx with proxy_http_version 1.0): the 201 at the end, then the close."""
    channel, transport = fake.connect()
    channel.dataReceived(b"POST /stream/old HTTP/1.0\r\nContent-Length: 6\r\n" + AT_END
                         + b"\r\nabc")
    assert transport.value() == b""
    channel.dataReceived(b"def")
    assert transport.value().startswith(b"HTTP/1.0 201 Created")
    assert transport.disconnecting
    assert (await read_all(fake.store, "old")) == (b"abcdef", COMPLETE)


@pytest.mark.parametrize("value", [b"at-once", b"AT-ONCE"])
def test_at_once_is_the_default(fake, value):
    """X-Stream-Respond: at-once (any case) is what no header means: the 201 at once."""
    channel, transport = fake.connect()
    channel.dataReceived(post(extra=b"X-Stream-Respond: " + value + b"\r\n") + chunk(b"x"))
    assert parse_response(transport.value())[0] == 201


@pytest.mark.parametrize("extra", [b"X-Stream-Respond: later\r\n",
                                   b"X-Stream-Respond: at-end\r\nX-Stream-Respond: at-end\r\n"])
def test_other_values_are_400_and_create_nothing(fake, extra):
    """An unknown X-Stream-Respond value, or two of them, is a 400 and makes no stream."""
    channel, transport = fake.connect()
    channel.dataReceived(post(extra=extra) + chunk(b"x"))
    status, _, body = parse_response(transport.value())
    assert status == 400 and "X-Stream-Respond" in json_body(body)["error"]
    assert fake.store.live_streams() == []
