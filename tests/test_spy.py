"""/spy's framing, colours and multiplexing producer, on a Clock and a MemoryStore."""

import re

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from loom.spy import MAX_PARTIAL, PALETTE, LineFramer, Spy, SpyFormat, clean_line
from loom.store import MemoryStore
from tests.helpers import RecordingSink, ShortSink, run_pending

ANSI = re.compile(rb"\x1b\[[0-9;]*m")


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def store(clock):
    store = MemoryStore(clock, fsync="never")  # no sync timer: the clock holds only the spy's
    store.start()
    return store


def lines(sink) -> list[str]:
    return ANSI.sub(b"", bytes(sink.data)).decode().splitlines()


def test_framer_holds_partial_lines_until_their_newline(clock):
    """Whole lines come out at once; a partial line waits for the rest."""
    framer = LineFramer(clock)
    assert framer.feed(b"one\ntwo\nthr") == [b"one", b"two"]
    assert framer.feed(b"ee") == []
    assert framer.feed(b"\nfour\n") == [b"three", b"four"]
    assert framer.take_partial() is None


def test_framer_cuts_lines_longer_than_4_kib(clock):
    """A line without a newline is never held beyond 4 KiB."""
    framer = LineFramer(clock)
    out = framer.feed(b"x" * (MAX_PARTIAL * 2 + 10))
    assert out == [b"x" * MAX_PARTIAL] * 2
    assert framer.take_partial() == b"x" * 10


def test_a_line_shown_early_does_not_leave_an_empty_line(clock):
    """When a held line was shown after its timeout, its late newline adds nothing."""
    framer = LineFramer(clock)
    framer.feed(b"progress 50%")
    assert framer.take_partial(early=True) == b"progress 50%"
    assert framer.feed(b"\nnext\n") == [b"next"]


@pytest.mark.parametrize(
    "raw, shown",
    [(b"plain text", "plain text"),
     (b"\x1b[31mred\x1b[0m and \x1b[1;32mgreen\x1b[m", "red and green"),
     (b"10%\r50%\r100%", "100%"),
     (b"line with crlf\r", "line with crlf"),
     (b"\x1b]0;evil title\x07after", "after"),
     (b"bell\x07 back\x08space\x00nul", "bell backspacenul"),
     (b"tab\tstays", "tab\tstays"),
     (b"caf\xc3\xa9 \xff", "caf\u00e9 \ufffd"),
     # C1 controls (8-bit CSI, NEL, OSC as UTF-8), bidi overrides and isolates, separators
     ("a\u009b31mb\u0085c\u009d0;t\u009cd".encode(), "a31mbc0;td"),
     ("user\u202egnp.exe\u202c ok".encode(), "usergnp.exe ok"),
     ("x\u2066y\u2067z\u2068w\u2069\u200e\u200f\u061c".encode(), "xyzw"),
     ("one\u2028two\u2029".encode(), "onetwo")],
)
def test_clean_line_removes_escapes_and_controls(raw, shown):
    """A stream cannot repaint the spy's terminal or reorder its text: escapes, C0 and C1
    controls and bidirectional overrides are removed."""
    assert clean_line(raw) == shown


def test_colours_are_stable_distinct_and_never_black_or_white():
    """Each stream keeps one colour; concurrent streams get different ones; none is black/white."""
    fmt = SpyFormat(color=True)
    ids = [f"stream-{i}" for i in range(len(PALETTE))]
    for stream_id in ids:
        fmt.assign(stream_id)
    codes = {}
    for stream_id in ids:
        line = fmt.data(stream_id, b"x")
        code = int(re.match(rb"\x1b\[(\d+)m", line).group(1))
        assert code in PALETTE and code not in (30, 37, 90, 97, 93, 96)
        assert fmt.data(stream_id, b"y").startswith(line[: line.index(b"m") + 1])
        codes[stream_id] = code
    assert len(set(codes.values())) == len(PALETTE)
    assert all(line.endswith(b"\x1b[0m\n") for line in [fmt.data(ids[0], b"z")])


