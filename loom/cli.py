"""The command-line tools: ``loom-stream`` (bin/stream) and ``loom-spy`` (bin/spy).

Only the ``*_main`` entry functions touch the global reactor.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import select
import signal
import sys
import traceback
from dataclasses import dataclass
from typing import Callable

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer, IReadDescriptor
from twisted.internet.protocol import Protocol
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from loom import __version__
from loom.bootstrap import drain_stdin
from loom.client import (
    Busy,
    CannotConnect,
    Created,
    LoomClient,
    LoomClientError,
    RequestFailed,
    ServerAborted,
    SizeMismatch,
    StreamExists,
    StreamNotFound,
    Unauthorized,
    UntrustedCertificate,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CANNOT_CONNECT, EXIT_ABORTED = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130


def _say(program: str, message: str) -> None:
    sys.stderr.write(f"{program}: {message}\n")
    sys.stderr.flush()


def _trust_root(path: str | None):
    if path is None:
        return None
    from twisted.internet.ssl import Certificate

    with open(path, "rb") as f:
        return Certificate.loadPEM(f.read())


# --- failures, as someone at a terminal reads them -------------------------------------

INITIAL_BACKOFF = 0.5
MAX_BACKOFF = 30.0


def _exit_status(error: LoomClientError) -> int:
    """The exit status for a failure that ends the tool (see STREAM_HELP)."""
    if isinstance(error, CannotConnect) or (
        error.retryable and getattr(error, "status", None) in (502, 503, 504)
    ):
        return EXIT_CANNOT_CONNECT  # nothing answered but (at most) a proxy
    if error.retryable:  # cut off, or another producer holds the stream
        return EXIT_ABORTED
    return EXIT_FAILED


def _explain(error: LoomClientError, args) -> str:
    """The error's line, with what the command line can do about it."""
    if isinstance(error, StreamExists):
        return f"{error} (--force replaces it)"
    if isinstance(error, UntrustedCertificate):
        if args.cacert:
            return f"{error} (checked against --cacert {args.cacert})"
        return f"{error}; --cacert FILE trusts a private CA"
    if isinstance(error, Unauthorized):
        return f"{error} (the token: --token or $LOOM_TOKEN)"
    return str(error)


# --- loom-stream ---------------------------------------------------------------------

STREAM_HELP = """\
Send standard input to a Loom server as a live stream, line by line as it arrives.

examples:
  make 2>&1 | loom-stream http://localhost:3060 build-42
  ./deploy.sh | loom-stream https://loom.example.com --token "$LOOM_TOKEN" -m job=deploy -m env=prod
  tail -f app.log | loom-stream http://localhost:3060 app-log --force --tee

The stream id is optional: without one the server picks it and it is printed
on standard error as soon as the stream exists.

loom-stream never breaks the command feeding it: whatever happens to the
server or the network, it reads standard input to its end (and --tee keeps
copying it), and only its exit status says that the upload failed. A dropped
connection or a restarting server is resumed where the server stopped: it
keeps the last --replay-buffer bytes of input to resend, and tries again with
a growing pause, --retries times per outage (--no-resume: give up at once).
A refusal (the stream exists, a bad token, ...) is reported as soon as the
server answers. Ctrl-C ends the stream cleanly (everything read so far is
stored) and exits with status 130.

exit status (a failed upload also ends with one line saying why):
  0  the server stored the whole stream
  1  the server (or a proxy) refused the stream: it exists, unauthorized, ...
  2  bad command line (or Loom is not installed)
  3  the server could not be reached, or its TLS certificate is not trusted
  4  the stream was started but is incomplete: cut off, and not resumed
  130  interrupted by Ctrl-C (the stream was ended cleanly)
"""


