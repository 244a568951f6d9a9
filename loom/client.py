"""A client for Loom: push a stream, follow a stream, watch /spy.

``LoomClient`` takes the server's base URL (``http://`` or ``https://``),
an optional bearer token and, for TLS, an optional trust root. Every method
is a coroutine; failures are the exceptions of loom.client_errors (importable
from here too), each with a one-line message fit for a terminal.

Reading uses treq with unbuffered responses, so a long stream is handed to
your callback chunk by chunk and never held whole. Pushing uses a small
HTTP/1.1 protocol of its own (loom.upload): twisted.web's client only reports
the response once the whole request body is sent, and a producer wants its
stream id (the ``201``) the moment the stream exists.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import quote, urlsplit

from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.ssl import optionsForClientTLS
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, ResponseFailed

from loom import __version__
from loom.client_errors import (  # noqa: F401 (the client's errors, importable from here)
    Busy,
    CannotConnect,
    Forbidden,
    LoomClientError,
    RequestFailed,
    ServerAborted,
    SizeMismatch,
    StreamExists,
    StreamNotFound,
    Unauthorized,
    UntrustedCertificate,
    connect_error,
    error_for,
)
from loom.upload import Created, Once, PushResult, Upload

USER_AGENT = f"loom-client/{__version__}".encode("ascii")


# --- results ------------------------------------------------------------------------


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
            raise connect_error(e, self.base)
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
            raise connect_error(e, self.base)
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
            raise connect_error(e, self.base)
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
            raise connect_error(e, self.base)
        if response.code != expect:
            raise await _answer_error(response, stream_id)
        try:
            body = await response.content()
        except Exception as e:
            raise connect_error(e, self.base)
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
        upload = Upload(request, body, stream_id, self, on_created)
        endpoint = HostnameEndpoint(self._reactor, self._host, self._port)
        if self._scheme == "https":
            options = optionsForClientTLS(
                self._host, trustRoot=self._trust_root, acceptableProtocols=[b"http/1.1"]
            )
            endpoint = wrapClientTLS(options, endpoint)
        try:
            await endpoint.connect(Once(upload))
        except Exception as e:
            raise connect_error(e, self.base)
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
    return error_for(response.code, body, stream_id, headers, phrase)


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
