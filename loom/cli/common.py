"""What loom-stream and loom-spy share: exit statuses, messages for a person at a
terminal, and running a coroutine on the reactor."""

from __future__ import annotations

import sys

from twisted.internet.defer import ensureDeferred

from loom.client import (
    CannotConnect,
    LoomClientError,
    StreamExists,
    Unauthorized,
    UntrustedCertificate,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CANNOT_CONNECT, EXIT_ABORTED = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130


def warn(program: str, message: str) -> None:
    sys.stderr.write(f"{program}: {message}\n")
    sys.stderr.flush()


def trust_root(path: str | None):
    if path is None:
        return None
    from twisted.internet.ssl import Certificate

    with open(path, "rb") as f:
        return Certificate.loadPEM(f.read())


# --- failures, as someone at a terminal reads them -------------------------------------

INITIAL_BACKOFF = 0.5
MAX_BACKOFF = 30.0


def exit_status(error: LoomClientError) -> int:
    """The exit status for a failure that ends the tool (see STREAM_HELP in loom.cli.stream)."""
    if isinstance(error, CannotConnect) or (
        error.retryable and getattr(error, "status", None) in (502, 503, 504)
    ):
        return EXIT_CANNOT_CONNECT  # nothing answered but (at most) a proxy
    if error.retryable:  # cut off, or another producer holds the stream
        return EXIT_ABORTED
    return EXIT_FAILED


def explain(error: LoomClientError, args) -> str:
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


def stop_reactor(reactor) -> None:
    """Stop the reactor unless it is already stopping."""
    from twisted.internet.error import ReactorNotRunning

    try:
        reactor.stop()
    except ReactorNotRunning:
        pass


def run_on_reactor(reactor, main, interrupted_code: int = EXIT_INTERRUPTED) -> int:
    """Run ``main()`` on the reactor; its result is the exit status."""
    outcome: list[int] = []

    def start():
        d = ensureDeferred(main())

        def done(result):
            outcome.append(result)
            stop_reactor(reactor)

        def crashed(failure):
            sys.stderr.write(f"{failure.getTraceback()}\n")
            outcome.append(EXIT_FAILED)
            stop_reactor(reactor)

        d.addCallbacks(done, crashed)

    reactor.callWhenRunning(start)
    # Our own SIGINT handlers are installed by the tools; Twisted's would stop at once.
    reactor.run(installSignalHandlers=False)
    return outcome[0] if outcome else interrupted_code
