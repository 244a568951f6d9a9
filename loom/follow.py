"""Follower: sends one stream to one consumer, from an offset, then live, in bounded memory.

A follower is an IPushProducer registered on its consumer. It reads the
stream's file by offset while the consumer is not paused; when it has caught
up it waits for the stream to grow (it is woken for committed bytes only). A
caught-up, unpaused follower takes fresh chunks straight from the writer (or
from the file, when the log confirmed them later); a paused one falls back to
the file, so a
slow consumer costs a file offset, never a buffer. The consumer takes only
what its connection accepts at once and pauses the follower for the rest,
which stays in the file: a stalled reader holds no stream bytes in memory.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from loom.buffers import pieces
from loom.model import ABORTED, COMPLETE, DRAINED
from loom.store import LiveStream, StreamHandle

log = Logger()

READ_SIZE = 128 * 1024
# Fresh bytes are handed over from memory at most this much per send: a socket
# with a capped buffer takes a run of these whole (between two sends the kernel
# moves the last one on), where one large send is cut short and the rest must
# be read back from the file.
PIECE = 64 * 1024
# Bytes sent per reactor turn before yielding, for consumers that never pause.
TURN_BUDGET = 1024 * 1024


class FollowerSink(Protocol):
    """Where a follower's bytes go (the web layer adapts a request to this)."""

    def write(self, parts: list, size: int) -> int:
        """Send ``size`` bytes held in ``parts`` (bytes or memoryviews); return how many
        were taken. Fewer means the producer was paused: it offers the rest again
        once resumed, and the sink keeps nothing of it."""

    def end(self) -> None:
        """The stream ended normally and every byte was written."""

    def cut(self) -> None:
        """The stream ended any other way: close without a clean end."""

    def abort(self) -> None:
        """Drop the connection at once, without flushing (the reader is stuck)."""

    def registerProducer(self, producer, streaming: bool) -> None: ...

    def unregisterProducer(self) -> None: ...


class StallWatch:
    """Calls ``on_stall`` if a consumer stays paused for ``timeout`` seconds.

    A paused consumer costs no memory, but it holds a socket and a file: one
    that accepts nothing for this long while data waits is let go.
    """

    def __init__(self, clock, timeout: float | None, on_stall):
        self._clock = clock
        self._timeout = timeout
        self._on_stall = on_stall
        self._call = None

    def paused(self) -> None:
        if self._timeout and self._call is None:
            self._call = self._clock.callLater(self._timeout, self._fire)

    def resumed(self) -> None:
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None

    cancel = resumed

    def _fire(self) -> None:
        self._call = None
        self._on_stall()


@implementer(IPushProducer)
class StallingPushProducer:
    """IPushProducer for a reader that sends with ``_pump``, ends with ``stop`` and is
    watched by ``_stall`` (a StallWatch): pausing starts the watch, resuming stops it and
    sends what waits."""

    _paused = False
    _stall: StallWatch

    def pauseProducing(self) -> None:
        self._paused = True
        self._stall.paused()

    def resumeProducing(self) -> None:
        self._paused = False
        self._stall.resumed()
        self._pump()

    def stopProducing(self) -> None:
        self.stop()