def _stream_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loom-stream",
        description=STREAM_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("server", help="the server's base URL, e.g. http://localhost:3060")
    parser.add_argument("stream_id", nargs="?", help="the stream's id (default: the server picks one)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--force", action="store_true", help="replace the stream if it exists")
    parser.add_argument("--meta", metavar="JSON", help="metadata as a JSON object")
    parser.add_argument("-m", dest="fields", action="append", default=[], metavar="KEY=VALUE",
                        help="one metadata field (repeatable; added to --meta)")
    parser.add_argument("--token", default=os.environ.get("LOOM_TOKEN"),
                        help="bearer token (default: $LOOM_TOKEN); resuming needs the "
                             "write and read scopes")
    parser.add_argument("--cacert", metavar="FILE",
                        help="trust this PEM certificate for https (default: the system's)")
    parser.add_argument("--tee", action="store_true",
                        help="also copy standard input to standard output")
    parser.add_argument("--quiet", "-q", action="store_true",
                        help="print nothing but errors")
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                        help="if the connection drops, reconnect and carry on where the "
                             "server stopped (default; --no-resume gives up at once)")
    parser.add_argument("--replay-buffer", type=_size_arg, default=16 * 1024 * 1024,
                        metavar="SIZE", help="input kept to resend after a drop, and read "
                                             "ahead while the server is away (default 16MiB)")
    parser.add_argument("--retries", type=_count_arg, default=20, metavar="N",
                        help="reconnection attempts per outage before giving up; the count "
                             "and the pause start again after each reconnection (default 20)")
    return parser


def _size_arg(text: str) -> int:
    from loom.config import ConfigError, _size

    try:
        return _size(text, "size", 1, 2**40)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None


def _count_arg(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    return int(text)


def _retries(args) -> str:
    return "1 retry" if args.retries == 1 else f"{args.retries} retries"


def _human_size(size: int) -> str:
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size} bytes"


def _metadata(parser, args) -> dict | None:
    metadata = None
    if args.meta is not None:
        try:
            metadata = json.loads(args.meta)
        except ValueError as e:
            parser.error(f"--meta is not valid JSON: {e}")
        if not isinstance(metadata, dict):
            parser.error("--meta must be a JSON object")
    for field in args.fields:
        key, sep, value = field.partition("=")
        if not sep or not key:
            parser.error(f"-m takes KEY=VALUE, not {field!r}")
        metadata = metadata or {}
        metadata[key] = value
    return metadata


