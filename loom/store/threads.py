"""Where blocking work runs: off the reactor thread, in pools named for what they do.

* **catalog**: one thread, the catalog's only writer (SQLite takes one writer at
  a time; one thread keeps its commits in order);
* **read**: a few threads for catalog reads (opening a finished stream, listing,
  counting, health), so a slow query never stalls a follower or a producer;
* **io**: file syncs, file creation and removal.

Under test fakes the same work runs inline, at once (``InlineRunners``).
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool


class Runners(Protocol):
    def catalog(self, f: Callable, *args: Any) -> Deferred: ...

    def read(self, f: Callable, *args: Any) -> Deferred: ...

    def io(self, f: Callable, *args: Any) -> Deferred: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


class ThreadRunners:
    """The three pools, started and stopped with the store."""

    def __init__(self, reactor, io_threads: int = 4, read_threads: int = 2):
        self._reactor = reactor
        self._catalog = ThreadPool(1, 1, name="loom-catalog")
        self._read = ThreadPool(1, read_threads, name="loom-read")
        self._io = ThreadPool(1, io_threads, name="loom-io")

    def start(self) -> None:
        for pool in (self._catalog, self._read, self._io):
            pool.start()

    def stop(self) -> None:
        for pool in (self._catalog, self._read, self._io):
            if not pool.joined:
                pool.stop()

    def catalog(self, f, *args):
        return deferToThreadPool(self._reactor, self._catalog, f, *args)

    def read(self, f, *args):
        return deferToThreadPool(self._reactor, self._read, f, *args)

    def io(self, f, *args):
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

    read = io = catalog
