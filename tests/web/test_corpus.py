"""The hostile-input corpus: every route x every method x malformed heads, bodies, numbers
and encodings, sent over raw sockets to a real server on loopback.

For every request: an answer arrives before the connection closes (never a drop without
one), it is not a 5xx, an error is a JSON document, nothing is left on disk by a refused
request, and no traceback reaches the log. h11, a strict HTTP/1.1 parser, is the reference
for what is valid: whatever it refuses, Loom must refuse too.
"""

from __future__ import annotations

import json
import os

import h11
import pytest_twisted
from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults

from loom.store import stream_id_of_storage
from tests.helpers import chunk, parse_response, raw_connect, start_server

ROUTES = [b"/", b"/stream", b"/stream/", b"/stream/known", b"/stream/fresh",
          b"/stream/known/x", b"/streams", b"/spy", b"/health", b"/metrics", b"/metrics/x",
          b"/nowhere", b"//stream/known", b"/%73tream/known", b"/stream/%FF%00"]
METHODS = [b"GET", b"HEAD", b"POST", b"DELETE", b"PUT", b"PATCH", b"OPTIONS", b"FOO",
           b"get"]
DIGITS = b"9" * 5000


def request(method: bytes, target: bytes, headers: bytes = b"", body: bytes = b"",
            version: bytes = b"HTTP/1.1", host: bytes = b"Host: x\r\n") -> bytes:
    return method + b" " + target + b" " + version + b"\r\n" + host + headers + b"\r\n" + body