@implementer(IBodyProducer, IPushProducer)
class StdinBody:
    """The request body fed from standard input, chunk by chunk as it is read.

    Standard input is read whether or not a connection takes the data, so
    the command feeding it never waits on the server: at most the last
    ``keep`` bytes read are held, to resend after a dropped connection from
    the offset the server holds (``restart_at``). Only while a connection is
    up but cannot take data as fast as it comes, and ``keep`` bytes wait to
    be sent, does reading pause (flow control, never a dropped byte). With
    no connection, the oldest bytes go first: if some were never sent, the
    stream cannot be completed (``kept_from > position``). ``drain()``
    gives up on sending: the input is still read to its end, and only teed.
    """

    length = UNKNOWN_LENGTH

    def __init__(self, keep: int, tee: Callable[[bytes], None] | None = None):
        self.stdio = None
        self._tee = tee
        self._keep = keep
        self._sent: collections.deque[tuple[int, bytes]] = collections.deque()
        self._unsent: collections.deque[tuple[int, bytes]] = collections.deque()
        self._unsent_bytes = 0
        self.read_total = 0  # bytes read from standard input so far
        self.position = 0  # the offset of the next byte to send
        self._consumer = None
        self._paused = False  # the connection takes no data for now
        self._finished: Deferred | None = None
        self._ended = False
        self._draining = False
        self._reading = True
        self.input_ended: Deferred = Deferred()  # fires at the end of the input

    @property
    def ended(self) -> bool:
        return self._ended

    @property
    def kept_from(self) -> int:
        """The first offset still held (resendable)."""
        for held in (self._sent, self._unsent):
            if held:
                return held[0][0]
        return self.read_total

    def kept(self, start: int, end: int) -> bytes:
        """The input from ``start`` to ``end``, which must still be held."""
        pieces = []
        for offset, data in (*self._sent, *self._unsent):
            if offset + len(data) > start and offset < end:
                pieces.append(data[max(start - offset, 0) : end - offset])
        return b"".join(pieces)

    # the body of a request

    def startProducing(self, consumer) -> Deferred:
        self._consumer = consumer
        self._paused = False
        self._finished = Deferred()
        self._send_pending()
        self._update_reading()
        return self._finished

    def pauseProducing(self) -> None:
        self._paused = True
        self._update_reading()

    def resumeProducing(self) -> None:
        self._paused = False
        self._send_pending()
        self._trim()
        self._update_reading()

    def stopProducing(self) -> None:
        """The connection is gone: keep reading, and hold what is read for the next one."""
        self._consumer = None
        self._paused = False
        self._trim()
        self._update_reading()

    def restart_at(self, offset: int) -> bool:
        """Send from ``offset`` on the next connection; False if those bytes are gone."""
        if self._draining or not self.kept_from <= offset <= self.position:
            return False
        while self._sent and self._sent[-1][0] + len(self._sent[-1][1]) > offset:
            start, data = self._sent.pop()
            if start < offset:
                self._sent.append((start, data[: offset - start]))
                start, data = offset, data[offset - start :]
            self._unsent.appendleft((start, data))
            self._unsent_bytes += len(data)
        self.position = offset
        return True

    # standard input

    def received(self, data: bytes) -> None:
        if self._tee is not None:
            self._tee(data)
        if self._ended:
            return
        self.read_total += len(data)
        if self._draining:
            return
        self._unsent.append((self.read_total - len(data), data))
        self._unsent_bytes += len(data)
        self._send_pending()
        self._trim()
        self._update_reading()

    def end(self) -> None:
        """No more input (end of file, or Ctrl-C): finish the body cleanly."""
        if self._ended:
            return
        self._ended = True
        self._update_reading()
        self._maybe_finish()
        self.input_ended.callback(self.read_total)

    def drain(self) -> None:
        """Send nothing more: read the input to its end all the same, holding none of it."""
        self._draining = True
        self._sent.clear()
        self._unsent.clear()
        self._unsent_bytes = 0
        self._update_reading()

    def _send_pending(self) -> None:
        while self._unsent and self._consumer is not None and not self._paused:
            start, data = self._unsent[0]
            if start != self.position:
                return  # a gap: bytes that were never sent are gone
            self._unsent.popleft()
            self._unsent_bytes -= len(data)
            self._sent.append((start, data))
            self.position = start + len(data)
            self._consumer.write(data)  # may pause us at once
        self._maybe_finish()

    def _trim(self) -> None:
        limit = self.read_total - self._keep
        _drop_before(self._sent, limit)
        if self._consumer is None:
            # Nothing takes data: rather than make the input wait, let its oldest go.
            self._unsent_bytes -= _drop_before(self._unsent, limit)

    def _update_reading(self) -> None:
        backed_up = (self._consumer is not None and self._paused
                     and self._unsent_bytes >= self._keep and not self._draining)
        reading = not self._ended and not backed_up
        if reading != self._reading and self.stdio is not None:
            if reading:
                self.stdio.resumeProducing()
            else:
                self.stdio.pauseProducing()
        self._reading = reading

    def _maybe_finish(self) -> None:
        if (self._ended and self._consumer is not None and self.position == self.read_total
                and self._finished is not None and not self._finished.called):
            self._finished.callback(None)


def _drop_before(held: collections.deque[tuple[int, bytes]], limit: int) -> int:
    """Drop the bytes before offset ``limit`` from ``held``; how many were dropped."""
    dropped = 0
    while held and held[0][0] < limit:
        start, data = held.popleft()
        if start + len(data) > limit:
            held.appendleft((limit, data[limit - start :]))
            dropped += limit - start
            break
        dropped += len(data)
    return dropped


@implementer(IHalfCloseableProtocol)
class _Stdin(Protocol):
    """Standard input, read without blocking the reactor (never FileBodyProducer(sys.stdin))."""

    def __init__(self, body: StdinBody):
        self._body = body

    def dataReceived(self, data: bytes) -> None:
        self._body.received(data)

    def readConnectionLost(self) -> None:
        self._body.end()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason=None) -> None:
        self._body.end()


