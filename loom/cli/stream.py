"""loom-stream (bin/stream): pipe standard input into a Loom stream in real time,
resuming it across dropped connections, never hurting the command that feeds it."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
from dataclasses import dataclass
from typing import Callable

from loom import __version__
from loom.bootstrap import drain_stdin
from loom.cli.common import (
    EXIT_ABORTED,
    EXIT_CANNOT_CONNECT,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    INITIAL_BACKOFF,
    MAX_BACKOFF,
    exit_status,
    explain,
    run_on_reactor,
    stop_reactor,
    trust_root,
    warn,
)
from loom.cli.stdin import StdinBody, StdinReader, Tee
from loom.client import (
    Busy,
    CannotConnect,
    Created,
    LoomClient,
    LoomClientError,
    RequestFailed,
    SizeMismatch,
    StreamExists,
    StreamNotFound,
)

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
                    return cannot_resume(f"reading what it holds failed: {explain(check, args)}")
                failure = check
            else:
                if not ours:
                    return cannot_resume(f"the {e.size} bytes it holds are not this "
                                         f"input's (was it replaced?)")
                body.restart_at(e.size)
                continue
        except StreamExists as e:
            if created or not maybe_created:
                return failed(EXIT_FAILED, explain(e, args))
            # An attempt that went unanswered may have created it: if the stream holds
            # this input so far, it is ours, and is resumed.
            try:
                size = await _own_stream(client, body, stream_id, metadata)
            except LoomClientError as check:
                if not check.retryable:
                    return failed(EXIT_FAILED, (
                        f"{explain(e, args)}; an unanswered attempt may have created it, "
                        f"but checking that failed: {explain(check, args)}"))
                failure = check
            else:
                if size is None:
                    return failed(EXIT_FAILED, explain(e, args))
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
                return failed(exit_status(e), explain(e, args))
            failure = e
        except StreamNotFound as e:
            if created:
                return cannot_resume("the server no longer has it (deleted?)")
            return failed(EXIT_FAILED, str(e))
        except LoomClientError as e:
            if not e.retryable:
                return failed(exit_status(e), explain(e, args))
            failure = e
        if not args.resume:
            return failed(exit_status(failure), f"{failure} (--no-resume: not retrying)")
        if not created and not isinstance(failure, CannotConnect):
            maybe_created = True
        attempts += 1
        if attempts > args.retries:
            return failed(exit_status(failure), f"gave up after {_retries(args)}: {failure}")
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

    tee = Tee() if args.tee else None
    body = StdinBody(keep=args.replay_buffer, tee=tee)
    # Standard output is not the reactor's: it stays blocking (see Tee).
    nowhere = os.open(os.devnull, os.O_WRONLY)
    body.stdio = StandardIO(StdinReader(body), stdout=nowhere, reactor=reactor)

    def say(message: str) -> None:
        if not args.quiet:
            warn("loom-stream", message)

    def on_interrupt():
        if interrupted:
            # A second Ctrl-C: stop waiting.
            stop_reactor(reactor)
            return
        interrupted.append(True)
        say("interrupted: ending the stream")
        body.end()

    signal.signal(signal.SIGINT, lambda *_: reactor.callFromThread(on_interrupt))
    try:
        client = LoomClient(args.server, args.token, reactor, trust_root(args.cacert))
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
            warn("loom-stream", f"{outcome.reason}; reading the input to its end, "
                                "without storing it")
            await body.input_ended
        warn("loom-stream", f"upload failed after {body.read_total} bytes of input: "
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
        return run_on_reactor(reactor, lambda: _stream(reactor, args, metadata, []))
    finally:
        # The reactor made standard input non-blocking; a shared terminal wants it back.
        fdesc.setBlocking(0)
