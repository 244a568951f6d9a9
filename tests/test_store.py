"""The store contract: DiskStore and MemoryStore pass the same tests."""

import errno
import json
import os

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from loom.errors import (
    Forbidden,
    OffsetMismatch,
    StorageFailed,
    StreamBusy,
    StreamCut,
    StreamExists,
    StreamNotFound,
    StreamNotResumable,
)
from loom.store import (
    ABORTED,
    COMPLETE,
    ENDING_WAIT,
    INTERRUPTED,
    REPLACED,
    TAKEOVER_QUIET,
    DiskStore,
    InlineRunners,
    IStreamStore,
    MemoryStore,
    stream_id_of_storage,
)
from loom.testing import read_all
from tests.helpers import ManualRunners


class Stores:
    """Makes a store of one kind and can 'restart' it over the same storage."""

    def __init__(self, kind, tmp_path, fsync="interval"):
        self.kind = kind
        self.tmp_path = tmp_path
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.fsync = fsync
        self._memory = ({}, {})
        self._disk = None

    def make(self):
        if self.kind == "disk":
            if self._disk is not None:
                # The previous store's process is gone (as after kill -9): its
                # files and its lock on the directory go with it.
                self._disk._close_storage()
            store = self._disk = DiskStore(str(self.tmp_path / "data"), self.clock,
                                           InlineRunners(), fsync=self.fsync)
        else:
            records, files = self._memory
            store = MemoryStore(self.clock, fsync=self.fsync, records=records, files=files)
        store.start()
        return store


@pytest.fixture(params=["disk", "memory"])
def stores(request, tmp_path):
    return Stores(request.param, tmp_path)


class Listener:
    def __init__(self):
        self.grew = []
        self.ended = []

    def stream_grew(self, stream, start, parts, size):
        chunk = b"".join(parts)
        assert len(chunk) == size
        self.grew.append((start, chunk))

    def stream_ended(self, stream):
        self.ended.append(stream.outcome)


def test_both_stores_provide_the_interface(stores):
    """Each store provides IStreamStore."""
    assert verifyObject(IStreamStore, stores.make())


@pytest_twisted.ensureDeferred
async def test_create_append_complete_read(stores):
    """Appended bytes are readable at once, and after completion with state complete."""
    store = stores.make()
    stream = (await store.create("s1", '{"a":1}'))
    stream.append(b"hello ")
    stream.append(b"world")
    data, state = (await read_all(store, "s1"))
    assert (data, state) == (b"hello world", "live")
    (await stream.complete())
    assert stream.outcome == COMPLETE
    handle = store.open("s1")
    assert (handle.state, handle.size, handle.metadata_json) == ("complete", 11, '{"a":1}')
    assert handle.live is None
    handle.close()
    assert (await read_all(store, "s1")) == (b"hello world", "complete")


def test_unknown_stream_is_not_found(stores):
    """Opening an id that was never created raises StreamNotFound."""
    with pytest.raises(StreamNotFound):
        stores.make().open("nope")


@pytest_twisted.ensureDeferred
async def test_taken_id_is_refused_live_or_finished(stores):
    """A live or finished stream's id cannot be reused without force."""
    store = stores.make()
    stream = (await store.create("s1", "{}"))
    with pytest.raises(StreamExists):
        (await store.create("s1", "{}"))
    (await stream.complete())
    with pytest.raises(StreamExists):
        (await store.create("s1", "{}"))
    assert (await read_all(store, "s1")) == (b"", "complete")


@pytest_twisted.ensureDeferred
async def test_force_replaces_a_live_stream_and_cuts_it(stores):
    """Force: the old live stream is cut (producer and followers), its data gone."""
    store = stores.make()
    old = (await store.create("s1", '{"v":1}'))
    old.append(b"old data")
    cuts, listener = [], Listener()
    old.on_cut = cuts.append
    old.subscribe(listener)
    new = (await store.create("s1", '{"v":2}', force=True))
    assert new.replaced
    assert old.outcome == REPLACED and cuts == [REPLACED] and listener.ended == [REPLACED]
    with pytest.raises(StreamCut):
        old.append(b"more")
    new.append(b"new")
    (await new.complete())
    handle = store.open("s1")
    assert handle.metadata_json == '{"v":2}'
    handle.close()
    assert (await read_all(store, "s1")) == (b"new", "complete")
    # The old stream finishing late must not overwrite the new record.
    with pytest.raises(StreamCut):
        (await old.complete())
    assert (await read_all(store, "s1")) == (b"new", "complete")


