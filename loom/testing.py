"""Fakes for testing Loom, or a program that embeds it, without sockets, threads or time.

* ``MemoryStore`` (from loom.store) with ``InlineRunners``: a stream store in
  dictionaries whose blocking work runs at once; ``ManualRunners`` holds the
  kinds of work it is told to (file work by default) until the test runs them;
  ``MemoryStore(commits="manual")`` holds the log's confirmations until
  ``store.log.commit()`` (or ``refuse(error)``); ``NextTurnRunners`` answers
  everything on a later turn of the reactor, as a networked backend would.
* ``make_fake_site``: a real LoomSite (channels, requests, resources) on a
  ``twisted.internet.task.Clock`` and a memory or disk store; ``connect()``
  gives a channel on a ``FakeTCPTransport`` to feed raw bytes into.
* ``FaultyFileSystem``: the real file system, with chosen calls failing
  (ENOSPC, EIO), for a DiskStore's ``fs``.
* ``RecordingSink``: a follower's consumer that records what it is given.
* ``read_all``: a stream's bytes and state, as a reader would see them;
  ``append``: append to a live stream and wait until the log committed it.
* ``crash``: let a store's storage go as a killed process would, nothing recorded;
  ``CrashAt``: crash points that kill the process itself at a chosen step (for
  a server started by a test, see tests/helpers.py ``crashing_twistd``).
"""

from __future__ import annotations

import os
import signal
import weakref
from dataclasses import dataclass
from typing import ClassVar

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport

from loom.store import DiskStore, InlineRunners, MemoryStore
from loom.store.faults import CRASH_POINTS, CrashPoints, FileSystem
from loom.web.auth import BearerAuth
from loom.web.resources import LoomApp, Root
from loom.web.site import LoomSite

__all__ = ["CrashAt", "FakeSite", "FakeTCPTransport", "FaultyFileSystem", "InlineRunners",
           "ManualRunners", "MemoryStore", "NextTurnRunners", "RecordingSink", "append", "crash",
           "make_fake_site", "read_all"]


async def read_all(store, stream_id: str) -> tuple[bytes, str]:
    """The bytes a reader of ``stream_id`` gets now, and the stream's state."""
    handle = await store.open(stream_id)
    try:
        return handle.read(0, handle.size + 10)[: handle.size], handle.state
    finally:
        handle.close()


async def append(stream, data: bytes) -> None:
    """Append ``data`` to a LiveStream and wait until its log has committed it (as the
    producer's request does); raises what ``append`` raises."""
    pending = stream.append(data)
    if pending is not None:
        await pending


def crash(store) -> None:
    """As after ``kill -9``: the store's catalog and (for a DiskStore) its lock on the data
    directory go; nothing is recorded, no stream is ended. Start a new store on the same
    storage to see what start-up makes of it."""
    store.stopped = True
    store.housekeeping.stop_loops()
    store.runners.stop()
    for stream in store.signal.live_streams():
        stream.file.release()  # as the process's end closes its files
    store.catalog.close()


class CrashAt(CrashPoints):
    """Kill this process (SIGKILL, as ``kill -9``) the ``count``-th time ``point`` is reached."""

    def __init__(self, point: str, count: int = 1):
        if point not in CRASH_POINTS:
            raise ValueError(f"unknown crash point {point!r}; known: {', '.join(CRASH_POINTS)}")
        if count < 1:
            raise ValueError(f"a crash point is reached at least once, not {count} times")
        self.point = point
        self.remaining = count

    def reached(self, point: str) -> None:
        if point == self.point:
            self.remaining -= 1
            if self.remaining == 0:
                os.kill(os.getpid(), signal.SIGKILL)


class ManualRunners(InlineRunners):
    """Blocking work of the kinds in ``hold`` (``"catalog"``, ``"read"``, ``"io"``; file
    work by default) waits in one queue, in order, until the test runs it; the rest runs
    at once."""

    def __init__(self, hold=("io",)):
        unknown = set(hold) - {"catalog", "read", "io"}
        if unknown:
            raise ValueError(f"no such kind of work: {', '.join(sorted(unknown))}")
        self.pending = []
        self._hold = frozenset(hold)

    def catalog(self, f, *args):
        return self._queue("catalog", f, args)

    def read(self, f, *args):
        return self._queue("read", f, args)

    def io(self, f, *args):
        return self._queue("io", f, args)

    def _queue(self, kind: str, f, args) -> Deferred:
        if kind not in self._hold:
            return InlineRunners.catalog(self, f, *args)
        d = Deferred()
        self.pending.append((d, f, args))
        return d

    def run_next(self) -> None:
        """Run the oldest piece of work waiting; its Deferred fires with what it did."""
        d, f, args = self.pending.pop(0)
        try:
            value = f(*args)
        except BaseException as e:
            d.errback(e)
        else:
            d.callback(value)

    def run_all(self) -> None:
        """Run what waits, and what that work queues in turn, until nothing waits."""
        while self.pending:
            self.run_next()


class NextTurnRunners(InlineRunners):
    """Every piece of work runs on the reactor thread, but only on a later turn of the
    reactor: the answers of a backend across a network, for a MemoryStore."""

    def __init__(self, reactor=None):
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor

    def catalog(self, f, *args):
        return deferLater(self._reactor, 0, f, *args)

    read = io = catalog


class FakeTCPTransport(StringTransport):
    """StringTransport that can half-close, as a TCP transport can."""

    write_closed = False

    def loseWriteConnection(self):
        self.write_closed = True


