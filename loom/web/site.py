"""LoomSite: the HTTP factory, with Loom's channel, request, timeouts and access log."""

from __future__ import annotations

import re

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web import server

from loom.web.channel import LoomChannel, LoomRequest
from loom.web.proxies import TrustedProxies

log = Logger(namespace="loom.access")

# Query parameters whose values must never reach a log line.
_SECRET_PARAMETER = re.compile(
    rb"((?:^|&)(?:[^=&]*token[^=&]*|auth[^=&]*|key|secret|password)=)[^&]*", re.I
)


def redact_uri(uri: bytes) -> str:
    """The URI as it may be logged: secrets in the query string replaced by ``***``."""
    path, question, query = uri.partition(b"?")
    if question:
        query = _SECRET_PARAMETER.sub(rb"\1***", query)
    return (path + question + query).decode("ascii", "backslashreplace")


class SiteCounters:
    """Counters the HTTP layer bumps on its hot paths, read by /metrics."""

    bytes_out = 0


_CLIENT_FULL = b"This client has too many connections open; close some or try again later."


class _TooManyConnections(Protocol):
    """Says 503 and closes, without reading a byte: the server (or this client's share of
    it) is full."""

    def __init__(self, message: bytes):
        self._message = message

    def connectionMade(self):
        body = b'{"error": "%s"}\n' % self._message
        self.transport.write(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body)
        )
        self.transport.loseConnection()


class LoomSite(server.Site):
    """A Site whose channels stream request bodies and never offer HTTP/2.

    ``idle_timeout`` closes idle keep-alive connections; it is replaced by the
    producer idle timeout while a producer's body streams in.
    """

    requestFactory = LoomRequest
    displayTracebacks = False

    def __init__(
        self,
        resource,
        reactor,
        idle_timeout: float = 60.0,
        header_timeout: float = 30.0,
        max_connections: int = 10000,
        max_head_bytes: int = 16384,
        counters: SiteCounters | None = None,
        max_connections_per_client: int | None = None,
        trusted_proxies: TrustedProxies | None = None,
        direct_send: bool = True,
    ):
        super().__init__(resource, timeout=idle_timeout, reactor=reactor)
        self.counters = counters or SiteCounters()
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.max_connections_per_client = max_connections_per_client
        self.trusted_proxies = trusted_proxies or TrustedProxies()
        self.max_head_bytes = max_head_bytes
        self.direct_send = direct_send  # see LoomChannel.send_some
        self.channels: set[LoomChannel] = set()
        self._per_client: dict[str, int] = {}  # open connections by client address
        self._refused_from: set[str] = set()  # addresses told so since they were last served

    def protocol(self):
        return LoomChannel()

    def buildProtocol(self, addr):
        host = getattr(addr, "host", None)  # None for a UNIX socket: no address to share
        if len(self.channels) >= self.max_connections:
            self._warn_once(host, "refusing connections from {peer}: {count} connections "
                                  "are open (maxConnections)", len(self.channels))
            return _TooManyConnections(b"The server has too many connections; try again "
                                       b"later.")
        if self.trusted_proxies.trusts(host):
            host = None  # a proxy carries many clients: each request is counted for its own
        elif host is not None and not self._room_for(host):
            return _TooManyConnections(_CLIENT_FULL)
        channel = super().buildProtocol(addr)
        channel.client_host = host
        return channel

    def _room_for(self, host: str) -> bool:
        cap = self.max_connections_per_client
        if cap is not None and self._per_client.get(host, 0) >= cap:
            self._warn_once(host, "refusing connections from {peer}: it has {count} open "
                                  "(maxConnectionsPerClient)", cap)
            return False
        return True

    def admit(self, client: str) -> bool:
        """Count a request a trusted proxy forwarded for ``client`` against its share of the
        server, as a connection of its own would be; False if that share is full."""
        if not self._room_for(client):
            return False
        self._count(client, +1)
        return True

    def release(self, client: str) -> None:
        """A request counted by ``admit`` is done."""
        self._count(client, -1)

    def _count(self, host: str, change: int) -> None:
        left = self._per_client.get(host, 0) + change
        if left > 0:
            self._per_client[host] = left
        else:
            self._per_client.pop(host, None)
        if change > 0:
            self._refused_from.discard(host)

    def _warn_once(self, host, message: str, count: int) -> None:
        """One log line per address for a run of refusals, not one per connection."""
        key = host or "-"
        if key not in self._refused_from:
            self._refused_from.add(key)
            log.warn(message, peer=key, count=count)

    async def close_connections(self, grace: float = 2.0) -> None:
        """Close every open connection (on shutdown); none of them ends cleanly.

        Each gets ``grace`` seconds to flush what was already written to it;
        connections still open then (a client that stopped reading) are aborted.
        """
        if not self.channels:
            return
        closed = Deferred()

        def check():
            if not self.channels and not closed.called:
                closed.callback(None)

        self._on_channel_closed = check
        for channel in list(self.channels):
            channel.loseConnection()
        timer = self.reactor.callLater(grace, lambda: closed.called or closed.callback(None))
        check()
        await closed
        if timer.active():
            timer.cancel()
        self._on_channel_closed = None
        for channel in list(self.channels):
            channel.abort()

    _on_channel_closed = None

    def channel_opened(self, channel: LoomChannel) -> None:
        self.channels.add(channel)
        if channel.client_host is not None:
            self._count(channel.client_host, +1)

    def channel_closed(self, channel: LoomChannel) -> None:
        if channel in self.channels:
            self.channels.discard(channel)
            if channel.client_host is not None:
                self._count(channel.client_host, -1)
        if self._on_channel_closed is not None:
            self._on_channel_closed()

    def acceptableProtocols(self):
        # HTTP/2 would break streaming uploads: offer HTTP/1.1 only over TLS.
        return [b"http/1.1"]

    def log(self, request, closed: bool = False):
        """One line per request: never headers, and never a secret from the query."""
        client = request.client_host or getattr(request.getClientAddress(), "host", "-")
        log.info(
            '{client} "{method} {uri}" {code} {sent}{how}{stream}',
            client=client,
            method=request.method.decode("ascii", "replace"),
            uri=redact_uri(request.uri),
            code=request.code,
            sent=request.sentLength,
            how=" (connection closed)" if closed else "",
            stream=f" stream={request.stream_id}" if request.stream_id else "",
        )
