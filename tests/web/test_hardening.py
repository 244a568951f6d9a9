"""Inputs that used to crash a request, and scopes that used to say less than they meant.

Through a real channel fed raw bytes (Clock, fakes); the loopback corpus is in
tests/web/test_corpus.py.
"""

import json

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from loom.config import Token
from loom.store import DiskStore
from tests.helpers import chunk, cut_off, json_body, make_fake_site, parse_response
from loom.testing import ManualRunners, read_all


@pytest.fixture
def fake(tmp_path):
    fake = make_fake_site(data_dir=str(tmp_path))
    send(fake, b"POST /stream/done HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n0123456789")
    return fake


def send(fake, raw: bytes):
    channel, transport = fake.connect()
    channel.dataReceived(raw)
    return channel, transport


def answer(fake, raw: bytes):
    """(status, headers, body) of the answer to ``raw``."""
    return parse_response(send(fake, raw)[1].value())


def get(target: bytes, headers: bytes = b"") -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n"


# --- query strings and numbers ----------------------------------------------------------------

BAD_QUERIES = [
    b"/streams?%FF=1", b"/stream/done?notail=%FF", b"/stream/done?offset=%C3%A9",
    b"/stream/done?offset=" + b"9" * 5000, b"/stream/done?offset=99999999999999999999",
    b"/stream/done?offset=-1", b"/stream/done?offset=%D9%A1", b"/stream/done?offset=1&offset=2",
    b"/stream/done?notail&notail", b"/streams?limit=" + b"9" * 5000, b"/streams?limit=%D9%A1",
    b"/streams?limit=1&limit=2", b"/streams?meta.%FF=x", b"/streams?meta.a=%FF%FE",
    b"/streams?state=%FF", b"/streams?since=%D9%A1%D9%A2", b"/streams?since=1." + b"1" * 5000,
    b"/streams?%E2%82%AC=1", b"/spy?color=%00", b"/streams?cursor=" + b"W" * 5000,
]


@pytest.mark.parametrize("target", BAD_QUERIES)
def test_any_query_string_gets_a_4xx_json_answer(fake, target):
    """Percent-encoded bytes (UTF-8 or not), numbers of any length, Unicode digits and
    repeated parameters: a 400 JSON answer naming the problem, never a 500 or a drop."""
    status, headers, body = answer(fake, get(target))
    assert status == 400, (target[:60], status, body[:200])
    assert headers["content-type"] == "application/json" and json_body(body)["error"]


def test_a_bad_query_is_answered_before_auth_too(tmp_path):
    """Without a token, a hostile query string still gets a clean 401, never a crash."""
    fake = make_fake_site(data_dir=str(tmp_path), tokens=("sekrit-q",))
    for target in BAD_QUERIES:
        status, headers, _ = answer(fake, get(target))
        assert status == 401 and "www-authenticate" in headers, target[:60]


def test_metadata_filters_on_non_ascii_values_work(fake):
    """A metadata filter on a non-ASCII value (percent-encoded UTF-8) finds its stream."""
    send(fake, b'POST /stream/fr HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n'
               b'X-Stream-Metadata: {"who": "\xc3\xa9t\xc3\xa9 \xe2\x82\xac"}\r\n\r\n')
    status, _, body = answer(fake, get(b"/streams?meta.who=%C3%A9t%C3%A9+%E2%82%AC"))
    assert status == 200 and [s["id"] for s in json_body(body)["streams"]] == ["fr"]
    status, _, body = answer(fake, get(b"/streams?meta.who=ete"))
    assert json_body(body)["streams"] == []


@pytest.mark.parametrize("range_header, expected", [
    (b"bytes=" + b"9" * 5000 + b"-", 416),
    (b"bytes=0-" + b"9" * 5000, 206),
    (b"bytes=-" + b"9" * 5000, 206),
    (b"bytes=" + b"9" * 30 + b"-" + b"9" * 31, 416),
])
def test_range_numbers_of_any_length(fake, range_header, expected):
    """A Range position of thousands of digits is past the stream's end, not a crash."""
    status, headers, body = answer(fake, get(b"/stream/done", b"Range: " + range_header + b"\r\n"))
    assert status == expected
    if expected == 206:
        assert body == b"0123456789" and headers["content-range"] == "bytes 0-9/10"


