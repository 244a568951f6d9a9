"""The canary for a Twisted upgrade: every private or undocumented twisted.web (and TCP
transport) name that loom.web.channel relies on still exists, on live Twisted objects.

When this fails after an upgrade, read each use of the flagged name in
loom/web/channel.py against the new Twisted (see docs/architecture.md, "Twisted
internals") before changing the list.
"""

import re
from pathlib import Path

import pytest_twisted
from twisted.internet import reactor, tcp
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.web import http

import loom.web.channel
from loom.web.channel import TWISTED_INTERNALS

CHANNEL_SOURCE = Path(loom.web.channel.__file__).read_text()
TWISTED_CLASSES = (http.HTTPChannel, http.Request, tcp.Server)


def missing(instance, names) -> list[str]:
    return [name for name in names if not hasattr(instance, name)]


def parsing_channel() -> http.HTTPChannel:
    """A plain Twisted channel in the middle of a request head (its request line parsed)."""
    channel = http.HTTPChannel()
    channel.requestFactory = http.Request
    channel.makeConnection(StringTransport())
    channel.dataReceived(b"POST /stream HTTP/1.1\r\nHost: x\r\n")
    return channel


def test_the_http_channel_internals_exist():
    channel = parsing_channel()
    assert missing(channel, TWISTED_INTERNALS["twisted.web.http.HTTPChannel"]) == []


def test_the_request_internals_exist():
    channel = parsing_channel()
    channel.dataReceived(b"Transfer-Encoding: chunked\r\n\r\n")
    request = channel.requests[-1]
    assert isinstance(request, http.Request) and type(request) is http.Request
    assert missing(request, TWISTED_INTERNALS["twisted.web.http.Request"]) == []


async def with_tcp_server_transport(check):
    """``check(transport)`` on the server side of a real loopback connection: the
    transport a channel gets."""
    accepted = Deferred()

    class Accepting(Protocol):
        def connectionMade(self):
            accepted.callback(self.transport)

    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(Accepting))
    try:
        client = await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), Protocol())
        transport = await accepted
        try:
            assert type(transport) is tcp.Server
            check(transport)
        finally:
            client.transport.loseConnection()
            transport.loseConnection()
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_the_tcp_transport_internals_exist():
    def check(transport):
        assert missing(transport, TWISTED_INTERNALS["twisted.internet.tcp.Server"]) == []

    await with_tcp_server_transport(check)


def test_the_canary_fails_on_a_removed_name():
    """The check above can fail: a name Twisted does not have is reported."""
    names = (*TWISTED_INTERNALS["twisted.web.http.HTTPChannel"], "_renamedInANewTwisted")
    assert missing(parsing_channel(), names) == ["_renamedInANewTwisted"]


@pytest_twisted.ensureDeferred
async def test_every_twisted_private_name_the_channel_uses_is_listed():
    """A private name used in loom/web/channel.py that some Twisted class defines (on
    the class, or on a live instance) is in TWISTED_INTERNALS: the list is complete."""
    used = set(re.findall(r"\.(_[A-Za-z]\w*)", CHANNEL_SOURCE))
    listed = {name for names in TWISTED_INTERNALS.values() for name in names}

    def check(transport):
        instances = (parsing_channel(), http.Request(parsing_channel()), transport)
        twisted_names = {
            name for name in used
            if any(hasattr(cls, name) for cls in TWISTED_CLASSES)
            or any(name in vars(instance) for instance in instances)
        }
        assert twisted_names, "the scan found nothing: the pattern is broken"
        assert twisted_names - listed == set()

    await with_tcp_server_transport(check)


def test_no_other_module_reads_twisted_privates_of_a_request():
    """Outside the channel module, code asks LoomRequest.gone, never _disconnected."""
    package = Path(loom.web.channel.__file__).parents[1]
    offenders = [
        str(path.relative_to(package.parent))
        for path in package.rglob("*.py")
        if path.name != "channel.py" and "_disconnected" in path.read_text()
    ]
    assert offenders == []
