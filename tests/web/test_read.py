"""GET /stream/:id through a real channel: finished, live, notail, slow consumers."""

import pytest
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from loom.testing import FakeTCPTransport
from tests.helpers import (
    chunk,
    cut_off,
    dechunk,
    fake_get,
    fake_produce,
    json_body,
    make_fake_site,
    parse_response,
)

GONE = Failure(ConnectionDone())


@pytest.fixture
def fake(tmp_path):
    return make_fake_site(data_dir=str(tmp_path))


def test_finished_stream_is_served_whole_with_headers(fake):
    """A finished stream: 200, Content-Length, octet-stream, metadata and state headers."""
    fake_produce(fake, data=b"all the data", metadata='{"name": "b\u00fcild"}'.encode())
    _, transport = fake_get(fake)
    status, headers, body = parse_response(transport.value())
    assert status == 200 and body == b"all the data"
    assert headers["content-length"] == "12"
    assert headers["content-type"] == "application/octet-stream"
    assert headers["x-stream-metadata"] == '{"name":"b\\u00fcild"}'
    assert headers["x-stream-state"] == "complete"


def test_live_stream_sends_history_then_live_then_a_clean_end(fake):
    """A live stream: what exists, each new chunk as it comes, then the final chunk."""
    producer, _ = fake_produce(fake, data=b"history\n", end=False)
    _, transport = fake_get(fake)
    status, headers, body = parse_response(transport.value())
    assert status == 200 and headers["x-stream-state"] == "live"
    assert "content-length" not in headers and headers["transfer-encoding"] == "chunked"
    assert dechunk(body) == (b"history\n", False)
    producer.dataReceived(chunk(b"live\n"))
    assert dechunk(parse_response(transport.value())[2]) == (b"history\nlive\n", False)
    producer.dataReceived(b"0\r\n\r\n")
    assert dechunk(parse_response(transport.value())[2]) == (b"history\nlive\n", True)
    assert not transport.disconnecting


def test_headers_are_sent_at_once_for_an_empty_live_stream(fake):
    """A follower of a live stream with no data yet gets its headers immediately."""
    fake_produce(fake, end=False)
    _, transport = fake_get(fake)
    assert parse_response(transport.value())[0] == 200


def test_notail_returns_what_exists_now_with_content_length(fake):
    """?notail on a live stream: current content, Content-Length, ends at once."""
    producer, _ = fake_produce(fake, data=b"so far", end=False)
    _, transport = fake_get(fake, b"/stream/s1?notail")
    status, headers, body = parse_response(transport.value())
    assert status == 200 and body == b"so far" and headers["content-length"] == "6"
    assert headers["x-stream-state"] == "live"
    producer.dataReceived(chunk(b" more"))
    assert parse_response(transport.value())[2] == b"so far"


def test_unknown_stream_is_404_with_the_contract_error(fake):
    """An unknown id: 404 and the original service's error text."""
    _, transport = fake_get(fake, b"/stream/ghost")
    status, _, body = parse_response(transport.value())
    assert status == 404
    assert json_body(body) == {"error": "The stream with ID ghost does not exist"}


def test_aborted_producer_cuts_followers_without_the_final_chunk(fake):
    """When the producer disconnects, followers get every byte then a closed connection."""
    producer, _ = fake_produce(fake, data=b"partial", end=False)
    _, transport = fake_get(fake)
    producer.connectionLost(GONE)
    body = parse_response(transport.value())[2]
    assert dechunk(body) == (b"partial", False)
    assert cut_off(transport)


def test_follower_is_a_push_producer_that_stops_when_the_transport_is_full(fake):
    """A consumer that stops reading pauses its follower: nothing more is buffered for it."""
    producer, _ = fake_produce(fake, end=False)
    channel, transport = fake_get(fake)
    follower = channel._requestProducer
    assert follower is not None
    channel.pauseProducing()  # what the TCP transport does when its buffer is full
    size = len(transport.value())
    for _ in range(200):
        producer.dataReceived(chunk(b"x" * 65536))
    assert len(transport.value()) == size  # 12.5 MiB arrived, none of it was queued
    channel.resumeProducing()
    while fake.clock.getDelayedCalls() and len(dechunk(parse_response(transport.value())[2])[0]) < 200 * 65536:
        fake.clock.advance(0)
    assert len(dechunk(parse_response(transport.value())[2])[0]) == 200 * 65536


def test_follower_leaving_unsubscribes(fake):
    """A follower whose client disconnects is removed from the stream at once."""
    fake_produce(fake, end=False)
    channel, _ = fake_get(fake)
    stream = fake.store.live_streams()[0]
    assert stream.listener_count == 1
    channel.connectionLost(GONE)
    assert stream.listener_count == 0


def test_get_on_the_collection_is_405(fake):
    """GET /stream is not a stream: 405 with Allow: POST."""
    _, transport = fake_get(fake, b"/stream")
    status, headers, _ = parse_response(transport.value())
    assert status == 405 and headers["allow"] == "POST"


class BreakingTransport(FakeTCPTransport):
    """A reader's transport that raises on every write once ``broken``: a bug anywhere
    between a follower (or a spy) and its socket."""

    broken = False

    def write(self, data):
        if self.broken:
            raise RuntimeError("the reader's transport broke")
        super().write(data)

    def writeSequence(self, data):
        if self.broken:
            raise RuntimeError("the reader's transport broke")
        super().writeSequence(data)


@pytest.mark.parametrize("target", [b"/stream/s1", b"/spy"])
def test_a_reader_whose_writes_raise_is_dropped_alone(fake, failures, target):
    """A follower or spy client that raises while being handed a chunk is logged and
    dropped; the producer goes on, and the readers after it get every byte."""
    producer, producer_transport = fake_produce(fake, data=b"history\n", end=False)
    _, broken = fake_get(fake, target, transport=BreakingTransport())
    _, follower = fake_get(fake)
    _, spy = fake_get(fake, b"/spy")
    broken.broken = True
    producer.dataReceived(chunk(b"live\n"))
    producer.dataReceived(chunk(b"more\n"))
    assert cut_off(broken)
    assert len(failures) == 1 and "dropped" in failures[0]["log_format"]
    assert not cut_off(producer_transport) and not cut_off(follower)
    producer.dataReceived(b"0\r\n\r\n")
    assert parse_response(producer_transport.value())[0] == 201
    assert producer_transport.value().endswith(b"0\r\n\r\n")  # a clean end: complete
    assert dechunk(parse_response(follower.value())[2]) == (b"history\nlive\nmore\n", True)
    spied = dechunk(parse_response(spy.value())[2])[0]
    assert b"s1 | live\n" in spied and b"s1 | more\n" in spied
    _, transport = fake_get(fake)
    assert parse_response(transport.value())[1]["x-stream-state"] == "complete"


def test_a_spy_client_that_raises_on_a_new_stream_is_dropped_alone(fake, failures):
    """A /spy client that raises while being told a stream started is logged and dropped,
    not left connected and deaf; the new stream and the other spy clients go on."""
    _, broken = fake_get(fake, b"/spy", transport=BreakingTransport())
    _, spy = fake_get(fake, b"/spy")
    broken.broken = True
    producer, producer_transport = fake_produce(fake, data=b"first line\n", end=False)
    assert cut_off(broken)
    assert len(failures) == 1
    assert fake.store.observer_count == 1  # the other spy client only
    producer.dataReceived(b"0\r\n\r\n")
    assert producer_transport.value().endswith(b"0\r\n\r\n")
    assert b"s1 | first line\n" in dechunk(parse_response(spy.value())[2])[0]