def test_two_range_headers_are_refused(fake):
    """Two Range headers are ambiguous: 400."""
    status, _, _ = answer(fake, get(b"/stream/done", b"Range: bytes=0-1\r\nRange: bytes=2-3\r\n"))
    assert status == 400


@pytest.mark.parametrize("offset, expected", [
    (b"9" * 5000, 400), (b"99999999999999999999", 400), (b"%41", 400), (b"12a", 400),
    (b"\xd9\xa1", 400), (b"-0", 400),
])
def test_x_stream_offset_of_any_shape(fake, offset, expected):
    """X-Stream-Offset that is not a number Loom accepts is a 400, not a 500."""
    status, _, body = answer(fake, b"POST /stream/done?append=true HTTP/1.1\r\nHost: x\r\n"
                                   b"X-Stream-Offset: " + offset + b"\r\nContent-Length: 1\r\n\r\nx")
    assert status == expected and json_body(body)["error"]


@pytest_twisted.ensureDeferred
async def test_a_duplicate_x_stream_offset_is_400(fake):
    """Two X-Stream-Offset headers are ambiguous: 400, and nothing is appended."""
    status, _, body = answer(fake, b"POST /stream/done?append=true HTTP/1.1\r\nHost: x\r\n"
                                   b"X-Stream-Offset: 10\r\nX-Stream-Offset: 0\r\n"
                                   b"Content-Length: 1\r\n\r\nx")
    assert status == 400 and "X-Stream-Offset" in json_body(body)["error"]
    assert (await read_all(fake.store, "done")) == (b"0123456789", "complete")


def test_a_content_length_of_thousands_of_digits_is_400(fake):
    """A Content-Length too long to be a length is refused, not left to crash int()."""
    status, _, _ = answer(fake, b"POST /stream/cl HTTP/1.1\r\nHost: x\r\nContent-Length: "
                                + b"9" * 5000 + b"\r\n\r\nx")
    assert status == 400
    assert fake.store.live_streams() == []


@pytest.mark.parametrize("cursor", [
    b"W" * 300,  # too long to be one Loom gave out
    __import__("base64").urlsafe_b64encode(b"[" * 100 + b"]" * 100).rstrip(b"="),
    __import__("base64").urlsafe_b64encode(b'[1, "\\ud800"]').rstrip(b"="),
    __import__("base64").urlsafe_b64encode(b'[1, "../x"]').rstrip(b"="),
    __import__("base64").urlsafe_b64encode(b"[" * 5000 + b"]" * 5000).rstrip(b"=")[:200],
])
def test_forged_or_nested_cursors_are_400(fake, cursor):
    """A cursor nested deeply, too long, or naming an id no stream could have: 400."""
    status, _, body = answer(fake, get(b"/streams?cursor=" + cursor))
    assert status == 400 and "cursor" in json_body(body)["error"]


def test_many_metadata_filters_are_refused(fake):
    """More than 20 metadata filters in one listing: 400 before any query runs."""
    query = b"&".join(b"meta.k%d=v" % index for index in range(21))
    status, _, body = answer(fake, get(b"/streams?" + query))
    assert status == 400 and "at most 20" in json_body(body)["error"]
    query = b"&".join(b"meta.k%d=v" % index for index in range(20))
    assert answer(fake, get(b"/streams?" + query))[0] == 200


def test_a_request_target_over_8_kib_is_414(fake):
    """A URL longer than 8 KiB is refused with 414 JSON, whatever the route."""
    status, _, body = answer(fake, get(b"/streams?meta.a=" + b"x" * 8200))
    assert status == 414 and "longer than" in json_body(body)["error"]


# --- metadata ----------------------------------------------------------------------------------