@pytest_twisted.ensureDeferred
async def test_force_replaces_a_finished_stream(stores):
    """Force over a complete stream replaces it; without an old stream it just creates."""
    store = stores.make()
    first = (await store.create("s1", "{}"))
    first.append(b"first")
    (await first.complete())
    second = (await store.create("s1", "{}", force=True))
    assert second.replaced
    (await second.complete())
    assert (await read_all(store, "s1")) == (b"", "complete")
    fresh = (await store.create("s2", "{}", force=True))
    assert not fresh.replaced


@pytest_twisted.ensureDeferred
async def test_generated_ids_are_distinct(stores):
    """Streams created without an id get distinct generated ids."""
    store = stores.make()
    ids = {(await store.create(None, "{}")).id for _ in range(40)}
    assert len(ids) == 40


@pytest_twisted.ensureDeferred
async def test_abort_keeps_what_arrived(stores):
    """A producer that vanished leaves an aborted stream with every byte it sent."""
    store = stores.make()
    stream = (await store.create("s1", "{}"))
    stream.append(b"partial")
    (await stream.abort())
    assert (await read_all(store, "s1")) == (b"partial", "aborted")


@pytest_twisted.ensureDeferred
async def test_listeners_hear_growth_and_the_end(stores):
    """Subscribers get each chunk with its offset, then the outcome."""
    store = stores.make()
    stream = (await store.create("s1", "{}"))
    listener = Listener()
    stream.subscribe(listener)
    stream.append(b"ab")
    stream.append(b"cde")
    (await stream.complete())
    assert listener.grew == [(0, b"ab"), (2, b"cde")]
    assert listener.ended == [COMPLETE]


@pytest_twisted.ensureDeferred
async def test_observers_hear_about_new_streams(stores):
    """observe() reports every stream created afterwards until unobserve()."""
    store = stores.make()
    seen = []
    store.observe(lambda stream: seen.append(stream.id))
    (await store.create("a", "{}"))
    store.unobserve(seen.append)  # not the registered callable: no effect
    assert seen == ["a"]
    assert store.observer_count == 1


@pytest_twisted.ensureDeferred
async def test_restart_turns_live_streams_into_interrupted(stores):
    """After a crash, a stream that was live is interrupted with the bytes that were stored."""
    store = stores.make()
    stream = (await store.create("s1", '{"k":"v"}'))
    stream.append(b"before the crash")
    done = (await store.create("s2", "{}"))
    done.append(b"done")
    (await done.complete())
    restarted = stores.make()  # no stop(): as after kill -9
    assert (await read_all(restarted, "s1")) == (b"before the crash", "interrupted")
    assert (await read_all(restarted, "s2")) == (b"done", "complete")
    handle = restarted.open("s1")
    assert handle.metadata_json == '{"k":"v"}'
    handle.close()


@pytest_twisted.ensureDeferred
async def test_stop_interrupts_live_streams_and_cuts_producers(stores):
    """stop(): live streams are synced and recorded interrupted; producers are cut."""
    store = stores.make()
    stream = (await store.create("s1", "{}"))
    stream.append(b"data")
    cuts, listener = [], Listener()
    stream.on_cut = cuts.append
    stream.subscribe(listener)
    (await store.stop())
    assert cuts == [INTERRUPTED]
    assert listener.ended == [INTERRUPTED]
    assert stream.synced == 4
    assert (await read_all(stores.make(), "s1")) == (b"data", "interrupted")


