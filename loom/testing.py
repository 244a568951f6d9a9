"""Fakes for testing Loom, or a program that embeds it, without sockets, threads or time.

* ``MemoryStore`` (from loom.store) with ``InlineRunners``: a stream store in
  dictionaries whose blocking work runs at once; ``ManualRunners`` holds file
  syncs until the test runs them.
* ``make_fake_site``: a real LoomSite (channels, requests, resources) on a
  ``twisted.internet.task.Clock`` and a memory or disk store; ``connect()``
  gives a channel on a ``FakeTCPTransport`` to feed raw bytes into.
* ``FaultyFileSystem``: the real file system, with chosen calls failing
  (ENOSPC, EIO), for a DiskStore's ``fs``.
* ``RecordingSink``: a follower's consumer that records what it is given.
* ``read_all``: a stream's bytes and state, as a reader would see them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from loom.store import DiskStore, InlineRunners, MemoryStore
from loom.store.faults import FileSystem
from loom.web.auth import BearerAuth
from loom.web.resources import LoomApp, Root
from loom.web.site import LoomSite

__all__ = ["FakeSite", "FakeTCPTransport", "FaultyFileSystem", "InlineRunners",
           "ManualRunners", "MemoryStore", "RecordingSink", "make_fake_site", "read_all"]


async def read_all(store, stream_id: str) -> tuple[bytes, str]:
    """The bytes a reader of ``stream_id`` gets now, and the stream's state."""
    handle = await store.open(stream_id)
    try:
        return handle.read(0, handle.size + 10)[: handle.size], handle.state
    finally:
        handle.close()


class ManualRunners(InlineRunners):
    """Catalog work inline, but file syncs wait until the test runs them."""

    def __init__(self):
        self.pending = []

    def io(self, f, *args):
        d = Deferred()
        self.pending.append((d, f, args))
        return d

    def run_next(self):
        d, f, args = self.pending.pop(0)
        d.callback(f(*args))


class FakeTCPTransport(StringTransport):
    """StringTransport that can half-close, as a TCP transport can."""

    write_closed = False

    def loseWriteConnection(self):
        self.write_closed = True


@dataclass
class FakeSite:
    """A real LoomSite on a Clock and a store with inline blocking work."""

    clock: Clock
    store: object
    site: LoomSite
    app: LoomApp

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
                    max_head_bytes=max(64 * 1024, max_metadata_bytes + 8192))
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

