"""The stream store contract: every backend passes these (memory, memory answering on later
reactor turns, disk inline, disk with threads). A new backend joins BACKENDS in conftest.py
and must pass them all."""

import errno
import json

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

import loom.store.housekeeping
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
from loom.follow import Follower
from loom.model import ABORTED, COMPLETE, DELETED, INTERRUPTED, REPLACED, TAKEN_OVER
from loom.store import ENDING_WAIT, TAKEOVER_QUIET, IStreamStore, MemoryStore
from loom.store.catalog_db import CatalogError
from loom.testing import ManualRunners, RecordingSink, append, read_all


class Listener:
    """Hears a live stream's growth, reading bytes from the file when not handed them."""

    def __init__(self):
        self.grew = []
        self.ended = []

    def stream_grew(self, stream, start, parts, size):
        chunk = b"".join(parts) if parts is not None else stream.file.read(start, size)
        assert len(chunk) == size
        self.grew.append((start, chunk))

    def stream_ended(self, stream):
        self.ended.append(stream.outcome)


@pytest_twisted.ensureDeferred
async def test_every_store_provides_the_interface(stores):
    """Each store provides IStreamStore, its parts their roles, and its log's files
    IStreamData."""
    from loom.store import IByteLog, ICatalog, ILiveSignal, IStreamData

    store = stores.make()
    assert verifyObject(IStreamStore, store)
    assert verifyObject(ICatalog, store.catalog)
    assert verifyObject(IByteLog, store.log)
    assert verifyObject(ILiveSignal, store.signal)
    stream = await store.create("s1", "{}")
    assert verifyObject(IStreamData, stream.file)
    await stream.complete()


@pytest_twisted.ensureDeferred
async def test_create_append_complete_read(stores):
    """Appended bytes are readable once committed, and after completion with state complete."""
    store = stores.make()
    stream = await store.create("s1", '{"a":1}')
    await append(stream, b"hello ")
    await append(stream, b"world")
    assert await read_all(store, "s1") == (b"hello world", "live")
    await stream.complete()
    assert stream.outcome == COMPLETE
    handle = await store.open("s1")
    assert (handle.state, handle.size, handle.metadata_json) == ("complete", 11, '{"a":1}')
    assert handle.live is None
    handle.close()
    assert await read_all(store, "s1") == (b"hello world", "complete")


@pytest_twisted.ensureDeferred
async def test_unknown_stream_is_not_found(stores):
    """Opening an id that was never created fails with StreamNotFound."""
    with pytest.raises(StreamNotFound):
        await stores.make().open("nope")


@pytest_twisted.ensureDeferred
async def test_taken_id_is_refused_live_or_finished(stores):
    """A live or finished stream's id cannot be reused without force."""
    store = stores.make()
    stream = await store.create("s1", "{}")
    with pytest.raises(StreamExists):
        await store.create("s1", "{}")
    await stream.complete()
    with pytest.raises(StreamExists):
        await store.create("s1", "{}")
    assert await read_all(store, "s1") == (b"", "complete")


@pytest_twisted.ensureDeferred
async def test_force_replaces_a_live_stream_and_cuts_it(stores):
    """Force: the old live stream is cut (producer and followers), its data gone."""
    store = stores.make()
    old = await store.create("s1", '{"v":1}')
    await append(old, b"old data")
    cuts, listener = [], Listener()
    old.on_cut = cuts.append
    old.subscribe(listener)
    new = await store.create("s1", '{"v":2}', force=True)
    assert new.replaced
    assert old.outcome == REPLACED and cuts == [REPLACED] and listener.ended == [REPLACED]
    with pytest.raises(StreamCut):
        await append(old, b"more")
    await append(new, b"new")
    await new.complete()
    handle = await store.open("s1")
    assert handle.metadata_json == '{"v":2}'
    handle.close()
    assert await read_all(store, "s1") == (b"new", "complete")
    # The old stream finishing late must not overwrite the new record.
    with pytest.raises(StreamCut):
        await old.complete()
    assert await read_all(store, "s1") == (b"new", "complete")