class _Tee:
    """Copies the input to standard output with plain blocking writes, as ``tee`` does.

    Standard output is often shared with the build's own output (a terminal,
    a CI log); making it non-blocking, as a reactor's writer would, could make
    the build's writes fail with EAGAIN. If standard output goes away, the
    copy stops and the stream goes on.
    """

    def __init__(self, fd: int = 1):
        self._fd = fd
        self.broken = False

    def __call__(self, data: bytes) -> None:
        view = memoryview(data)
        while view and not self.broken:
            try:
                view = view[os.write(self._fd, view):]
            except BlockingIOError:  # someone else made it non-blocking
                select.select([], [self._fd], [])
            except OSError:  # EPIPE and the like: nobody reads it any more
                self.broken = True


@dataclass(frozen=True)
class _Outcome:
    """How an upload ended: the exit status and, unless it succeeded, why (one line)."""

    status: int
    reason: str | None = None
    stream_id: str | None = None


async def _upload(reactor, client: LoomClient, body: StdinBody, args, metadata,
                  say: Callable[[str], None]) -> _Outcome:
    """Send standard input as one stream, resuming it as often as it takes."""
    from twisted.internet.task import deferLater

    stream_id = args.stream_id
    created = False  # the server has answered 201: from now on, only appends
    maybe_created = False  # an unanswered attempt may have created it all the same
    attempts, mismatches, backoff = 0, 0, INITIAL_BACKOFF
    keep = _human_size(args.replay_buffer)
    offset = 0  # where the current attempt starts

    def on_created(info: Created) -> None:
        nonlocal stream_id, created, attempts, mismatches, backoff
        if created:
            say(f"resumed stream {info.stream_id} at byte {offset}")
        else:
            replaced = " (replaced the old stream)" if info.replaced else ""
            say(f"stream {info.stream_id}: {info.url}{replaced}")
        stream_id, created = info.stream_id, True
        # A new outage starts with a new budget and a short pause.
        attempts, mismatches, backoff = 0, 0, INITIAL_BACKOFF

    def failed(status: int, reason: str) -> _Outcome:
        # Once the stream exists, whatever stopped it leaves it incomplete.
        return _Outcome(EXIT_ABORTED if created else status, reason, stream_id)

    def cannot_resume(why: str) -> _Outcome:
        return failed(EXIT_ABORTED, f"cannot resume stream {stream_id}: {why}")

    while True:
        if body.kept_from > (body.position if created else 0):
            if not created:
                return failed(EXIT_CANNOT_CONNECT, (
                    f"the server could not be reached before more than --replay-buffer "
                    f"({keep}) of input had arrived; the start of the input is gone"))
            return cannot_resume(
                f"more than --replay-buffer ({keep}) of input arrived while the server was "
                f"away, so bytes {body.position} to {body.kept_from} can no longer be sent")
        offset = body.position
        try:
            await client.push(body, stream_id, metadata, args.force, on_created,
                              append_at=offset if created else None)
            return _Outcome(EXIT_OK, None, stream_id)
        except SizeMismatch as e:
            # The server holds another number of bytes than were sent: resend from
            # there, at once, if those bytes are still kept and are this input's.
            mismatches += 1
            if mismatches > args.retries:
                return cannot_resume(f"gave up after {_retries(args)}: {e}")
            if e.size > body.position:
                return cannot_resume(f"the server holds {e.size} bytes, more than the "
                                     f"{body.position} sent (someone else appended to it)")
            if e.size < body.kept_from:
                return cannot_resume(f"the server holds {e.size} bytes, but only bytes from "
                                     f"{body.kept_from} on are kept (--replay-buffer {keep})")
            try:
                ours = await _holds_this_input(client, body, stream_id, e.size)
            except LoomClientError as check:
                if not check.retryable:
                    return cannot_resume(f"reading what it holds failed: {_explain(check, args)}")
                failure = check
            else:
                if not ours:
                    return cannot_resume(f"the {e.size} bytes it holds are not this "
                                         f"input's (was it replaced?)")
                body.restart_at(e.size)
                continue
        except StreamExists as e:
            if created or not maybe_created:
                return failed(EXIT_FAILED, _explain(e, args))
            # An attempt that went unanswered may have created it: if the stream holds
            # this input so far, it is ours, and is resumed.
            try:
                size = await _own_stream(client, body, stream_id, metadata)
            except LoomClientError as check:
                if not check.retryable:
                    return failed(EXIT_FAILED, (
                        f"{_explain(e, args)}; an unanswered attempt may have created it, "
                        f"but checking that failed: {_explain(check, args)}"))
                failure = check
            else:
                if size is None:
                    return failed(EXIT_FAILED, _explain(e, args))
                created = True
                body.restart_at(size)
                say(f"stream {stream_id} was created by an unanswered attempt; "
                    f"resuming it at byte {size}")
                continue
        except RequestFailed as e:
            if created and e.from_loom and e.status == 416:
                return cannot_resume(
                    f"the server does not hold the {body.position} bytes sent, and tells how "
                    f"many it holds only to a token that may also read the stream: resuming "
                    f"needs a token with the write and read scopes")
            if created and e.from_loom and e.status == 409:
                # Not resumable: complete (perhaps by this very upload, its answer lost).
                try:
                    info = await client.head(stream_id)
                except LoomClientError:
                    info = None
                if (info is not None and info.state == "complete" and body.ended
                        and info.size == body.read_total):
                    return _Outcome(EXIT_OK, None, stream_id)
                return cannot_resume(e.error)
            if not e.retryable:
                return failed(_exit_status(e), _explain(e, args))
            failure = e
        except StreamNotFound as e:
            if created:
                return cannot_resume("the server no longer has it (deleted?)")
            return failed(EXIT_FAILED, str(e))
        except LoomClientError as e:
            if not e.retryable:
                return failed(_exit_status(e), _explain(e, args))
            failure = e
        if not args.resume:
            return failed(_exit_status(failure), f"{failure} (--no-resume: not retrying)")
        if not created and not isinstance(failure, CannotConnect):
            maybe_created = True
        attempts += 1
        if attempts > args.retries:
            return failed(_exit_status(failure), f"gave up after {_retries(args)}: {failure}")
        wait = backoff
        if isinstance(failure, Busy):
            # Another producer holds the stream for now, or its end is still being
            # recorded: the server says when to ask again.
            wait = max(backoff, failure.retry_after)
        again = "resuming" if created else "retrying"
        say(f"{failure}; {again} in {wait:g}s (retry {attempts} of {args.retries})")
        await deferLater(reactor, wait, lambda: None)
        backoff = min(backoff * 2, MAX_BACKOFF)
        if not created:
            body.restart_at(0)  # create it again, from the first byte


