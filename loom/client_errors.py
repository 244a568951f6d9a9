"""The errors of loom.client, and how an answer or a failed connection becomes one.

Each error's message is one line fit for a terminal: Loom's own sentence when
Loom answered, what answered instead (a proxy's error page, a captive portal)
when it was not Loom, and what TLS or the network said when nothing did.
"""

from __future__ import annotations

import json
import re
from http import HTTPStatus
from urllib.parse import urlsplit

from twisted.internet import error as net_error
from twisted.web.client import ResponseFailed



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


def error_for(status: int, body: bytes, stream_id: str | None,
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


def tls_failure(reason, url: str) -> LoomClientError | None:
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


def connect_error(failure_value: BaseException, url: str) -> LoomClientError:
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
            tls = tls_failure(reason, url)
            if tls is not None:
                return tls
        return ServerAborted(
            f"server closed the connection: {failure_value.reasons[0].getErrorMessage()}")
    return CannotConnect(f"cannot connect to {url}: {failure_value}")
