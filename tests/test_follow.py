"""Follower: the push producer that sends a stream to one consumer."""

import pytest
import pytest_twisted
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from loom.follow import READ_SIZE, TURN_BUDGET, Follower
from loom.store import MemoryStore
from tests.helpers import RecordingSink, ShortSink, run_pending


@pytest.fixture
def store():
    store = MemoryStore(Clock())
    store.start()
    return store


async def finished_stream(store, stream_id, data):
    stream = (await store.create(stream_id, "{}"))
    stream.append(data)
    (await stream.complete())


@pytest_twisted.ensureDeferred
async def test_follower_is_a_push_producer(store):
    """The follower provides IPushProducer."""
    (await finished_stream(store, "s", b"x"))
    assert verifyObject(IPushProducer, Follower((await store.open("s")), RecordingSink(), Clock()))


@pytest_twisted.ensureDeferred
async def test_finished_stream_is_sent_whole_then_ended_cleanly(store):
    """A finished stream is sent completely, then the response ends cleanly."""
    data = bytes(range(256)) * 2000
    (await finished_stream(store, "s", data))
    sink = RecordingSink()
    Follower((await store.open("s")), sink, Clock(), end=len(data)).start()
    assert bytes(sink.data) == data and sink.ended and sink.producer is None


@pytest_twisted.ensureDeferred
async def test_paused_follower_writes_nothing_until_resumed(store):
    """While its consumer is paused, a follower writes nothing, however much arrives."""
    stream = (await store.create("s", "{}"))
    sink, clock = RecordingSink(limit=1), Clock()
    follower = Follower((await store.open("s")), sink, clock)
    follower.start()
    stream.append(b"a")  # fills the consumer: it pauses
    assert bytes(sink.data) == b"a"
    for _ in range(100):
        stream.append(b"b" * 65536)
    assert bytes(sink.data) == b"a" and sink.writes == 1
    sink.limit = None
    follower.resumeProducing()
    run_pending(clock)
    assert len(sink.data) == 1 + 100 * 65536
    (await stream.complete())
    assert sink.ended


@pytest_twisted.ensureDeferred
async def test_live_stream_history_then_live_then_clean_end(store):
    """A follower gets the history, then each new chunk as it is appended, then the end."""
    stream = (await store.create("s", "{}"))
    stream.append(b"history ")
    sink = RecordingSink()
    follower = Follower((await store.open("s")), sink, Clock())
    follower.start()
    assert bytes(sink.data) == b"history "
    stream.append(b"live")
    assert bytes(sink.data) == b"history live"
    assert not sink.ended
    (await stream.complete())
    assert sink.ended and not sink.cut_off
    assert stream.listener_count == 0


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("later, clean", [(b"d", False), (b"de", True)])
async def test_a_live_follower_from_an_offset_ends_cleanly_only_if_the_stream_reached_it(
        store, later, clean):
    """From byte 5 of a live stream: a clean end if it completes at 5 bytes, a cut if it
    completes shorter (no clean end may suggest the follower got what it asked for)."""
    stream = (await store.create("s", "{}"))
    stream.append(b"abc")
    sink = RecordingSink()
    Follower((await store.open("s")), sink, Clock(), offset=5).start()
    stream.append(later)
    (await stream.complete())
    assert sink.data == b"" and (sink.ended, sink.cut_off) == (clean, not clean)


@pytest_twisted.ensureDeferred
async def test_caught_up_follower_takes_chunks_from_memory(store, monkeypatch):
    """A caught-up follower is handed fresh chunks without reading the file."""
    stream = (await store.create("s", "{}"))
    handle = (await store.open("s"))
    sink = RecordingSink()
    Follower(handle, sink, Clock()).start()
    reads = []
    monkeypatch.setattr(handle, "read", lambda *a: reads.append(a) or b"")
    stream.append(b"fresh")
    assert bytes(sink.data) == b"fresh" and reads == []