VERIFY_WINDOW = 64 * 1024


async def _holds_this_input(client: LoomClient, body: StdinBody, stream_id: str,
                            size: int) -> bool:
    """Whether the last bytes the stream holds before ``size`` (up to VERIFY_WINDOW of
    them, as far as they are still kept) are this input's: so a resumed stream is never
    someone else's that replaced it."""
    start = max(body.kept_from, size - VERIFY_WINDOW)
    if start >= size:
        return True  # nothing left to compare
    return await client.read(stream_id, start, size) == body.kept(start, size)


async def _own_stream(client: LoomClient, body: StdinBody, stream_id: str,
                      metadata: dict | None) -> int | None:
    """The size of ``stream_id`` if it can be continued, has this metadata and holds
    this input so far (an unanswered attempt created it); else None."""
    info = await client.head(stream_id)
    if (info.state not in ("live", "aborted", "interrupted")
            or info.metadata != (metadata or {})
            or not body.kept_from <= info.size <= body.position):
        return None
    if not await _holds_this_input(client, body, stream_id, info.size):
        return None
    return info.size


async def _stream(reactor, args, metadata, interrupted: list[bool]) -> int:
    from twisted.internet.stdio import StandardIO

    tee = _Tee() if args.tee else None
    body = StdinBody(keep=args.replay_buffer, tee=tee)
    # Standard output is not the reactor's: it stays blocking (see _Tee).
    nowhere = os.open(os.devnull, os.O_WRONLY)
    body.stdio = StandardIO(_Stdin(body), stdout=nowhere, reactor=reactor)

    def say(message: str) -> None:
        if not args.quiet:
            _say("loom-stream", message)

    def on_interrupt():
        if interrupted:
            # A second Ctrl-C: stop waiting.
            _stop(reactor)
            return
        interrupted.append(True)
        say("interrupted: ending the stream")
        body.end()

    signal.signal(signal.SIGINT, lambda *_: reactor.callFromThread(on_interrupt))
    try:
        client = LoomClient(args.server, args.token, reactor, _trust_root(args.cacert))
    except (ValueError, OSError) as e:
        outcome = _Outcome(EXIT_USAGE, str(e))
    else:
        try:
            outcome = await _upload(reactor, client, body, args, metadata, say)
        except Exception:
            # A bug: say so, but still let the command feeding us run to its end.
            sys.stderr.write(traceback.format_exc())
            outcome = _Outcome(EXIT_FAILED, "internal error (a bug in loom-stream: its "
                                            "traceback is above)")
    if outcome.status != EXIT_OK:
        body.drain()
        # A command feeding us must not be cut off; a person at a terminal is not kept.
        if not body.ended and not os.isatty(0):
            _say("loom-stream", f"{outcome.reason}; reading the input to its end, "
                                "without storing it")
            await body.input_ended
        _say("loom-stream", f"upload failed after {body.read_total} bytes of input: "
                            f"{outcome.reason}")
        return outcome.status
    say(f"stream {outcome.stream_id} complete: {body.read_total} bytes")
    return EXIT_INTERRUPTED if interrupted else EXIT_OK


