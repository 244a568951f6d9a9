"""Resume, inspect, manage — through a real channel fed raw bytes (Clock, fakes)."""

import json
import os

import pytest
import pytest_twisted
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from twisted.internet.task import Clock

from loom.config import Token
from loom.store import DiskStore
from loom.testing import ManualRunners
from tests.helpers import chunk, cut_off, dechunk, json_body, make_fake_site, parse_response
from loom.testing import read_all

GONE = Failure(ConnectionDone())


@pytest.fixture
def fake(tmp_path):
    fake = make_fake_site(data_dir=str(tmp_path))
    produce(fake, b"done", b"0123456789", end=True)
    return fake


def produce(fake, stream_id, data=b"", end=True, metadata=b""):
    channel, transport = fake.connect()
    channel.dataReceived(
        b"POST /stream/" + stream_id + b" HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        + (b"X-Stream-Metadata: " + metadata + b"\r\n" if metadata else b"") + b"\r\n"
        + (chunk(data) if data else b"") + (b"0\r\n\r\n" if end else b"")
    )
    return channel, transport


def request(fake, method, target, headers=b"", body=b""):
    channel, transport = fake.connect()
    channel.dataReceived(method + b" " + target + b" HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n"
                         + body)
    return channel, transport


# --- reading from an offset or a range ---------------------------------------------


@pytest.mark.parametrize(
    "range_header, status, body, content_range",
    [(b"bytes=2-5", 206, b"2345", "bytes 2-5/10"),
     (b"bytes=7-", 206, b"789", "bytes 7-9/10"),
     (b"bytes=-3", 206, b"789", "bytes 7-9/10"),
     (b"bytes=8-100", 206, b"89", "bytes 8-9/10"),
     (b"bytes=-100", 206, b"0123456789", "bytes 0-9/10"),
     (b"bytes=0-0", 206, b"0", "bytes 0-0/10"),
     (b"bytes=1-2,4-5", 200, b"0123456789", None),
     (b"items=1-2", 200, b"0123456789", None),
     (b"bytes=5-2", 200, b"0123456789", None)],
)
def test_ranges_of_a_finished_stream(fake, range_header, status, body, content_range):
    """A single byte range gets 206 and Content-Range; what Loom cannot honour is ignored."""
    _, transport = request(fake, b"GET", b"/stream/done", b"Range: " + range_header + b"\r\n")
    got, headers, content = parse_response(transport.value())
    assert (got, content) == (status, body)
    assert headers.get("content-range") == content_range
    assert headers["accept-ranges"] == "bytes"
    assert headers["content-length"] == str(len(body))


@pytest.mark.parametrize("range_header", [b"bytes=10-", b"bytes=50-60", b"bytes=-0"])
def test_unsatisfiable_range_is_416_with_the_size(fake, range_header):
    """A range outside the stream: 416 with Content-Range: bytes */<size>."""
    _, transport = request(fake, b"GET", b"/stream/done", b"Range: " + range_header + b"\r\n")
    status, headers, body = parse_response(transport.value())
    assert status == 416 and headers["content-range"] == "bytes */10"
    assert "error" in json_body(body)


@pytest.mark.parametrize("range_header", [b"bytes=-5", b"bytes=0-", b"bytes=0-0"])
def test_no_range_of_an_empty_stream_is_satisfiable(fake, range_header):
    """An empty stream has no bytes to give: every range is 416 with bytes */0."""
    produce(fake, b"empty", end=True)
    _, transport = request(fake, b"GET", b"/stream/empty", b"Range: " + range_header + b"\r\n")
    status, headers, _ = parse_response(transport.value())
    assert status == 416 and headers["content-range"] == "bytes */0"


def test_offset_reads_a_finished_stream_from_a_byte(fake):
    """?offset=N starts at byte N; past the end is 416; not a number is 400."""
    _, transport = request(fake, b"GET", b"/stream/done?offset=4")
    assert parse_response(transport.value())[2] == b"456789"
    _, transport = request(fake, b"GET", b"/stream/done?offset=10")
    assert parse_response(transport.value())[2] == b""
    _, transport = request(fake, b"GET", b"/stream/done?offset=11")
    assert parse_response(transport.value())[0] == 416
    _, transport = request(fake, b"GET", b"/stream/done?offset=-1")
    assert parse_response(transport.value())[0] == 400