def test_lone_surrogates_in_metadata_are_400(fake):
    """A JSON escape for a lone surrogate is no text: 400, and no stream is created."""
    for escaped in (b'{"a": "\\ud800"}', b'{"\\udfff": 1}', b'{"a": ["x\\ud83d"]}'):
        status, _, body = answer(fake, b"POST /stream/sur HTTP/1.1\r\nHost: x\r\n"
                                       b"X-Stream-Metadata: " + escaped
                                       + b"\r\nContent-Length: 1\r\n\r\nx")
        assert status == 400 and "surrogate" in json_body(body)["error"]
    assert [s.id for s in fake.store.live_streams()] == []


def test_metadata_limit_is_on_the_header_loom_sends_back(fake):
    """8 KiB of emoji is 24 KiB once escaped: refused at creation; what is accepted is
    sent back whole in X-Stream-Metadata."""
    emoji = "\U0001f600" * 2000  # 8000 bytes of UTF-8, 24000 escaped
    raw = json.dumps({"e": emoji}, ensure_ascii=False).encode()
    assert len(raw) < 8192
    status, _, body = answer(fake, b"POST /stream/emoji HTTP/1.1\r\nHost: x\r\n"
                                   b"X-Stream-Metadata: " + raw + b"\r\nContent-Length: 0\r\n\r\n")
    assert status == 413 and "once encoded" in json_body(body)["error"]
    fitting = json.dumps({"e": "\U0001f600" * 600}, ensure_ascii=False).encode()
    assert answer(fake, b"POST /stream/emoji HTTP/1.1\r\nHost: x\r\nX-Stream-Metadata: "
                        + fitting + b"\r\nContent-Length: 0\r\n\r\n")[0] == 201
    status, headers, _ = answer(fake, get(b"/stream/emoji"))
    assert json.loads(headers["x-stream-metadata"]) == {"e": "\U0001f600" * 600}
    assert len(headers["x-stream-metadata"]) <= 8192


# --- framing and routes ------------------------------------------------------------------------


@pytest.mark.parametrize("transfer_encoding", [b"identity", b"gzip", b"chunked, identity",
                                               b"Identity"])
def test_transfer_encodings_but_chunked_are_refused(fake, transfer_encoding):
    """Transfer-Encoding other than chunked (h11 refuses them) is a 400; no stream is made."""
    status, _, _ = answer(fake, b"POST /stream/te HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: "
                                + transfer_encoding + b"\r\n\r\nxyz")
    assert status == 400
    assert fake.store.live_streams() == []


@pytest.mark.parametrize("head", [
    b"GET /stream/done HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
    b"GET /stream/done HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET /stream/done HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n",
    b"POST /stream/h HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n",
])
def test_heads_a_strict_parser_refuses_are_400(fake, head):
    """No Host or two on HTTP/1.1, two on 1.0, chunked on 1.0 (RFC 9112; h11 agrees): 400."""
    assert answer(fake, head)[0] == 400
    assert [s.id for s in fake.store.live_streams()] == []


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"DELETE", b"PUT", b"OPTIONS", b"FOO"])
@pytest.mark.parametrize("framing", [b"Content-Length: 100000\r\n",
                                     b"Transfer-Encoding: chunked\r\n"])