def stream_main(argv: list[str] | None = None) -> int:
    parser = _stream_parser()
    try:
        args = parser.parse_args(argv)
        metadata = _metadata(parser, args)
    except SystemExit as e:
        if e.code:  # a bad command line: still, the command feeding us runs to its end
            drain_stdin(tee="--tee" in (sys.argv[1:] if argv is None else argv))
        raise
    for fd, mode in ((0, os.O_RDONLY), (1, os.O_WRONLY)):
        try:
            os.fstat(fd)
        except OSError:  # closed (<&-, >&-): before the reactor's own files take the number
            os.open(os.devnull, mode)
    from twisted.internet import fdesc, reactor

    try:
        return _run(reactor, lambda: _stream(reactor, args, metadata, []))
    finally:
        # The reactor made standard input non-blocking; a shared terminal wants it back.
        fdesc.setBlocking(0)


# --- loom-spy ------------------------------------------------------------------------

SPY_HELP = """\
Watch every live stream on a Loom server, one line at a time, each stream in its own colour.

examples:
  loom-spy http://localhost:3060
  loom-spy https://loom.example.com --token "$LOOM_TOKEN" | grep '^build-42 '
  loom-spy http://localhost:3060 | grep -m1 '^END build-42 '    # wait for build-42 to end

When the server goes away, loom-spy says so and reconnects with a growing pause
(up to 30 s); a server that refuses it (a bad token, an untrusted certificate)
ends it with one line and a non-zero status. Colour is on only when standard
output is a terminal (--color forces it, --no-color or NO_COLOR turns it off).
Ctrl-C quits, and so does closing its output (| head): quietly, with status 0.
"""


def _spy_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loom-spy", description=SPY_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("server", help="the server's base URL, e.g. http://localhost:3060")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--token", default=os.environ.get("LOOM_TOKEN"),
                        help="bearer token (default: $LOOM_TOKEN)")
    colour = parser.add_mutually_exclusive_group()
    colour.add_argument("--color", action="store_true",
                        help="colours even when standard output is not a terminal")
    colour.add_argument("--no-color", action="store_true", help="plain text, no colours")
    parser.add_argument("--cacert", metavar="FILE",
                        help="trust this PEM certificate for https (default: the system's)")
    return parser


def _spy_colour(args, output) -> bool:
    if args.color or args.no_color:
        return args.color
    return not os.environ.get("NO_COLOR") and output.isatty()


