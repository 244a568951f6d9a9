"""A client for Loom: push a stream, follow a stream, watch /spy.

``LoomClient`` takes the server's base URL (``http://`` or ``https://``),
an optional bearer token and, for TLS, an optional trust root. Every method
is a coroutine; failures are the exceptions below, each with a one-line
message fit for a terminal.

Reading uses treq with unbuffered responses, so a long stream is handed to
your callback chunk by chunk and never held whole. Pushing uses a small
HTTP/1.1 protocol of its own: twisted.web's client only reports the response
once the whole request body is sent, and a producer wants its stream id (the
``201``) the moment the stream exists.
"""

from __future__ import annotations

import json
import re
import socket
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Callable
from urllib.parse import quote, urlsplit

from twisted.internet import error as net_error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, ResponseFailed
from twisted.web.iweb import UNKNOWN_LENGTH

from loom import __version__

USER_AGENT = f"loom-client/{__version__}".encode("ascii")


# --- errors -----------------------------------------------------------------------


class LoomClientError(Exception):
    """Something went wrong talking to Loom; ``str()`` is one line for a human.

    ``retryable`` says whether the same request may well succeed later (the
    server restarting, a proxy that cannot reach it yet, a busy stream).
    """

    retryable = False


class Unauthorized(LoomClientError):
    pass


class Forbidden(LoomClientError):
    pass


class StreamNotFound(LoomClientError):
    pass


class StreamExists(LoomClientError):
    pass


class CannotConnect(LoomClientError):
    """The server could not be reached (refused, unknown host, TLS failure)."""

    retryable = True


class UntrustedCertificate(CannotConnect):
    """The server's TLS certificate is not trusted, or not valid for its name: trying
    again cannot help until the trust root (or the URL) changes."""

    retryable = False


class ServerAborted(LoomClientError):
    """The server ended the exchange without a clean end."""

    retryable = True


class SizeMismatch(LoomClientError):
    """An append named the wrong offset; ``size`` is what the server holds."""

    def __init__(self, stream_id: str, size: int):
        super().__init__(f"stream {stream_id} holds {size} bytes")
        self.size = size


class Busy(LoomClientError):
    """The server asked to try again later (a ``Retry-After`` answer): another producer
    holds the stream for now, or the stream is still being ended."""

    retryable = True

    def __init__(self, status: int, error: str, retry_after: float):
        super().__init__(f"server answered {status}: {error}")
        self.status = status
        self.retry_after = retry_after


class RequestFailed(LoomClientError):
    """Any other error answer; ``status`` and the server's ``error`` sentence.

    ``from_loom`` is False when the answer did not come from Loom (an HTML
    page from a proxy in between). 502, 503 and 504 are ``retryable``: Loom,
    or a proxy's way to it, may be back soon (a restart).
    """

    def __init__(self, status: int, error: str, from_loom: bool = True,
                 message: str | None = None):
        super().__init__(message or f"server answered {status}: {error}")
        self.status = status
        self.error = error
        self.from_loom = from_loom
        self.retryable = status in (502, 503, 504)


