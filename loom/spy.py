"""/spy: every live stream, interleaved line by line, optionally coloured per stream.

Output is plain text, one line at a time:

    START <id> <metadata JSON>
    <id> | <a line of that stream>
    SKIP <id> <n> bytes
    END <id> <state> <size>

Lines of different streams never splice: a stream's partial line is held
until its newline, but never longer than about a second or 4 KiB (progress
bars and prompts still show). Control characters and terminal escape
sequences in the data are removed, so a stream cannot repaint the viewer's
terminal; ``?color`` adds Loom's own colours.

``Spy`` is one IPushProducer per client. It reads each stream by offset, so a
client that stops reading costs offsets, not memory (at most the lines of one
read that its connection did not take); a client that falls more than
``max_lag`` bytes behind a stream skips ahead and is told so.
"""

from __future__ import annotations

import re
import zlib

from loom.follow import FollowerSink, StallingPushProducer, StallWatch
from loom.store import LiveStream, StreamHandle

# Foreground colours readable on dark and light backgrounds alike, and known
# to colorama on Windows: no black, white, grey, bright yellow or bright cyan.
PALETTE = (31, 32, 33, 34, 35, 36, 91, 92, 94, 95)
MAX_PARTIAL = 4096
PARTIAL_SECONDS = 1.0
# Lines are written after each read: a client that stops reading keeps at most
# the lines of one read (and those queued before it) that its connection did not take.
READ_SIZE = 16 * 1024
TURN_BUDGET = 512 * 1024
DEFAULT_MAX_LAG = 4 * 1024 * 1024

_ESCAPES = re.compile(
    rb"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI: colours, cursor movement
    rb"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"  # OSC: window titles, hyperlinks
    rb"|\x1b[PX^_][^\x1b]*(?:\x1b\\)?"  # DCS, SOS, PM, APC strings
    rb"|\x1b[ -/]*[0-~]?"  # any other escape
)
_CONTROLS = bytes(c for c in range(32) if c != 9) + b"\x7f"
# Characters that steer a terminal or reorder text once decoded: the C1 controls
# (U+0080-U+009F, CSI among them), the bidirectional marks, embeddings, overrides
# and isolates, and the line and paragraph separators.
_STEERING = dict.fromkeys(
    [*range(0x80, 0xA0), 0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F),
     *range(0x2066, 0x206A), 0x2028, 0x2029]
)


def clean_line(line: bytes) -> str:
    """A line as a terminal would finally show it, without escapes, control characters
    (C0 and C1) or bidirectional overrides.

    A carriage return inside a line (a progress bar redrawing itself) keeps
    only what follows the last one.
    """
    line = line.rstrip(b"\r")
    if b"\r" in line:
        line = line.rsplit(b"\r", 1)[1]
    line = _ESCAPES.sub(b"", line).translate(None, _CONTROLS)
    return line.decode("utf-8", "replace").translate(_STEERING)


class LineFramer:
    """Cuts one stream's bytes into whole lines, holding back at most one partial line."""

    def __init__(self, clock):
        self._clock = clock
        self.partial = bytearray()
        self.partial_since: float | None = None
        # The held partial line was shown early; its own newline ends it silently.
        self._shown_early = False

    def feed(self, data: bytes) -> list[bytes]:
        lines = []
        start = 0
        while True:
            newline = data.find(b"\n", start)
            if newline < 0:
                break
            if self._shown_early and not self.partial and data[start:newline] in (b"", b"\r"):
                self._shown_early = False
                start = newline + 1
                continue
            self._shown_early = False
            if self.partial:
                self.partial += data[start:newline]
                lines.append(bytes(self.partial))
                self.partial.clear()
                self.partial_since = None
            else:
                lines.append(data[start:newline])
            start = newline + 1
        rest = data[start:]
        if rest:
            if not self.partial:
                self.partial_since = self._clock.seconds()
            self.partial += rest
            while len(self.partial) >= MAX_PARTIAL:
                lines.append(bytes(self.partial[:MAX_PARTIAL]))
                del self.partial[:MAX_PARTIAL]
                self.partial_since = self._clock.seconds() if self.partial else None
        return lines

    def take_partial(self, early: bool = False) -> bytes | None:
        """The held partial line, if any; ``early``: its newline is still to come."""
        if not self.partial:
            return None
        line = bytes(self.partial)
        self.partial.clear()
        self.partial_since = None
        self._shown_early = early
        return line