def test_no_escape_codes_without_color():
    """Without ?color the output contains no escape sequence at all."""
    fmt = SpyFormat(color=False)
    fmt.assign("a")
    out = fmt.start("a", "{}") + fmt.data("a", b"\x1b[31mred\x1b[0m") + fmt.end("a", "complete", 3)
    assert b"\x1b" not in out
    assert out == b"START a {}\na | red\nEND a complete 3\n"


@pytest_twisted.ensureDeferred
async def test_spy_shows_active_streams_from_their_end_and_new_ones_from_the_start(store, clock):
    """Streams live at connect start at their current end; later ones from their first byte."""
    old = (await store.create("old", '{"job":1}'))
    old.append(b"history\n")
    sink = RecordingSink()
    spy = Spy(store, sink, clock)
    spy.start()
    old.append(b"live\n")
    new = (await store.create("new", "{}"))
    new.append(b"first\n")
    (await new.complete())
    assert lines(sink) == [
        'START old {"job":1}',
        "old | live",
        "START new {}",
        "new | first",
        "END new complete 6",
    ]


@pytest_twisted.ensureDeferred
async def test_lines_of_different_streams_never_splice(store, clock):
    """Partial lines written alternately by two streams come out as whole lines."""
    a = (await store.create("a", "{}"))
    b = (await store.create("b", "{}"))
    sink = RecordingSink()
    Spy(store, sink, clock).start()
    a.append(b"aa")
    b.append(b"bb")
    a.append(b"AA\n")
    b.append(b"BB\n")
    assert lines(sink)[2:] == ["a | aaAA", "b | bbBB"]


@pytest_twisted.ensureDeferred
async def test_partial_line_is_shown_after_about_a_second(store, clock):
    """A prompt or progress bar without newline appears after ~1 s, not never."""
    stream = (await store.create("p", "{}"))
    sink = RecordingSink()
    spy = Spy(store, sink, clock)
    spy.start()
    stream.append(b"Password: ")
    assert lines(sink) == ["START p {}"]
    clock.advance(0.9)
    assert lines(sink) == ["START p {}"]
    clock.advance(0.2)
    assert lines(sink) == ["START p {}", "p | Password: "]
    stream.append(b"\nok\n")
    assert lines(sink)[-1] == "p | ok"
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_end_line_reports_state_and_size(store, clock):
    """END carries the final state and size, after the stream's last line."""
    stream = (await store.create("x", "{}"))
    sink = RecordingSink()
    Spy(store, sink, clock).start()
    stream.append(b"no newline at end")
    (await stream.abort())
    assert lines(sink)[-2:] == ["x | no newline at end", "END x aborted 17"]


@pytest_twisted.ensureDeferred
async def test_paused_spy_buffers_nothing_and_catches_up_later(store, clock):
    """While the client is paused nothing is written; afterwards every line is sent."""
    stream = (await store.create("s", "{}"))
    sink = RecordingSink(limit=1)
    spy = Spy(store, sink, clock)
    spy.start()
    written = len(sink.data)
    for index in range(1000):
        stream.append(b"line %d\n" % index)
    assert len(sink.data) == written
    sink.limit = None
    spy.resumeProducing()
    run_pending(clock)
    assert lines(sink)[1:] == [f"s | line {i}" for i in range(1000)]


@pytest_twisted.ensureDeferred
async def test_a_spy_far_behind_skips_with_an_explicit_marker(store, clock):
    """Lag beyond the limit is replaced by a SKIP line saying how much was skipped."""
    stream = (await store.create("s", "{}"))
    sink = RecordingSink(limit=1)
    spy = Spy(store, sink, clock, max_lag=1000)
    spy.start()
    stream.append(b"x" * 999 + b"\n" + b"y" * 1500 + b"\n" + b"zz")
    sink.limit = None
    spy.resumeProducing()
    assert lines(sink)[1:] == ["SKIP s 2501 bytes"]
    stream.append(b"z after\n")
    assert lines(sink)[-1] == "s | zzz after"