class Follower(StallingPushProducer):
    """Send ``handle`` from ``offset`` to ``sink``; stop at ``end`` if given, else follow live."""

    def __init__(
        self,
        handle: StreamHandle,
        sink: FollowerSink,
        clock,
        offset: int = 0,
        end: int | None = None,
        stall_timeout: float | None = None,
        resumes=None,
    ):
        self._handle = handle
        self._sink = sink
        self._clock = clock
        self._offset = offset
        self._end = end
        self._live: LiveStream | None = handle.live if end is None else None
        self._paused = False
        self._done = False
        self._scheduled = None
        self._stall = StallWatch(clock, stall_timeout, self._stalled)
        # The store, if followers of an aborted stream should wait for it to resume.
        self._resumes = resumes
        self._resume_call = None

    @property
    def offset(self) -> int:
        """Bytes of the stream sent so far."""
        return self._offset

    @property
    def done(self) -> bool:
        return self._done

    def start(self) -> None:
        self._sink.registerProducer(self, True)
        if self._live is not None:
            if self._live.outcome is not None and self._live.outcome not in DRAINED:
                self._finish(clean=False)
                return
            self._live.subscribe(self)
        self._pump()

    def stop(self) -> None:
        """The consumer went away: release everything, write nothing more."""
        if not self._done:
            self._done = True
            self._release()

    def _stalled(self) -> None:
        log.info("a reader of stream {stream_id} accepted nothing for too long: "
                 "disconnecting it at offset {offset}",
                 stream_id=self._handle.id, offset=self._offset)
        self.stop()
        self._sink.abort()

    # StreamListener

    def stream_grew(self, stream: LiveStream, start: int, parts: list | None,
                    size: int) -> None:
        if self._done or self._paused:
            return
        if parts is not None and self._offset == start and self._scheduled is None:
            # Caught up: hand the fresh bytes over without touching the file. What
            # the consumer does not take now is read from the file when it resumes.
            if size <= PIECE:
                taken = self._sink.write(parts, size)
                self._offset += taken
                return
            for piece, piece_size in pieces(parts, size, PIECE):
                taken = self._sink.write(piece, piece_size)
                self._offset += taken
                if taken < piece_size or self._paused or self._done:
                    return
        else:
            self._pump()

    def listener_failed(self) -> None:
        """Handing this follower bytes raised (logged by the stream): drop its reader."""
        if not self._done:
            self.stop()
            self._sink.abort()

    def stream_ended(self, stream: LiveStream) -> None:
        if self._done:
            return
        if stream.outcome in DRAINED:
            # Everything the producer sent is in the file: drain it, then end.
            self._pump()
        else:
            # Interrupted, replaced or deleted: the data is going away now.
            self._finish(clean=False)

    # internals

    def _limit(self) -> int:
        return self._end if self._end is not None else self._handle.size

    def _pump(self) -> None:
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()
        self._scheduled = None
        budget = TURN_BUDGET
        while not self._paused and not self._done:
            limit = self._limit()
            if self._offset < limit:
                if budget <= 0:
                    self._scheduled = self._clock.callLater(0, self._pump)
                    return
                data = self._handle.read(
                    self._offset, min(READ_SIZE, limit - self._offset)
                )
                if not data:
                    log.error(
                        "stream {stream_id}: data file ends at {offset}, "
                        "before the recorded size {size}",
                        stream_id=self._handle.id,
                        offset=self._offset,
                        size=limit,
                    )
                    self._finish(clean=False)
                    return
                budget -= len(data)
                taken = self._sink.write([data], len(data))
                self._offset += taken
                continue
            if self._live is None:
                self._finish(clean=True)
            elif self._live.outcome == ABORTED and self._may_wait_for_resume():
                self._wait_for_resume()
            elif self._live.outcome is not None:
                # A follower that asked for an offset the stream never reached did not get
                # what it asked for: no clean end.
                clean = self._live.outcome == COMPLETE and self._offset == limit
                self._finish(clean=clean)
            return

    # waiting for an aborted stream to resume

    def _may_wait_for_resume(self) -> bool:
        return bool(self._resumes is not None and self._resumes.resume_window)

    def _wait_for_resume(self) -> None:
        if self._resume_call is not None:
            return
        self._resumes.wait_for_resume(self._handle.id, self)
        self._resume_call = self._clock.callLater(
            self._resumes.resume_window, self._resume_gave_up
        )

    def stream_resumed(self, stream: LiveStream) -> None:
        """The producer came back: carry on with the same offsets, as one stream."""
        self._cancel_resume_wait()
        if self._done:
            return
        self._live = self._handle.live = stream
        stream.subscribe(self)
        self._pump()

    def resume_abandoned(self) -> None:
        """The stream will not resume (deleted, replaced, server stopping)."""
        self._cancel_resume_wait()
        if not self._done:
            self._finish(clean=False)

    def _resume_gave_up(self) -> None:
        self._resume_call = None
        self._resumes.stop_waiting(self._handle.id, self)
        if not self._done:
            self._finish(clean=False)

    def _cancel_resume_wait(self) -> None:
        if self._resume_call is not None:
            if self._resume_call.active():
                self._resume_call.cancel()
            self._resume_call = None
            self._resumes.stop_waiting(self._handle.id, self)

    def _release(self) -> None:
        self._cancel_resume_wait()
        self._stall.cancel()
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()
        self._scheduled = None
        if self._live is not None:
            self._live.unsubscribe(self)
        self._handle.close()

    def _finish(self, clean: bool) -> None:
        self._done = True
        self._release()
        self._sink.unregisterProducer()
        if clean:
            self._sink.end()
        else:
            self._sink.cut()
