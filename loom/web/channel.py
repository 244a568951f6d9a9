"""The HTTP channel: the only module that touches twisted.web's (and the TCP transport's)
private or undocumented names. Every one of them is listed in TWISTED_INTERNALS below;
tests/web/test_channel.py fails when a Twisted upgrade removes or renames any.

twisted.web normally spools a request body to a temporary file and renders
the request when the body has ended. Loom's producers keep their body open
for hours and want their ``201`` at once, so:

* ``LoomChannel`` tells the request when its headers are complete, holds back
  ``100 Continue`` until the request is accepted, enforces the limits on
  request heads, hands a producer's body to the pure decoder
  (loom.web.chunked) in large reads, and after an early answer (401, 409, ...)
  stops reading requests and closes gently. It also sends response bytes the
  fast way: straight to the socket when Twisted holds nothing for it (the
  ``directSend`` setting turns that off).
* ``LoomRequest`` never spools: a POST is dispatched as soon as its headers
  are in, each body chunk goes to its ``body_sink`` (loom.web.ingest.Ingest)
  as it arrives, and the channel's "request received" becomes "body ended".

This module is longer than most (about 740 lines): the channel and its request
are two halves of one override of twisted.web's request handling, and keeping
them together keeps every reliance on Twisted's internals in one place.
Tested against Twisted 26.10 with raw bytes through a real channel
(tests/web/test_ingest.py); setup.py pins the Twisted range.
"""

from __future__ import annotations

import socket

from twisted.internet import tcp
from twisted.web import http, server

from loom.buffers import after, before
from loom.errors import BadRequest
from loom.web.chunked import BodyDecoder, MalformedBody
from loom.web.framing import (
    SHARED_FRAME_LIMIT,
    chunk_runs,
    chunks_sent,
    origin_form,
    shared_frame,
)
from loom.web.query import parse_query
from loom.web.responses import answer_failure, write_error, write_json

# Every name of Twisted's this module relies on that Twisted does not document as
# public, by the class whose instances have it. Upgrading Twisted: run
# tests/web/test_channel.py, then read each use of a name it flags (and see
# docs/architecture.md, "Twisted internals").
TWISTED_INTERNALS = {
    "twisted.web.http.HTTPChannel": (
        # the request line of the request being parsed
        "_command", "_path", "_version",
        # parsing state: head size so far, the body decoder, a request in progress
        "_receivedHeaderSize", "_transferDecoder", "_handlingRequest",
        # the transport as a producer, and whether the transport paused it
        "_networkProducer", "_waitingForTransport",
        # methods overridden or called: a body's end, a bad request, 100 Continue
        "_finishRequestBody", "_respondToBadRequestAndDisconnect", "_send100Continue",
        # undocumented attributes: body length, keep-alive, open requests, limits
        "length", "persistent", "requests", "timeOut", "totalHeadersSize",
    ),
    "twisted.web.http.Request": (
        # whether the client is gone (read through LoomRequest.gone everywhere else)
        "_disconnected",
        # undocumented: chunked response, body bytes sent, whether the head went out (the
        # last two are also read by loom.web.ingest, responses and site)
        "chunked", "sentLength", "startedWriting",
    ),
    "twisted.internet.tcp.Server": (
        # the direct send: the socket, and whether Twisted buffers anything for it
        "socket", "TLS", "dataBuffer", "_tempDataBuffer", "offset",
        # a pause the transport itself ends when its buffer drains
        "producerPaused", "producer",
        # the size of each read
        "bufferSize",
    ),
}

# After an early answer, how long the client may keep sending before we close.
LINGER_SECONDS = 2.0

_MIN_READ, _MAX_READ = 64 * 1024, 512 * 1024
# A Content-Length of more digits than a signed 64-bit length is refused.
_MAX_LENGTH_DIGITS = 19
# The longest request target (path and query) accepted: room for any id and a
# query of filters, and a bound on the work a query string can ask for.
MAX_TARGET_BYTES = 8192
# The most handed at once to a transport that is not written directly (TLS, or
# directSend off): a stalled reader's transport holds its buffer size and at most
# this more.
SLICE = 16 * 1024