@dataclass(eq=False)
class FakeSite:
    """A real LoomSite on a Clock and a store with inline blocking work."""

    clock: Clock
    store: object
    site: LoomSite
    app: LoomApp

    # Every FakeSite made and not closed yet, for a test suite to close after each test.
    unclosed: ClassVar[weakref.WeakSet] = weakref.WeakSet()

    def __post_init__(self):
        FakeSite.unclosed.add(self)

    def close(self) -> None:
        """Let go of the store's files at once, as ``crash`` does (tests that want a
        clean stop await ``store.stop()`` first)."""
        FakeSite.unclosed.discard(self)
        if not self.store.stopped:
            crash(self.store)

    @classmethod
    def close_all(cls) -> None:
        for fake in list(cls.unclosed):
            fake.close()

    def connect(self, transport=None, host: str | None = None):
        """A channel on a fake transport; ``host``: the client's address, if it has one."""
        address = IPv4Address("TCP", host, 40000) if host else None
        channel = self.site.buildProtocol(address)
        transport = transport or FakeTCPTransport()
        channel.makeConnection(transport)
        return channel, transport


def make_fake_site(
    store=None,
    tokens: tuple[str, ...] = (),
    clock: Clock | None = None,
    data_dir: str | None = None,
    fsync: str = "interval",
    max_metadata_bytes: int = 8192,
    producer_idle_timeout: float | None = 3600.0,
    idle_timeout: float = 60.0,
    header_timeout: float = 30.0,
    max_connections: int = 10000,
    stalled_reader_timeout: float | None = 600.0,
    max_stream_bytes: int | None = None,
    max_connections_per_client: int | None = None,
    direct_send: bool = True,
) -> FakeSite:
    clock = clock or Clock()
    if store is None:
        if data_dir is not None:
            store = DiskStore(data_dir, clock, InlineRunners(), fsync=fsync,
                              max_stream_bytes=max_stream_bytes)
        else:
            store = MemoryStore(clock, fsync=fsync, max_stream_bytes=max_stream_bytes)
    store.start()
    app = LoomApp(
        store,
        clock,
        BearerAuth(tokens),
        max_metadata_bytes=max_metadata_bytes,
        producer_idle_timeout=producer_idle_timeout,
        stalled_reader_timeout=stalled_reader_timeout,
    )
    site = LoomSite(Root(app), clock, idle_timeout=idle_timeout, header_timeout=header_timeout,
                    max_connections=max_connections, counters=app.site_counters,
                    max_connections_per_client=max_connections_per_client,
                    max_head_bytes=max(64 * 1024, max_metadata_bytes + 8192),
                    direct_send=direct_send)
    return FakeSite(clock, store, site, app)


class FaultyFileSystem(FileSystem):
    """The real file system, except that chosen calls fail.

    ``fail(op, at, error)`` makes the ``at``-th call of ``op`` (write, fsync,
    open) and every later one raise ``error`` until ``heal()``. As on a
    filling disk, the first failing write is short (half its data lands, and
    the count says so) and the next call raises.
    """

    def __init__(self):
        self.calls: dict[str, int] = {}
        self.plan: dict[str, tuple[int, int]] = {}
        self.failures = 0
        self._short_write_done = False

    def fail(self, op: str, at: int, error: int) -> None:
        self.plan[op] = (self.calls.get(op, 0) + at, error)

    def heal(self) -> None:
        self.plan.clear()
        self._short_write_done = False

    def _due(self, op: str) -> int | None:
        self.calls[op] = self.calls.get(op, 0) + 1
        planned = self.plan.get(op)
        if planned and self.calls[op] >= planned[0]:
            self.failures += 1
            return planned[1]
        return None

    def open(self, path, flags, mode=0o644):
        error = self._due("open") if flags & os.O_CREAT else None
        if error:
            raise OSError(error, os.strerror(error))
        return super().open(path, flags, mode)

    def write(self, fd, data):
        error = self._due("write")
        if error:
            if not self._short_write_done and len(data) > 1:
                self._short_write_done = True
                return super().write(fd, bytes(data[: len(data) // 2]))
            raise OSError(error, os.strerror(error))
        return super().write(fd, data)

    def writev(self, fd, buffers):
        # As a filling disk would: what fits of the first buffer, then errors.
        return self.write(fd, buffers[0])

    def fsync(self, fd):
        error = self._due("fsync")
        if error:
            raise OSError(error, os.strerror(error))
        super().fsync(fd)

    def syncfs(self, fd):
        error = self._due("fsync")  # counted and failed as the syncs they replace
        if error:
            raise OSError(error, os.strerror(error))
        super().syncfs(fd)


class RecordingSink:
    """Records what a follower does; pauses its producer past ``limit`` bytes if set."""

    def __init__(self, limit=None):
        self.data = bytearray()
        self.writes = 0
        self.ended = self.cut_off = False
        self.producer = None
        self.limit = limit

    def write(self, parts, size):
        assert not (self.ended or self.cut_off)
        data = b"".join(parts)
        assert len(data) == size
        self.data += data
        self.writes += 1
        if self.limit is not None and len(self.data) >= self.limit:
            self.producer.pauseProducing()
        return size

    def registerProducer(self, producer, streaming):
        assert streaming
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None

    def end(self):
        self.ended = True

    def cut(self):
        self.cut_off = True