@pytest_twisted.ensureDeferred
async def test_interval_policy_syncs_live_streams_every_interval(stores):
    """With fsync interval, unsynced bytes are synced when the interval passes."""
    store = stores.make()
    stream = (await store.create("s1", "{}"))
    stream.append(b"x" * 100)
    assert stream.synced == 0
    stores.clock.advance(1.0)
    assert stream.synced == 100


@pytest_twisted.ensureDeferred
async def test_appending_after_the_end_is_refused(stores):
    """A completed stream accepts no more data."""
    store = stores.make()
    stream = (await store.create("s1", "{}"))
    (await stream.complete())
    with pytest.raises(StreamCut):
        stream.append(b"late")
    with pytest.raises(StreamCut):
        (await stream.complete())


@pytest_twisted.ensureDeferred
async def test_complete_waits_for_the_sync(stores):
    """complete() does not record the stream complete before its data is synced."""
    from loom.store.streams import _StoreBase

    store = stores.make()
    runners = ManualRunners()
    store._runners = runners
    stream = (await store.create("s1", "{}"))
    stream.append(b"abc")
    finished = Deferred.fromCoroutine(stream.complete())
    assert not finished.called and stream.outcome is None
    runners.run_next()
    assert finished.called and stream.outcome == COMPLETE
    assert isinstance(store, _StoreBase)


@pytest_twisted.ensureDeferred
async def test_failed_sync_is_never_success(stores):
    """If the final sync fails, complete() raises and the stream is recorded aborted."""
    store = stores.make()
    stream = (await store.create("s1", "{}"))
    stream.append(b"abc")

    def broken_sync():
        raise OSError(errno.EIO, "Input/output error")

    stream.file.thd_sync = broken_sync
    with pytest.raises(StorageFailed):
        (await stream.complete())
    assert stream.outcome == ABORTED
    assert (await read_all(store, "s1")) == (b"abc", "aborted")


@pytest_twisted.ensureDeferred
async def test_storage_names_are_not_raw_ids_and_decode(tmp_path):
    """Data files are named by an encoding of the id, never the id itself."""
    clock = Clock()
    store = DiskStore(str(tmp_path), clock, InlineRunners())
    store.start()
    stream = (await store.create("a.b", "{}"))
    storage = stream.record.storage
    assert "a.b" not in storage
    assert stream_id_of_storage(storage) == "a.b"
    path = store.data_path(storage)
    assert os.path.exists(path.path) and path.path.startswith(str(tmp_path))


@pytest_twisted.ensureDeferred
async def test_disk_replace_removes_the_old_file(tmp_path):
    """A forced replace leaves no file of the old stream on disk."""
    clock = Clock()
    store = DiskStore(str(tmp_path), clock, InlineRunners())
    store.start()
    old = (await store.create("s1", "{}"))
    old.append(b"old")
    old_path = store.data_path(old.record.storage)
    assert os.path.exists(old_path.path)
    (await store.create("s1", "{}", force=True))
    assert not os.path.exists(old_path.path)
    files = [f for _, _, names in os.walk(tmp_path / "streams") for f in names]
    assert len(files) == 1


