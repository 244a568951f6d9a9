"""Blocking storage work really runs off the reactor thread."""

import threading

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from loom.store import DataFile, DiskStore, ThreadRunners


@pytest_twisted.ensureDeferred
async def test_fsync_and_catalog_commits_run_in_threads(tmp_path, monkeypatch):
    """fsync and catalog writes never run on the reactor thread."""
    seen = []
    real_sync = DataFile.thd_sync

    def recording_sync(self):
        seen.append(("sync", threading.current_thread() is threading.main_thread()))
        real_sync(self)

    monkeypatch.setattr(DataFile, "thd_sync", recording_sync)
    store = DiskStore(str(tmp_path), reactor, ThreadRunners(reactor))
    store.start()
    real_create = store._thd_create

    def recording_create(*args):
        seen.append(("create", threading.current_thread() is threading.main_thread()))
        return real_create(*args)

    store._thd_create = recording_create
    try:
        stream = await store.create("s", "{}")
        stream.append(b"data")
        await Deferred.fromCoroutine(stream.complete())
    finally:
        await Deferred.fromCoroutine(store.stop())
    assert ("create", False) in seen and ("sync", False) in seen
    assert all(not on_main for _, on_main in seen)