def _bare_line_feed(head: bytes) -> bool:
    """Whether ``head`` (part of a request head) ends a line with LF alone."""
    return head.count(b"\n") != head.count(b"\r\n")


def _keep_alive(transport) -> None:
    """TCP keepalive probes after a minute of silence: a quiet follower's connection (and
    its NAT or firewall state) stays up, and a peer that vanished is noticed."""
    transport.setTcpKeepAlive(True)
    sock = transport.getHandle()
    for option, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 15), ("TCP_KEEPCNT", 4)):
        if hasattr(socket, option):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
            except OSError:
                pass


class LoomChannel(http.HTTPChannel):
    """An HTTPChannel that lets requests act as soon as their headers are complete.

    It also enforces the limits on request heads: a deadline for the whole
    head (a client trickling bytes cannot hold a connection forever) and a
    size limit answered with 431 rather than a silent disconnect.
    """

    idle_timeout: float | None = None
    direct_send = True  # send to the socket directly when Twisted holds nothing for it
    _holding_continue = False
    _continue_expected = False
    _discarding = False
    _linger_call = None
    _read_pauses = 0
    _head_call = None
    _awaiting_head = True
    _adaptive_reads = False
    _body_decoder = None  # set while a producer's body streams: reads go straight to it
    _pending_body_decoder = None
    _hosts = 0  # Host headers of the request being read
    client_host: str | None = None  # the client's address, set by the site (None: a proxy's)
    _admitted: str | None = None  # the client a trusted proxy's current request is counted for
    _head_tail = b""  # a CR that ended the last read of a head
    _backlog_call = None  # continues a body read held back by its decoder

    def connectionMade(self):
        # Site.buildProtocol set timeOut to the keep-alive idle timeout.
        self.idle_timeout = self.timeOut
        self.direct_send = self.site.direct_send
        self.MAX_LENGTH = self.totalHeadersSize = self.site.max_head_bytes
        self.site.channel_opened(self)
        super().connectionMade()
        if type(self.transport) is tcp.Server:
            _keep_alive(self.transport)

    # Once a request was answered before its body ended, nothing more the
    # client sends may reach the parser: the rest of the current read is
    # still delivered line by line or raw, and a finished body would make the
    # base class look for a request that is gone.

    def dataReceived(self, data):
        if self._discarding:
            return
        if self._body_decoder is not None:
            # A producer's body is streaming: straight to its decoder, without
            # the line-receiver and channel layers every read would climb.
            self._adapt_read_size(len(data))
            self.resetTimeout()
            try:
                self._body_decoder.dataReceived(data)
            except MalformedBody:
                self._body_decoder = None
                self._respondToBadRequestAndDisconnect()
            return
        self._adapt_read_size(len(data))
        if self._awaiting_head:
            if self._head_call is None:
                self._head_call = self.callLater(self.site.header_timeout, self._head_too_slow)
            head = self._head_tail + data[: data.find(b"\r\n\r\n") % (len(data) + 1)]
            # A CR that ends one read has its LF at the start of the next.
            self._head_tail = b"\r" if data.endswith(b"\r") else b""
            if _bare_line_feed(head):
                # A head of LF-terminated lines would wait for a CRLF that never comes.
                self._refuse_head(400, "Bad Request", "Request lines must end with CRLF.")
                return
        super().dataReceived(data)

    def lineReceived(self, line):
        if self._discarding:
            return
        if b"\n" in line:
            self._refuse_head(400, "Bad Request", "Request lines must end with CRLF.")
            return
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            self._refuse_head(431, "Request Header Fields Too Large",
                              "The request's headers are too large.")
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line):
        # LineReceiver would silently drop the connection.
        self._refuse_head(431, "Request Header Fields Too Large",
                          "A request header line is too long.")

    def headerReceived(self, line):
        # Framing a strict parser (h11) would refuse is refused here, before
        # twisted.web interprets it: Transfer-Encoding other than chunked
        # (identity would leave the body to be read as the next request), and
        # a Content-Length too long to be a length (int() would raise).
        name, _, value = line.partition(b":")
        name = name.lower()
        if name == b"transfer-encoding" and value.strip(b" \t").lower() != b"chunked":
            self._refuse_head(400, "Bad Request",
                              "Loom accepts no Transfer-Encoding but chunked.")
            return False
        if name == b"content-length" and len(value.strip(b" \t")) > _MAX_LENGTH_DIGITS:
            self._refuse_head(400, "Bad Request", "The Content-Length is not a length.")
            return False
        if name == b"host":
            self._hosts += 1
        # Twisted strips trailing whitespace from values; a token must be exact.
        if name == b"authorization" and value != value.rstrip():
            self.requests[-1].authorization_padded = True
        return super().headerReceived(line)

    def _attribute(self, request) -> bool:
        """Say whose request this is: the peer, or for a trusted proxy the client it names,
        counted against that client's share of the server (503 once it is full)."""
        proxies = self.site.trusted_proxies
        peer = getattr(self.transport.getPeer(), "host", None) if self.transport else None
        if self.client_host is not None or not proxies.trusts(peer):
            request.client_host = self.client_host
            return True
        headers = request.requestHeaders
        client = proxies.client(peer, headers.getRawHeaders(b"forwarded", []),
                                headers.getRawHeaders(b"x-forwarded-for", []))
        request.client_host = client
        if not self.site.admit(client):
            self._refuse_head(503, "Service Unavailable",
                              "This client has too many connections open; close some or try "
                              "again later.", retry_after=1)
            return False
        self._admitted = client
        return True

    def _release_client(self) -> None:
        if self._admitted is not None:
            self.site.release(self._admitted)
            self._admitted = None

    def _head_problem(self) -> str | None:
        """What makes a complete request head unacceptable, if anything (RFC 9112)."""
        if len(self._path) > MAX_TARGET_BYTES:
            return "target"
        target = origin_form(self._path)
        if not target.startswith(b"/") and target != b"*":
            return "The request target must be a path starting with /."
        if self._version == b"HTTP/1.1" and self._hosts != 1:
            return "A request needs exactly one Host header."
        if self._hosts > 1:
            return "A request may have one Host header, not several."
        if self._version != b"HTTP/1.1" and self._transferDecoder is not None \
                and self.length is None:
            return "Transfer-Encoding needs HTTP/1.1."
        return None

    def _adapt_read_size(self, received: int) -> None:
        """Read a streaming body in large pieces while it comes in bulk, small ones otherwise.

        Twisted reads 64 KiB at a time; a bulk upload is cheaper in fewer,
        larger reads. But Python allocates the whole read size for every
        recv, and above 128 KiB that is an mmap and munmap per call, which
        a trickle of log lines must not pay.
        """
        if not self._adaptive_reads:
            return
        size = self.transport.bufferSize
        if received == size and size < _MAX_READ:
            self.transport.bufferSize = size * 2
        elif received < size // 8 and size > _MIN_READ:
            self.transport.bufferSize = size // 2

    def _head_too_slow(self) -> None:
        self._head_call = None
        self._refuse_head(408, "Request Timeout",
                          "The request's headers did not arrive in time.")

    def _cancel_head_deadline(self) -> None:
        if self._head_call is not None and self._head_call.active():
            self._head_call.cancel()
        self._head_call = None

    def _refuse_head(self, code: int, phrase: str, message: str,
                     retry_after: int | None = None) -> None:
        """Answer a request whose head cannot be accepted, and close."""
        self._cancel_head_deadline()
        if self._discarding or self.transport is None:
            return
        request = self.requests[-1] if self.requests else None
        if request is not None and request.dispatched_early:
            # Its handler may still be at work (a stream being created): this is
            # its answer, and nothing it writes later may follow it.
            request._disconnected = True
        body = b'{"error": "%s"}\n' % message.encode("ascii")
        retry = b"Retry-After: %d\r\n" % retry_after if retry_after is not None else b""
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n%s"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (code, phrase.encode("ascii"), retry, len(body), body)
        )
        self.refuse_further_requests()
        self.loseConnection()

    def rawDataReceived(self, data):
        if self._discarding:
            return
        try:
            super().rawDataReceived(data)
        except MalformedBody:
            self._body_decoder = None
            self._respondToBadRequestAndDisconnect()

    def allHeadersReceived(self):
        self._awaiting_head = False
        self._cancel_head_deadline()
        problem, self._hosts = self._head_problem(), 0
        if problem == "target":
            self._refuse_head(414, "URI Too Long",
                              f"The request target is longer than {MAX_TARGET_BYTES} bytes.")
            return
        if problem is not None:
            self._refuse_head(400, "Bad Request", problem)
            return
        if not self._attribute(self.requests[-1]):
            return
        self._holding_continue = True
        try:
            super().allHeadersReceived()
        finally:
            self._holding_continue = False
        request = self.requests[-1]
        request.headers_received(self._command, self._path, self._version,
                                 has_body=self.length != 0)
        if not request.dispatched_early:
            self.send_continue()
        elif (request.body_sink is not None and self._transferDecoder is not None
              and not self._discarding):
            # A producer's body: decode it our way, in large reads. The rest of
            # the current read reaches it through the usual path; the following
            # reads come straight to it (see dataReceived).
            self._transferDecoder = BodyDecoder(
                self.length, request.body_sink.body_data, self._body_finished,
                self._body_backlog,
            )
            self._adaptive_reads = type(self.transport) is tcp.Server
            self._pending_body_decoder = self._transferDecoder

    def setRawMode(self):
        super().setRawMode()
        if self._pending_body_decoder is not None and not self._handlingRequest:
            self._body_decoder, self._pending_body_decoder = self._pending_body_decoder, None

    def _body_backlog(self) -> None:
        """The body decoder held back part of a read: read nothing more until it is done,
        and go on with it on the next turn, once whatever else is ready has had its turn."""
        self.pause_reading()
        self._backlog_call = self.callLater(0, self._continue_body)

    def _continue_body(self) -> None:
        self._backlog_call = None
        decoder = self._transferDecoder
        try:
            if isinstance(decoder, BodyDecoder) and decoder.backlog and not self._discarding:
                decoder.dataReceived(b"")  # may hold back again, and pause once more
        except MalformedBody:
            self._body_decoder = None
            self._respondToBadRequestAndDisconnect()
        finally:
            self.resume_reading()

    def _body_finished(self, rest: bytes) -> None:
        self._body_decoder = self._pending_body_decoder = None
        self._finishRequestBody(rest)

    def _send100Continue(self):
        if self._holding_continue:
            self._continue_expected = True
        else:
            super()._send100Continue()

    def send_continue(self) -> None:
        """Send the ``100 Continue`` the client asked for, if it did and it is still due."""
        if self._continue_expected:
            self._continue_expected = False
            super()._send100Continue()

    def requestDone(self, request):
        self._release_client()
        super().requestDone(request)
        if self.persistent:
            self._awaiting_head = True  # the next request's head has its own deadline
            self._head_tail = b""

    def allContentReceived(self):
        if self._discarding:
            return
        # A streaming upload ran under the producer idle timeout; between
        # requests the keep-alive idle timeout applies again. The base class
        # saves self.timeOut here and restores it when the response is done.
        self.timeOut = self.idle_timeout
        super().allContentReceived()

    def set_body_timeout(self, seconds: float | None) -> None:
        """Use ``seconds`` of silence (None: no limit) as the limit while a body streams in."""
        self.setTimeout(seconds)

    def pause_reading(self) -> None:
        """Stop reading from the client until every pause is matched by a resume."""
        self._read_pauses += 1
        if self._read_pauses == 1 and self.transport is not None:
            self.transport.pauseProducing()

    def resume_reading(self) -> None:
        self._read_pauses -= 1
        if self._read_pauses == 0 and self.transport is not None:
            self.transport.resumeProducing()

    def refuse_further_requests(self) -> None:
        """The current request was answered before its body ended: read nothing more.

        Finishing such a response makes the channel close the connection
        (``persistent`` is false); ``loseConnection`` then half-closes and lets
        the client's remaining bytes drain for a moment, so that the answer is
        not destroyed by a TCP reset.
        """
        self.persistent = False
        self._discarding = True

    def _gone(self) -> bool:
        """Whether the connection is closed already, though Twisted may not have told this
        channel yet (its socket closed in this same reactor turn): nothing more to close."""
        transport = self.transport
        return transport is None or getattr(transport, "disconnected", False) or \
            not getattr(transport, "connected", True)

    def loseConnection(self):
        if self._gone():
            return None  # a stream cut after its producer left, say
        if not self._discarding:
            return super().loseConnection()
        if self._linger_call is not None:
            return
        self._networkProducer.unregisterProducer()
        close_write = getattr(self.transport, "loseWriteConnection", None)
        if close_write is None:
            return self.transport.loseConnection()
        close_write()
        self._linger_call = self.callLater(LINGER_SECONDS, self._end_linger)

    def _end_linger(self):
        self._linger_call = None
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason):
        if self._linger_call is not None and self._linger_call.active():
            self._linger_call.cancel()
        self._linger_call = None
        if self._backlog_call is not None and self._backlog_call.active():
            self._backlog_call.cancel()
        self._backlog_call = None
        self._cancel_head_deadline()
        self._release_client()
        super().connectionLost(reason)
        self.site.channel_closed(self)

    def limit_send_buffer(self, size: int | None) -> None:
        """Cap the kernel's send buffer for this connection (a reader's).

        Linux lets a socket's send buffer grow to megabytes; a reader that
        stops reading would make Loom copy that much for nothing, and every
        byte queued there is latency for a reader that does read.
        """
        if not size:
            return
        transport = self.transport
        for _ in range(3):  # TCP, or TLS over TCP
            handle = getattr(transport, "getHandle", lambda: None)()
            if isinstance(handle, socket.socket):
                try:
                    handle.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
                except OSError:
                    pass  # not a TCP socket, or not allowed: keep the default
                return
            transport = getattr(transport, "transport", None)

    def send_some(self, parts: list, size: int) -> int:
        """Send what the connection takes now of ``parts`` (``size`` bytes); return how many.

        Fewer than ``size`` means the response's producer has been paused; it
        is resumed when the connection can take more, and must then offer the
        rest again. So a reader that stops reading costs no buffer here: a
        follower keeps what was not taken in the stream's file, as an offset.

        On plain TCP the bytes go straight to the socket, in one system call,
        when Twisted holds nothing else for it; that also saves a reactor turn
        of latency for a reader that keeps up. Other transports (TLS) are
        handed slices until they pause the producer, which they do once their
        own buffer holds more than its size (64 KiB): a bounded fallback, also
        taken for every transport when ``directSend`` is off.
        """
        transport = self.transport
        # Only a plain TCP connection: a TLS wrapper forwards attribute lookups
        # to the TCP transport beneath it, whose socket must never see plaintext.
        if not self.direct_send or type(transport) is not tcp.Server or transport.TLS:
            return self._send_sliced(parts, size)
        usable = transport.connected and not transport.disconnecting
        idle = not transport._tempDataBuffer and transport.offset == len(transport.dataBuffer)
        sent = 0
        if usable and idle:
            try:
                if len(parts) == 1:
                    sent = transport.socket.send(parts[0])
                else:
                    sent = transport.socket.sendmsg(parts)
            except BlockingIOError:
                sent = 0
            except OSError:
                sent = 0
                usable = False  # broken: the transport finds the error when it writes
            if sent == size:
                return size
        if not usable or transport.producer is not self:
            # Nothing would resume a pause (the connection is closing): queue as any write.
            transport.writeSequence([bytes(part) for part in after(parts, sent)])
            return size
        # Twisted resumes a streaming producer that it paused once its buffer
        # has drained and the socket is writable (FileDescriptor.doWrite):
        # mark this pause as one of those, so that the same path ends it.
        transport.producerPaused = True
        self.pauseProducing()
        transport.startWriting()
        return sent

    def _send_sliced(self, parts: list, size: int) -> int:
        """Hand ``parts`` to the transport a slice at a time until it pauses the producer."""
        taken = 0
        while taken < size:
            piece = before(after(parts, taken), SLICE)
            self.transport.writeSequence([bytes(part) for part in piece])
            taken += min(SLICE, size - taken)
            if self._waitingForTransport:
                break  # paused: the rest waits with the caller
        return taken

    def write_framing(self, data: bytes) -> None:
        """Queue the few bytes of HTTP framing that complete what was sent (sent in order)."""
        if self.transport is not None:
            self.transport.write(data)

    def abort(self) -> None:
        """Drop the connection at once, without flushing (the client is stuck)."""
        if not self._gone():
            self.transport.abortConnection()

    def cut_off(self) -> None:
        """End the current response so that the client cannot mistake it for a clean end,
        yet receives what was already written to it (a producer's 201).

        A chunked response is closed without its last chunk: the write side is
        closed once what was written is sent, and what the client still sends
        is drained for a moment (see loseConnection), since closing on unread
        bytes would reset the connection and lose the answer. A response
        delimited by the connection (HTTP/1.0) would look complete if closed,
        so it is reset instead.
        """
        if self._gone():
            return
        request = self.requests[0] if self.requests else None
        if request is None or not request.chunked:
            self.abort()
            return
        self.refuse_further_requests()
        self.loseConnection()

    def _respondToBadRequestAndDisconnect(self):
        # Called for malformed requests, including a malformed chunk in the
        # middle of a body. If a response (such as a 201) has begun, writing
        # "400 Bad Request" into it would corrupt it: abort instead.
        request = self.requests[-1] if self.requests else None
        if request is not None and request.body_sink is not None:
            request.body_sink.body_malformed()
        if request is not None and request.startedWriting:
            self.cut_off()
            return
        self._refuse_head(400, "Bad Request", "The request is malformed.")