@pytest_twisted.ensureDeferred
async def test_a_replacing_stream_is_live_while_the_old_bytes_are_removed(inline_stores):
    """A reader that comes while a forced replace is still removing the old stream's bytes
    finds the new stream live, not a live record without a stream."""
    runners = ManualRunners(hold=("io",))
    store = inline_stores.make(runners)
    creating = Deferred.fromCoroutine(store.create("s1", "{}"))
    runners.run_all()
    old = await creating
    await append_now(old, runners, b"old")
    ending = Deferred.fromCoroutine(old.complete())
    runners.run_all()
    await ending
    replacing = Deferred.fromCoroutine(store.create("s1", "{}", force=True))
    runners.run_next()  # the new stream's bytes exist, its record replaced the old one
    assert runners.pending and not replacing.called  # the old bytes are being removed
    handle = await store.open("s1")
    assert handle.live is not None and handle.state == "live"
    handle.close()
    runners.run_all()
    new = await replacing
    assert new.replaced and handle.live is new


async def append_now(stream, runners, data: bytes) -> None:
    pending = stream.append(data)
    runners.run_all()
    if pending is not None:
        await pending


@pytest_twisted.ensureDeferred
async def test_force_replaces_a_finished_stream(stores):
    """Force over a complete stream replaces it; without an old stream it just creates."""
    store = stores.make()
    first = await store.create("s1", "{}")
    await append(first, b"first")
    await first.complete()
    second = await store.create("s1", "{}", force=True)
    assert second.replaced
    await second.complete()
    assert await read_all(store, "s1") == (b"", "complete")
    fresh = await store.create("s2", "{}", force=True)
    assert not fresh.replaced


@pytest_twisted.ensureDeferred
async def test_generated_ids_are_distinct_across_restarts(stores):
    """Streams created without an id get distinct ids, also from a store restarted at the
    same instant."""
    first = {(await stores.make().create(None, "{}")).id for _ in range(20)}
    second = {(await stores.make().create(None, "{}")).id for _ in range(20)}
    assert len(first | second) == 40


@pytest_twisted.ensureDeferred
async def test_abort_keeps_what_arrived(stores):
    """A producer that vanished leaves an aborted stream with every byte it sent."""
    store = stores.make()
    stream = await store.create("s1", "{}")
    await append(stream, b"partial")
    await stream.abort()
    assert await read_all(store, "s1") == (b"partial", "aborted")


@pytest_twisted.ensureDeferred
async def test_listeners_hear_growth_and_the_end(stores):
    """Subscribers get each chunk with its offset, then the outcome."""
    store = stores.make()
    stream = await store.create("s1", "{}")
    listener = Listener()
    stream.subscribe(listener)
    await append(stream, b"ab")
    await append(stream, b"cde")
    await stream.complete()
    assert listener.grew == [(0, b"ab"), (2, b"cde")]
    assert listener.ended == [COMPLETE]


@pytest_twisted.ensureDeferred
async def test_a_listener_that_raises_is_dropped_alone(stores):
    """A follower whose callback raises is logged and dropped; the producer's append and the
    listeners after it are untouched."""
    store = stores.make()
    stream = await store.create("s1", "{}")

    class Broken(Listener):
        failed = False

        def stream_grew(self, stream, start, parts, size):
            raise RuntimeError("a broken reader")

        def listener_failed(self):
            self.failed = True

    broken, after = Broken(), Listener()
    stream.subscribe(broken)
    stream.subscribe(after)
    await append(stream, b"one")
    await append(stream, b"two")
    assert broken.failed and stream.listener_count == 1
    assert after.grew == [(0, b"one"), (3, b"two")]
    await stream.complete()
    assert after.ended == [COMPLETE] and broken.ended == []
    assert await read_all(store, "s1") == (b"onetwo", "complete")


@pytest_twisted.ensureDeferred
async def test_observers_hear_about_new_streams(stores):
    """observe() reports every stream created afterwards until unobserve()."""
    store = stores.make()
    seen = []
    store.observe(lambda stream: seen.append(stream.id))
    await store.create("a", "{}")
    store.unobserve(seen.append)  # not the registered callable: no effect
    assert seen == ["a"]
    assert store.observer_count == 1


