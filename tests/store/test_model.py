"""A Hypothesis state machine drives the disk store against a simple model.

Random create / append / complete / abort / crash-and-reopen / clean restart
/ ENOSPC on write / EIO on sync sequences: after every step, every stream
reads back exactly as the model says.
"""

import errno
import os
import shutil
import tempfile

import pytest_twisted
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock

from loom.errors import StorageFailed, StreamCut, StreamExists
from loom.store import DiskStore, InlineRunners
from loom.testing import FaultyFileSystem, crash, read_all

IDS = st.sampled_from(["a", "b", "c"])


def wait(awaitable):
    """The result of a store call (a Deferred or a coroutine), letting the reactor run until
    it is there: Hypothesis's rules are plain functions."""
    d = awaitable if isinstance(awaitable, Deferred) else ensureDeferred(awaitable)
    return pytest_twisted.blockon(d)


class StoreModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.path = tempfile.mkdtemp(prefix="loom-model-")
        self.clock = Clock()
        self.fs = FaultyFileSystem()
        self.model: dict[str, dict] = {}
        self.live = {}
        self._open()

    def _open(self):
        self.store = DiskStore(self.path, self.clock, InlineRunners(), fs=self.fs)
        self.store.start()

    def teardown(self):
        crash(self.store)
        shutil.rmtree(self.path, ignore_errors=True)

    @rule(stream_id=IDS, force=st.booleans(), disk_full=st.booleans())
    def create(self, stream_id, force, disk_full):
        if disk_full:
            self.fs.fail("open", 1, errno.ENOSPC)
        try:
            stream = wait(self.store.create(stream_id, "{}", force))
        except StreamExists:
            assert stream_id in self.model and not force
            return
        except StorageFailed:
            assert disk_full
            return
        finally:
            self.fs.heal()
        assert not disk_full
        assert force or stream_id not in self.model
        old = self.live.pop(stream_id, None)
        if old is not None:
            assert old.outcome == "replaced"
        self.model[stream_id] = {"data": bytearray(), "state": "live"}
        self.live[stream_id] = stream

    @precondition(lambda self: self.live)
    @rule(data=st.data(), payload=st.binary(max_size=200), disk_full=st.booleans())
    def append(self, data, payload, disk_full):
        stream_id = data.draw(st.sampled_from(sorted(self.live)))
        stream = self.live[stream_id]
        if disk_full:
            self.fs.fail("write", 1, errno.ENOSPC)
        try:
            stream.append(payload)
            assert not disk_full or not payload
            self.model[stream_id]["data"] += payload
        except StorageFailed:
            # A filling disk takes half the chunk, then refuses; the producer is aborted.
            self.model[stream_id]["data"] += payload[: len(payload) // 2] if len(payload) > 1 else b""
            self.fs.heal()
            self._end(stream_id, "abort")
        finally:
            self.fs.heal()

    @precondition(lambda self: self.live)
    @rule(data=st.data(), how=st.sampled_from(["complete", "abort"]), sync_fails=st.booleans())
    def end(self, data, how, sync_fails):
        stream_id = data.draw(st.sampled_from(sorted(self.live)))
        unsynced = self.live[stream_id].size > self.live[stream_id].synced
        if sync_fails:
            self.fs.fail("fsync", 1, errno.EIO)
        try:
            self._end(stream_id, how)
        finally:
            self.fs.heal()
        if sync_fails and unsynced:
            assert self.model[stream_id]["state"] == "aborted"  # a failed sync is never success

    def _end(self, stream_id, how):
        stream = self.live.pop(stream_id)
        try:
            wait(stream.complete() if how == "complete" else stream.abort())
            self.model[stream_id]["state"] = "complete" if how == "complete" else "aborted"
        except (StorageFailed, StreamCut):
            self.model[stream_id]["state"] = "aborted"

    @rule()
    def crash_and_reopen(self):
        crash(self.store)  # kill -9: nothing orderly happens
        self._restarted()

    @rule()
    def clean_restart(self):
        wait(self.store.stop())
        self._restarted()

    def _restarted(self):
        for stream_id in self.live:
            self.model[stream_id]["state"] = "interrupted"
        self.live = {}
        self._open()

    @invariant()
    def every_stream_reads_as_the_model_says(self):
        for stream_id, expected in self.model.items():
            assert wait(read_all(self.store, stream_id)) == (bytes(expected["data"]),
                                                              expected["state"])


StoreModel.TestCase.settings = settings(
    # MODEL_EXAMPLES=1000 for a longer hunt than the suite's.
    max_examples=int(os.environ.get("MODEL_EXAMPLES", "60")), stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestStoreModel = StoreModel.TestCase
