"""loom-spy (bin/spy): watch every live stream of a server, reconnecting when it goes
away, quiet when its reader (| head) has had enough."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Callable

from twisted.internet.interfaces import IReadDescriptor
from zope.interface import implementer

from loom import __version__
from loom.cli.common import (
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
from loom.client import LoomClient, LoomClientError, ServerAborted

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
        client = LoomClient(args.server, args.token, reactor, trust_root(args.cacert))
    except (ValueError, OSError) as e:
        warn("loom-spy", str(e))
        return EXIT_USAGE
    backoff = INITIAL_BACKOFF
    announced = False

    def connected():
        nonlocal backoff, announced
        backoff = INITIAL_BACKOFF
        warn("loom-spy", f"connected to {client.base}" if not announced else "reconnected")
        announced = True

    while True:
        try:
            await client.spy(out, color=color, on_connected=connected)
            reason = "the server ended the connection"
        except ServerAborted:
            reason = "lost the connection to the server"
        except LoomClientError as e:
            if not e.retryable:
                warn("loom-spy", explain(e, args))
                return exit_status(e)
            reason = str(e)
        if quitting:
            return EXIT_OK
        warn("loom-spy", f"{reason}; reconnecting in {backoff:g}s")
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
        reactor.callFromThread(stop_reactor, reactor)

    def output_gone() -> None:
        # Whoever read our output has had enough: that is an ordinary end, not an error.
        # Nothing left in Python's buffer may fail again at exit, so send it nowhere.
        if not quitting:
            quitting.append(True)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            stop_reactor(reactor)

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
    return run_on_reactor(reactor, lambda: _spy(reactor, args, out, quitting, color),
                interrupted_code=EXIT_OK)


# --- running ---------------------------------------------------------------------------