@pytest_twisted.ensureDeferred
async def test_restart_turns_live_streams_into_interrupted(stores):
    """After a crash, a stream that was live is interrupted with the bytes that were stored."""
    store = stores.make()
    stream = await store.create("s1", '{"k":"v"}')
    await append(stream, b"before the crash")
    done = await store.create("s2", "{}")
    await append(done, b"done")
    await done.complete()
    restarted = stores.make()  # no stop(): as after kill -9
    assert await read_all(restarted, "s1") == (b"before the crash", "interrupted")
    assert await read_all(restarted, "s2") == (b"done", "complete")
    handle = await restarted.open("s1")
    assert handle.metadata_json == '{"k":"v"}'
    handle.close()


@pytest_twisted.ensureDeferred
async def test_stop_interrupts_live_streams_and_cuts_producers(stores):
    """stop(): live streams are synced and recorded interrupted; producers are cut."""
    store = stores.make()
    stream = await store.create("s1", "{}")
    await append(stream, b"data")
    cuts, listener = [], Listener()
    stream.on_cut = cuts.append
    stream.subscribe(listener)
    await store.stop()
    assert cuts == [INTERRUPTED]
    assert listener.ended == [INTERRUPTED]
    assert stream.synced == 4
    assert await read_all(stores.make(), "s1") == (b"data", "interrupted")


@pytest_twisted.ensureDeferred
async def test_interval_policy_syncs_live_streams_every_interval(stores):
    """With fsync interval, unsynced bytes are synced when the interval passes."""
    store = stores.make()
    stream = await store.create("s1", "{}")
    await append(stream, b"x" * 100)
    assert stream.synced == 0
    await stores.tick(store)
    assert stream.synced == 100


@pytest_twisted.ensureDeferred
async def test_appending_after_the_end_is_refused(stores):
    """A completed stream accepts no more data."""
    store = stores.make()
    stream = await store.create("s1", "{}")
    await stream.complete()
    with pytest.raises(StreamCut):
        await append(stream, b"late")
    with pytest.raises(StreamCut):
        await stream.complete()


@pytest_twisted.ensureDeferred
async def test_complete_waits_for_the_sync(inline_stores):
    """complete() does not record the stream complete before its data is synced."""
    runners = ManualRunners()
    store = inline_stores.make(runners)
    stream = await _run(runners, store.create("s1", "{}"))
    await append(stream, b"abc")
    finished = Deferred.fromCoroutine(stream.complete())
    assert not finished.called and stream.outcome is None
    runners.run_next()
    assert finished.called and stream.outcome == COMPLETE


@pytest_twisted.ensureDeferred
async def test_failed_sync_is_never_success(stores):
    """If the final sync fails, complete() raises and the stream is recorded aborted."""
    store = stores.make()
    stream = await store.create("s1", "{}")
    await append(stream, b"abc")

    def broken_sync():
        raise OSError(errno.EIO, "Input/output error")

    stream.file.thd_sync = broken_sync
    with pytest.raises(StorageFailed):
        await stream.complete()
    assert stream.outcome == ABORTED
    assert await read_all(store, "s1") == (b"abc", "aborted")


@pytest_twisted.ensureDeferred
async def test_a_failed_background_sync_poisons_the_stream(stores):
    """After a failed interval sync the producer is told at once and nothing is trusted later."""
    store = stores.make()
    stream = await store.create("s1", "{}")
    cuts = []
    stream.on_cut = cuts.append
    await append(stream, b"abc")
    calls = []

    def fail_once():
        calls.append(1)
        if len(calls) == 1:
            raise OSError(errno.EIO, "Input/output error")

    stream.file.thd_sync = fail_once
    await stores.tick(store)
    assert cuts == [ABORTED]
    # A later sync would "succeed", but the data may be gone: still a failure.
    with pytest.raises(StorageFailed):
        await stream.complete()
    assert len(calls) == 1
    assert (await read_all(store, "s1"))[1] == "aborted"


@pytest_twisted.ensureDeferred
async def test_an_end_the_catalog_refuses_is_served_and_retried(stores):
    """Disk full for the catalog too: the stream reads as aborted with its bytes, and the end
    is written to the catalog once it accepts writes again."""
    store = stores.make()
    stream = await store.create("s1", "{}")
    await append(stream, b"kept bytes")
    catalog = store.catalog
    real_finish = catalog.finish
    refusing = [True]

    def finish(*args):
        if refusing[0]:
            d = Deferred()
            d.errback(CatalogError("catalog finish failed: database or disk is full"))
            return d
        return real_finish(*args)

    catalog.finish = finish
    with pytest.raises(StorageFailed):
        await stream.complete()  # never a success that was not written down
    assert await read_all(store, "s1") == (b"kept bytes", "aborted")
    with pytest.raises(StreamExists):
        await store.create("s1", "{}")
    await stores.tick(store)
    assert store.unrecorded  # still refused: kept, retried
    refusing[0] = False
    await stores.tick(store)
    assert not store.unrecorded
    assert await read_all(stores.make(), "s1") == (b"kept bytes", "aborted")