# Each variant turns (method, route) into the bytes of one request.
VARIANTS = {
    "plain": lambda m, r: request(m, r),
    "query bytes": lambda m, r: request(m, r + b"?%FF%FE=%00&x=%C3%A9&%E2%82=1&a=%zz&%"),
    "query numbers": lambda m, r: request(
        m, r + b"?offset=" + DIGITS[:3000] + b"&limit=%D9%A1&since=" + DIGITS[:3000]),
    "query repeats": lambda m, r: request(
        m, r + b"?force=1&force=true&append&notail=%FF&offset=1&offset=2&meta.a=%FF"),
    "forged cursor": lambda m, r: request(m, r + b"?cursor=" + b"W1tb" * 500),
    "range and offset": lambda m, r: request(
        m, r, b"Range: bytes=" + DIGITS + b"-\r\nX-Stream-Offset: " + DIGITS
        + b"\r\nX-Stream-Offset: 1\r\n"),
    "body": lambda m, r: request(m, r, b"Content-Length: 5\r\n", b"hello"),
    "malformed chunk": lambda m, r: request(m, r, b"Transfer-Encoding: chunked\r\n",
                                            b"zz\r\nhello\r\n0\r\n\r\n"),
    "chunked": lambda m, r: request(m, r, b"Transfer-Encoding: chunked\r\n",
                                    chunk(b"hello") + b"0\r\n\r\n"),
    "identity": lambda m, r: request(m, r, b"Transfer-Encoding: identity\r\n", b"abc"),
    "huge length": lambda m, r: request(m, r, b"Content-Length: " + DIGITS + b"\r\n", b"x"),
    "length and chunked": lambda m, r: request(
        m, r, b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n"),
    "no host": lambda m, r: request(m, r, host=b""),
    "two hosts": lambda m, r: request(m, r, b"Host: y\r\n"),
    "bad metadata": lambda m, r: request(
        m, r, b'X-Stream-Metadata: {"a": "\\ud800", "e": "' + "\U0001f600".encode() * 2000
        + b'"}\r\nContent-Length: 1\r\n', b"x"),
    "bare lf": lambda m, r: m + b" " + r + b" HTTP/1.1\nHost: x\n\n",
    "no colon": lambda m, r: request(m, r, b"X-Broken header\r\n"),
    "nul in value": lambda m, r: request(m, r, b"X-Nul: a\x00b\r\n"),
    "space before colon": lambda m, r: request(m, r, b"Transfer-Encoding : chunked\r\n"),
    "folded": lambda m, r: request(m, r, b"X-Folded: a\r\n  b\r\n"),
    "absolute form": lambda m, r: request(m, b"http://loom.example" + r),
    "http/1.0 chunked": lambda m, r: request(m, r, b"Transfer-Encoding: chunked\r\n",
                                             b"0\r\n\r\n", version=b"HTTP/1.0"),
    "unknown version": lambda m, r: request(m, r, version=b"HTTP/1.7"),
    "long target": lambda m, r: request(m, r + b"?meta.a=" + b"x" * 9000),
    "odd auth": lambda m, r: request(m, r, b"Authorization: Bearer \xff\xfe\r\n"
                                           b"Authorization: Basic x\r\n"),
}


def h11_refuses(raw: bytes) -> bool:
    """Whether h11, as a server, refuses ``raw`` as a request (its head or its framing)."""
    connection = h11.Connection(h11.SERVER)
    try:
        connection.receive_data(raw)
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA or isinstance(event, h11.EndOfMessage):
                return False
    except h11.RemoteProtocolError:
        return True


def stored_ids(data_dir: str) -> set[str]:
    """The stream ids that have a data file (file names encode them)."""
    streams = os.path.join(data_dir, "streams")
    return {stream_id_of_storage(name[: -len(".data")])
            for bucket in os.listdir(streams)
            for name in os.listdir(os.path.join(streams, bucket))}


def answered(received: bytes, head_only: bool) -> bool:
    """Whether ``received`` holds a whole answer head, and its body if it has a length."""
    head, separator, body = received.partition(b"\r\n\r\n")
    if not separator:
        return False
    if head_only:
        return True
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return True  # chunked or open-ended (a stream, /spy): the head is enough


async def exchange(port: int, raw: bytes) -> tuple[bytes, bool]:
    """Send ``raw``; (the answer: its head, and its body if it has a length; whether the
    connection closed without one)."""
    client = await raw_connect(port)
    client.send(raw)
    head_only = raw[:5].upper().startswith(b"HEAD ")
    try:
        received = await client.wait_for(lambda got: answered(got, head_only))
    except AssertionError:  # the connection closed before a whole answer arrived
        return bytes(client.received), True
    finally:
        client.transport.abortConnection()
    return received, False


async def run_corpus(server, cases):
    """Send every case; return the problems found (empty when Loom behaved), and the ids
    of the streams Loom said it created."""
    problems, created = [], set()
    semaphore = DeferredSemaphore(16)

    async def one(name, raw):
        received, dropped = await exchange(server.port, raw)
        if dropped or not received.startswith(b"HTTP/1.1 "):
            problems.append((name, "no answer before the connection closed", received[:80]))
            return
        status, headers, body = parse_response(received)
        if status >= 500:
            problems.append((name, f"status {status}", received[:200]))
        if h11_refuses(raw) and status < 400:
            problems.append((name, f"h11 refuses it, Loom answered {status}", raw[:120]))
        if status >= 400 and headers.get("content-type") != "application/json":
            problems.append((name, "an error that is not JSON", received[:200]))
        elif status >= 400 and not raw[:5].upper().startswith(b"HEAD "):
            try:
                assert json.loads(body)["error"]
            except (ValueError, KeyError, AssertionError):
                problems.append((name, "an error without a JSON sentence", received[:200]))
        if status in (200, 201) and "x-stream-id" in headers and raw.startswith(b"POST"):
            created.add(headers["x-stream-id"])

    work = [semaphore.run(lambda n=name, r=raw: Deferred.fromCoroutine(one(n, r)))
            for name, raw in cases]
    await gatherResults(work, consumeErrors=True)
    return problems, created


def all_cases():
    return [(f"{variant} {method.decode('latin-1')} {route.decode('latin-1')}",
             make(method, route))
            for variant, make in VARIANTS.items() for method in METHODS for route in ROUTES]


@pytest_twisted.ensureDeferred
async def test_the_corpus_on_an_open_server(tmp_path, failures):
    """Every route x method x hostile variant (3,375 requests) on a server without tokens:
    an answer for each, no 5xx, JSON errors, h11's refusals refused, no traceback."""
    server = await start_server(tmp_path / "data")
    try:
        _, dropped = await exchange(server.port, request(b"POST", b"/stream/known",
                                                         b"Content-Length: 4\r\n", b"kept"))
        assert not dropped
        cases = all_cases()
        assert len(cases) == len(VARIANTS) * len(METHODS) * len(ROUTES)
        problems, created = await run_corpus(server, cases)
        assert problems == [], f"{len(problems)} problems, the first: {problems[:40]}"
        assert failures == [], [e.get("log_format") for e in failures[:5]]
        # Every file on disk is a stream a request was told it created (or one it deleted).
        assert stored_ids(server.data_dir) <= created | {"known"}
    finally:
        await server.service.stopService()


@pytest_twisted.ensureDeferred
async def test_the_corpus_before_auth(tmp_path, failures):
    """The same corpus on a server with tokens, sent without one: every answer is a clean
    4xx (401 or a refusal of the framing), nothing is created, no traceback."""
    from loom.config import Token

    server = await start_server(tmp_path / "data", tokens=(Token("sekrit-corpus"),))
    try:
        problems, created = await run_corpus(server, all_cases())
        assert problems == [], f"{len(problems)} problems, the first: {problems[:40]}"
        assert failures == [], [e.get("log_format") for e in failures[:5]]
        assert created == set() and stored_ids(server.data_dir) == set()
    finally:
        await server.service.stopService()


def test_the_reference_parser_refuses_what_it_should():
    """h11 is a meaningful reference: it refuses these, and accepts a plain request."""
    for variant in ("no colon", "nul in value", "space before colon", "identity", "no host",
                    "two hosts"):
        assert h11_refuses(VARIANTS[variant](b"GET", b"/")), variant
    assert not h11_refuses(VARIANTS["plain"](b"GET", b"/"))