def test_offset_then_live(fake):
    """?offset=N on a live stream: from byte N, then live, then the clean end — unless the
    stream ended before byte N, which no clean end may suggest it reached."""
    producer, _ = produce(fake, b"live", b"abcdef", end=False)
    _, transport = request(fake, b"GET", b"/stream/live?offset=4")
    producer.dataReceived(chunk(b"ghi"))
    _, transport2 = request(fake, b"GET", b"/stream/live?offset=20")  # waits for byte 20
    producer.dataReceived(b"0\r\n\r\n")
    assert dechunk(parse_response(transport.value())[2]) == (b"efghi", True)
    assert dechunk(parse_response(transport2.value())[2]) == (b"", False)


def test_head_has_the_get_headers_size_and_state_but_no_body(fake):
    """HEAD: what GET would say, plus X-Stream-Size and X-Stream-State, no body."""
    produce(fake, b"live", b"abc", end=False)
    _, transport = request(fake, b"HEAD", b"/stream/done")
    status, headers, body = parse_response(transport.value())
    assert status == 200 and body == b""
    assert headers["x-stream-size"] == "10" and headers["x-stream-state"] == "complete"
    assert headers["content-length"] == "10" and headers["accept-ranges"] == "bytes"
    _, transport = request(fake, b"HEAD", b"/stream/live")
    status, headers, body = parse_response(transport.value())
    assert headers["x-stream-size"] == "3" and headers["x-stream-state"] == "live"
    assert body == b"" and transport.value().endswith(b"\r\n\r\n")
    _, transport = request(fake, b"HEAD", b"/stream/ghost")
    assert parse_response(transport.value())[0] == 404


# --- appending -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_append_continues_an_aborted_stream(fake):
    """POST ?append=true with the right X-Stream-Offset: 200, appended, one stream."""
    producer, _ = produce(fake, b"s", b"part one,", end=False)
    producer.connectionLost(GONE)
    assert (await read_all(fake.store, "s")) == (b"part one,", "aborted")
    channel, transport = request(fake, b"POST", b"/stream/s?append=true",
                                 b"X-Stream-Offset: 9\r\nTransfer-Encoding: chunked\r\n",
                                 chunk(b" part two") + b"0\r\n\r\n")
    status, headers, _ = parse_response(transport.value())
    assert status == 200 and headers["x-stream-offset"] == "9"
    assert headers["x-stream-id"] == "s"
    assert (await read_all(fake.store, "s")) == (b"part one, part two", "complete")


@pytest_twisted.ensureDeferred
async def test_append_with_the_wrong_offset_is_416_with_the_size(fake):
    """A producer that is wrong about the size learns it from X-Stream-Size; nothing stored."""
    producer, _ = produce(fake, b"s", b"12345", end=False)
    producer.connectionLost(GONE)
    _, transport = request(fake, b"POST", b"/stream/s?append=true",
                           b"X-Stream-Offset: 9\r\nContent-Length: 3\r\n", b"xyz")
    status, headers, _ = parse_response(transport.value())
    assert status == 416 and headers["x-stream-size"] == "5"
    assert (await read_all(fake.store, "s")) == (b"12345", "aborted")


@pytest.mark.parametrize(
    "target, headers, status",
    [(b"/stream/done?append=true", b"X-Stream-Offset: 10\r\n", 409),
     (b"/stream/ghost?append=true", b"X-Stream-Offset: 0\r\n", 404),
     (b"/stream/done?append=true", b"", 400),
     (b"/stream/done?append=true", b"X-Stream-Offset: ten\r\n", 400),
     (b"/stream?append=true", b"X-Stream-Offset: 0\r\n", 400),
     (b"/stream/done?append=true&force=true", b"X-Stream-Offset: 10\r\n", 400)],
)
def test_bad_appends_are_refused_clearly(fake, target, headers, status):
    """A complete stream, an unknown one, a missing or bad offset, no id, or with force."""
    _, transport = request(fake, b"POST", target, headers + b"Content-Length: 1\r\n", b"x")
    got, _, body = parse_response(transport.value())
    assert got == status and "error" in json_body(body)


# --- deleting ----------------------------------------------------------------------------