@pytest_twisted.ensureDeferred
async def test_delete_cuts_a_live_stream_and_removes_everything(stores):
    """DELETE: the producer and followers are cut, the record and the data are gone."""
    store = stores.make()
    stream = await store.create("s1", "{}")
    await append(stream, b"data")
    cuts, listener = [], Listener()
    stream.on_cut = cuts.append
    stream.subscribe(listener)
    await store.delete("s1")
    assert cuts == [DELETED] and listener.ended == [DELETED]
    with pytest.raises(StreamNotFound):
        await store.open("s1")
    with pytest.raises(StreamNotFound):
        await store.delete("s1")
    assert await store.stream_count() == 0
    await store.create("s1", "{}")  # the id is free again


@pytest_twisted.ensureDeferred
async def test_resume_continues_an_aborted_stream_at_its_size(stores):
    """Append at the right offset: the stream is live again and grows from there."""
    store = stores.make()
    stream = await store.create("s1", "{}")
    await append(stream, b"first ")
    await stream.abort()
    with pytest.raises(OffsetMismatch) as mismatch:
        await store.resume("s1", 3)
    assert mismatch.value.size == 6 and mismatch.value.headers == {"X-Stream-Size": "6"}
    resumed = await store.resume("s1", 6)
    assert resumed.size == 6
    await append(resumed, b"second")
    await resumed.complete()
    assert await read_all(store, "s1") == (b"first second", "complete")


@pytest_twisted.ensureDeferred
async def test_resume_after_a_restart_continues_an_interrupted_stream(stores):
    """A stream interrupted by a crash can be appended to after the restart."""
    store = stores.make()
    stream = await store.create("s1", "{}")
    await append(stream, b"before ")
    restarted = stores.make()
    resumed = await restarted.resume("s1", 7)
    await append(resumed, b"after")
    await resumed.complete()
    assert await read_all(restarted, "s1") == (b"before after", "complete")


@pytest_twisted.ensureDeferred
async def test_only_aborted_or_interrupted_streams_resume(stores):
    """A complete stream, or an unknown id, cannot be appended to."""
    store = stores.make()
    stream = await store.create("s1", "{}")
    await stream.complete()
    with pytest.raises(StreamNotResumable):
        await store.resume("s1", 0)
    with pytest.raises(StreamNotFound):
        await store.resume("ghost", 0)


@pytest_twisted.ensureDeferred
async def test_resume_takes_over_a_live_stream_at_its_exact_size(stores):
    """A producer that knows the exact size takes over a stream whose producer went silent."""
    store = stores.make()
    cuts, new_cuts = [], []
    stream = await store.create("s1", "{}", on_cut=cuts.append)
    await append(stream, b"abc")
    with pytest.raises(OffsetMismatch):
        await store.resume("s1", 1)
    stores.clock.advance(TAKEOVER_QUIET)
    assert await store.resume("s1", 3, on_cut=new_cuts.append) is stream
    assert cuts == [TAKEN_OVER] and stream.outcome is None
    await append(stream, b"def")
    assert await read_all(store, "s1") == (b"abcdef", "live")
    await store.delete("s1")
    assert new_cuts == [DELETED]  # the stream now answers to its new producer


@pytest_twisted.ensureDeferred
async def test_a_take_over_needs_the_token_that_writes_the_stream(stores):
    """Only the token a live stream's producer used may take it over."""
    store = stores.make()
    stream = await store.create("s1", "{}", owner=b"token-a")
    await append(stream, b"abc")
    stores.clock.advance(TAKEOVER_QUIET)
    with pytest.raises(Forbidden):
        await store.resume("s1", 3, owner=b"token-b")
    with pytest.raises(Forbidden):
        await store.resume("s1", 3, owner=None)
    assert await store.resume("s1", 3, owner=b"token-a") is stream