@pytest_twisted.ensureDeferred
async def test_skipping_drops_the_held_partial_line_and_counts_it(store, clock):
    """A partial line held when the skip happens is counted in the SKIP line, not lost."""
    stream = (await store.create("s", "{}"))
    sink = RecordingSink()
    spy = Spy(store, sink, clock, max_lag=100)
    spy.start()
    stream.append(b"held")
    sink.limit = 1
    spy.pauseProducing()
    stream.append(b" rest\n" + b"q" * 200 + b"\n")
    sink.limit = None
    spy.resumeProducing()
    assert lines(sink)[1:] == ["SKIP s 211 bytes"]  # 4 held + 6 + 201


@pytest_twisted.ensureDeferred
async def test_stop_leaves_nothing_behind(store, clock):
    """A spy that leaves holds no observer, listener, timer or file."""
    stream = (await store.create("s", "{}"))
    spies = []
    for _ in range(200):
        spy = Spy(store, RecordingSink(), clock)
        spy.start()
        spies.append(spy)
    stream.append(b"partial")  # every spy now has a partial line and a timer
    assert store.observer_count == 200 and stream.listener_count == 200
    for spy in spies:
        spy.stopProducing()
    assert store.observer_count == 0
    assert stream.listener_count == 0
    assert clock.getDelayedCalls() == []
    assert all(cursor_free(spy) for spy in spies)


def cursor_free(spy) -> bool:
    return spy.streams == 0


class Tripwire:
    """Stands in for a cursor's framer: any use of it fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"touched another stream's framer ({name})")


@pytest_twisted.ensureDeferred
async def test_a_chunk_costs_the_spy_its_own_stream_only(store, clock):
    """With a thousand streams each holding a partial line, a chunk of one stream touches
    no other stream's state: a spy's cost per chunk does not grow with the streams."""
    streams = [(await store.create(f"s{i}", "{}")) for i in range(1000)]
    sink = RecordingSink()
    spy = Spy(store, sink, clock)
    spy.start()
    for index, stream in enumerate(streams):
        stream.append(b"progress %d%%" % index)
    busy = streams[500]
    for stream, cursor in spy._cursors.items():
        if stream is not busy:
            cursor.framer = Tripwire()
    for step in range(10):
        busy.append(b"\rprogress %d%%" % step)
    busy.append(b" done\n")
    assert lines(sink)[-1] == "s500 | progress 9% done"


@pytest_twisted.ensureDeferred
async def test_held_lines_are_shown_oldest_first_each_at_its_own_time(store, clock):
    """Partial lines begun at different moments are each shown about a second later."""
    sink = RecordingSink()
    spy = Spy(store, sink, clock)
    spy.start()
    a, b, c = [(await store.create(name, "{}")) for name in "abc"]
    a.append(b"a-partial")
    clock.advance(0.4)
    b.append(b"b-partial")
    clock.advance(0.3)
    c.append(b"c-partial")
    a.append(b" still going")  # the same line: its clock does not restart
    clock.advance(0.31)  # t = 1.01
    assert lines(sink)[3:] == ["a | a-partial still going"]
    clock.advance(0.4)  # t = 1.41
    assert lines(sink)[4:] == ["b | b-partial"]
    b.append(b"\n")  # its newline, after it was shown, adds no empty line
    clock.advance(0.3)  # t = 1.71
    assert lines(sink)[5:] == ["c | c-partial"]
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_what_a_spy_client_did_not_take_goes_first_when_it_resumes(store, clock):
    """Lines a spy client's connection did not take are kept and sent first when it
    resumes: none lost, none repeated, none out of order."""
    stream = (await store.create("s", "{}"))
    sink = ShortSink(take=10)
    Spy(store, sink, clock).start()
    for index in range(300):
        stream.append(b"line %d\n" % index)
    (await stream.complete())
    end = b"END s complete %d\n" % stream.size
    sink.resume_until_done(clock, lambda: sink.data.endswith(end))
    assert lines(sink) == ["START s {}", *(f"s | line {i}" for i in range(300)),
                           f"END s complete {stream.size}"]