class SpyFormat:
    """Renders spy lines, plain or in each stream's colour."""

    def __init__(self, color: bool):
        self.color = color
        self._in_use: dict[str, int] = {}

    def assign(self, stream_id: str) -> None:
        """Give a stream a colour for its lifetime: its own hash, or the next one free."""
        if not self.color:
            return
        start = zlib.crc32(stream_id.encode("ascii")) % len(PALETTE)
        taken = set(self._in_use.values())
        for step in range(len(PALETTE)):
            code = PALETTE[(start + step) % len(PALETTE)]
            if code not in taken:
                break
        else:
            code = PALETTE[start]
        self._in_use[stream_id] = code

    def release(self, stream_id: str) -> None:
        self._in_use.pop(stream_id, None)

    def _paint(self, stream_id: str, text: str, bold: bool = False) -> bytes:
        if self.color:
            code = self._in_use.get(stream_id, PALETTE[0])
            text = f"\x1b[{'1;' if bold else ''}{code}m{text}\x1b[0m"
        return (text + "\n").encode("utf-8")

    def start(self, stream_id: str, metadata_json: str) -> bytes:
        return self._paint(stream_id, f"START {stream_id} {metadata_json}", bold=True)

    def data(self, stream_id: str, line: bytes) -> bytes:
        return self._paint(stream_id, f"{stream_id} | {clean_line(line)}")

    def skip(self, stream_id: str, skipped: int) -> bytes:
        return self._paint(stream_id, f"SKIP {stream_id} {skipped} bytes", bold=True)

    def end(self, stream_id: str, state: str, size: int) -> bytes:
        return self._paint(stream_id, f"END {stream_id} {state} {size}", bold=True)


class _Cursor:
    """Where one spy client is in one stream."""

    def __init__(self, handle: StreamHandle, offset: int, clock):
        self.handle = handle
        self.live: LiveStream = handle.live
        self.offset = offset
        self.framer = LineFramer(clock)
        self.ended = False


