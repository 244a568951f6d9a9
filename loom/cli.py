"""The command-line tools: ``loom-stream`` (bin/stream) and ``loom-spy`` (bin/spy).

Only the ``*_main`` entry functions touch the global reactor.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import sys
from typing import Callable

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IHalfCloseableProtocol, IReadDescriptor
from twisted.internet.protocol import Protocol
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from loom import __version__
from loom.client import (
    Busy,
    CannotConnect,
    Created,
    LoomClient,
    LoomClientError,
    ServerAborted,
    SizeMismatch,
    StreamExists,
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
  ./long-build.sh | loom-stream http://localhost:3060 build-43 --resume   # survives network drops

The stream id is optional: without one the server picks it and it is printed
on standard error as soon as the stream exists. Ctrl-C ends the stream cleanly
(everything read so far is stored) and exits with status 130.

exit status:
  0  the server stored the whole stream
  1  the server refused it (exists, unauthorized, bad metadata, ...)
  2  bad command line
  3  the server could not be reached
  4  the server aborted the stream before it was complete
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
                        help="bearer token (default: $LOOM_TOKEN)")
    parser.add_argument("--cacert", metavar="FILE",
                        help="trust this PEM certificate for https (default: the system's)")
    parser.add_argument("--tee", action="store_true",
                        help="also copy standard input to standard output")
    parser.add_argument("--quiet", "-q", action="store_true",
                        help="print nothing but errors")
    parser.add_argument("--resume", action="store_true",
                        help="if the connection drops, reconnect and carry on where the "
                             "server stopped (needs the stream id, or the one the server gave)")
    parser.add_argument("--replay-buffer", type=_size_arg, default=16 * 1024 * 1024,
                        metavar="SIZE", help="with --resume: bytes kept to resend "
                                             "(default 16MiB)")
    parser.add_argument("--retries", type=int, default=20, metavar="N",
                        help="with --resume: reconnection attempts before giving up (default 20)")
    return parser


def _size_arg(text: str) -> int:
    from loom.config import ConfigError, _size

    try:
        return _size(text, "size", 1, 2**40)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None


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


@implementer(IBodyProducer)
class StdinBody:
    """The request body fed from standard input, chunk by chunk as it is read.

    It keeps the bytes not yet sent and, for ``--resume``, the last ``keep``
    bytes sent, so that after a dropped connection it can start again from
    the offset the server holds (``restart_at``). While no connection takes
    data, standard input is not read.
    """

    length = UNKNOWN_LENGTH

    def __init__(self, keep: int = 0, tee: Callable[[bytes], None] | None = None):
        self.stdio = None
        self._tee = tee
        self._keep = keep
        self._log: collections.deque[tuple[int, bytes]] = collections.deque()
        self.read_total = 0  # bytes read from standard input so far
        self.position = 0  # the offset of the next byte to send
        self._consumer = None
        self._finished: Deferred | None = None
        self._ended = False

    @property
    def ended(self) -> bool:
        return self._ended

    @property
    def kept_from(self) -> int:
        """The first offset still held (replayable)."""
        return self._log[0][0] if self._log else self.read_total

    def startProducing(self, consumer) -> Deferred:
        self._consumer = consumer
        self._finished = Deferred()
        self._send_pending()
        if self._ended:
            self._finish()
        elif self.stdio is not None:
            self.stdio.resumeProducing()
        return self._finished

    def restart_at(self, offset: int) -> bool:
        """Send from ``offset`` on the next connection; False if those bytes are gone."""
        if not self.kept_from <= offset <= self.position:
            return False
        self.position = offset
        return True

    def received(self, data: bytes) -> None:
        if self._tee is not None:
            self._tee(data)
        self._log.append((self.read_total, data))
        self.read_total += len(data)
        if self._consumer is None:
            self.stdio.pauseProducing()  # nothing takes data now: read no more
        else:
            self._send_pending()
        self._trim()

    def _send_pending(self) -> None:
        for start, data in self._log:
            end = start + len(data)
            if end > self.position and self._consumer is not None:
                self._consumer.write(data[self.position - start :])
                self.position = end

    def _trim(self) -> None:
        keep_from = min(self.position, self.read_total - self._keep)
        while self._log and self._log[0][0] + len(self._log[0][1]) <= keep_from:
            self._log.popleft()

    def end(self) -> None:
        """No more input (end of file, or Ctrl-C): finish the body cleanly."""
        if self._ended:
            return
        self._ended = True
        if self.stdio is not None:
            self.stdio.pauseProducing()
        if self._consumer is not None:
            self._finish()

    def _finish(self) -> None:
        if self._finished is not None and not self._finished.called:
            self._finished.callback(None)

    def pauseProducing(self) -> None:
        if self.stdio is not None and not self._ended:
            self.stdio.pauseProducing()

    def resumeProducing(self) -> None:
        if self.stdio is not None and not self._ended:
            self.stdio.resumeProducing()

    def stopProducing(self) -> None:
        """The connection is gone: hold on to the input, read no more until the next one."""
        self._consumer = None
        if self.stdio is not None:
            self.stdio.pauseProducing()


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


async def _stream(reactor, args, metadata, interrupted: list[bool]) -> int:
    from twisted.internet.stdio import StandardIO
    from twisted.internet.task import deferLater

    body = StdinBody(keep=args.replay_buffer if args.resume else 0)
    stdio = StandardIO(_Stdin(body), reactor=reactor)
    if args.tee:
        body._tee = stdio.write
    body.stdio = stdio

    def on_interrupt():
        if interrupted:
            # A second Ctrl-C: stop waiting.
            _stop(reactor)
            return
        interrupted.append(True)
        if not args.quiet:
            _say("loom-stream", "interrupted: ending the stream")
        body.end()

    signal.signal(signal.SIGINT, lambda *_: reactor.callFromThread(on_interrupt))
    stream_id = args.stream_id
    announced = False

    def created(info: Created) -> None:
        nonlocal stream_id, announced
        stream_id = info.stream_id
        if not args.quiet and not announced:
            replaced = " (replaced the old stream)" if info.replaced else ""
            _say("loom-stream", f"stream {info.stream_id}: {info.url}{replaced}")
        announced = True

    try:
        client = LoomClient(args.server, args.token, reactor, _trust_root(args.cacert))
    except (ValueError, OSError) as e:
        _say("loom-stream", str(e))
        return EXIT_USAGE
    append_at, attempts, backoff = None, 0, 0.5
    while True:
        wait = backoff
        try:
            await client.push(body, stream_id, metadata, args.force, created,
                              append_at=append_at)
            break
        except SizeMismatch as e:
            failure: LoomClientError = e
            size = e.size
        except (CannotConnect, ServerAborted) as e:
            failure, size = e, None
        except Busy as e:
            # Another producer holds the stream for now, or its end is still being
            # recorded: the server says when to ask again.
            failure, size, wait = e, None, max(backoff, e.retry_after)
        except StreamExists as e:
            sys.stderr.write(f"{e}; use --force\n")
            return EXIT_FAILED
        except LoomClientError as e:
            sys.stderr.write(f"{e}\n")
            return EXIT_FAILED
        if not args.resume or attempts >= args.retries:
            sys.stderr.write(f"{failure}\n")
            return EXIT_CANNOT_CONNECT if isinstance(failure, CannotConnect) else EXIT_ABORTED
        attempts += 1
        if size is None:
            if not args.quiet:
                again = "resuming" if announced else "retrying"
                _say("loom-stream", f"{failure}; {again} in {wait:g}s")
            await deferLater(reactor, wait, lambda: None)
            backoff = min(backoff * 2, MAX_BACKOFF)
        if not announced:
            # The stream was never created (the server was down or restarting): create it
            # now, from the first byte. Should the lost attempt have created it after all,
            # the server says it exists, and the tool stops rather than guess.
            if not body.restart_at(0):
                sys.stderr.write("cannot retry: the start of the input is no longer kept\n")
                return EXIT_ABORTED
            continue
        if size is None:
            try:
                info = await client.head(stream_id)
            except (CannotConnect, ServerAborted):
                continue
            except LoomClientError as e:
                sys.stderr.write(f"cannot resume: {e}\n")
                return EXIT_ABORTED
            if info.state == "complete" and info.size == body.read_total and body.ended:
                # The end went through; only its answer was lost.
                break
            size = info.size
        if not body.restart_at(size):
            sys.stderr.write(
                f"cannot resume: the server holds {size} bytes, but only bytes from "
                f"{body.kept_from} to {body.position} can be resent (raise --replay-buffer)\n"
            )
            return EXIT_ABORTED
        append_at = size
        if not args.quiet:
            _say("loom-stream", f"resuming stream {stream_id} at byte {size}")
    if not args.quiet:
        total = body.read_total
        _say("loom-stream", f"stream {stream_id} complete: {total} bytes")
    return EXIT_INTERRUPTED if interrupted else EXIT_OK


def stream_main(argv: list[str] | None = None) -> int:
    parser = _stream_parser()
    args = parser.parse_args(argv)
    metadata = _metadata(parser, args)
    from twisted.internet import reactor

    return _run(reactor, lambda: _stream(reactor, args, metadata, []))


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