def test_delete_a_live_stream(fake):
    """DELETE: 204; the producer is cut; followers are closed without the final chunk."""
    producer, producer_transport = produce(fake, b"s", b"data", end=False)
    _, follower = request(fake, b"GET", b"/stream/s")
    _, transport = request(fake, b"DELETE", b"/stream/s")
    assert parse_response(transport.value())[0] == 204
    assert cut_off(producer_transport)
    assert cut_off(follower)
    _, transport = request(fake, b"GET", b"/stream/s")
    assert parse_response(transport.value())[0] == 404
    _, transport = request(fake, b"DELETE", b"/stream/s")
    assert parse_response(transport.value())[0] == 404


@pytest_twisted.ensureDeferred
async def test_a_delete_whose_client_left_still_deletes_and_logs_no_traceback(tmp_path, failures):
    """The client of a DELETE hangs up while the bytes are being removed: the handler is
    cancelled where it waits (nobody to answer), the deletion itself runs to its end."""
    runners = ManualRunners()
    fake = make_fake_site(store=DiskStore(str(tmp_path), Clock(), runners))
    produce(fake, b"s", b"data", end=True)
    while runners.pending:
        runners.run_next()  # the final sync
    handle = await fake.store.open("s")
    path = fake.store.data_path(handle.record.storage)
    handle.close()
    channel, transport = request(fake, b"DELETE", b"/stream/s")
    assert runners.pending and transport.value() == b""  # removing the file waits
    channel.connectionLost(GONE)
    while runners.pending:
        runners.run_next()
    assert failures == []
    assert transport.value() == b""
    assert not path.exists()
    _, transport = request(fake, b"GET", b"/stream/s")
    assert parse_response(transport.value())[0] == 404


# --- scopes ---------------------------------------------------------------------------------


ROUTES = {
    "write": [b"POST /stream/new HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n%s\r\nx"],
    "read": [b"GET /stream/done HTTP/1.1\r\nHost: x\r\n%s\r\n",
             b"HEAD /stream/done HTTP/1.1\r\nHost: x\r\n%s\r\n",
             b"GET /streams HTTP/1.1\r\nHost: x\r\n%s\r\n",
             b"GET /metrics HTTP/1.1\r\nHost: x\r\n%s\r\n"],
    "spy": [b"GET /spy HTTP/1.1\r\nHost: x\r\n%s\r\n"],
    "admin": [b"DELETE /stream/done HTTP/1.1\r\nHost: x\r\n%s\r\n"],
}
TOKENS = {
    "legacy": Token("sekrit-legacy"),
    "writer": Token("sekrit-writer", frozenset({"write"})),
    "dashboard": Token("sekrit-dash", frozenset({"read", "spy"})),
    "ops": Token("sekrit-ops", frozenset({"admin"})),
}
ALLOWED = {"legacy": {"write", "read", "spy", "admin"}, "writer": {"write"},
           "dashboard": {"read", "spy"}, "ops": {"write", "read", "spy", "admin"}}