def queued_runners() -> ManualRunners:
    """Catalog and file work wait in one queue until the test runs them."""
    return ManualRunners(hold=("catalog", "read", "io"))


def _run(runners, coroutine):
    """Start ``coroutine`` and run the queued blocking work until it is done."""
    d = Deferred.fromCoroutine(coroutine)
    while not d.called and runners.pending:
        runners.run_next()
    return d


@pytest_twisted.ensureDeferred
async def test_two_producers_racing_to_append_never_both_write(inline_stores):
    """Two appends at the same offset, the second while the first is being granted:
    exactly one gets the stream, the other a StreamBusy; nothing interleaves."""
    runners = queued_runners()
    store = inline_stores.make(runners)
    stream = await _run(runners, store.create("s1", "{}"))
    await append(stream, b"base ")
    await _run(runners, stream.abort())
    first_cuts, second_cuts = [], []
    first = Deferred.fromCoroutine(store.resume("s1", 5, on_cut=first_cuts.append))
    second = Deferred.fromCoroutine(store.resume("s1", 5, on_cut=second_cuts.append))
    while not first.called:
        runners.run_next()  # the first reads the record, reopens the file, is granted ...
    granted = await first
    runners.run_all()
    with pytest.raises(StreamBusy) as refused:  # ... and the second, queued behind it, is not
        await second
    assert refused.value.status == 409 and refused.value.headers["Retry-After"] == "1"
    await append(granted, b"first")
    assert first_cuts == second_cuts == []
    assert await _run(runners, read_all(store, "s1")) == (b"base first", "live")


@pytest_twisted.ensureDeferred
async def test_an_append_waits_for_a_stream_that_is_still_ending(inline_stores):
    """An append arriving while the dropped producer's stream is being ended waits for the
    end, then resumes it; one that waits too long is told to try again."""
    runners = queued_runners()
    store = inline_stores.make(runners)
    stream = await _run(runners, store.create("s1", "{}"))
    await append(stream, b"abc")
    ending = Deferred.fromCoroutine(stream.abort())  # its sync and record wait in the queue
    resumed = Deferred.fromCoroutine(store.resume("s1", 3))
    assert not resumed.called
    runners.run_all()
    assert await ending is None
    again = await resumed
    assert again is not stream and again.size == 3
    await append(again, b"def")
    # A stream whose end does not come within ENDING_WAIT: StreamBusy, then a retry works.
    late = Deferred.fromCoroutine(again.abort())
    refused = Deferred.fromCoroutine(store.resume("s1", 6))
    inline_stores.clock.advance(ENDING_WAIT)
    with pytest.raises(StreamBusy):
        await refused
    runners.run_all()
    await late
    assert (await _run(runners, store.resume("s1", 6))).size == 6


@pytest_twisted.ensureDeferred
async def test_discard_removes_only_an_empty_stream(stores):
    """discard() removes a stream that holds no byte, and nothing else."""
    store = stores.make()
    empty = await store.create("e", "{}")
    full = await store.create("f", "{}")
    await append(full, b"x")
    assert await store.discard(empty) is True
    assert await store.discard(full) is False
    with pytest.raises(StreamNotFound):
        await store.open("e")
    assert empty.outcome == DELETED
    assert await read_all(store, "f") == (b"x", "live")
    assert (await store.create("e", "{}")).size == 0  # the id is free again


@pytest_twisted.ensureDeferred
async def test_followers_wait_for_a_resume_within_the_window(stores):
    """Followers of an aborted stream wait; a resume in time gives them one continuous stream."""
    store = stores.make(resume_window=30)
    stream = await store.create("s1", "{}")
    await append(stream, b"one ")
    waiting, late = RecordingSink(), RecordingSink()
    Follower(await store.open("s1"), waiting, stores.clock, resumes=store).start()
    Follower(await store.open("s1"), late, stores.clock, resumes=store).start()
    await stream.abort()
    assert not waiting.cut_off and not late.cut_off  # waiting for the producer
    stores.clock.advance(10)
    resumed = await store.resume("s1", 4)
    await append(resumed, b"two")
    await resumed.complete()
    assert bytes(waiting.data) == b"one two" and waiting.ended
    assert store.signal.waiting == {}


