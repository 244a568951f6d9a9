"""Hostile input: ids, metadata, smuggling and malformed chunking. Never a 5xx,
never a file outside the data directory, never a stored stream with foreign bytes."""

import json
import os

import pytest
import pytest_twisted

from tests.helpers import (
    chunk,
    cut_off,
    make_fake_site,
    parse_response,
    raw_connect,
    start_server,
)
from loom.testing import read_all

HOSTILE_IDS = [
    b"..", b".", b"...", b"%2e%2e", b"%2E%2E%2Fetc", b"..%2f..%2fetc%2fpasswd", b"a%2Fb",
    b"%2F", b"%5c..%5cwin", b"a%00b", b"%00", b".hidden", b".env", b"x" * 129, b"x" * 4096,
    b"%C3%A9t%C3%A9", b"%FF%FE", b"a%20b", b"a%0d%0aX-Injected:%20yes", b"a%09b", b"%7e%2f",
    b"con:", b"a*b", b"a%3Fb=c", b"%25", b"a%2fb%2f..%2f..", b"~%2f..",
]

HOSTILE_METADATA = [
    b"{", b"}", b"null", b"[]", b'"text"', b"1", b"true",
    b'{"a": NaN}', b'{"a": Infinity}', b'{"a": -Infinity}', b'{"a": 1e999}',
    b'{"a": ' + b"9" * 5000 + b"}", b'{"a": -' + b"1" * 4400 + b"}",
    b"[" * 3000 + b"]" * 3000, b'{"a":' * 100 + b"1" + b"}" * 100,
    b'{"a": "\xff\xfe"}', b"\xc3\x28", b'{"a": "\xed\xa0\x80"}',
    b"{" + b",".join(b'"k%d": %d' % (i, i) for i in range(2000)) + b"}",
    b'{"a": "' + b"x" * 9000 + b'"}', b'{"a": 1} trailing', b"{'single': 'quotes'}",
    b'{"a": undefined}', b"{\"a\": 0x10}", b'{"a": 01}',
]


@pytest.fixture
def fake(tmp_path):
    return make_fake_site(data_dir=str(tmp_path / "data"))


def tree(root) -> list:
    return sorted((path, sorted(files)) for path, _, files in os.walk(root))


@pytest.mark.parametrize("raw_id", HOSTILE_IDS)
@pytest.mark.parametrize("method", [b"GET", b"POST"])
def test_hostile_ids_get_4xx_json_and_create_nothing(tmp_path, fake, raw_id, method):
    """Every hostile id is a 4xx JSON answer; nothing appears anywhere on disk."""
    outside = tree(tmp_path)
    channel, transport = fake.connect()
    body = b"Content-Length: 4\r\n\r\ndata" if method == b"POST" else b"\r\n"
    channel.dataReceived(method + b" /stream/" + raw_id + b" HTTP/1.1\r\nHost: x\r\n" + body)
    status, headers, answer = parse_response(transport.value())
    assert 400 <= status < 500, (raw_id, status)
    assert headers["content-type"] == "application/json"
    assert "error" in json.loads(answer)
    assert b"X-Injected" not in transport.value()
    assert tree(tmp_path) == outside


@pytest.mark.parametrize("metadata", HOSTILE_METADATA)
def test_hostile_metadata_gets_4xx_json_and_creates_no_stream(fake, metadata):
    """Malformed, non-finite, non-object, deep, huge or badly encoded metadata: 4xx, no stream."""
    channel, transport = fake.connect()
    channel.dataReceived(b"POST /stream/m HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
                         b"X-Stream-Metadata: " + metadata + b"\r\n\r\nx")
    status, headers, answer = parse_response(transport.value())
    assert status in (400, 413), (metadata[:40], status)
    assert "error" in json.loads(answer)
    assert fake.store.live_streams() == []