async def _spy(reactor, args, out, quitting: list[bool], color: bool = False) -> int:
    from twisted.internet.task import deferLater

    try:
        client = LoomClient(args.server, args.token, reactor, _trust_root(args.cacert))
    except (ValueError, OSError) as e:
        _say("loom-spy", str(e))
        return EXIT_USAGE
    backoff = INITIAL_BACKOFF
    announced = False

    def connected():
        nonlocal backoff, announced
        backoff = INITIAL_BACKOFF
        _say("loom-spy", f"connected to {client.base}" if not announced else "reconnected")
        announced = True

    while True:
        try:
            await client.spy(out, color=color, on_connected=connected)
            reason = "the server ended the connection"
        except ServerAborted:
            reason = "lost the connection to the server"
        except LoomClientError as e:
            if not e.retryable:
                _say("loom-spy", _explain(e, args))
                return _exit_status(e)
            reason = str(e)
        if quitting:
            return EXIT_OK
        _say("loom-spy", f"{reason}; reconnecting in {backoff:g}s")
        await deferLater(reactor, backoff, lambda: None)
        backoff = min(backoff * 2, MAX_BACKOFF)


@implementer(IReadDescriptor)
class _ReaderGone:
    """Says when nobody reads the pipe on standard output any more (``| head -1`` has
    its line), without waiting for the next write to fail.

    The write end of a pipe never becomes readable; the reactor reports it
    only once the read end is closed, as Twisted's own process pipes do.
    """

    def __init__(self, fd: int, on_gone: Callable[[], None]):
        self._fd = fd
        self._on_gone = on_gone

    @classmethod
    def watch(cls, reactor, fd: int, on_gone: Callable[[], None]) -> None:
        """Watch ``fd`` if it is the write-only end of a pipe (nothing else can tell)."""
        import stat

        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return
        try:
            os.read(fd, 0)
            return  # readable: a two-way descriptor, whose readiness means data
        except OSError:
            pass
        reactor.addReader(cls(fd, on_gone))

    def fileno(self) -> int:
        return self._fd

    def doRead(self):
        from twisted.internet.main import CONNECTION_LOST

        return CONNECTION_LOST

    def connectionLost(self, reason) -> None:
        self._on_gone()

    def logPrefix(self) -> str:
        return "stdout"


def spy_main(argv: list[str] | None = None) -> int:
    args = _spy_parser().parse_args(argv)
    import colorama

    colorama.just_fix_windows_console()
    from twisted.internet import reactor

    quitting: list[bool] = []

    def quit_(*_):
        quitting.append(True)
        reactor.callFromThread(_stop, reactor)

    def output_gone() -> None:
        # Whoever read our output has had enough: that is an ordinary end, not an error.
        # Nothing left in Python's buffer may fail again at exit, so send it nowhere.
        if not quitting:
            quitting.append(True)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            _stop(reactor)

    def out(data: bytes) -> None:
        if quitting:
            return
        try:
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        except BrokenPipeError:
            output_gone()

    signal.signal(signal.SIGINT, quit_)
    signal.signal(signal.SIGTERM, quit_)
    _ReaderGone.watch(reactor, sys.stdout.fileno(), output_gone)
    color = _spy_colour(args, sys.stdout)
    return _run(reactor, lambda: _spy(reactor, args, out, quitting, color),
                interrupted_code=EXIT_OK)


# --- running ---------------------------------------------------------------------------


def _stop(reactor) -> None:
    """Stop the reactor unless it is already stopping."""
    from twisted.internet.error import ReactorNotRunning

    try:
        reactor.stop()
    except ReactorNotRunning:
        pass


def _run(reactor, main, interrupted_code: int = EXIT_INTERRUPTED) -> int:
    """Run ``main()`` on the reactor; its result is the exit status."""
    outcome: list[int] = []

    def start():
        d = ensureDeferred(main())

        def done(result):
            outcome.append(result)
            _stop(reactor)

        def crashed(failure):
            sys.stderr.write(f"{failure.getTraceback()}\n")
            outcome.append(EXIT_FAILED)
            _stop(reactor)

        d.addCallbacks(done, crashed)

    reactor.callWhenRunning(start)
    # Our own SIGINT handlers are installed by the tools; Twisted's would stop at once.
    reactor.run(installSignalHandlers=False)
    return outcome[0] if outcome else interrupted_code