def _loom_sentence(body: bytes) -> str | None:
    """The ``error`` sentence of a Loom error body, or None if the body is not one."""
    try:
        sentence = json.loads(body.decode("utf-8"))["error"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
        return None
    return _one_line(sentence) if isinstance(sentence, str) else None


def _one_line(text: str) -> str:
    """``text`` on one line, without control characters (no escape reaches a terminal)."""
    return "".join(c if c.isprintable() else " " for c in " ".join(text.split()))


def _not_loom(status: int, phrase: str, body: bytes, headers: dict) -> str:
    """One line for an answer that is not Loom's (a proxy's error page): the status and
    who sent it, never the page itself."""
    if not phrase:
        title = re.search(rb"<title>([^<]{1,200})</title>", body, re.IGNORECASE)
        phrase = title.group(1).decode("utf-8", "replace") if title else ""
        phrase = phrase.removeprefix(str(status)).strip()
    if not phrase:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
    server = headers.get("server", "")
    if server.startswith("Loom/"):
        return _one_line(f"server answered {status} {phrase}")[:300]
    if server:
        who = f"the proxy {server}"
    elif headers.get("via"):
        who = f"a proxy (Via: {headers['via']})"
    else:
        who = "something that is not Loom (a proxy?)"
    return _one_line(f"{status} {phrase} from {who}, not from Loom")[:300]


def _error_for(status: int, body: bytes, stream_id: str | None,
               headers: dict | None = None, phrase: str = "") -> LoomClientError:
    """The exception for an error answer; ``headers`` with lower-case names."""
    headers = headers or {}
    sentence = _loom_sentence(body)
    if sentence is None and not body.strip():
        # No body (HEAD): nothing tells Loom from a proxy, so take the status at its word.
        sentence = f"{status} {phrase}".strip()
    elif sentence is None:
        summary = _not_loom(status, phrase, body, headers)
        if status == 401:
            return Unauthorized(f"unauthorized: {summary}")
        if status == 403:
            return Forbidden(f"forbidden: {summary}")
        return RequestFailed(status, summary, from_loom=False, message=summary)
    if status == 401:
        return Unauthorized("unauthorized")
    if status == 403:
        return Forbidden(f"forbidden: {sentence}")
    if status == 404:
        return StreamNotFound(
            f"stream {stream_id} does not exist" if stream_id else sentence
        )
    if status == 409 and "already exists" in sentence:
        return StreamExists(f"stream {stream_id} already exists")
    retry_after = headers.get("retry-after", "")
    if retry_after.isdigit():
        return Busy(status, sentence, float(retry_after))
    size = headers.get("x-stream-size")
    if status == 416 and size is not None and size.isdigit():
        return SizeMismatch(stream_id or "", int(size))
    return RequestFailed(status, sentence)


def _tls_failure(reason, url: str) -> LoomClientError | None:
    """The error for a failed TLS handshake (a Failure), or None if it is not one."""
    try:
        from OpenSSL.SSL import Error as TLSError
    except ImportError:
        return None  # no TLS here at all
    try:
        from service_identity import VerificationError
    except ImportError:
        VerificationError = None  # noqa: N806 (Twisted then checks no names)
    host = urlsplit(url).netloc
    if VerificationError is not None and reason.check(VerificationError):
        return UntrustedCertificate(
            f"the TLS certificate of {host} is not valid for that name")
    if reason.check(TLSError):
        detail = _openssl_reason(reason.value)
        if "certificate verify failed" in detail:
            return UntrustedCertificate(
                f"the TLS certificate of {host} is not trusted (certificate verify failed)")
        return CannotConnect(f"TLS with {url} failed: {detail}")
    return None


def _openssl_reason(error: BaseException) -> str:
    # pyOpenSSL errors carry [(library, function, reason), ...].
    try:
        return "; ".join(item[2] for item in error.args[0] if item[2]) or str(error)
    except (IndexError, TypeError):
        return str(error)


def _connect_error(failure_value: BaseException, url: str) -> LoomClientError:
    if isinstance(failure_value, LoomClientError):
        return failure_value
    if isinstance(failure_value, net_error.ConnectionRefusedError):
        return CannotConnect("connection refused")
    if isinstance(failure_value, net_error.DNSLookupError):
        return CannotConnect(f"cannot resolve the host of {url}")
    if isinstance(failure_value, net_error.TimeoutError):
        return CannotConnect(f"timed out connecting to {url}")
    if isinstance(failure_value, ResponseFailed):
        for reason in failure_value.reasons:
            tls = _tls_failure(reason, url)
            if tls is not None:
                return tls
        return ServerAborted(
            f"server closed the connection: {failure_value.reasons[0].getErrorMessage()}")
    return CannotConnect(f"cannot connect to {url}: {failure_value}")


# --- results ------------------------------------------------------------------------


@dataclass(frozen=True)
class Created:
    """What the 201 said: the stream's id and whether it replaced an older stream."""

    stream_id: str
    replaced: bool
    url: str


@dataclass(frozen=True)
class PushResult:
    stream_id: str
    replaced: bool
    bytes_sent: int


@dataclass(frozen=True)
class StreamInfo:
    """What HEAD says about a stream."""

    stream_id: str
    state: str
    size: int
    metadata: dict


@dataclass(frozen=True)
class FollowResult:
    """How a followed stream ended: its state and the bytes received."""

    state: str
    bytes_received: int
    metadata: dict


# --- the client -----------------------------------------------------------------------


class LoomClient:
    """Talks to one Loom server."""

    def __init__(self, server: str, token: str | None = None, reactor=None, trust_root=None):
        parts = urlsplit(server if "://" in server else "http://" + server)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {server!r}")
        self.base = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
        self._scheme = parts.scheme
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._path = parts.path.rstrip("/")
        self._token = token
        self._trust_root = trust_root
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self._reactor = reactor
        self._http = None

    def stream_url(self, stream_id: str) -> str:
        return f"{self.base}/stream/{quote(stream_id, safe='')}"

    def _headers(self, extra: dict | None = None) -> dict:
        headers = {b"User-Agent": [USER_AGENT]}
        if self._token:
            headers[b"Authorization"] = [b"Bearer " + self._token.encode("ascii")]
        for name, value in (extra or {}).items():
            headers[name] = [value]
        return headers

    def _treq(self):
        if self._http is None:
            from treq.client import HTTPClient

            policy = BrowserLikePolicyForHTTPS(trustRoot=self._trust_root)
            self._http = HTTPClient(Agent(self._reactor, contextFactory=policy))
        return self._http

    # reading

    async def _get(self, url: str, stream_id: str | None):
        try:
            response = await self._treq().get(url, headers=self._headers(), unbuffered=True)
        except Exception as e:
            raise _connect_error(e, self.base)
        if response.code != 200:
            raise await _answer_error(response, stream_id)
        return response

    async def _collect(self, response, callback: Callable[[bytes], Any]) -> int:
        received = 0

        def deliver(data: bytes) -> None:
            nonlocal received
            received += len(data)
            callback(data)

        from treq import collect

        try:
            await collect(response, deliver)
        except ResponseFailed:
            raise ServerAborted("server aborted the stream")
        return received

    async def follow(
        self, stream_id: str, callback: Callable[[bytes], Any], notail: bool = False,
        offset: int = 0,
    ) -> FollowResult:
        """Hand every chunk of the stream, from ``offset``, to ``callback`` until it ends.

        Raises ServerAborted if the stream ends uncleanly (its producer
        vanished, it was replaced, the server stopped); follow again with
        ``offset`` set to the bytes received so far to carry on.
        """
        query = [f"offset={offset}"] if offset else []
        if notail:
            query.append("notail")
        url = self.stream_url(stream_id) + ("?" + "&".join(query) if query else "")
        response = await self._get(url, stream_id)
        headers = response.headers
        state = (headers.getRawHeaders("x-stream-state") or ["unknown"])[0]
        metadata = json.loads((headers.getRawHeaders("x-stream-metadata") or ["{}"])[0])
        received = await self._collect(response, callback)
        if state == "live" and not notail:
            state = "complete"
        return FollowResult(state, received, metadata)

    async def head(self, stream_id: str) -> StreamInfo:
        """The stream's state, size and metadata (HEAD)."""
        try:
            response = await self._treq().head(self.stream_url(stream_id),
                                               headers=self._headers())
        except Exception as e:
            raise _connect_error(e, self.base)
        if response.code != 200:
            raise await _answer_error(response, stream_id)
        headers = response.headers
        return StreamInfo(
            stream_id,
            headers.getRawHeaders("x-stream-state")[0],
            int(headers.getRawHeaders("x-stream-size")[0]),
            json.loads(headers.getRawHeaders("x-stream-metadata")[0]),
        )

    async def read(self, stream_id: str, start: int, end: int) -> bytes:
        """Bytes ``start`` to ``end`` (exclusive) of what the stream holds now; fewer if it
        holds fewer. For comparing a little of a stream, never for reading a whole one."""
        if end <= start:
            return b""
        headers = self._headers({b"Range": b"bytes=%d-%d" % (start, end - 1)})
        try:
            response = await self._treq().get(self.stream_url(stream_id) + "?notail",
                                              headers=headers, unbuffered=True)
        except Exception as e:
            raise _connect_error(e, self.base)
        if response.code == 416:  # it holds no byte at start
            await self._collect(response, lambda data: None)
            return b""
        if response.code not in (200, 206):
            raise await _answer_error(response, stream_id)
        received = bytearray()
        await self._collect(response, received.extend)
        if response.code == 200:  # the whole stream: the range was not applied
            del received[:start]
        return bytes(received[: end - start])

    async def delete(self, stream_id: str) -> None:
        """Delete a stream (needs the admin scope)."""
        await self._json("DELETE", self.stream_url(stream_id), stream_id, expect=204)

    async def list_streams(self, **filters) -> dict:
        """GET /streams: ``state``, ``since``, ``until``, ``limit``, ``cursor``, and
        ``meta={"key": "value"}``; returns ``{"streams": [...], "next": cursor}``."""
        params = {k: str(v) for k, v in filters.items() if k != "meta" and v is not None}
        for key, value in (filters.get("meta") or {}).items():
            params[f"meta.{key}"] = str(value)
        query = "&".join(f"{quote(k)}={quote(v)}" for k, v in params.items())
        return await self._json("GET", self.base + "/streams" + ("?" + query if query else ""))

    async def _json(self, method: str, url: str, stream_id: str | None = None,
                    expect: int = 200):
        try:
            response = await self._treq().request(method, url, headers=self._headers())
        except Exception as e:
            raise _connect_error(e, self.base)
        if response.code != expect:
            raise await _answer_error(response, stream_id)
        try:
            body = await response.content()
        except Exception as e:
            raise _connect_error(e, self.base)
        return json.loads(body) if body else None

    async def spy(
        self,
        callback: Callable[[bytes], Any],
        color: bool = False,
        on_connected: Callable[[], Any] | None = None,
    ) -> None:
        """Hand /spy's output to ``callback`` until the server ends it."""
        response = await self._get(self.base + "/spy" + ("?color" if color else ""), None)
        if on_connected is not None:
            on_connected()
        await self._collect(response, callback)

    # writing

    async def push(
        self,
        body,
        stream_id: str | None = None,
        metadata: dict | None = None,
        force: bool = False,
        on_created: Callable[[Created], Any] | None = None,
        append_at: int | None = None,
    ) -> PushResult:
        """Send ``body`` (an IBodyProducer) as a stream; return once Loom stored all of it.

        ``on_created`` is called as soon as the server has created the stream,
        while the body is still being sent. With ``append_at`` the body is
        appended to an existing (aborted or interrupted) stream that holds
        exactly that many bytes; SizeMismatch says how many it really holds.
        """
        path = self._path + ("/stream" if stream_id is None else "/stream/" + quote(stream_id, safe=""))
        extra_headers = []
        if append_at is not None:
            path += "?append=true"
            extra_headers.append(b"X-Stream-Offset: %d" % append_at)
        elif force:
            path += "?force=true"
        head = [
            b"POST " + path.encode("ascii") + b" HTTP/1.1",
            b"Host: " + self._host_header(),
            b"Transfer-Encoding: chunked",
            b"User-Agent: " + USER_AGENT,
        ]
        if metadata is not None and append_at is None:
            head.append(b"X-Stream-Metadata: " + json.dumps(metadata, ensure_ascii=True).encode())
        head.extend(extra_headers)
        if self._token:
            head.append(b"Authorization: Bearer " + self._token.encode("ascii"))
        request = b"\r\n".join(head) + b"\r\n\r\n"
        upload = _Upload(request, body, stream_id, self, on_created)
        endpoint = HostnameEndpoint(self._reactor, self._host, self._port)
        if self._scheme == "https":
            options = optionsForClientTLS(
                self._host, trustRoot=self._trust_root, acceptableProtocols=[b"http/1.1"]
            )
            endpoint = wrapClientTLS(options, endpoint)
        try:
            await endpoint.connect(_Once(upload))
        except Exception as e:
            raise _connect_error(e, self.base)
        return await upload.result

    def _host_header(self) -> bytes:
        default = 443 if self._scheme == "https" else 80
        host = f"[{self._host}]" if ":" in self._host else self._host
        return (host if self._port == default else f"{host}:{self._port}").encode("idna")


async def _answer_error(response, stream_id: str | None) -> LoomClientError:
    """The exception for a treq response that is an error answer (its body is read)."""
    try:
        body = await response.content()
    except ResponseFailed:
        body = b""  # the status alone still says what happened
    headers = {name.decode("latin-1").lower(): values[-1].decode("latin-1")
               for name, values in response.headers.getAllRawHeaders()}
    phrase = response.phrase.decode("latin-1") if response.phrase else ""
    return _error_for(response.code, body, stream_id, headers, phrase)


class _Once:
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


class _Upload(Protocol):
    """One streaming POST: request head, chunked body, and the response as it arrives."""

    def __init__(self, request: bytes, body, stream_id, client: LoomClient, on_created):
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
            self._fail(_error_for(self._status, bytes(self._buffer), self._stream_id,
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
        tls = _tls_failure(reason, self._client.base) if self._status is None else None
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


__all__ = [
    "Busy",
    "CannotConnect",
    "Created",
    "FollowResult",
    "Forbidden",
    "LoomClient",
    "LoomClientError",
    "PushResult",
    "RequestFailed",
    "ServerAborted",
    "SizeMismatch",
    "StreamInfo",
    "StreamExists",
    "StreamNotFound",
    "Unauthorized",
    "UntrustedCertificate",
]