@pytest_twisted.ensureDeferred
async def test_followers_give_up_when_the_window_passes(stores):
    """Without a resume in time, the followers are cut as before."""
    store = stores.make(resume_window=30)
    stream = await store.create("s1", "{}")
    await append(stream, b"one")
    sink = RecordingSink()
    Follower(await store.open("s1"), sink, stores.clock, resumes=store).start()
    await stream.abort()
    stores.clock.advance(31)
    assert sink.cut_off and bytes(sink.data) == b"one"
    assert store.signal.waiting == {}


@pytest_twisted.ensureDeferred
async def test_retention_deletes_old_finished_streams_in_batches(stores, monkeypatch):
    """Finished streams older than the retention go, batch by batch; live ones stay."""
    monkeypatch.setattr(loom.store.housekeeping, "RETENTION_BATCH", 3)
    store = stores.make()
    for index in range(7):
        await (await store.create(f"old{index}", "{}")).complete()
    live = await store.create("live", "{}")
    stores.clock.advance(3600 * 24 * 2)
    await (await store.create("young", "{}")).complete()
    store.retention = 86400
    await store.housekeeping.sweep()
    remaining = sorted(r.id for r in await store.list_streams(limit=100))
    assert remaining == ["live", "young"]
    assert live.outcome is None


@pytest_twisted.ensureDeferred
async def test_a_stopping_store_ends_the_retention_sweep_between_batches(stores, monkeypatch):
    """A sweep does not start another batch once the store is stopping."""
    monkeypatch.setattr(loom.store.housekeeping, "RETENTION_BATCH", 3)
    store = stores.make()
    for index in range(7):
        await (await store.create(f"old{index}", "{}")).complete()
    stores.clock.advance(3600 * 24 * 2)
    store.retention = 86400
    expired = store.catalog.expired

    def one_batch_then_stop(*args):
        store.stopped = True  # stop() began while this batch ran
        return expired(*args)

    store.catalog.expired = one_batch_then_stop
    await store.housekeeping.sweep()
    store.stopped = False
    assert len(await store.list_streams(limit=100)) == 4


@pytest_twisted.ensureDeferred
async def test_a_stream_resumed_while_the_sweep_runs_is_not_deleted(stores):
    """Retention finds an old aborted stream, then its producer resumes it before the
    sweep deletes: the stream, live again, keeps its bytes and takes more."""
    store = stores.make()
    old = await store.create("s1", "{}")
    await append(old, b"kept ")
    await old.abort()
    stores.clock.advance(3600 * 24 * 2)
    store.retention = 86400
    expired = store.catalog.expired
    resumed = []

    async def found_then_resumed(*args):
        found = await expired(*args)
        resumed.append(await store.resume("s1", 5))  # between the query and the delete
        return found

    store.catalog.expired = found_then_resumed
    await store.housekeeping.sweep()
    store.catalog.expired = expired
    assert resumed and resumed[0].outcome is None
    await append(resumed[0], b"and more")
    await resumed[0].complete()
    assert await read_all(store, "s1") == (b"kept and more", "complete")


@pytest_twisted.ensureDeferred
async def test_listing_filters_and_pages_stably(stores):
    """Listing: filters by state, time and metadata; newest first; cursors unaffected by
    inserts; live streams at their live size."""
    store = stores.make()
    for index in range(5):
        branch = "main" if index % 2 else "dev"
        stream = await store.create(f"s{index}", json.dumps({"branch": branch, "n": index}))
        await append(stream, b"x" * index)
        if index < 4:
            await stream.complete()
        stores.clock.advance(1)
    assert [r.id for r in await store.list_streams(limit=10)] == ["s4", "s3", "s2", "s1", "s0"]
    assert [r.id for r in await store.list_streams(meta=(("branch", "main"),))] == ["s3", "s1"]
    assert [r.id for r in await store.list_streams(meta=(("branch", "dev"), ("n", "2")))] == [
        "s2"]
    assert [r.id for r in await store.list_streams(state="live")] == ["s4"]
    assert (await store.list_streams(state="live"))[0].size == 4  # live, not the catalog's
    first = await store.list_streams(limit=2)
    cursor = (first[-1].created_ms, first[-1].id)
    await store.create("newer", "{}")  # a new stream must not shift the next page
    assert [r.id for r in await store.list_streams(limit=2, before=cursor)] == ["s2", "s1"]
    created = {r.id: r.created_ms for r in await store.list_streams(limit=10)}
    window = await store.list_streams(since_ms=created["s2"], until_ms=created["s3"] + 1)
    assert [r.id for r in window] == ["s3", "s2"]
    assert await store.stream_count() == 6