@pytest_twisted.ensureDeferred
async def test_aborted_stream_is_drained_then_cut(store):
    """When the producer vanishes, the follower still gets every byte, then a cut."""
    stream = (await store.create("s", "{}"))
    sink = RecordingSink(limit=1)
    follower = Follower((await store.open("s")), sink, Clock())
    follower.start()
    stream.append(b"x" * 1000)
    (await stream.abort())
    assert not sink.cut_off  # still has bytes to send
    sink.limit = None
    follower.resumeProducing()
    assert len(sink.data) == 1000 and sink.cut_off and not sink.ended


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("how", ["replace", "stop"])
async def test_replaced_or_interrupted_stream_cuts_at_once(store, how):
    """When the data goes away (replace) or the server stops, followers are cut at once."""
    stream = (await store.create("s", "{}"))
    sink = RecordingSink(limit=1)
    Follower((await store.open("s")), sink, Clock()).start()
    stream.append(b"x" * 1000)
    if how == "replace":
        (await store.create("s", "{}", force=True))
    else:
        (await store.stop())
    assert sink.cut_off and not sink.ended


@pytest_twisted.ensureDeferred
async def test_notail_stops_at_the_size_when_opened(store):
    """With an end offset, a follower of a live stream stops there and ends cleanly."""
    stream = (await store.create("s", "{}"))
    stream.append(b"now")
    sink = RecordingSink()
    Follower((await store.open("s")), sink, Clock(), end=3).start()
    stream.append(b"later")
    assert bytes(sink.data) == b"now" and sink.ended


@pytest_twisted.ensureDeferred
async def test_stop_releases_the_follower(store):
    """A consumer that leaves unsubscribes its follower; nothing more is written."""
    stream = (await store.create("s", "{}"))
    sink = RecordingSink()
    follower = Follower((await store.open("s")), sink, Clock())
    follower.start()
    assert stream.listener_count == 1
    follower.stopProducing()
    assert stream.listener_count == 0
    stream.append(b"after")
    assert bytes(sink.data) == b""


@pytest_twisted.ensureDeferred
async def test_a_consumer_that_never_pauses_does_not_starve_the_reactor(store):
    """Without back-pressure, a follower sends at most a turn's budget, then yields."""
    data = b"z" * (TURN_BUDGET * 3)
    (await finished_stream(store, "s", data))
    sink, clock = RecordingSink(), Clock()
    Follower((await store.open("s")), sink, clock, end=len(data)).start()
    assert len(sink.data) == TURN_BUDGET
    assert sink.writes == TURN_BUDGET // READ_SIZE
    clock.advance(0)
    clock.advance(0)
    assert bytes(sink.data) == data and sink.ended


@pytest_twisted.ensureDeferred
async def test_file_shorter_than_recorded_is_cut_not_looped(store):
    """If the data file holds fewer bytes than recorded, the response is cut."""
    (await finished_stream(store, "s", b"abc"))
    handle = (await store.open("s"))
    sink = RecordingSink()
    Follower(handle, sink, Clock(), end=10).start()
    assert bytes(sink.data) == b"abc" and sink.cut_off


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("take", [100, 1000, 50000])
async def test_a_follower_goes_on_from_the_first_byte_its_consumer_did_not_take(store, take):
    """A consumer that takes part of a write and pauses gets the rest, once and in order,
    when it resumes: for history read from the file and for fresh chunks from memory."""
    data = bytes(range(256)) * 1200
    stream = (await store.create("s", "{}"))
    stream.append(data[:200000])
    sink, clock = ShortSink(take), Clock()
    follower = Follower((await store.open("s")), sink, clock)
    follower.start()
    assert sink.paused and len(sink.data) == take
    sink.resume_until_done(clock, lambda: follower.offset == 200000)
    stream.append(data[200000:])  # caught up: handed over from memory, taken in part
    assert len(sink.data) == 200000 + take and sink.paused
    (await stream.complete())
    sink.resume_until_done(clock, lambda: sink.ended)
    assert bytes(sink.data) == data


@pytest_twisted.ensureDeferred
async def test_fresh_bytes_are_handed_over_in_pieces_a_socket_takes_whole(store):
    """A large fresh chunk goes to a caught-up follower's consumer in pieces of at most
    64 KiB: one large send would be cut short by a capped socket buffer."""
    stream = (await store.create("s", "{}"))
    sink = RecordingSink()
    sizes = []
    write = sink.write
    sink.write = lambda parts, size: sizes.append(size) or write(parts, size)
    Follower((await store.open("s")), sink, Clock()).start()
    stream.append(b"x" * 300_000)
    assert bytes(sink.data) == b"x" * 300_000 and max(sizes) == 64 * 1024
