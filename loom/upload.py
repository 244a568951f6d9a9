"""loom.client's push: one streaming POST over a small HTTP/1.1 protocol of its own.

twisted.web's client reports a response only once the whole request body is
sent; a producer wants its stream id (the ``201``) the moment the stream exists,
and to hear at once when the server refuses or cuts it while it is still sending.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import Protocol
from twisted.web.iweb import UNKNOWN_LENGTH

from loom.client_errors import (
    LoomClientError,
    RequestFailed,
    ServerAborted,
    error_for,
    tls_failure,
)


@dataclass(frozen=True)
class Created:
    """What the 201 said: the stream's id and whether it replaced an older stream."""

    stream_id: str
    replaced: bool
    url: str


@dataclass(frozen=True)
class PushResult:
    """How a push ended: the stream's id, whether it replaced an older one, what was sent."""

    stream_id: str
    replaced: bool
    bytes_sent: int


class Once:
    """A factory for exactly one connection (what endpoint.connect wants)."""

    def __init__(self, protocol):
        self._protocol = protocol

    def buildProtocol(self, addr):
        return self._protocol

    def doStart(self):
        pass

    def doStop(self):
        pass


class _ChunkedWriter:
    """The IConsumer a body producer writes to: each write goes out as one HTTP chunk."""

    def __init__(self, transport, count: Callable[[int], None]):
        self._transport = transport
        self._count = count

    def write(self, data: bytes) -> None:
        if data:
            self._count(len(data))
            self._transport.writeSequence([b"%x\r\n" % len(data), data, b"\r\n"])

    def registerProducer(self, producer, streaming):
        self._transport.registerProducer(producer, streaming)

    def unregisterProducer(self):
        self._transport.unregisterProducer()


class Upload(Protocol):
    """One streaming POST: request head, chunked body, and the response as it arrives."""

    def __init__(self, request: bytes, body, stream_id, client, on_created):
        self._request = request
        self._body = body
        self._stream_id = stream_id
        self._client = client
        self._on_created = on_created
        self.result: Deferred = Deferred()
        self._buffer = bytearray()
        self._status: int | None = None
        self._phrase = ""
        self._headers: dict[str, str] = {}
        self._created: Created | None = None
        self._sent = 0
        self._body_done = False
        self._response_done = False

    def connectionMade(self):
        _watch_peer(self.transport)
        self.transport.write(self._request)
        writer = _ChunkedWriter(self.transport, self._count)
        if self._body.length is not UNKNOWN_LENGTH and self._body.length == 0:
            self._end_body(None)
            return
        writer.registerProducer(self._body, True)
        d = self._body.startProducing(writer)

        def ended(result):
            writer.unregisterProducer()
            self._end_body(result)

        def failed(failure):
            if self._response_done or self.result.called:
                return None
            writer.unregisterProducer()
            self.transport.abortConnection()
            self._fail(LoomClientError(f"reading the input failed: {failure.getErrorMessage()}"))

        d.addCallbacks(ended, failed)

    def _count(self, size: int) -> None:
        self._sent += size

    def _end_body(self, _):
        self._body_done = True
        if self.transport is not None and not self._response_done:
            self.transport.write(b"0\r\n\r\n")

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        if self._status is None:
            self._parse_head()
        if self._status is not None:
            self._parse_body()

    def _parse_head(self) -> None:
        while True:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self._buffer[:end]).decode("latin-1").split("\r\n")
            del self._buffer[: end + 4]
            _, status_text, self._phrase = (head[0].split(None, 2) + ["", ""])[:3]
            if not status_text.isdigit():
                self._not_http()
                return
            status = int(status_text)
            if 100 <= status < 200:
                continue  # an interim answer such as 100 Continue
            self._status = status
            self._headers = {
                name.strip().lower(): value.strip()
                for name, _, value in (line.partition(":") for line in head[1:])
            }
            if status in (200, 201):
                stream_id = self._headers.get("x-stream-id", self._stream_id or "")
                self._created = Created(
                    stream_id,
                    self._headers.get("x-stream-replaced") == "true",
                    self._client.stream_url(stream_id),
                )
                if self._on_created is not None:
                    self._on_created(self._created)
            else:
                self._stop_body()
            return

    def _parse_body(self) -> None:
        if self._headers.get("transfer-encoding", "").lower() == "chunked":
            complete = _chunked_complete(self._buffer)
        elif "content-length" in self._headers:
            complete = len(self._buffer) >= int(self._headers["content-length"])
        else:
            complete = False  # delimited by the connection closing
        if complete:
            self._respond()

    def _respond(self) -> None:
        self._response_done = True
        if self._status in (200, 201):
            if not self._body_done:
                self._fail(ServerAborted("server ended the stream before the input ended"))
            else:
                self.result.callback(
                    PushResult(self._created.stream_id, self._created.replaced, self._sent)
                )
        else:
            self._fail(error_for(self._status, bytes(self._buffer), self._stream_id,
                                  self._headers, self._phrase))
        self.transport.loseConnection()

    def _not_http(self) -> None:
        self._response_done = True
        self._stop_body()
        self._fail(RequestFailed(0, "", from_loom=False,
                                 message=f"{self._client.base} did not answer in HTTP"))
        self.transport.abortConnection()

    def _stop_body(self) -> None:
        try:
            self._body.stopProducing()
        except Exception:
            pass

    def _fail(self, error: Exception) -> None:
        if not self.result.called:
            self.result.errback(error)

    def connectionLost(self, reason):
        if self._response_done:
            return
        if self._status not in (None, 200, 201) and "content-length" not in self._headers:
            self._respond()
            return
        if not self._body_done:
            self._stop_body()
        tls = tls_failure(reason, self._client.base) if self._status is None else None
        self._fail(tls or ServerAborted("server aborted the stream"))


# A producer that has sent data the server has not acknowledged for this long is cut off
# (and can resume): a black-holed network is noticed in two minutes, not TCP's fifteen.
UNACKNOWLEDGED_LIMIT_MS = 120_000


def _watch_peer(transport) -> None:
    """TCP keepalive on an upload's connection (probes after a minute of silence), and the
    limit above on unacknowledged data, where the platform has them."""
    while hasattr(transport, "wrappedProtocol"):
        transport = transport.transport  # TLS wraps the TCP connection
    if not ITCPTransport.providedBy(transport):
        return
    transport.setTcpKeepAlive(True)
    sock = transport.getHandle()
    for option, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 15), ("TCP_KEEPCNT", 4),
                          ("TCP_USER_TIMEOUT", UNACKNOWLEDGED_LIMIT_MS)):
        if hasattr(socket, option):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
            except OSError:  # not for this socket here: the defaults stay
                pass


def _chunked_complete(buffer: bytearray) -> bool:
    """Whether a chunked body in ``buffer`` has reached its final chunk."""
    position = 0
    while True:
        line_end = buffer.find(b"\r\n", position)
        if line_end < 0:
            return False
        try:
            size = int(bytes(buffer[position:line_end]).split(b";")[0], 16)
        except ValueError:
            return False
        if size == 0:
            return buffer.find(b"\r\n\r\n", line_end) >= 0
        position = line_end + 2 + size + 2

