"""Where blocking work runs: a catalog thread, an I/O pool; inline under test fakes."""

from __future__ import annotations

from typing import Any, Callable, Protocol

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool


log = Logger()


# --- where blocking work runs ---------------------------------------------


class Runners(Protocol):
    def catalog(self, f: Callable, *args: Any) -> Deferred: ...

    def io(self, f: Callable, *args: Any) -> Deferred: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


class ThreadRunners:
    """Catalog writes in one dedicated thread (one SQLite writer); file syncs in a pool."""

    def __init__(self, reactor, io_threads: int = 4):
        self._reactor = reactor
        self._catalog = ThreadPool(1, 1, name="loom-catalog")
        self._io = ThreadPool(1, io_threads, name="loom-io")

    def start(self) -> None:
        self._catalog.start()
        self._io.start()

    def stop(self) -> None:
        self._catalog.stop()
        self._io.stop()

    def catalog(self, f, *args):
        from twisted.internet.threads import deferToThreadPool

        return deferToThreadPool(self._reactor, self._catalog, f, *args)

    def io(self, f, *args):
        from twisted.internet.threads import deferToThreadPool

        return deferToThreadPool(self._reactor, self._io, f, *args)


class InlineRunners:
    """Runs blocking work at once on the calling thread: for tests on fakes."""

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def catalog(self, f, *args):
        try:
            return succeed(f(*args))
        except BaseException:
            return fail()

    io = catalog