@pytest_twisted.ensureDeferred
async def test_disk_write_failure_keeps_exactly_the_bytes_written(tmp_path, monkeypatch):
    """ENOSPC part-way through a chunk: the stream's size is what reached the file."""
    clock = Clock()
    store = DiskStore(str(tmp_path), clock, InlineRunners())
    store.start()
    stream = (await store.create("s1", "{}"))
    stream.append(b"12345")
    real_write = os.write
    calls = []

    def short_then_full(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[:3]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("loom.store.faults.os.write", short_then_full)
    with pytest.raises(StorageFailed, match="No space left"):
        stream.append(b"abcdef")
    monkeypatch.setattr("loom.store.faults.os.write", real_write)
    assert stream.size == 8
    (await stream.abort())
    assert (await read_all(store, "s1")) == (b"12345abc", "aborted")


@pytest_twisted.ensureDeferred
async def test_fsync_never_does_not_sync(tmp_path):
    """With fsync: never, completing a stream issues no sync at all."""
    stores = Stores("disk", tmp_path, fsync="never")
    store = stores.make()
    stream = (await store.create("s1", "{}"))
    stream.append(b"abc")
    stream.file.thd_sync = lambda: pytest.fail("synced despite fsync: never")
    stores.clock.advance(10)
    (await stream.complete())
    assert (await read_all(store, "s1")) == (b"abc", "complete")


@pytest_twisted.ensureDeferred
async def test_generated_ids_differ_across_restarts(tmp_path):
    """A restarted store at the same instant still generates new, distinct ids."""
    stores = Stores("disk", tmp_path)
    first = {(await stores.make().create(None, "{}")).id for _ in range(5)}
    second = {(await stores.make().create(None, "{}")).id for _ in range(5)}
    assert len(first | second) == 10


@pytest_twisted.ensureDeferred
async def test_a_failed_background_sync_poisons_the_stream(stores):
    """After a failed interval sync the producer is told at once and nothing is trusted later."""
    store = stores.make()
    stream = (await store.create("s1", "{}"))
    cuts = []
    stream.on_cut = cuts.append
    stream.append(b"abc")
    calls = []

    def fail_once():
        calls.append(1)
        if len(calls) == 1:
            raise OSError(errno.EIO, "Input/output error")

    stream.file.thd_sync = fail_once
    stores.clock.advance(1.0)
    assert cuts == [ABORTED]
    # A later sync would "succeed", but the data may be gone: still a failure.
    with pytest.raises(StorageFailed):
        (await stream.complete())
    assert len(calls) == 1
    assert (await read_all(store, "s1"))[1] == "aborted"


@pytest_twisted.ensureDeferred
async def test_an_end_the_catalog_refuses_is_served_and_retried(stores):
    """Disk full for SQLite too: the stream reads as aborted with its bytes, and the end is
    written to the catalog once it accepts writes again."""
    from loom.store.catalog_db import CatalogError

    store = stores.make()
    stream = (await store.create("s1", "{}"))
    stream.append(b"kept bytes")
    real = store._thd_record_end
    refusing = [True]

    def record_end(*args):
        if refusing[0]:
            raise CatalogError("catalog finish failed: database or disk is full")
        return real(*args)

    store._thd_record_end = record_end
    with pytest.raises(StorageFailed):
        (await stream.complete())  # never a success that was not written down
    assert (await read_all(store, "s1")) == (b"kept bytes", "aborted")
    with pytest.raises(StreamExists):
        (await store.create("s1", "{}"))
    stores.clock.advance(1.0)
    assert store._unrecorded  # still refused: kept, retried
    refusing[0] = False
    stores.clock.advance(1.0)
    assert not store._unrecorded
    assert (await read_all(stores.make(), "s1")) == (b"kept bytes", "aborted")


# --- issue 6: delete, resume, retention, listing -------------------------------------


@pytest_twisted.ensureDeferred
async def test_delete_cuts_a_live_stream_and_removes_everything(stores):
    """DELETE: the producer and followers are cut, the row and the data are gone."""
    store = stores.make()
    stream = (await store.create("s1", "{}"))
    stream.append(b"data")
    cuts, listener = [], Listener()
    stream.on_cut = cuts.append
    stream.subscribe(listener)
    (await store.delete("s1"))
    assert cuts == ["deleted"] and listener.ended == ["deleted"]
    with pytest.raises(StreamNotFound):
        store.open("s1")
    with pytest.raises(StreamNotFound):
        (await store.delete("s1"))
    assert store.stream_count() == 0
    (await store.create("s1", "{}"))  # the id is free again


@pytest_twisted.ensureDeferred
async def test_resume_continues_an_aborted_stream_at_its_size(stores):
    """append at the right offset: the stream is live again and grows from there."""
    store = stores.make()
    stream = (await store.create("s1", "{}"))
    stream.append(b"first ")
    (await stream.abort())
    with pytest.raises(OffsetMismatch) as mismatch:
        (await store.resume("s1", 3))
    assert mismatch.value.size == 6 and mismatch.value.headers == {"X-Stream-Size": "6"}
    resumed = (await store.resume("s1", 6))
    assert resumed.size == 6
    resumed.append(b"second")
    (await resumed.complete())
    assert (await read_all(store, "s1")) == (b"first second", "complete")


@pytest_twisted.ensureDeferred
async def test_resume_after_a_restart_continues_an_interrupted_stream(stores):
    """A stream interrupted by a crash can be appended to after the restart."""
    store = stores.make()
    stream = (await store.create("s1", "{}"))
    stream.append(b"before ")
    restarted = stores.make()
    resumed = (await restarted.resume("s1", 7))
    resumed.append(b"after")
    (await resumed.complete())
    assert (await read_all(restarted, "s1")) == (b"before after", "complete")


@pytest_twisted.ensureDeferred
async def test_only_aborted_or_interrupted_streams_resume(stores):
    """A complete stream, or an unknown id, cannot be appended to."""
    store = stores.make()
    stream = (await store.create("s1", "{}"))
    (await stream.complete())
    with pytest.raises(StreamNotResumable):
        (await store.resume("s1", 0))
    with pytest.raises(StreamNotFound):
        (await store.resume("ghost", 0))


@pytest_twisted.ensureDeferred
async def test_resume_takes_over_a_live_stream_at_its_exact_size(stores):
    """A producer that knows the exact size takes over a stream whose producer went silent."""
    store = stores.make()
    cuts, new_cuts = [], []
    stream = (await store.create("s1", "{}", on_cut=cuts.append))
    stream.append(b"abc")
    with pytest.raises(OffsetMismatch):
        (await store.resume("s1", 1))
    stores.clock.advance(TAKEOVER_QUIET)
    assert (await store.resume("s1", 3, on_cut=new_cuts.append)) is stream
    assert cuts == ["taken over"] and stream.outcome is None
    stream.append(b"def")
    assert (await read_all(store, "s1")) == (b"abcdef", "live")
    (await store.delete("s1"))
    assert new_cuts == ["deleted"]  # the stream now answers to its new producer


@pytest_twisted.ensureDeferred
async def test_two_producers_racing_to_append_never_both_write(stores):
    """Two appends at the same offset, the second while the first is being granted:
    exactly one gets the stream, the other a StreamBusy; nothing interleaves."""
    store = stores.make()
    stream = (await store.create("s1", "{}"))
    stream.append(b"base ")
    (await stream.abort())
    runners = ManualCatalog()
    store._runners = runners  # catalog work now waits for the test
    first_cuts, second_cuts = [], []
    first = Deferred.fromCoroutine(store.resume("s1", 5, on_cut=first_cuts.append))
    second = Deferred.fromCoroutine(store.resume("s1", 5, on_cut=second_cuts.append))
    runners.run_next()  # the first reopens the file: it is granted the stream ...
    granted = (await first)
    with pytest.raises(StreamBusy) as refused:  # ... and the second, queued behind it, is not
        (await second)
    assert refused.value.status == 409 and refused.value.headers["Retry-After"] == "1"
    granted.append(b"first")
    assert first_cuts == second_cuts == []
    assert (await read_all(store, "s1")) == (b"base first", "live")


@pytest_twisted.ensureDeferred
async def test_a_take_over_needs_the_token_that_writes_the_stream(stores):
    """Only the token a live stream's producer used may take it over."""
    store = stores.make()
    stream = (await store.create("s1", "{}", owner=b"token-a"))
    stream.append(b"abc")
    stores.clock.advance(TAKEOVER_QUIET)
    with pytest.raises(Forbidden):
        (await store.resume("s1", 3, owner=b"token-b"))
    with pytest.raises(Forbidden):
        (await store.resume("s1", 3, owner=None))
    assert (await store.resume("s1", 3, owner=b"token-a")) is stream


@pytest_twisted.ensureDeferred
async def test_an_append_waits_for_a_stream_that_is_still_ending(stores):
    """An append arriving while the dropped producer's stream is being ended waits for the
    end, then resumes it; one that waits too long is told to try again."""
    store = stores.make()
    store._runners = runners = ManualCatalog()
    stream = (await _run(runners, store.create("s1", "{}")))
    stream.append(b"abc")
    ending = Deferred.fromCoroutine(stream.abort())  # its sync and record wait in the queue
    resumed = Deferred.fromCoroutine(store.resume("s1", 3))
    assert not resumed.called
    runners.run_all()
    assert (await ending) is None
    again = (await resumed)
    assert again is not stream and again.size == 3
    again.append(b"def")
    # A stream whose end does not come within ENDING_WAIT: StreamBusy, then a retry works.
    late = Deferred.fromCoroutine(again.abort())
    refused = Deferred.fromCoroutine(store.resume("s1", 6))
    stores.clock.advance(ENDING_WAIT)
    with pytest.raises(StreamBusy):
        (await refused)
    runners.run_all()
    (await late)
    assert (await _run(runners, store.resume("s1", 6))).size == 6


@pytest_twisted.ensureDeferred
async def test_discard_removes_only_an_empty_stream(stores):
    """discard() removes a stream that holds no byte, and nothing else."""
    store = stores.make()
    empty = (await store.create("e", "{}"))
    full = (await store.create("f", "{}"))
    full.append(b"x")
    assert (await store.discard(empty)) is True
    assert (await store.discard(full)) is False
    with pytest.raises(StreamNotFound):
        store.open("e")
    assert empty.outcome == "deleted"
    assert (await read_all(store, "f")) == (b"x", "live")
    assert (await store.create("e", "{}")).size == 0  # the id is free again


class ManualCatalog(InlineRunners):
    """Catalog and file work wait in one queue until the test runs them."""

    def __init__(self):
        self.pending = []

    def catalog(self, f, *args):
        d = Deferred()
        self.pending.append((d, f, args))
        return d

    io = catalog

    def run_next(self):
        d, f, args = self.pending.pop(0)
        try:
            value = f(*args)
        except BaseException as e:
            d.errback(e)
        else:
            d.callback(value)

    def run_all(self):
        while self.pending:
            self.run_next()


def _run(runners, coroutine):
    """Start ``coroutine`` and run the queued blocking work until it is done."""
    d = Deferred.fromCoroutine(coroutine)
    runners.run_all()
    return d


@pytest_twisted.ensureDeferred
async def test_followers_wait_for_a_resume_within_the_window(stores):
    """Followers of an aborted stream wait; a resume in time gives them one continuous stream."""
    from loom.follow import Follower
    from tests.test_follow import Sink

    store = stores.make()
    store.resume_window = 30
    stream = (await store.create("s1", "{}"))
    stream.append(b"one ")
    waiting, late = Sink(), Sink()
    Follower(store.open("s1"), waiting, stores.clock, resumes=store).start()
    Follower(store.open("s1"), late, stores.clock, resumes=store).start()
    (await stream.abort())
    assert not waiting.cut_off and not late.cut_off  # waiting for the producer
    stores.clock.advance(10)
    resumed = (await store.resume("s1", 4))
    resumed.append(b"two")
    (await resumed.complete())
    assert bytes(waiting.data) == b"one two" and waiting.ended
    assert store._resume_waiters == {}


@pytest_twisted.ensureDeferred
async def test_followers_give_up_when_the_window_passes(stores):
    """Without a resume in time, the followers are cut as before."""
    from loom.follow import Follower
    from tests.test_follow import Sink

    store = stores.make()
    store.resume_window = 30
    stream = (await store.create("s1", "{}"))
    stream.append(b"one")
    sink = Sink()
    Follower(store.open("s1"), sink, stores.clock, resumes=store).start()
    (await stream.abort())
    stores.clock.advance(31)
    assert sink.cut_off and bytes(sink.data) == b"one"
    assert store._resume_waiters == {}


@pytest_twisted.ensureDeferred
async def test_retention_deletes_old_finished_streams_in_batches(stores, monkeypatch):
    """Finished streams older than the retention go, batch by batch; live ones stay."""
    import loom.store.streams

    monkeypatch.setattr(loom.store.streams, "RETENTION_BATCH", 3)
    store = stores.make()
    for index in range(7):
        (await (await store.create(f"old{index}", "{}")).complete())
    live = (await store.create("live", "{}"))
    stores.clock.advance(3600 * 24 * 2)
    (await (await store.create("young", "{}")).complete())
    store.retention = 86400
    (await store._sweep())
    remaining = sorted(r.id for r in store.list_streams(limit=100))
    assert remaining == ["live", "young"]
    assert live.outcome is None


@pytest_twisted.ensureDeferred
async def test_a_stopping_store_ends_the_retention_sweep_between_batches(stores, monkeypatch):
    """A sweep does not start another batch once the store is stopping."""
    import loom.store.streams

    monkeypatch.setattr(loom.store.streams, "RETENTION_BATCH", 3)
    store = stores.make()
    for index in range(7):
        (await (await store.create(f"old{index}", "{}")).complete())
    stores.clock.advance(3600 * 24 * 2)
    store.retention = 86400
    expire = store._thd_expire

    def one_batch_then_stop(*args):
        store._stopped = True  # stop() began while this batch ran
        return expire(*args)

    store._thd_expire = one_batch_then_stop
    (await store._sweep())
    assert len(store.list_streams(limit=100)) == 4


@pytest_twisted.ensureDeferred
async def test_listing_filters_and_pages_stably(stores):
    """Listing: filters by state, time and metadata; newest first; cursors unaffected by inserts."""
    store = stores.make()
    for index in range(5):
        branch = "main" if index % 2 else "dev"
        stream = (await store.create(f"s{index}", json.dumps({"branch": branch, "n": index})))
        stream.append(b"x" * index)
        if index < 4:
            (await stream.complete())
        stores.clock.advance(1)
    assert [r.id for r in store.list_streams(limit=10)] == ["s4", "s3", "s2", "s1", "s0"]
    assert [r.id for r in store.list_streams(meta=(("branch", "main"),))] == ["s3", "s1"]
    assert [r.id for r in store.list_streams(meta=(("branch", "dev"), ("n", "2")))] == ["s2"]
    assert [r.id for r in store.list_streams(state="live")] == ["s4"]
    assert store.list_streams(state="live")[0].size == 4  # the live size, not the catalog's
    first = store.list_streams(limit=2)
    cursor = (first[-1].created_ms, first[-1].id)
    (await store.create("newer", "{}"))  # a new stream must not shift the next page
    assert [r.id for r in store.list_streams(limit=2, before=cursor)] == ["s2", "s1"]
    created = {r.id: r.created_ms for r in store.list_streams(limit=10)}
    window = store.list_streams(since_ms=created["s2"], until_ms=created["s3"] + 1)
    assert [r.id for r in window] == ["s3", "s2"]


@pytest_twisted.ensureDeferred
async def test_a_crash_between_deleting_the_row_and_the_file_still_removes_the_file(tmp_path):
    """The row and a pending-delete note commit together; the next start removes the file."""
    stores = Stores("disk", tmp_path)
    store = stores.make()
    (await (await store.create("s1", "{}")).complete())
    path = store.data_path(store.open("s1").record.storage).path
    store._thd_remove_data = lambda storages: None  # the process dies before the unlink
    (await store.delete("s1"))
    assert os.path.exists(path)
    store._close_storage()
    stores.make()
    assert not os.path.exists(path)


def test_listing_uses_the_metadata_index(tmp_path):
    """A metadata filter is answered through the stream_meta index, not a scan."""
    from loom.store.catalog_db import Catalog

    catalog = Catalog(str(tmp_path / "c.sqlite3"))
    plan = catalog.explain_list(meta=(("branch", "main"),), state="complete")
    assert "stream_meta_by_value" in plan, plan
    assert "SCAN stream_meta" not in plan
