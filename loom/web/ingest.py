"""Streaming request bodies: the only module that touches twisted.web's channel internals.

twisted.web normally spools a request body to a temporary file and renders
the request when the body has ended. Loom's producers keep their body open
for hours and want their ``201`` at once, so:

* ``LoomChannel`` tells the request when its headers are complete, holds back
  ``100 Continue`` until the request is accepted, and after an early answer
  (401, 409, ...) stops reading requests and closes gently.
* ``LoomRequest`` never spools: a POST is dispatched as soon as its headers
  are in, each body chunk goes to its ``body_sink`` as it arrives, and the
  channel's "request received" becomes "body ended".
* ``Ingest`` is that sink for ``POST /stream``: it creates the stream, sends
  the 201, appends every chunk to the stream, and ends the response only when
  the data is durable; on any storage failure it aborts the connection.

Tested against Twisted 26.10 with raw bytes through a real channel
(tests/web/test_ingest.py); setup.py pins the Twisted range.
"""

from __future__ import annotations

import socket

from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server

from loom.buffers import after, before
from loom.errors import BadRequest, StorageFailed, StreamCut, StreamGone, StreamTooLarge
from loom.store import TAKEN_OVER, LiveStream
from loom.web.query import parse_query
from loom.web.responses import answer_failure, write_error, write_json

log = Logger()

# After an early answer, how long the client may keep sending before we close.
LINGER_SECONDS = 2.0


_HEX = frozenset(b"0123456789abcdefABCDEF")
_MIN_READ, _MAX_READ = 64 * 1024, 512 * 1024
_MAX_SIZE_LINE = 1024
# A Content-Length of more digits than a signed 64-bit length is refused.
_MAX_LENGTH_DIGITS = 19
# The longest request target (path and query) accepted: room for any id and a
# query of filters, and a bound on the work a query string can ask for.
MAX_TARGET_BYTES = 8192
# The most handed at once to a transport that is not written directly (TLS):
# a stalled reader's transport holds its buffer size and at most this more.
_SLICE = 16 * 1024