async def test_a_body_on_a_method_that_takes_none_is_refused_at_once(fake, method, framing):
    """A GET (or HEAD, DELETE, ...) with a body is answered 400 as soon as its head is in,
    not after the body has trickled in; the rest of the body is never parsed."""
    channel, transport = send(fake, method + b" /stream/done HTTP/1.1\r\nHost: x\r\n"
                              + framing + b"\r\nx")
    status, _, body = parse_response(transport.value())
    assert status == 400
    if method != b"HEAD":
        assert "may not have a body" in json_body(body)["error"]
    assert transport.write_closed  # closing; what else comes is drained
    channel.dataReceived(b"y" * 1000 + b"GET /stream/done HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.value().count(b"HTTP/1.1 ") == 1
    assert (await read_all(fake.store, "done")) == (b"0123456789", "complete")


def test_a_body_on_a_get_is_refused_before_auth_would_wait_for_it(tmp_path):
    """With tokens, an unauthenticated GET trickling a body is answered at once, too."""
    fake = make_fake_site(data_dir=str(tmp_path), tokens=("sekrit-g",))
    _, transport = send(fake, b"GET /stream/x HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\n")
    assert parse_response(transport.value())[0] in (400, 401)
    assert transport.write_closed


def test_head_spy_is_headers_only_and_ends(fake):
    """HEAD /spy answers /spy's headers and ends; no spy stays behind."""
    channel, transport = send(fake, b"HEAD /spy HTTP/1.1\r\nHost: x\r\n\r\n")
    raw = transport.value()
    assert raw.startswith(b"HTTP/1.1 200 OK") and raw.endswith(b"\r\n\r\n")
    assert b"text/plain" in raw
    assert fake.store.observer_count == 0 and fake.app.spies == 0
    channel.dataReceived(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # the connection goes on
    assert transport.value().count(b"HTTP/1.1 200 OK") == 2


@pytest.mark.parametrize("target", [b"/streams", b"/metrics", b"/health", b"/"])
def test_head_works_where_get_does(fake, target):
    """HEAD on a JSON route is its GET without the body."""
    raw = send(fake, b"HEAD " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")[1].value()
    assert raw.startswith(b"HTTP/1.1 200 OK") and raw.endswith(b"\r\n\r\n")


@pytest.mark.parametrize("target", [b"/metrics/x", b"/metrics/x/y", b"/metrics/..", b"/spy/x",
                                    b"/streams/x", b"/health/x", b"/stream/done/x"])
def test_unknown_paths_under_known_routes_are_404(fake, target):
    """Nothing answers for a path it does not own: /metrics/anything is 404."""
    status, _, body = answer(fake, get(target))
    assert status == 404 and json_body(body)["error"]


# --- malformed first chunk ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_malformed_first_chunk_while_the_stream_is_made_leaves_nothing(tmp_path):
    """A bad first chunk, found while the stream is still being created: 400, no stream
    left behind, and the same request retried afterwards succeeds."""
    # Catalog work waits until the test runs it: the stream being created is in flight.
    runners, clock = ManualRunners(hold=("catalog",)), Clock()
    store = DiskStore(str(tmp_path), clock, runners)
    fake = make_fake_site(store=store, clock=clock)
    channel, transport = send(fake, b"POST /stream/m HTTP/1.1\r\nHost: x\r\n"
                                    b"Transfer-Encoding: chunked\r\n\r\nzz\r\nbad\r\n")
    runners.run_all()  # the creation completes after the 400
    status, _, body = parse_response(transport.value())
    assert status == 400 and transport.value().count(b"HTTP/1.1") == 1
    channel.connectionLost(None)
    runners.run_all()
    assert store.live_streams() == [] and (await store.list_streams()) == []
    channel, transport = send(fake, b"POST /stream/m HTTP/1.1\r\nHost: x\r\n"
                                    b"Transfer-Encoding: chunked\r\n\r\n" + chunk(b"good")
                              + b"0\r\n\r\n")
    runners.run_all()
    assert parse_response(transport.value())[0] == 201
    assert (await read_all(store, "m")) == (b"good", "complete")


@pytest_twisted.ensureDeferred
async def test_a_malformed_first_chunk_after_the_201_leaves_nothing(fake):
    """A bad first chunk after the 201: the producer is aborted, the empty stream removed,
    and a retry of the same request succeeds."""
    channel, transport = send(fake, b"POST /stream/m HTTP/1.1\r\nHost: x\r\n"
                                    b"Transfer-Encoding: chunked\r\n\r\n")
    assert parse_response(transport.value())[0] == 201
    channel.dataReceived(b"-1\r\nbad\r\n")
    assert cut_off(transport)
    channel.connectionLost(None)
    assert [r.id for r in (await fake.store.list_streams())] == ["done"]
    _, transport = send(fake, b"POST /stream/m HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nok")
    assert parse_response(transport.value())[0] == 201
    assert (await read_all(fake.store, "m")) == (b"ok", "complete")


@pytest_twisted.ensureDeferred
async def test_a_malformed_chunk_after_data_keeps_the_data_and_says_why(fake):
    """A bad chunk after stored data: the stream is aborted, keeps its bytes and its reason."""
    channel, _ = send(fake, b"POST /stream/m HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked"
                            b"\r\n\r\n" + chunk(b"kept") + b"zz\r\n")
    channel.connectionLost(None)
    assert (await read_all(fake.store, "m")) == (b"kept", "aborted")
    assert (await fake.store.open("m")).record.reason == "the request body was malformed"


# --- scopes ------------------------------------------------------------------------------------

TOKENS = (Token("sekrit-all"), Token("sekrit-writer", frozenset({"write"})),
          Token("sekrit-replacer", frozenset({"replace"})),
          Token("sekrit-reader-writer", frozenset({"read", "write"})),
          Token("sekrit-ops", frozenset({"admin"})))


def authorized(token: bytes) -> bytes:
    return b"Authorization: Bearer " + token + b"\r\n"


@pytest.fixture
def guarded(tmp_path):
    fake = make_fake_site(data_dir=str(tmp_path), tokens=TOKENS)
    send(fake, b"POST /stream/done HTTP/1.1\r\nHost: x\r\n" + authorized(b"sekrit-all")
         + b"Content-Length: 4\r\n\r\nkeep")
    return fake


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("token, allowed", [
    (b"sekrit-writer", False), (b"sekrit-reader-writer", False), (b"sekrit-replacer", True),
    (b"sekrit-ops", True), (b"sekrit-all", True),
])
async def test_force_needs_the_replace_or_admin_scope(guarded, token, allowed):
    """?force=true destroys a stream: a write-only token gets 403, replace or admin may."""
    status, _, body = answer(guarded, b"POST /stream/done?force=true HTTP/1.1\r\nHost: x\r\n"
                             + authorized(token) + b"Content-Length: 3\r\n\r\nnew")
    if allowed:
        assert status == 201
        assert (await read_all(guarded.store, "done")) == (b"new", "complete")
    else:
        assert status == 403 and "replace" in json_body(body)["error"]
        assert (await read_all(guarded.store, "done")) == (b"keep", "complete")


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("query, status", [
    (b"force=true", 201), (b"force=false", 409), (b"force=1", 400), (b"force=yes", 400),
    (b"force=", 400), (b"force", 400), (b"force=TRUE", 400), (b"force=true&force=true", 400),
])
async def test_only_force_true_forces(fake, query, status):
    """As the original: only force=true replaces; force=false does not; anything else is a
    400 naming the values, never a silent replacement."""
    got, _, body = answer(fake, b"POST /stream/done?" + query + b" HTTP/1.1\r\nHost: x\r\n"
                               b"Content-Length: 3\r\n\r\nnew")
    assert got == status
    if status == 400:
        assert "true or false" in json_body(body)["error"] or "once" in json_body(body)["error"]
    expected = b"new" if status == 201 else b"0123456789"
    assert (await read_all(fake.store, "done"))[0] == expected


def test_the_size_in_a_416_is_only_for_tokens_that_may_read(guarded):
    """An append at the wrong offset: a write-only token gets 416 without X-Stream-Size."""
    send(guarded, b"POST /stream/cut HTTP/1.1\r\nHost: x\r\n" + authorized(b"sekrit-all")
         + b"Transfer-Encoding: chunked\r\n\r\n" + chunk(b"12345"))[0].connectionLost(None)
    append = (b"POST /stream/cut?append=true HTTP/1.1\r\nHost: x\r\nX-Stream-Offset: 2\r\n"
              b"Content-Length: 1\r\n%s\r\nx")
    status, headers, body = answer(guarded, append % authorized(b"sekrit-writer"))
    assert status == 416 and "x-stream-size" not in headers
    assert "5" not in json_body(body)["error"]
    status, headers, _ = answer(guarded, append % authorized(b"sekrit-reader-writer"))
    assert status == 416 and headers["x-stream-size"] == "5"


@pytest_twisted.ensureDeferred
async def test_only_the_writing_token_may_take_a_live_stream_over(guarded):
    """A take-over of a live stream by another token is 403; by its own, once quiet, 200."""
    channel, _ = send(guarded, b"POST /stream/live HTTP/1.1\r\nHost: x\r\n"
                      + authorized(b"sekrit-reader-writer")
                      + b"Transfer-Encoding: chunked\r\n\r\n" + chunk(b"abc"))
    guarded.clock.advance(5)
    append = (b"POST /stream/live?append=true HTTP/1.1\r\nHost: x\r\nX-Stream-Offset: 3\r\n"
              b"Content-Length: 3\r\n%s\r\ndef")
    status, _, body = answer(guarded, append % authorized(b"sekrit-all"))
    assert status == 403 and "another token" in json_body(body)["error"]
    status, _, _ = answer(guarded, append % authorized(b"sekrit-reader-writer"))
    assert status == 200
    assert (await read_all(guarded.store, "live")) == (b"abcdef", "complete")


# --- a producer of tiny chunks ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_read_of_tiny_chunks_is_decoded_a_bounded_batch_per_turn(fake):
    """One read of 10,240 one-byte chunks is decoded 2,048 chunks per reactor turn, reading
    nothing more meanwhile, so other connections get their turns; every byte is stored."""
    from loom.web.chunked import BodyDecoder as _BodyDecoder

    batch = _BodyDecoder.MAX_CHUNKS_PER_TURN
    channel, transport = send(fake, b"POST /stream/tiny HTTP/1.1\r\nHost: x\r\n"
                                    b"Transfer-Encoding: chunked\r\n\r\n")
    stream = fake.store.live_streams()[0]
    appends = Appends()
    stream.subscribe(appends)
    payload = bytes(range(256)) * 40
    channel.dataReceived(b"".join(chunk(payload[i:i + 1]) for i in range(len(payload))))
    assert appends.sizes == [batch] and transport.producerState == "paused"
    fake.clock.advance(0)  # the next turns
    assert appends.sizes == [batch] * (len(payload) // batch)
    assert transport.producerState == "producing"
    channel.dataReceived(b"0\r\n\r\n")
    assert (await read_all(fake.store, "tiny")) == (payload, "complete")


class Appends:
    """A stream listener that records the size of each append."""

    def __init__(self):
        self.sizes = []

    def stream_grew(self, stream, start, parts, size):
        self.sizes.append(size)

    def stream_ended(self, stream):
        pass


@pytest_twisted.ensureDeferred
async def test_a_malformed_chunk_in_a_held_back_batch_still_aborts(fake):
    """A bad chunk found in a later turn's batch aborts the producer like any other."""
    channel, transport = send(fake, b"POST /stream/tiny HTTP/1.1\r\nHost: x\r\n"
                                    b"Transfer-Encoding: chunked\r\n\r\n")
    channel.dataReceived(chunk(b"x") * 3000 + b"zz\r\nbad\r\n")
    fake.clock.advance(0)
    assert cut_off(transport)
    channel.connectionLost(None)
    assert (await read_all(fake.store, "tiny")) == (b"x" * 3000, "aborted")


@pytest.mark.parametrize("gone", ["closed", "lost", "none"])
def test_a_stream_cut_after_its_producer_left_is_no_error(tmp_path, gone):
    """DELETE of a stream whose producer's connection is already gone (its socket closed,
    or its end still being recorded) cuts nothing that is not there: 204, never a 500."""
    runners, clock = ManualRunners(hold=("catalog", "io")), Clock()
    fake = make_fake_site(store=DiskStore(str(tmp_path), clock, runners), clock=clock)
    channel, transport = send(fake, b"POST /stream/gone HTTP/1.1\r\nHost: x\r\n"
                                    b"Transfer-Encoding: chunked\r\n\r\n" + chunk(b"data"))
    runners.run_all()
    if gone == "closed":  # the socket is closed; Twisted has not told the channel yet
        transport.connected = False
    elif gone == "lost":  # told: the stream is ending (its sync waits)
        channel.connectionLost(None)
    else:
        channel.transport = None
    deleting = Deferred.fromCoroutine(fake.store.delete("gone"))
    runners.run_all()
    assert deleting.called and deleting.result is None

