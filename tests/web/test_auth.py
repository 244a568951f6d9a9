"""Bearer tokens guard every route when configured."""

import pytest
from twisted.logger import formatEvent, globalLogPublisher

from tests.helpers import chunk, json_body, make_fake_site, parse_response

TOKEN = "sekrit-T0ken"

REQUESTS = [
    b"GET /stream/s1 HTTP/1.1\r\nHost: x\r\n%s\r\n",
    b"GET /stream/s1?token=" + b"sekrit-T0ken" + b" HTTP/1.1\r\nHost: x\r\n%s\r\n",
    b"GET /stream/s1/ HTTP/1.1\r\nHost: x\r\n%s\r\n",
    b"HEAD /stream/s1 HTTP/1.1\r\nHost: x\r\n%s\r\n",
    b"DELETE /stream/s1 HTTP/1.1\r\nHost: x\r\n%s\r\n",
    b"GET /stream/s1?notail HTTP/1.1\r\nHost: x\r\n%s\r\n",
    b"POST /stream/new HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n%s\r\nabc",
    b"POST /stream HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n%s\r\nabc",
    b"GET / HTTP/1.1\r\nHost: x\r\n%s\r\n",
    b"GET /nowhere HTTP/1.1\r\nHost: x\r\n%s\r\n",
    b"GET //stream/s1 HTTP/1.1\r\nHost: x\r\n%s\r\n",
    b"GET /%73tream/s1 HTTP/1.1\r\nHost: x\r\n%s\r\n",
    b"GET /spy HTTP/1.1\r\nHost: x\r\n%s\r\n",
    b"GET /spy?color HTTP/1.1\r\nHost: x\r\n%s\r\n",
    b"GET /streams HTTP/1.1\r\nHost: x\r\n%s\r\n",
    b"GET /streams?meta.x=1 HTTP/1.1\r\nHost: x\r\n%s\r\n",
    b"GET /metrics HTTP/1.1\r\nHost: x\r\n%s\r\n",
    b"POST /stream/s1?append=true HTTP/1.1\r\nHost: x\r\nX-Stream-Offset: 11\r\n"
    b"Content-Length: 1\r\n%s\r\nx",
    b"GET /health/x HTTP/1.1\r\nHost: x\r\n%s\r\n",
]


@pytest.fixture
def fake(tmp_path):
    fake = make_fake_site(tokens=(TOKEN, "sekrit-other"), data_dir=str(tmp_path))
    channel, _ = fake.connect()
    channel.dataReceived(
        b"POST /stream/s1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
        + b"\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk(b"secret data") + b"0\r\n\r\n"
    )
    return fake


@pytest.mark.parametrize("request_template", REQUESTS)
@pytest.mark.parametrize(
    "authorization",
    [b"", b"Authorization: Bearer\r\n", b"Authorization: Bearer \r\n",
     b"Authorization: Basic czNjcmV0LVQwa2Vu\r\n", b"Authorization: Bearer wrong\r\n",
     b"Authorization: Bearer  " + TOKEN.encode() + b"\r\n",
     b"Authorization: " + TOKEN.encode() + b"\r\n",
     b"Authorization: Bearer " + TOKEN.encode()[:-1] + b"\r\n",
     b"Authorization: Bearer " + TOKEN.encode() + b" \r\n",
     b"Authorization: Bearer " + TOKEN.encode() + b"\t\r\n",
     b"X-Token: " + TOKEN.encode() + b"\r\n"],
)
def test_every_route_needs_a_valid_token(fake, request_template, authorization):
    """Without the right bearer token every route answers 401 JSON and no stream data."""
    channel, transport = fake.connect()
    channel.dataReceived(request_template.replace(b"%s", authorization))
    status, headers, body = parse_response(transport.value())
    assert status == 401
    assert headers["www-authenticate"] == 'Bearer realm="loom"'
    assert headers["content-type"] == "application/json"
    if not request_template.startswith(b"HEAD"):  # HEAD answers carry no body
        assert "error" in json_body(body)
    assert b"secret data" not in transport.value()


def test_valid_token_reads_and_the_scheme_is_case_insensitive(fake):
    """Any configured token works, with the scheme in any case."""
    for header in (b"Bearer " + TOKEN.encode(), b"bearer sekrit-other", b"BEARER " + TOKEN.encode()):
        channel, transport = fake.connect()
        channel.dataReceived(b"GET /stream/s1 HTTP/1.1\r\nHost: x\r\nAuthorization: %s\r\n\r\n" % header)
        status, _, body = parse_response(transport.value())
        assert status == 200 and body == b"secret data"


@pytest.mark.parametrize("request_template", REQUESTS)
def test_two_authorization_headers_are_a_bad_request(fake, request_template):
    """Two Authorization headers are refused with 400 on every route, even if one is right."""
    channel, transport = fake.connect()
    channel.dataReceived(request_template.replace(
        b"%s", b"Authorization: Bearer wrong\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n"
    ))
    status, _, body = parse_response(transport.value())
    assert status == 400 and b"secret data" not in transport.value()


def test_token_in_query_string_is_not_accepted_nor_logged(fake):
    """A token in the query string does not authenticate, and never reaches the log."""
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        channel, transport = fake.connect()
        channel.dataReceived(
            b"GET /stream/s1?token=" + TOKEN.encode() + b"&access_token=" + TOKEN.encode()
            + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        channel, _ = fake.connect()
        channel.dataReceived(
            b"GET /stream/s1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
            + b"\r\n\r\n"
        )
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert parse_response(transport.value())[0] == 401
    logged = "\n".join(formatEvent(e) + repr(e) for e in events)
    assert "GET /stream/s1" in logged
    assert TOKEN not in logged


def test_without_tokens_everything_is_open(tmp_path):
    """With no tokens configured, requests need no Authorization header."""
    fake = make_fake_site(data_dir=str(tmp_path))
    channel, transport = fake.connect()
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert parse_response(transport.value())[0] == 200