class _BodyDecoder:
    """Decodes a streaming request body, handing over each network read at once.

    Twisted's decoders copy every chunk out of a bytearray and call back once
    per chunk; this one slices the read with memoryviews (no copy) and calls
    ``on_data`` once per read with all the payload it held, so a read that
    carries many small chunks costs one append and one round of wake-ups.
    ``length`` None means chunked transfer coding, else a Content-Length.
    Malformed chunking raises Twisted's own error after the well-formed
    bytes before it were delivered, so the channel aborts as it would.

    A read of tiny chunks (a producer writing a byte at a time, flat out) is
    decoded at most ``MAX_CHUNKS_PER_TURN`` chunks at a time: the rest is held
    and ``on_backlog`` called, for the channel to stop reading and go on with
    it on the next reactor turn, so that no read holds up everyone else.
    """

    MAX_CHUNKS_PER_TURN = 2048

    def __init__(self, length: int | None, on_data, on_end, on_backlog=None):
        self._remaining = length  # bytes left: of the body, or of the current chunk
        self._chunked = length is None
        self._state = "size" if self._chunked else "data"
        self._held = b""  # bytes not decoded yet: an unfinished line, or a backlog
        self._on_data = on_data
        self._on_end = on_end
        self._on_backlog = on_backlog

    @property
    def backlog(self) -> bool:
        """Whether decoded-later bytes wait (see ``MAX_CHUNKS_PER_TURN``)."""
        return self._backlog

    _backlog = False

    def dataReceived(self, data: bytes) -> None:
        if self._held:
            data = self._held + data
            self._held = b""
        if not self._chunked:
            self._identity(data)
            return
        parts, error = self._chunks(data)
        if parts:
            self._on_data(parts)
        if error is not None:
            raise http._MalformedChunkedDataError(error)
        if self._state == "done":
            self._on_end(self._rest)
        elif self._backlog and self._on_backlog is not None:
            self._on_backlog()

    def _identity(self, data: bytes) -> None:
        if len(data) < self._remaining:
            self._remaining -= len(data)
            self._on_data([data])
            return
        view = memoryview(data)
        body, rest = view[: self._remaining], data[self._remaining :]
        self._remaining = 0
        if body:
            self._on_data([body])
        self._on_end(rest)

    def _chunks(self, data: bytes):
        view = memoryview(data)
        parts, position, end = [], 0, len(data)
        budget = self.MAX_CHUNKS_PER_TURN
        self._backlog = False
        while position < end:
            state = self._state
            if state == "data":
                take = min(self._remaining, end - position)
                parts.append(view[position : position + take])
                position += take
                self._remaining -= take
                if not self._remaining:
                    self._state = "crlf"
            elif state == "crlf":
                if end - position < 2:
                    self._held = data[position:]
                    return parts, None
                if data[position : position + 2] != b"\r\n":
                    return parts, "Chunk did not end with CRLF"
                position += 2
                self._state = "size"
            elif state == "size":
                if not budget and self._on_backlog is not None:
                    self._held = data[position:]
                    self._backlog = True
                    return parts, None
                line_end = data.find(b"\r\n", position, position + _MAX_SIZE_LINE)
                if line_end < 0:
                    if end - position >= _MAX_SIZE_LINE:
                        return parts, "Chunk size line too long"
                    self._held = data[position:]
                    return parts, None
                size_text, _, extension = data[position:line_end].partition(b";")
                if not size_text or not _HEX.issuperset(size_text):
                    return parts, "Chunk size is not a hexadecimal number"
                if extension and extension.translate(None, http._chunkExtChars):
                    return parts, "Invalid characters in a chunk extension"
                position = line_end + 2
                self._remaining = int(size_text, 16)
                self._state = "data" if self._remaining else "trailer"
                budget -= 1
            elif state == "trailer":
                line_end = data.find(b"\r\n", position)
                if line_end < 0:
                    if end - position > 65536:
                        return parts, "Trailer too long"
                    self._held = data[position:]
                    return parts, None
                empty = line_end == position
                position = line_end + 2
                if empty:
                    self._state = "done"
                    self._rest = data[position:]
                    return parts, None
            else:  # done: the channel takes what follows
                break
        return parts, None


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
            except http._MalformedChunkedDataError:
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
        target = _origin_form(self._path)
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
        if not self._discarding:
            super().rawDataReceived(data)

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
            self._transferDecoder = _BodyDecoder(
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
            if isinstance(decoder, _BodyDecoder) and decoder.backlog and not self._discarding:
                decoder.dataReceived(b"")  # may hold back again, and pause once more
        except http._MalformedChunkedDataError:
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
        own buffer holds more than its size (64 KiB): a bounded fallback.
        """
        transport = self.transport
        # Only a plain TCP connection: a TLS wrapper forwards attribute lookups
        # to the TCP transport beneath it, whose socket must never see plaintext.
        if type(transport) is not tcp.Server or transport.TLS:
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
            piece = before(after(parts, taken), _SLICE)
            self.transport.writeSequence([bytes(part) for part in piece])
            taken += min(_SLICE, size - taken)
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


# A fresh chunk goes to every follower of its stream: the small ones are framed
# once and the same bytes handed to each (one send each, no per-follower work).
_SHARED_FRAME_LIMIT = 16384
_last_frame: list = [None, b""]


def _shared_frame(parts: list, size: int) -> bytes:
    """``parts`` as one HTTP chunk, built once for all the followers given the same list."""
    if _last_frame[0] is not parts:
        _last_frame[0] = parts
        _last_frame[1] = b"%x\r\n%s\r\n" % (size, b"".join(parts))
    return _last_frame[1]


def _origin_form(target: bytes) -> bytes:
    """The path and query of a request target: ``http://host/a?b`` is ``/a?b`` (RFC 9112
    says a server must accept the absolute form); any other target is returned as it is."""
    scheme, separator, rest = target.partition(b"://")
    if not separator or scheme.lower() not in (b"http", b"https"):
        return target
    cut = min((index for index in (rest.find(b"/"), rest.find(b"?")) if index >= 0),
              default=len(rest))
    path = rest[cut:]
    return path if path.startswith(b"/") else b"/" + path


def _chunk_runs(size: int, owed: int) -> list[tuple[bytes | None, int]]:
    """How ``size`` payload bytes go out in chunked coding when the first ``owed`` of them
    finish a chunk begun earlier, in order: payload ``(None, n)``, and framing
    ``(bytes, size of the chunk it opens)`` (0 for the CRLF that ends a chunk)."""
    runs: list[tuple[bytes | None, int]] = []
    if owed:
        first = min(owed, size)
        runs.append((None, first))
        if first < owed:
            return runs
        runs.append((b"\r\n", 0))
        size -= first
        if not size:
            return runs
    runs += [(b"%x\r\n" % size, size), (None, size), (b"\r\n", 0)]
    return runs


def _chunks_sent(size: int, owed: int, sent: int) -> tuple[int, int, bytes]:
    """After ``sent`` bytes of ``_chunk_runs(size, owed)`` went out: the payload bytes
    taken, the payload still owed to a chunk that was begun, and the framing bytes
    that were begun but not sent (they must follow before anything else)."""
    taken = 0
    for framing, n in _chunk_runs(size, owed):
        if framing is None:
            part = min(sent, n)
            taken, owed, sent = taken + part, owed - part, sent - part
            if part < n:
                break
            continue
        part = min(sent, len(framing))
        sent -= part
        if n:  # a chunk's head
            if not part:
                break  # that chunk was not begun: nothing of it is owed
            owed = n
        if part < len(framing):
            return taken, owed, framing[part:]
    return taken, owed, b""


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

    def body_data(self, parts: list) -> None:
        """Body bytes of one network read (memoryviews into it), for the body sink."""
        if self.body_sink is not None:
            self.body_sink.body_data(parts)

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
        path = _origin_form(path)
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
        if self._disconnected or not size:
            return size
        if not self.chunked:
            taken = self.channel.send_some(parts, size)
        elif not self._chunk_owed and size <= _SHARED_FRAME_LIMIT:
            # The common case, kept short: a small fresh chunk, framed once for all.
            frame = _shared_frame(parts, size)
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
            for framing, n in _chunk_runs(size, owed):
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
        taken, self._chunk_owed, framing = _chunks_sent(size, self._chunk_owed, sent)
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


class Ingest:
    """Feeds the body of one ``POST /stream`` request into one LiveStream.

    Until the stream exists the channel is paused, so at most one network
    read is held in memory. After that every chunk is appended (handed to the
    OS) before the next one is read.

    With ``respond_at_end`` the 201 (or 200) is held back until the body has
    ended and is durable, and then sent whole; a stream cut off before that
    gets its headers and a cut response then. A reverse proxy asks for this:
    nginx stops forwarding a request body once it has passed a response's
    headers on, and HAProxy 2.6 can take a 201 that arrives with a
    ``100 Continue`` for a complete response (docs/deployment.md).
    """

    def __init__(self, request: LoomRequest, store, producer_idle_timeout: float | None,
                 respond_at_end: bool = False):
        self._request = request
        self._respond_at_end = respond_at_end
        self._store = store
        self._channel: LoomChannel = request.channel
        self._producer_idle_timeout = producer_idle_timeout
        self._pending: list[list] = []
        self._stream: LiveStream | None = None
        self._body_ended = False
        self._lost = False
        self._failed = False
        self._malformed = False
        self._syncing = False
        self._created = False  # this request made the stream (not a resume of it)
        self._cut_early: str | None = None
        request.body_sink = self

    async def run(self, stream_id: str | None, metadata_json: str, force: bool) -> None:
        """Create the stream and answer 201, or raise the LoomError to answer instead."""
        self._created = True
        await self._start(lambda owner: self._store.create(
            stream_id, metadata_json, force, on_cut=self._cut, owner=owner))

    async def resume(self, stream_id: str, offset: int) -> None:
        """Append to a stream at ``offset`` and answer 200, or raise (416: resend from X)."""
        await self._start(lambda owner: self._store.resume(
            stream_id, offset, on_cut=self._cut, owner=owner), resumed_at=offset)

    async def _start(self, open_stream, resumed_at: int | None = None) -> None:
        self._channel.pause_reading()
        try:
            # The store binds this ingest to the stream as its producer in the
            # same step that grants it: no other producer can slip in between.
            stream = await open_stream(getattr(self._request, "token_id", None))
        except BaseException:
            self._channel.resume_reading()
            raise
        self._stream = stream
        self._request.stream_id = stream.id
        if self._cut_early is not None:
            self._failed = True
            self._channel.resume_reading()
            raise StreamGone(stream.id, self._cut_early)
        if self._malformed:
            # The body proved malformed while the stream was being made; the
            # client has its 400 already.
            self._give_up()
            self._channel.resume_reading()
            return
        if not self._lost:
            self._send_created(stream, resumed_at)
        pending, self._pending = self._pending, []
        for parts in pending:
            self.body_data(parts)
        if self._lost:
            self._abort_stream()
        elif self._body_ended:
            self._complete()
        self._channel.resume_reading()

    def _send_created(self, stream: LiveStream, resumed_at: int | None) -> None:
        request = self._request
        self._channel.send_continue()
        if not request.body_done:
            self._channel.set_body_timeout(self._producer_idle_timeout)
        request.setHeader(b"X-Stream-Id", stream.id.encode("ascii"))
        request.setHeader(b"Location", b"/stream/" + stream.id.encode("ascii"))
        if resumed_at is None:
            request.setResponseCode(http.CREATED)
        else:
            request.setResponseCode(http.OK)
            request.setHeader(b"X-Stream-Offset", b"%d" % resumed_at)
        if stream.replaced:
            request.setHeader(b"X-Stream-Replaced", b"true")
        if self._respond_at_end:
            return  # finish() sends the headers with the response's end (or _cut_off)
        request.write(b"")  # the headers leave now; the body of the response stays empty

    # body_sink

    def body_data(self, parts: list) -> None:
        if self._failed:
            return
        if self._stream is None:
            self._pending.append(parts)
            return
        try:
            committing = self._stream.append_parts(parts)
        except StreamTooLarge as e:
            self._fail(e.message, reason=f"the size limit of {self._store.max_stream_bytes} "
                                         "bytes was reached")
            return
        except StorageFailed as e:
            self._fail(str(e), reason=f"storing the data failed: {e}")
            return
        except StreamCut:
            self._fail(None)
            return
        if committing is not None:
            # The byte log confirms later (a networked log): read nothing more
            # from the producer until it has.
            self._channel.pause_reading()
            committing.addCallbacks(lambda _: self._channel.resume_reading(),
                                    self._commit_failed)
        if self._store.fsync == "always" and not self._syncing:
            self._sync_before_reading_more()

    def _commit_failed(self, failure: Failure) -> None:
        self._channel.resume_reading()
        self._fail(failure.getErrorMessage(), reason="the stream's log refused the data")

    def body_ended(self) -> None:
        self._body_ended = True
        if self._stream is not None and not self._failed:
            self._complete()

    def body_lost(self, reason: Failure) -> None:
        self._lost = True
        if self._stream is not None and not self._failed:
            self._abort_stream()

    def body_malformed(self) -> None:
        """The body's framing broke: no more of it will come (the channel answers or aborts)."""
        self._malformed = True
        if self._stream is not None:
            self._give_up()

    def _give_up(self) -> None:
        """After a malformed body: a stream this request made and never stored a byte
        of is removed, so the same request can be retried; any other is aborted."""
        if self._failed:
            return
        stream = self._stream
        if self._created and stream.size == 0:
            self._failed = True
            d = Deferred.fromCoroutine(self._store.discard(stream))
            d.addErrback(lambda f: log.failure("discarding stream {stream_id} failed", f,
                                               stream_id=stream.id))
            return
        self._fail("the request body was malformed", reason="the request body was malformed")

    # internals

    def _sync_before_reading_more(self) -> None:
        self._syncing = True
        self._channel.pause_reading()

        def synced(_):
            if self._stream.synced < self._stream.size and not self._failed:
                self._stream.sync().addCallbacks(synced, failed)
                return
            self._syncing = False
            self._channel.resume_reading()

        def failed(failure):
            self._syncing = False
            self._channel.resume_reading()
            self._fail(failure.getErrorMessage())

        self._stream.sync().addCallbacks(synced, failed)

    def _complete(self) -> None:
        def completed(_):
            if not self._request._disconnected and not self._request.finished:
                self._request.finish()

        def failed(failure):
            failure.trap(StorageFailed, StreamCut)
            self._fail(failure.getErrorMessage(), record=False)

        d = Deferred.fromCoroutine(self._stream.complete())
        d.addCallbacks(completed, failed)

    def _abort_stream(self, reason: str | None = None) -> None:
        def failed(failure):
            failure.trap(StorageFailed, StreamCut)

        Deferred.fromCoroutine(self._stream.abort(reason)).addErrback(failed)

    def _fail(self, message: str | None, record: bool = True, reason: str | None = None) -> None:
        """Storing failed after the 201: abort the connection so the producer can tell.

        ``reason`` is recorded with the aborted stream.
        """
        if self._failed:
            return
        self._failed = True
        if message:
            log.error(
                "stream {stream_id}: {message}; aborting its producer",
                stream_id=self._stream.id,
                message=message,
            )
        if record and self._stream.outcome is None and not self._stream.closing:
            self._abort_stream(reason)
        self._cut_off()

    def _cut_off(self) -> None:
        """End the answer so that the producer cannot take it for a clean end.

        A 201 held back (``respond_at_end``) goes out now, headers only: the
        body is over for Loom, so a proxy forwarding no more of it does no
        harm, and its client then sees the response cut, as without a proxy
        (curl exits 18), rather than the proxy's 502 for a reset.
        """
        request = self._request
        if self._respond_at_end and not request.startedWriting and not request._disconnected:
            request.write(b"")
        self._channel.cut_off()

    def _cut(self, outcome: str) -> None:
        """The store ended the stream under us (replaced, deleted, shutting down, failed),
        or another producer took it over (the stream goes on without us)."""
        if self._failed:
            return
        if self._stream is None:
            # Cut between the store granting the stream and this ingest hearing of it
            # (a DELETE in the same turn): _start answers instead of the 201.
            self._cut_early = outcome
            return
        if outcome == TAKEN_OVER:
            self._failed = True
            log.info("stream {stream_id} taken over: disconnecting its previous producer",
                     stream_id=self._stream.id)
            self._cut_off()
            return
        log.info(
            "stream {stream_id} {outcome}: disconnecting its producer",
            stream_id=self._stream.id,
            outcome=outcome,
        )
        self._fail(None)