class Spy(StallingPushProducer):
    """Multiplexes every live stream into one line-oriented response."""

    def __init__(
        self,
        store,
        sink: FollowerSink,
        clock,
        color: bool = False,
        max_lag: int = DEFAULT_MAX_LAG,
        stall_timeout: float | None = None,
    ):
        self._store = store
        self._sink = sink
        self._clock = clock
        self._format = SpyFormat(color)
        self._max_lag = max_lag
        self._cursors: dict[LiveStream, _Cursor] = {}
        self._ready: dict[LiveStream, None] = {}  # cursors with something to do, in order
        # Streams whose partial line is held, in the order those lines began: the
        # first is the next to show, so nothing here walks every stream.
        self._held: dict[LiveStream, None] = {}
        self._queued: list[bytes] = []  # lines waiting for the next write
        self._unsent: list[bytes] = []  # what the client's connection did not take yet
        self._paused = False
        self._stopped = False
        self._pumping = False
        self._flush_call = None
        self._stall = StallWatch(clock, stall_timeout, self._stalled)

    @property
    def streams(self) -> int:
        return len(self._cursors)

    def start(self) -> None:
        self._sink.registerProducer(self, True)
        self._store.observe(self._stream_started)
        for stream in self._store.live_streams():
            self._add(stream, from_end=True)
        self._pump()

    def stop(self) -> None:
        """The client left: let go of every stream, observer and timer."""
        if self._stopped:
            return
        self._stopped = True
        self._store.unobserve(self._stream_started)
        for cursor in self._cursors.values():
            cursor.live.unsubscribe(self)
            cursor.handle.close()
        self._cursors.clear()
        self._ready.clear()
        self._held.clear()
        self._queued.clear()
        self._unsent.clear()
        self._cancel_flush()
        self._stall.cancel()

    def _stalled(self) -> None:
        self.stop()
        self._sink.abort()

    # store observer and StreamListener

    def _stream_started(self, stream: LiveStream) -> None:
        # A new stream is empty; a resumed one goes on from where it stopped.
        self._add(stream, from_end=True)
        self._pump()

    def stream_grew(self, stream: LiveStream, start: int, parts: list, size: int) -> None:
        cursor = self._cursors.get(stream)
        if cursor is None:
            return
        if (parts is not None and cursor.offset == start and not self._paused
                and not self._pumping and not self._unsent and stream not in self._ready):
            # Caught up: frame the fresh bytes as they are, without reading the file.
            # The work is this stream's alone, whatever the number of streams.
            cursor.offset += size
            out = self._queued
            self._queued = []
            self._feed(stream, cursor, parts[0] if len(parts) == 1 else b"".join(parts), out)
            self._send(out)  # what the client does not take now goes first when it resumes
            self._schedule_flush()
            return
        self._ready[stream] = None
        self._pump()

    def listener_failed(self) -> None:
        """Showing a stream to this client raised (logged by the stream): drop the client."""
        self._stalled()

    def stream_ended(self, stream: LiveStream) -> None:
        cursor = self._cursors.get(stream)
        if cursor is not None:
            cursor.ended = True
            self._ready[stream] = None
            self._pump()

    # internals

    def _add(self, stream: LiveStream, from_end: bool) -> None:
        if stream in self._cursors or stream.outcome is not None:
            return
        handle = stream.reader()
        cursor = _Cursor(handle, stream.size if from_end else 0, self._clock)
        self._cursors[stream] = cursor
        self._format.assign(stream.id)
        self._queued.append(self._format.start(stream.id, stream.metadata_json))
        stream.subscribe(self)
        if cursor.offset < stream.size:
            self._ready[stream] = None

    def _pump(self) -> None:
        if self._stopped or self._pumping:
            return
        self._pumping = True
        try:
            self._pump_turn()
        finally:
            self._pumping = False
        self._schedule_flush()

    def _pump_turn(self) -> None:
        budget = TURN_BUDGET
        while not self._paused and not self._stopped:
            unsent, self._unsent = self._unsent, []
            if not self._send(unsent):
                return
            out = self._queued
            self._queued = []
            for stream in list(self._ready):
                if budget <= 0:
                    break
                budget -= self._advance(stream, out)
                if not self._send(out):
                    return
                out = []
            if not self._send(out):
                return
            if not self._ready and not self._queued:
                return
            if budget <= 0:
                self._clock.callLater(0, self._pump)
                return

    def _send(self, out: list[bytes]) -> bool:
        """Write the lines in ``out``; False if the client paused (what it did not take is
        kept to go first when it resumes)."""
        if out:
            block = out[0] if len(out) == 1 else b"".join(out)
            taken = self._sink.write([block], len(block))
            if taken < len(block):
                self._unsent = [block[taken:]]
        return not (self._paused or self._stopped or self._unsent)

    def _advance(self, stream: LiveStream, out: list[bytes]) -> int:
        """Read one slice of ``stream`` into ``out``; return the bytes read."""
        cursor = self._cursors[stream]
        limit = stream.size
        behind = limit - cursor.offset
        if behind > self._max_lag:
            self._skip(stream, cursor, limit, out)
            behind = limit - cursor.offset
        if behind > 0:
            data = cursor.handle.read(cursor.offset, min(READ_SIZE, behind))
            if data:
                cursor.offset += len(data)
                self._feed(stream, cursor, data, out)
                if cursor.offset < limit:
                    return len(data)
            else:
                cursor.offset = limit  # a short file: never spin on it
        self._ready.pop(stream, None)
        if cursor.ended and cursor.offset >= limit:
            self._finish(stream, cursor, out)
        return max(behind, 1)

    def _skip(self, stream: LiveStream, cursor: _Cursor, limit: int, out: list[bytes]) -> None:
        """Jump to the start of the last line before ``limit``, saying how much was skipped.

        The held partial line is dropped with the rest, so every byte is either
        shown in a line or counted in the SKIP line.
        """
        tail_start = max(cursor.offset, limit - READ_SIZE)
        tail = cursor.handle.read(tail_start, limit - tail_start)
        newline = tail.rfind(b"\n")
        target = tail_start + newline + 1 if newline >= 0 else limit
        dropped = cursor.framer.take_partial() or b""
        self._held.pop(stream, None)
        out.append(self._format.skip(stream.id, target - cursor.offset + len(dropped)))
        cursor.offset = target

    def _finish(self, stream: LiveStream, cursor: _Cursor, out: list[bytes]) -> None:
        partial = cursor.framer.take_partial()
        self._held.pop(stream, None)
        if partial is not None:
            out.append(self._format.data(stream.id, partial))
        out.append(self._format.end(stream.id, stream.outcome, stream.size))
        stream.unsubscribe(self)
        cursor.handle.close()
        del self._cursors[stream]
        self._format.release(stream.id)

    def _feed(self, stream: LiveStream, cursor: _Cursor, data, out: list[bytes]) -> None:
        """Frame ``data`` (the next bytes of ``stream``) into lines in ``out``."""
        before = cursor.framer.partial_since
        for line in cursor.framer.feed(bytes(data)):
            out.append(self._format.data(stream.id, line))
        since = cursor.framer.partial_since
        if since != before:  # a partial line began or ended: keep _held in order
            self._held.pop(stream, None)
            if since is not None:
                self._held[stream] = None

    def _schedule_flush(self) -> None:
        """Arrange for held partial lines to be shown after about a second."""
        if self._stopped or self._paused:
            return
        if not self._held:
            self._cancel_flush()
            return
        if self._flush_call is not None and self._flush_call.active():
            return
        oldest = self._cursors[next(iter(self._held))].framer.partial_since
        due = max(0.0, oldest + PARTIAL_SECONDS - self._clock.seconds())
        self._flush_call = self._clock.callLater(due, self._flush_partials)

    def _flush_partials(self) -> None:
        self._flush_call = None
        if self._stopped:
            return
        now = self._clock.seconds()
        for stream in list(self._held):  # oldest first: stop at the first that may wait
            cursor = self._cursors[stream]
            if now - cursor.framer.partial_since < PARTIAL_SECONDS - 1e-6:
                break
            del self._held[stream]
            self._queued.append(
                self._format.data(stream.id, cursor.framer.take_partial(early=True))
            )
        self._pump()

    def _cancel_flush(self) -> None:
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None