@pytest.mark.parametrize("who", sorted(TOKENS))
@pytest.mark.parametrize("scope", sorted(ROUTES))
def test_each_token_may_do_what_its_scopes_allow(tmp_path, who, scope):
    """write = POST, read = GET/HEAD/listing/metrics, spy = /spy, admin = all; else 403 JSON."""
    fake = make_fake_site(data_dir=str(tmp_path), tokens=tuple(TOKENS.values()))
    channel, _ = fake.connect()
    channel.dataReceived(b"POST /stream/done HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                         b"sekrit-legacy\r\nContent-Length: 2\r\n\r\nok")
    header = b"Authorization: Bearer " + TOKENS[who].secret.encode() + b"\r\n"
    for template in ROUTES[scope]:
        channel, transport = fake.connect()
        channel.dataReceived(template.replace(b"%s", header))
        status, headers, body = parse_response(transport.value())
        if scope in ALLOWED[who]:
            assert status in (200, 201, 204), (who, template[:20], status)
        else:
            assert status == 403, (who, template[:20], status)
            if not template.startswith(b"HEAD"):
                assert f"needs the {scope} scope" in json_body(body)["error"]


def test_health_needs_no_token_and_reports_trouble(tmp_path):
    """/health answers without a token: 200 when usable, 503 when the catalog is gone."""
    fake = make_fake_site(data_dir=str(tmp_path), tokens=("sekrit-x",))
    _, transport = request(fake, b"GET", b"/health")
    status, _, body = parse_response(transport.value())
    assert status == 200 and json_body(body) == {"status": "ok"}
    os.unlink(fake.store.catalog_path)  # deleted under the running server
    _, transport = request(fake, b"GET", b"/health")
    status, _, body = parse_response(transport.value())
    assert status == 503 and json_body(body)["status"] == "unavailable"


def test_metrics_in_prometheus_text_format(fake):
    """/metrics: streams live and total, bytes in and out, followers, spies, fsync, errors."""
    produce(fake, b"live", b"abc", end=False)
    request(fake, b"GET", b"/stream/live")
    request(fake, b"GET", b"/spy")
    request(fake, b"GET", b"/stream/done")
    fake.clock.advance(1.0)  # an interval sync, timed
    _, transport = request(fake, b"GET", b"/metrics")
    status, headers, body = parse_response(transport.value())
    assert status == 200 and headers["content-type"].startswith("text/plain")
    text = body.decode()
    spy_line = len(b"START live {}\n")
    for line in ("loom_streams_live 1.0", "loom_streams 2.0", "loom_bytes_in_total 13.0",
                 f"loom_bytes_out_total {10 + 3 + spy_line}.0", "loom_followers 1.0",
                 "loom_spy_clients 1.0", "loom_fsync_seconds_count 2.0"):
        assert line in text, (line, text)
    fake.store.errors["sync"] += 1
    _, transport = request(fake, b"GET", b"/metrics", b"Accept: text/plain;version=0.0.4\r\n")
    assert "version=0.0.4" in parse_response(transport.value())[1]["content-type"]
    assert 'loom_errors_total{kind="sync"} 1.0' in parse_response(transport.value())[2].decode()


# --- listing ------------------------------------------------------------------------------------


def test_listing_over_http(tmp_path):
    """GET /streams: JSON, filters, newest first, and a cursor to the next page."""
    fake = make_fake_site(data_dir=str(tmp_path))
    for index in range(3):
        produce(fake, b"s%d" % index, b"x", metadata=b'{"branch": "main", "n": %d}' % index)
        fake.clock.advance(1)
    _, transport = request(fake, b"GET", b"/streams?limit=2&meta.branch=main")
    page = json_body(parse_response(transport.value())[2])
    assert [s["id"] for s in page["streams"]] == ["s2", "s1"]
    first = page["streams"][0]
    assert first["state"] == "complete" and first["size"] == 1
    assert first["metadata"] == {"branch": "main", "n": 2}
    assert first["created"].endswith("Z") and first["finished"].endswith("Z")
    _, transport = request(fake, b"GET", b"/streams?limit=2&meta.branch=main&cursor="
                           + page["next"].encode())
    page = json_body(parse_response(transport.value())[2])
    assert [s["id"] for s in page["streams"]] == ["s0"] and page["next"] is None
    _, transport = request(fake, b"GET", b"/streams?meta.n=1")
    assert [s["id"] for s in json_body(parse_response(transport.value())[2])["streams"]] == ["s1"]
    _, transport = request(fake, b"GET", b"/streams?since=1970-01-01T00:00:01Z&until=2")
    assert [s["id"] for s in json_body(parse_response(transport.value())[2])["streams"]] == ["s1"]


@pytest.mark.parametrize(
    "query",
    [b"state=happy", b"limit=0", b"limit=5000", b"since=yesterday", b"until=2026-01-01",
     b"since=" + b"9" * 400, b"until=0001-01-01T00:00:00Z", b"cursor=nonsense",
     b"cursor=WzFlKzQwMCwieCJd", b"cursor=Wzk5OTk5OTk5OTk5OTk5OTk5OTk5OTksIngiXQ",
     b"cursor=W3RydWUsIngiXQ", b"colour=blue"],
)
def test_bad_listing_parameters_are_400(fake, query):
    """Unknown states, limits out of range, bad times, foreign cursors, unknown parameters."""
    _, transport = request(fake, b"GET", b"/streams?" + query)
    status, _, body = parse_response(transport.value())
    assert status == 400 and "error" in json.loads(body)
