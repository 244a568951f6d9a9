"""The fast paths built for speed must never change a byte: decoder, pieces, direct sends."""

import errno
import random

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock
from loom.web.chunked import MalformedBody

from loom.buffers import pieces
from loom.store import DiskStore, InlineRunners
from loom.web.chunked import BodyDecoder as _BodyDecoder
from tests.helpers import FaultyFileSystem, chunk, guard, raw_connect, start_producer


def decode(body: bytes, splits, length=None):
    """Feed ``body`` to a decoder in pieces cut at ``splits``; return (payload, rest, calls)."""
    got, ended, calls = bytearray(), [], [0]

    def on_data(parts):
        calls[0] += 1
        for part in parts:
            got.extend(part)

    decoder = _BodyDecoder(length, on_data, ended.append)
    cuts = [0, *splits, len(body)]
    after = b""
    for start, end in zip(cuts, cuts[1:]):
        if end > start:
            if ended:  # the body is over: the channel parses what follows
                after += body[start:end]
            else:
                decoder.dataReceived(body[start:end])
    return bytes(got), (ended[0] + after if ended else None), calls[0]


CHUNKED = (chunk(b"hello ") + b"5;ext=1\r\nworld\r\n" + chunk(b"x" * 300)
           + b"0\r\nTrailer: t\r\n\r\nNEXT REQUEST")
PAYLOAD = b"hello world" + b"x" * 300


@pytest.mark.parametrize("split", range(1, len(CHUNKED)))
def test_chunked_body_decodes_the_same_wherever_the_reads_split(split):
    """Cut anywhere, the decoder yields the payload exactly and hands back what follows."""
    payload, rest, _ = decode(CHUNKED, [split])
    assert payload == PAYLOAD and rest == b"NEXT REQUEST"


def test_chunked_body_byte_by_byte_and_in_random_reads():
    """One byte at a time, or in random pieces: the same payload."""
    assert decode(CHUNKED, range(1, len(CHUNKED)))[:2] == (PAYLOAD, b"NEXT REQUEST")
    rng = random.Random(7)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(CHUNKED)), 5))
        assert decode(CHUNKED, cuts)[:2] == (PAYLOAD, b"NEXT REQUEST")


def test_one_call_per_read_however_many_chunks_it_holds():
    """A read carrying a hundred chunks is handed over in one call."""
    body = b"".join(chunk(b"line %d\n" % i) for i in range(100)) + b"0\r\n\r\n"
    payload, rest, calls = decode(body, [])
    assert payload == b"".join(b"line %d\n" % i for i in range(100))
    assert rest == b"" and calls == 1


def test_content_length_body_and_what_follows():
    """With a Content-Length, exactly that many bytes are the body."""
    payload, rest, _ = decode(b"0123456789GET / HTTP/1.1", [3, 7], length=10)
    assert (payload, rest) == (b"0123456789", b"GET / HTTP/1.1")


def test_malformed_chunking_delivers_the_good_bytes_then_raises():
    """Bytes before a malformation are delivered; then Twisted's own error is raised."""
    got = []
    decoder = _BodyDecoder(None, lambda parts: got.extend(bytes(p) for p in parts), None)
    with pytest.raises(MalformedBody):
        decoder.dataReceived(chunk(b"good") + b"zz\r\nbad\r\n")
    assert got == [b"good"]


def test_pieces_split_without_copying_and_without_losing_a_byte():
    """pieces() cuts any list of buffers into bounded runs that add up to the input."""
    parts = [b"a" * 10, memoryview(b"b" * 25), b"c" * 7]
    runs = list(pieces(parts, 42, 8))
    assert all(size <= 8 for _, size in runs)
    assert b"".join(bytes(p) for run, _ in runs for p in run) == b"a" * 10 + b"b" * 25 + b"c" * 7
    assert [size for _, size in runs] == [8, 8, 8, 8, 8, 2]
    assert list(pieces(parts, 42, 100)) == [(parts, 42)]


@pytest_twisted.ensureDeferred
async def test_a_slow_reader_of_a_fast_stream_gets_every_byte_in_order(server):
    """Direct sends, partial sends and catching up from the file: exactly the bytes sent."""
    producer = await start_producer(server.port, b"exact")
    reader = await raw_connect(server.port)
    reader.send(b"GET /stream/exact HTTP/1.0\r\n\r\n")
    await reader.wait_for(b"\r\n\r\n")
    rng = random.Random(3)
    sent = bytearray()
    for index in range(400):
        piece = rng.randbytes(rng.choice((1, 100, 4000, 70000, 200000)))
        producer.send(chunk(piece))
        sent += piece
        if index % 50 == 0:
            # Stall the reader now and then, so the server falls back and catches up.
            reader.transport.pauseProducing()
            reactor.callLater(0.05, reader.transport.resumeProducing)
    producer.send(b"0\r\n\r\n")
    await producer.wait_for(b"0\r\n\r\n")
    await guard(reader.closed, 60)
    body = bytes(reader.received).partition(b"\r\n\r\n")[2]
    assert len(body) == len(sent) and body == bytes(sent)
    producer.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_reads_grow_for_bulk_bodies_and_shrink_for_trickles(server):
    """A bulk upload is read in large pieces; a trickle goes back to small ones."""
    producer = await start_producer(server.port, b"adaptive")
    [channel] = [c for c in server.service.site.channels if c._adaptive_reads]
    assert channel.transport.bufferSize == 64 * 1024
    follower = await raw_connect(server.port)
    follower.send(b"GET /stream/adaptive HTTP/1.0\r\n\r\n")
    producer.send(chunk(b"z" * (8 * 1024 * 1024)))
    await follower.wait_for(lambda got: len(got) > 8 * 1024 * 1024)
    assert channel.transport.bufferSize > 64 * 1024
    for index in range(40):
        producer.send(chunk(b"small %d\n" % index))
        await follower.wait_for(b"small %d\n" % index)
    assert channel.transport.bufferSize == 64 * 1024
    producer.transport.loseConnection()
    follower.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_many_live_streams_are_synced_with_one_syncfs(tmp_path):
    """With several dirty streams, one interval costs one syncfs, not an fsync each."""
    faults = FaultyFileSystem()
    clock = Clock()
    store = DiskStore(str(tmp_path), clock, InlineRunners(), fs=faults)
    store.start()
    streams = [(await store.create(f"s{i}", "{}")) for i in range(5)]
    for stream in streams:
        stream.append(b"data")
    before = faults.calls.get("fsync", 0)
    clock.advance(1.0)
    assert faults.calls.get("fsync", 0) - before == 1  # the one syncfs (it counts as a sync)
    assert all(stream.synced == 4 for stream in streams)


@pytest_twisted.ensureDeferred
async def test_a_failed_syncfs_falls_back_to_one_fsync_per_stream(tmp_path):
    """If syncfs fails, each stream is synced on its own, so a failure lands on its stream."""
    faults = FaultyFileSystem()
    clock = Clock()
    store = DiskStore(str(tmp_path), clock, InlineRunners(), fs=faults)
    store.start()
    streams = [(await store.create(f"s{i}", "{}")) for i in range(3)]
    for stream in streams:
        stream.append(b"data")

    def broken_syncfs(fd):
        raise OSError(errno.EIO, "Input/output error")

    faults.syncfs = broken_syncfs
    before = faults.calls.get("fsync", 0)
    clock.advance(1.0)
    assert faults.calls["fsync"] - before >= 3  # one per stream (and directory)
    assert all(stream.synced == 4 for stream in streams)
