"""trustedProxies: the client a trusted proxy forwards is the one logged and counted."""

import pytest
from twisted.internet.address import IPv4Address
from twisted.logger import globalLogPublisher

from loom.config import load_config
from loom.errors import ConfigError
from loom.web.proxies import TrustedProxies
from tests.helpers import FakeTCPTransport, json_body, make_fake_site, parse_response

PROXIES = TrustedProxies(["127.0.0.1/32", "10.0.0.0/8", "::1/128"])


@pytest.mark.parametrize("peer, forwarded, forwarded_for, client", [
    # Not a trusted proxy: whatever it claims, the client is the peer.
    ("203.0.113.9", [b"for=198.51.100.1"], [b"198.51.100.1"], "203.0.113.9"),
    # X-Forwarded-For: the rightmost address that is not a trusted proxy.
    ("127.0.0.1", [], [b"198.51.100.1"], "198.51.100.1"),
    ("127.0.0.1", [], [b"6.6.6.6, 198.51.100.1, 10.1.2.3"], "198.51.100.1"),
    ("127.0.0.1", [], [b"6.6.6.6", b"198.51.100.1"], "198.51.100.1"),  # two header lines
    ("127.0.0.1", [], [b"10.0.0.5, 10.0.0.6"], "10.0.0.5"),  # all proxies: the farthest
    ("127.0.0.1", [], [], "127.0.0.1"),  # nothing forwarded: the proxy itself
    # Forwarded (RFC 7239) wins over X-Forwarded-For; ports, brackets and quotes go.
    ("127.0.0.1", [b'for=192.0.2.60;proto=http;by=203.0.113.43'], [b"6.6.6.6"], "192.0.2.60"),
    ("127.0.0.1", [b'for="[2001:db8:cafe::17]:4711"'], [], "2001:db8:cafe::17"),
    ("127.0.0.1", [b"for=192.0.2.43:47011, for=10.9.9.9"], [], "192.0.2.43"),
    ("::1", [b"For=unknown"], [], "unknown"),
    ("::ffff:127.0.0.1", [], [b"198.51.100.7"], "198.51.100.7"),  # IPv4 on a dual-stack socket
])
def test_the_client_a_trusted_proxy_names(peer, forwarded, forwarded_for, client):
    """The client is read from Forwarded or X-Forwarded-For only when the peer is trusted,
    skipping every trusted hop from the right."""
    assert PROXIES.client(peer, forwarded, forwarded_for) == client


def test_trusted_proxies_in_the_configuration(tmp_path):
    """trustedProxies takes addresses and networks (YAML list or comma-separated variable)."""
    path = tmp_path / "a.yml"
    path.write_text("trustedProxies: [127.0.0.1, 10.0.0.0/8, '::1']\n")
    assert load_config([str(path)]).config.trusted_proxies == (
        "127.0.0.1/32", "10.0.0.0/8", "::1/128")
    environ = {"LOOM_TRUSTED_PROXIES": "192.168.0.0/16, 172.16.0.1"}
    assert load_config([], environ).config.trusted_proxies == ("192.168.0.0/16", "172.16.0.1/32")
    with pytest.raises(ConfigError, match="'proxy.example' is not an IP address or network"):
        load_config([], {"LOOM_TRUSTED_PROXIES": "proxy.example"})


def connect(fake, host: str):
    channel = fake.site.buildProtocol(IPv4Address("TCP", host, 40000))
    transport = FakeTCPTransport(peerAddress=IPv4Address("TCP", host, 40000))
    channel.makeConnection(transport)
    return channel, transport


def health(channel, forwarded_for: bytes = b""):
    channel.dataReceived(b"GET /health HTTP/1.1\r\nHost: x\r\n"
                         + (b"X-Forwarded-For: " + forwarded_for + b"\r\n" if forwarded_for
                            else b"") + b"\r\n")


def test_behind_a_trusted_proxy_each_client_has_its_own_share(tmp_path):
    """Connections from a trusted proxy are not capped as one client; the clients it
    forwards are, each while its request lasts."""
    fake = make_fake_site(data_dir=str(tmp_path), max_connections_per_client=2)
    fake.site.trusted_proxies = TrustedProxies(["127.0.0.1/32"])
    producers = []
    for index in range(3):  # one client, three producers through the proxy
        channel, transport = connect(fake, "127.0.0.1")
        channel.dataReceived(b"POST /stream/p%d HTTP/1.1\r\nHost: x\r\n"
                             b"X-Forwarded-For: 198.51.100.1\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n" % index)
        producers.append((channel, transport))
    statuses = [parse_response(t.value())[0] for _, t in producers]
    assert statuses == [201, 201, 503]
    status, headers, body = parse_response(producers[2][1].value())
    assert headers["retry-after"] == "1" and "too many connections" in json_body(body)["error"]
    for index in range(5):  # other clients through the same proxy: served
        channel, transport = connect(fake, "127.0.0.1")
        health(channel, b"198.51.100.%d" % (10 + index))
        assert parse_response(transport.value())[0] == 200
    producers[0][0].dataReceived(b"0\r\n\r\n")  # a request ends: its share is free again
    channel, transport = connect(fake, "127.0.0.1")
    health(channel, b"198.51.100.1")
    assert parse_response(transport.value())[0] == 200
    assert fake.site._per_client == {"198.51.100.1": 1}


def test_an_untrusted_peer_cannot_choose_its_address(tmp_path):
    """From an untrusted peer X-Forwarded-For is ignored: its connections count as its own."""
    fake = make_fake_site(data_dir=str(tmp_path), max_connections_per_client=2)
    fake.site.trusted_proxies = TrustedProxies(["127.0.0.1/32"])
    held = [connect(fake, "203.0.113.9") for _ in range(2)]
    for channel, _ in held:
        health(channel, b"198.51.100.77")
    refused = fake.site.buildProtocol(IPv4Address("TCP", "203.0.113.9", 1))
    transport = FakeTCPTransport()
    refused.makeConnection(transport)
    assert parse_response(transport.value())[0] == 503


def test_the_access_log_names_the_forwarded_client(tmp_path):
    """The access log shows the client a trusted proxy forwarded, not the proxy."""
    fake = make_fake_site(data_dir=str(tmp_path))
    fake.site.trusted_proxies = TrustedProxies(["127.0.0.1/32"])
    lines = []

    def observe(event):
        if event.get("log_namespace") == "loom.access":
            lines.append(event["client"])

    globalLogPublisher.addObserver(observe)
    try:
        channel, _ = connect(fake, "127.0.0.1")
        health(channel, b"198.51.100.23")
        channel, _ = connect(fake, "203.0.113.9")
        health(channel, b"198.51.100.23")
    finally:
        globalLogPublisher.removeObserver(observe)
    assert lines == ["198.51.100.23", "203.0.113.9"]
