"""Standard input as loom-stream's request body: read whether or not a connection takes
it, the last bytes kept to resend after a dropped connection, optionally copied to
standard output (--tee)."""

from __future__ import annotations

import collections
import os
import select
from typing import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

@implementer(IBodyProducer, IPushProducer)
class StdinBody:
    """The request body fed from standard input, chunk by chunk as it is read.

    Standard input is read whether or not a connection takes the data, so
    the command feeding it never waits on the server: at most the last
    ``keep`` bytes read are held, to resend after a dropped connection from
    the offset the server holds (``restart_at``). Only while a connection is
    up but cannot take data as fast as it comes, and ``keep`` bytes wait to
    be sent, does reading pause (flow control, never a dropped byte). With
    no connection, the oldest bytes go first: if some were never sent, the
    stream cannot be completed (``kept_from > position``). ``drain()``
    gives up on sending: the input is still read to its end, and only teed.
    """

    length = UNKNOWN_LENGTH

    def __init__(self, keep: int, tee: Callable[[bytes], None] | None = None):
        self.stdio = None
        self._tee = tee
        self._keep = keep
        self._sent: collections.deque[tuple[int, bytes]] = collections.deque()
        self._unsent: collections.deque[tuple[int, bytes]] = collections.deque()
        self._unsent_bytes = 0
        self.read_total = 0  # bytes read from standard input so far
        self.position = 0  # the offset of the next byte to send
        self._consumer = None
        self._paused = False  # the connection takes no data for now
        self._finished: Deferred | None = None
        self._ended = False
        self._draining = False
        self._reading = True
        self.input_ended: Deferred = Deferred()  # fires at the end of the input

    @property
    def ended(self) -> bool:
        return self._ended

    @property
    def kept_from(self) -> int:
        """The first offset still held (resendable)."""
        for held in (self._sent, self._unsent):
            if held:
                return held[0][0]
        return self.read_total

    def kept(self, start: int, end: int) -> bytes:
        """The input from ``start`` to ``end``, which must still be held."""
        pieces = []
        for offset, data in (*self._sent, *self._unsent):
            if offset + len(data) > start and offset < end:
                pieces.append(data[max(start - offset, 0) : end - offset])
        return b"".join(pieces)

    # the body of a request

    def startProducing(self, consumer) -> Deferred:
        self._consumer = consumer
        self._paused = False
        self._finished = Deferred()
        self._send_pending()
        self._update_reading()
        return self._finished

    def pauseProducing(self) -> None:
        self._paused = True
        self._update_reading()

    def resumeProducing(self) -> None:
        self._paused = False
        self._send_pending()
        self._trim()
        self._update_reading()

    def stopProducing(self) -> None:
        """The connection is gone: keep reading, and hold what is read for the next one."""
        self._consumer = None
        self._paused = False
        self._trim()
        self._update_reading()

    def restart_at(self, offset: int) -> bool:
        """Send from ``offset`` on the next connection; False if those bytes are gone."""
        if self._draining or not self.kept_from <= offset <= self.position:
            return False
        while self._sent and self._sent[-1][0] + len(self._sent[-1][1]) > offset:
            start, data = self._sent.pop()
            if start < offset:
                self._sent.append((start, data[: offset - start]))
                start, data = offset, data[offset - start :]
            self._unsent.appendleft((start, data))
            self._unsent_bytes += len(data)
        self.position = offset
        return True

    # standard input

    def received(self, data: bytes) -> None:
        if self._tee is not None:
            self._tee(data)
        if self._ended:
            return
        self.read_total += len(data)
        if self._draining:
            return
        self._unsent.append((self.read_total - len(data), data))
        self._unsent_bytes += len(data)
        self._send_pending()
        self._trim()
        self._update_reading()

    def end(self) -> None:
        """No more input (end of file, or Ctrl-C): finish the body cleanly."""
        if self._ended:
            return
        self._ended = True
        self._update_reading()
        self._maybe_finish()
        self.input_ended.callback(self.read_total)

    def drain(self) -> None:
        """Send nothing more: read the input to its end all the same, holding none of it."""
        self._draining = True
        self._sent.clear()
        self._unsent.clear()
        self._unsent_bytes = 0
        self._update_reading()

    def _send_pending(self) -> None:
        while self._unsent and self._consumer is not None and not self._paused:
            start, data = self._unsent[0]
            if start != self.position:
                return  # a gap: bytes that were never sent are gone
            self._unsent.popleft()
            self._unsent_bytes -= len(data)
            self._sent.append((start, data))
            self.position = start + len(data)
            self._consumer.write(data)  # may pause us at once
        self._maybe_finish()

    def _trim(self) -> None:
        limit = self.read_total - self._keep
        _drop_before(self._sent, limit)
        if self._consumer is None:
            # Nothing takes data: rather than make the input wait, let its oldest go.
            self._unsent_bytes -= _drop_before(self._unsent, limit)

    def _update_reading(self) -> None:
        backed_up = (self._consumer is not None and self._paused
                     and self._unsent_bytes >= self._keep and not self._draining)
        reading = not self._ended and not backed_up
        if reading != self._reading and self.stdio is not None:
            if reading:
                self.stdio.resumeProducing()
            else:
                self.stdio.pauseProducing()
        self._reading = reading

    def _maybe_finish(self) -> None:
        if (self._ended and self._consumer is not None and self.position == self.read_total
                and self._finished is not None and not self._finished.called):
            self._finished.callback(None)


def _drop_before(held: collections.deque[tuple[int, bytes]], limit: int) -> int:
    """Drop the bytes before offset ``limit`` from ``held``; how many were dropped."""
    dropped = 0
    while held and held[0][0] < limit:
        start, data = held.popleft()
        if start + len(data) > limit:
            held.appendleft((limit, data[limit - start :]))
            dropped += limit - start
            break
        dropped += len(data)
    return dropped


@implementer(IHalfCloseableProtocol)
class StdinReader(Protocol):
    """Standard input, read without blocking the reactor (never FileBodyProducer(sys.stdin))."""

    def __init__(self, body: StdinBody):
        self._body = body

    def dataReceived(self, data: bytes) -> None:
        self._body.received(data)

    def readConnectionLost(self) -> None:
        self._body.end()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason=None) -> None:
        self._body.end()


class Tee:
    """Copies the input to standard output with plain blocking writes, as ``tee`` does.

    Standard output is often shared with the build's own output (a terminal,
    a CI log); making it non-blocking, as a reactor's writer would, could make
    the build's writes fail with EAGAIN. If standard output goes away, the
    copy stops and the stream goes on.
    """

    def __init__(self, fd: int = 1):
        self._fd = fd
        self.broken = False

    def __call__(self, data: bytes) -> None:
        view = memoryview(data)
        while view and not self.broken:
            try:
                view = view[os.write(self._fd, view):]
            except BlockingIOError:  # someone else made it non-blocking
                select.select([], [self._fd], [])
            except OSError:  # EPIPE and the like: nobody reads it any more
                self.broken = True