@pytest_twisted.ensureDeferred
async def test_many_keys_within_the_limit_are_fine(fake):
    """A large but valid object (hundreds of keys, under 8 KiB) is accepted and echoed."""
    metadata = {f"key{i}": i for i in range(500)}
    raw = json.dumps(metadata).encode()
    assert len(raw) < 8192
    channel, transport = fake.connect()
    channel.dataReceived(b"POST /stream/keys HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                         b"X-Stream-Metadata: " + raw + b"\r\n\r\n")
    assert parse_response(transport.value())[0] == 201
    assert json.loads((await fake.store.open("keys")).metadata_json) == metadata


SMUGGLING = {
    "content-length and chunked":
        b"POST /stream/s HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n4\r\nEVIL\r\n0\r\n\r\n",
    "chunked and content-length":
        b"POST /stream/s HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 4\r\n\r\n4\r\nEVIL\r\n0\r\n\r\n",
    "two content-lengths":
        b"POST /stream/s HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 8\r\n\r\n"
        b"EVILEVIL",
    "two equal content-lengths":
        b"POST /stream/s HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nEVIL",
    "signed content-length":
        b"POST /stream/s HTTP/1.1\r\nHost: x\r\nContent-Length: +4\r\n\r\nEVIL",
    "content-length list":
        b"POST /stream/s HTTP/1.1\r\nHost: x\r\nContent-Length: 4, 4\r\n\r\nEVIL",
    "unknown transfer-encoding":
        b"POST /stream/s HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
        b"4\r\nEVIL\r\n0\r\n\r\n",
    "obfuscated transfer-encoding":
        b"POST /stream/s HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n"
        b"4\r\nEVIL\r\n0\r\n\r\n",
    "header with a space before the colon":
        b"POST /stream/s HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n"
        b"4\r\nEVIL\r\n0\r\n\r\n",
}


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("name", sorted(SMUGGLING))
async def test_smuggling_attempts_are_refused_and_store_nothing(fake, name):
    """Ambiguous framing is refused before any stream exists; no foreign bytes are stored."""
    channel, transport = fake.connect()
    channel.dataReceived(SMUGGLING[name])
    status = parse_response(transport.value())[0]
    assert status == 400, (name, transport.value()[:120])
    assert transport.write_closed or transport.disconnecting or transport.disconnected
    from loom.errors import StreamNotFound

    with pytest.raises(StreamNotFound):
        (await fake.store.open("s"))


BAD_CHUNKS = {
    "negative size": b"-1\r\nx\r\n",
    "hex prefix": b"0x4\r\nEVIL\r\n",
    "not hex": b"zz\r\nEVIL\r\n",
    "plus sign": b"+4\r\nEVIL\r\n",
    "space in size": b" 4\r\nEVIL\r\n",
    "empty size line": b"\r\nEVIL\r\n",
    "data longer than its size": b"4\r\nokayEVIL\r\n",
    "bare LF": b"4\nEVIL\n",
    "bad extension": b"4;\x00\r\nEVIL\r\n",
    "size line too long": b"4" + b";x" * 1000 + b"\r\nEVIL\r\n",
}


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("name", sorted(BAD_CHUNKS))
async def test_malformed_chunk_mid_stream_aborts_and_keeps_only_good_bytes(fake, name):
    """A malformed chunk after good ones aborts the producer; the stream holds only the good bytes."""
    channel, transport = fake.connect()
    channel.dataReceived(b"POST /stream/c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                         + chunk(b"good "))
    assert parse_response(transport.value())[0] == 201
    before = transport.value()
    channel.dataReceived(BAD_CHUNKS[name] + chunk(b"more") + b"0\r\n\r\n")
    assert cut_off(transport), name
    assert transport.value() == before  # nothing spliced into the 201 response
    channel.connectionLost(None)
    data, state = (await read_all(fake.store, "c"))
    assert data.startswith(b"good ") and b"EVIL" not in data and b"more" not in data
    assert state == "aborted"


@pytest_twisted.ensureDeferred
async def test_hostile_corpus_on_a_real_server_never_gets_a_5xx(tmp_path):
    """Over loopback: every hostile id and metadata gets a 4xx, none a 5xx; no stray files."""
    server = await start_server(tmp_path / "data")
    outside = tree(tmp_path)
    statuses = []
    try:
        for raw_id in HOSTILE_IDS:
            client = await raw_connect(server.port)
            client.send(b"POST /stream/" + raw_id + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 4"
                        b"\r\n\r\ndata")
            statuses.append(int((await client.wait_for(b"\r\n\r\n")).split()[1]))
            client.transport.loseConnection()
        for metadata in HOSTILE_METADATA:
            client = await raw_connect(server.port)
            client.send(b"POST /stream/m HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
                        b"X-Stream-Metadata: " + metadata + b"\r\n\r\nx")
            statuses.append(int((await client.wait_for(b"\r\n\r\n")).split()[1]))
            client.transport.loseConnection()
    finally:
        await server.service.stopService()
    assert all(400 <= status < 500 for status in statuses), statuses
    assert [entry for entry in tree(tmp_path) if "data" not in entry[0]] == [
        entry for entry in outside if "data" not in entry[0]]