@pytest_twisted.ensureDeferred
async def test_an_append_the_log_refuses_aborts_the_stream():
    """A log that takes an append and then refuses it (a networked log that lost it): the
    producer's wait fails, nothing more is taken, and the stream ends aborted with what was
    committed, instead of staying live forever."""
    store = MemoryStore(Clock(), commits="manual")
    store.start()
    stream = await store.create("s1", "{}")
    stream.append(b"kept ")
    store.log.commit()
    waiting = stream.append(b"lost")
    ending = Deferred.fromCoroutine(stream.complete())
    store.log.refuse(ConnectionError("the log went away"))
    with pytest.raises(ConnectionError):
        await waiting
    with pytest.raises(StorageFailed):
        await ending
    with pytest.raises(StreamCut):
        stream.append(b"more")
    assert stream.outcome == "aborted"
    assert (await store.open("s1")).record.reason == "storing the data failed"
    assert await read_all(store, "s1") == (b"kept ", "aborted")


@pytest_twisted.ensureDeferred
async def test_a_delete_the_catalog_refuses_leaves_an_aborted_stream_not_a_live_one(stores):
    """DELETE cuts the producer, then the catalog fails to delete: the stream is served as
    aborted with its bytes (not live with no producer), and that end is recorded later."""
    store = stores.make()
    stream = await store.create("s1", "{}")
    await append(stream, b"still here")
    delete = store.catalog.delete
    store.catalog.delete = lambda *args: fail(CatalogError("disk I/O error"))
    with pytest.raises(StorageFailed):
        await store.delete("s1")
    store.catalog.delete = delete
    assert stream.outcome == "deleted"
    assert await read_all(store, "s1") == (b"still here", "aborted")
    await store.housekeeping.retry_unrecorded()
    assert store.unrecorded == {}
    handle = await store.open("s1")
    assert (handle.state, handle.record.reason) == (
        "aborted", "the catalog could not delete the stream")
    handle.close()


@pytest_twisted.ensureDeferred
async def test_a_stream_deleted_while_its_end_is_being_recorded_stays_deleted(stores):
    """The producer ends, and while the catalog records that, the stream is deleted; then
    recording the end fails: the stream stays deleted (its file let go of once), and no
    end is kept to be recorded later."""
    store = stores.make()
    stream = await store.create("s1", "{}")
    await append(stream, b"data")
    finishing, asked = Deferred(), Deferred()
    finish = store.catalog.finish

    def held(*args):
        store.catalog.finish = finish
        asked.callback(None)
        return finishing

    store.catalog.finish = held
    ending = Deferred.fromCoroutine(stream.complete())
    await asked  # the catalog is recording the end
    await store.delete("s1")
    assert stream.outcome == "deleted"
    finishing.errback(CatalogError("disk I/O error"))
    with pytest.raises(StorageFailed):
        await ending
    assert stream.outcome == "deleted" and store.unrecorded == {}
    with pytest.raises(StreamNotFound):
        await store.open("s1")


@pytest_twisted.ensureDeferred
async def test_a_healthy_store_says_so(stores):
    """check_health() fires for a store that can read and write."""
    store = stores.make()
    assert await store.check_health() is None


@pytest_twisted.ensureDeferred
async def test_followers_are_woken_only_for_committed_bytes():
    """A log that confirms appends later: followers and readers see a byte only once it is
    committed, and the append tells its producer to wait until then."""
    store = MemoryStore(Clock(), commits="manual")
    store.start()
    stream = await store.create("s1", "{}")
    listener = Listener()
    stream.subscribe(listener)
    pending = stream.append(b"held")
    assert isinstance(pending, Deferred) and not pending.called
    assert listener.grew == [] and stream.size == 0 and stream.written == 4
    assert await read_all(store, "s1") == (b"", "live")
    ending = Deferred.fromCoroutine(stream.complete())
    assert not ending.called  # not complete before every byte is committed
    store.log.commit()
    assert pending.called and listener.grew == [(0, b"held")]
    await ending
    assert await read_all(store, "s1") == (b"held", "complete")