class LoomRequest(server.Request):
    """A request that can be dispatched when its headers arrive and never spools its body."""

    defaultContentType = None
    client_host: str | None = None  # who sent it (through a trusted proxy: the client it names)
    authorization_padded = False
    body_sink = None
    dispatched_early = False
    body_done = False
    stream_id: str | None = None
    # Payload bytes of a response chunk whose head was sent but whose payload was not all.
    _chunk_owed = 0

    @property
    def gone(self) -> bool:
        """Whether the client is gone (or its head was refused and the connection is
        closing): write nothing more."""
        return self._disconnected

    def gotLength(self, length):
        # No temporary file: bodies are streamed to ``body_sink`` or discarded.
        self.content = None

    def headers_received(self, command: bytes, path: bytes, version: bytes,
                         has_body: bool) -> None:
        """All headers are in: dispatch a POST now so its body can stream, and refuse
        a body on any other method now, rather than read it for as long as it trickles."""
        if command == b"POST":
            self.dispatched_early = True
            self._set_request_line(command, path, version)
            self.process()
        elif has_body:
            self.dispatched_early = True
            self._set_request_line(command, path, version)
            method = command.decode("ascii", "replace")
            write_error(self, BadRequest(f"A {method} request may not have a body."))

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_sink is not None:
            self.body_sink.body_data([data])

    def requestReceived(self, command, path, version):
        """The body ended. For a request already dispatched that is all it means."""
        self.body_done = True
        if self.dispatched_early:
            if self.body_sink is not None:
                self.body_sink.body_ended()
            return
        self._set_request_line(command, path, version)
        self.process()

    def _set_request_line(self, command: bytes, path: bytes, version: bytes) -> None:
        path = origin_form(path)
        self.method, self.uri, self.clientproto = command, path, version
        self.path, _, query = path.partition(b"?")
        self.args = parse_query(query)

    def process(self):
        if self.path == b"*":
            # twisted.web would answer this itself, in its own (non-JSON) words.
            self.setHeader(b"Allow", b"GET, HEAD, POST, DELETE")
            if self.method == b"OPTIONS":
                write_json(self, http.OK, {"allow": ["GET", "HEAD", "POST", "DELETE"]})
            else:
                write_error(self, BadRequest("The target * is for OPTIONS only."))
            return
        super().process()

    def processingFailed(self, reason):
        # An unexpected exception while rendering: JSON 500 (or an abort if
        # the response has begun), never twisted.web's HTML traceback page.
        answer_failure(self, reason)

    def write_body(self, parts: list, size: int) -> int:
        """Send response body bytes (``size`` of them, in ``parts``) the fast way; return
        how many the connection took now.

        Equivalent to ``write(b"".join(parts))`` once the headers are out,
        without twisted.web's per-call layers or a copy: the chunk header,
        the parts and the trailing CRLF go to the socket in one system call
        when it can take them right now. Fewer than ``size`` taken means the
        producer was paused (see ``LoomChannel.send_some``) and must offer the
        rest again when resumed; a chunk whose head went out is then finished
        first, so the chunked framing stays exact wherever the socket cut it.
        """
        if self.gone or not size:
            return size
        if not self.chunked:
            taken = self.channel.send_some(parts, size)
        elif not self._chunk_owed and size <= SHARED_FRAME_LIMIT:
            # The common case, kept short: a small fresh chunk, framed once for all.
            frame = shared_frame(parts, size)
            sent = self.channel.send_some([frame], len(frame))
            taken = size if sent == len(frame) else self._chunk_cut(size, sent)
        else:
            taken = self._write_chunked(parts, size)
        self.sentLength += taken
        self.site.counters.bytes_out += taken
        return taken

    def _write_chunked(self, parts: list, size: int) -> int:
        """``write_body`` for a large chunk, or after a chunk was cut."""
        owed = self._chunk_owed
        if not owed:
            head = b"%x\r\n" % size
            wire, wire_size = [head, *parts, b"\r\n"], len(head) + size + 2
        else:  # first the rest of a chunk begun earlier
            wire, rest = [], parts
            for framing, n in chunk_runs(size, owed):
                if framing is None:
                    wire += before(rest, n)
                    rest = after(rest, n)
                else:
                    wire.append(framing)
            wire_size = sum(len(part) for part in wire)
        sent = self.channel.send_some(wire, wire_size)
        if sent == wire_size:
            self._chunk_owed = max(0, owed - size)
            return size
        return self._chunk_cut(size, sent)

    def _chunk_cut(self, size: int, sent: int) -> int:
        """The connection took ``sent`` bytes of a write of ``size`` payload bytes: note
        what the chunk begun still owes, queue the framing begun; return the payload taken."""
        taken, self._chunk_owed, framing = chunks_sent(size, self._chunk_owed, sent)
        if framing:
            self.channel.write_framing(framing)
        return taken

    def finish(self):
        if self.dispatched_early and not self.body_done and self.channel is not None:
            self.channel.refuse_further_requests()
        return super().finish()

    def connectionLost(self, reason):
        sink = self.body_sink if not self.body_done else None
        if not self.finished and self.channel is not None:
            site = getattr(self.channel, "site", None)
            if site is not None:
                site.log(self, closed=True)
        super().connectionLost(reason)
        if sink is not None:
            sink.body_lost(reason)
