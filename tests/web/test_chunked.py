"""loom.web.chunked: the request-body decoder on its own, cut at every boundary.

The reference is twisted.web's own chunked decoder (what Loom's replaced): for any body,
well-formed or not, and any way the network cuts it into reads, Loom's decoder must hand
over the same payload, end at the same byte, leave the same bytes for the next request,
and refuse exactly what Twisted refuses.
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.web.http import _ChunkedTransferDecoder, _MalformedChunkedDataError

from loom.web.chunked import BodyDecoder, MalformedBody


class Decoded:
    """What a decoder handed over: payload, whether it ended, the bytes after the body,
    and whether (and after how much payload) it refused the framing."""

    def __init__(self):
        self.payload = bytearray()
        self.rest = None
        self.malformed = False

    def outcome(self):
        return bytes(self.payload), self.rest, self.malformed


def loom_decode(reads: list[bytes], length: int | None = None, backlog: bool = False):
    decoded = Decoded()
    backlogs = []

    def on_data(parts):
        for part in parts:
            assert isinstance(part, (bytes, memoryview))
            decoded.payload += part

    def on_end(rest):
        assert decoded.rest is None, "the body ended twice"
        decoded.rest = bytes(rest)

    decoder = BodyDecoder(length, on_data, on_end,
                          on_backlog=(lambda: backlogs.append(1)) if backlog else None)
    try:
        for read in reads:
            if decoded.rest is not None:
                decoded.rest += read  # the body ended: what follows is the channel's
                continue
            decoder.dataReceived(read)
            while decoder.backlog and decoded.rest is None:
                decoder.dataReceived(b"")  # the channel's next turn
    except MalformedBody:
        decoded.malformed = True
    return decoded.outcome(), len(backlogs)


def twisted_decode(reads: list[bytes]):
    decoded = Decoded()

    def finish(rest):
        decoded.rest = bytes(rest)

    decoder = _ChunkedTransferDecoder(decoded.payload.extend, finish)
    try:
        for read in reads:
            if decoded.rest is not None:
                decoded.rest += read
                continue
            decoder.dataReceived(read)
    except _MalformedChunkedDataError:
        decoded.malformed = True
    return decoded.outcome()


def encode(chunks: list[bytes], extensions: list[bytes] = (), trailers: list[bytes] = (),
           upper: bool = False) -> bytes:
    out = []
    for index, payload in enumerate(chunks):
        size = b"%X" % len(payload) if upper else b"%x" % len(payload)
        extension = extensions[index] if index < len(extensions) else b""
        out.append(size + extension + b"\r\n" + payload + b"\r\n")
    out.append(b"0\r\n" + b"".join(line + b"\r\n" for line in trailers) + b"\r\n")
    return b"".join(out)


NEXT_REQUEST = b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n"
BODIES = {
    "plain": encode([b"hello", b" ", b"world\n"]),
    "empty body": encode([]),
    "one big chunk": encode([bytes(range(256)) * 40]),
    "crlf inside payload": encode([b"\r\n", b"0\r\n\r\n", b"\r"]),
    "extensions": encode([b"abc", b"de"], [b";name=value", b';q="quoted; string"']),
    "upper-case hex and leading zeros": encode([b"x" * 26]).replace(b"1a\r\n", b"001A\r\n"),
    "trailers": encode([b"data"], trailers=[b"X-Checksum: 1234", b"X-Other: y"]),
    "followed by the next request": encode([b"first"]) + NEXT_REQUEST,
}


@pytest.mark.parametrize("body", BODIES.values(), ids=BODIES.keys())
def test_every_two_way_cut_decodes_as_twisted_does(body):
    whole = twisted_decode([body])
    assert not whole[2] and whole[1] is not None  # the examples are well formed
    for cut in range(len(body) + 1):
        reads = [body[:cut], body[cut:]]
        assert loom_decode(reads)[0] == twisted_decode(reads) == whole, f"cut at {cut}"


@pytest.mark.parametrize("body", BODIES.values(), ids=BODIES.keys())
def test_a_byte_at_a_time_decodes_as_one_read(body):
    reads = [body[i:i + 1] for i in range(len(body))]
    assert loom_decode(reads)[0] == loom_decode([body])[0] == twisted_decode([body])


MALFORMED = {
    "size not hex": b"zz\r\nab\r\n0\r\n\r\n",
    "empty size": b"\r\nab\r\n0\r\n\r\n",
    "negative size": b"-1\r\nab\r\n0\r\n\r\n",
    "size with spaces": b"2 \r\nab\r\n0\r\n\r\n",
    "size with 0x": b"0x2\r\nab\r\n0\r\n\r\n",
    "payload longer than its size": b"2\r\nabc\r\n0\r\n\r\n",
    "no CRLF after the payload": b"2\r\nabXY0\r\n\r\n",
    "control character in an extension": b"2;a\x01b\r\nab\r\n0\r\n\r\n",
    "bare LF after the size": b"2\nab\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("body", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_framing_is_refused_wherever_it_is_cut(body):
    assert twisted_decode([body])[2], "the reference refuses it too"
    for cut in range(len(body) + 1):
        reads = [body[:cut], body[cut:]]
        payload, rest, malformed = loom_decode(reads)[0]
        assert malformed and rest is None, f"cut at {cut}"
        # Only the well-framed payload before the fault was handed over, as by Twisted.
        assert payload == twisted_decode(reads)[0], f"cut at {cut}"


def test_an_endless_size_line_is_refused_without_holding_it_all():
    decoded, _ = loom_decode([b"1" * 600, b"1" * 600])
    assert decoded[2]
    decoded, _ = loom_decode([b"0" * 1000 + b"5\r\nhello\r\n0\r\n\r\n"])
    assert decoded == (b"hello", b"", False)


def test_an_endless_trailer_is_refused():
    decoded, _ = loom_decode([b"0\r\nX-A: " + b"a" * 70000])
    assert decoded[2]


@pytest.mark.parametrize("body", [
    b"0\r\nX: " + b"a" * 70000 + b"\r\n\r\n",  # one long line, in one read
    b"0\r\n" + b"a: b\r\n" * 20000 + b"\r\n",  # many short lines
    b"0\r\n" + b"a: b\r\n" * 10000 + b"\r\n",  # 60 KiB: allowed
], ids=["long line", "many lines", "within the limit"])
def test_the_trailer_section_is_limited_as_twisted_limits_it(body):
    assert loom_decode([body])[0][2] == twisted_decode([body])[2]
    cut = len(body) // 2
    assert loom_decode([body[:cut], body[cut:]])[0][2] == twisted_decode([body])[2]


@pytest.mark.parametrize("digits", [1022, 1023, 1024, 1025])
def test_a_size_line_of_up_to_1023_characters_is_accepted_as_twisted_accepts_it(digits):
    body = b"0" * (digits - 1) + b"5\r\nhello\r\n0\r\n\r\n"
    for cut in (0, digits - 1, digits, digits + 1):
        reads = [body[:cut], body[cut:]]
        assert loom_decode(reads)[0] == twisted_decode(reads), f"cut at {cut}"


def test_content_length_bodies_end_at_their_length_wherever_cut():
    body = b"0123456789" * 10
    data = body + NEXT_REQUEST
    for cut in range(len(data) + 1):
        decoded, _ = loom_decode([data[:cut], data[cut:]], length=len(body))
        assert decoded == (body, NEXT_REQUEST, False), f"cut at {cut}"
    assert loom_decode([b""], length=0)[0] == (b"", b"", False)


def test_a_read_of_many_tiny_chunks_is_decoded_over_several_turns():
    chunks = [b"%d" % (i % 10) for i in range(3 * BodyDecoder.MAX_CHUNKS_PER_TURN + 5)]
    body = encode(chunks) + NEXT_REQUEST
    (payload, rest, malformed), turns = loom_decode([body], backlog=True)
    assert (payload, rest, malformed) == (b"".join(chunks), NEXT_REQUEST, False)
    assert turns == 3  # one backlog per full budget of chunks
    # Without a backlog callback the decoder takes the whole read at once.
    assert loom_decode([body])[0] == (payload, rest, malformed)


@st.composite
def bodies(draw):
    chunks = draw(st.lists(st.binary(min_size=1, max_size=40), max_size=8))
    extensions = draw(st.lists(st.sampled_from([b"", b";a=b", b";x", b';q="a;b"']),
                               max_size=len(chunks)))
    trailers = draw(st.lists(st.sampled_from([b"A: b", b"X-Sum: 1"]), max_size=2))
    body = encode(chunks, extensions, trailers, upper=draw(st.booleans()))
    if draw(st.booleans()):  # damage one byte
        position = draw(st.integers(0, len(body) - 1))
        body = body[:position] + bytes([draw(st.integers(0, 255))]) + body[position + 1:]
    return body + draw(st.sampled_from([b"", NEXT_REQUEST]))


@st.composite
def cuts(draw, data):
    points = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:])]


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_any_body_cut_anyhow_decodes_as_twisted_does(data):
    body = data.draw(bodies())
    reads = data.draw(cuts(body))
    loom, _ = loom_decode(reads, backlog=data.draw(st.booleans()))
    reference = twisted_decode(reads)
    assert loom[2] == reference[2]  # refused by both or neither
    if not reference[2]:
        assert loom == reference
    else:
        assert loom[0] == reference[0]  # the well-formed payload before the fault
