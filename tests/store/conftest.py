"""The backends every store contract test runs against, and a way to restart them."""

import pytest
from twisted.internet import reactor
from twisted.internet.task import Clock

from loom.store import DiskStore, InlineRunners, MemoryStore, ThreadRunners
from loom.testing import NextTurnRunners, crash

# memory: answers at once. memory-later: every catalog answer, file step and
# append confirmation arrives on a later turn of the reactor, as from a
# networked backend. disk: SQLite and files, blocking work inline. disk-threads:
# the same with the thread pools the server uses.
BACKENDS = ["memory", "memory-later", "disk", "disk-threads"]


class Stores:
    """Makes stores of one backend over the same storage: each ``make()`` after the first
    is a restart after a crash (the previous store is left as ``kill -9`` leaves it)."""

    def __init__(self, kind, tmp_path, **options):
        self.kind = kind
        self.tmp_path = tmp_path
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.options = options
        self._memory = ({}, {})
        self.made = []

    def make(self, runners=None, **options):
        """A started store; ``runners`` replaces the backend's own (inline backends only)."""
        options = {**self.options, **options}
        if self.made and not self.made[-1].stopped:
            crash(self.made[-1])
        if runners is not None and self.kind not in ("memory", "disk"):
            raise ValueError(f"the {self.kind} backend brings its own runners")
        if self.kind.startswith("disk"):
            runners = runners or (ThreadRunners(reactor) if self.kind == "disk-threads"
                                  else InlineRunners())
            store = DiskStore(str(self.tmp_path / "data"), self.clock, runners, **options)
        else:
            records, files = self._memory
            if self.kind == "memory-later":
                runners, options["commits"] = NextTurnRunners(reactor), "later"
            store = MemoryStore(self.clock, runners, records=records, files=files, **options)
        store.start()
        self.made.append(store)
        return store

    async def tick(self, store, seconds=1.0):
        """Let ``seconds`` pass on the store's clock, and wait for the housekeeping it set
        off (an interval sync, a retry) to finish."""
        self.clock.advance(seconds)
        await store.housekeeping.settled()

    def close(self):
        for store in self.made:
            if not store.stopped:
                crash(store)


@pytest.fixture(params=BACKENDS)
def stores(request, tmp_path):
    made = Stores(request.param, tmp_path)
    yield made
    made.close()


@pytest.fixture(params=["memory", "disk"])
def inline_stores(request, tmp_path):
    """The backends whose runners a test may replace, to hold blocking work in a queue."""
    made = Stores(request.param, tmp_path)
    yield made
    made.close()


@pytest.fixture
def disk_stores(tmp_path):
    made = Stores("disk", tmp_path)
    yield made
    made.close()
