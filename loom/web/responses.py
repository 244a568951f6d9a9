"""Writing whole answers: JSON documents and errors, whatever state a request is in."""

from __future__ import annotations

import json

from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http

from loom.errors import LoomError

log = Logger()


def write_json(request, status: int, document: dict, headers: dict | None = None) -> None:
    """Answer with a complete JSON document and finish the request."""
    body = json.dumps(document, ensure_ascii=True).encode("ascii") + b"\n"
    write_json_text(request, status, body, headers)


def write_json_text(request, status: int, body: bytes, headers: dict | None = None) -> None:
    """Answer with ``body``, a complete JSON document already encoded, and finish."""
    if request.gone:
        return  # the client left: nobody to answer
    request.setResponseCode(status)
    for name, value in (headers or {}).items():
        request.setHeader(name.encode("ascii"), value.encode("ascii"))
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Content-Length", b"%d" % len(body))
    request.write(body)
    request.finish()


def write_error(request, error: LoomError) -> None:
    write_json(request, error.status, {"error": error.message}, error.headers)


def answer_failure(request, failure: Failure) -> None:
    """Turn a handler's failure into the right answer, whatever state the request is in."""
    if request.gone or request.finished:
        if not failure.check(LoomError, CancelledError):
            log.failure("request failed after its client left", failure)
        return
    if request.startedWriting:
        # Too late for a status code: the client must see a broken response.
        if not failure.check(LoomError):
            log.failure("request failed while responding", failure)
        request.channel.cut_off()
        return
    if failure.check(LoomError):
        write_error(request, failure.value)
        return
    log.failure("unexpected error handling {method} {uri}", failure,
                method=request.method, uri=request.uri)
    write_json(request, http.INTERNAL_SERVER_ERROR,
               {"error": "Loom hit an unexpected error; it has been logged."})
