"""LocalSignal: which streams are live in this process, and who waits for them.

The live signal of one node: a registry of LiveStreams, the observers that
hear of every stream going live (/spy), and the followers of an aborted stream
waiting (``resumeWindow``) for its producer to come back. Per-stream wake-ups
(a stream grew or ended) are the LiveStream's own listeners.
"""

from __future__ import annotations

from typing import Callable

from twisted.logger import Logger
from zope.interface import implementer

from loom.store.interfaces import ILiveSignal
from loom.store.live import LiveStream

log = Logger()


@implementer(ILiveSignal)
class LocalSignal:
    def __init__(self):
        self._live: dict[str, LiveStream] = {}
        self._observers: list[Callable[[LiveStream], None]] = []
        self._resume_waiters: dict[str, list] = {}

    def get(self, stream_id: str) -> LiveStream | None:
        return self._live.get(stream_id)

    def live_streams(self) -> list[LiveStream]:
        return list(self._live.values())

    def register(self, stream: LiveStream) -> None:
        self._live[stream.id] = stream
        for observer in list(self._observers):
            try:
                observer(stream)
            except Exception:
                # One broken observer (a /spy client) must not stop the stream or the others.
                log.failure("an observer of new streams failed; it is dropped")
                self.unobserve(observer)
                _let_go(getattr(observer, "__self__", None))

    def unregister(self, stream: LiveStream) -> None:
        if self._live.get(stream.id) is stream:
            del self._live[stream.id]

    def observe(self, observer: Callable[[LiveStream], None]) -> None:
        self._observers.append(observer)

    def unobserve(self, observer: Callable[[LiveStream], None]) -> None:
        try:
            self._observers.remove(observer)
        except ValueError:
            pass

    @property
    def observer_count(self) -> int:
        return len(self._observers)

    # followers of an aborted stream, waiting for it to resume

    def wait_for_resume(self, stream_id: str, waiter) -> None:
        self._resume_waiters.setdefault(stream_id, []).append(waiter)

    def stop_waiting(self, stream_id: str, waiter) -> None:
        waiters = self._resume_waiters.get(stream_id)
        if waiters and waiter in waiters:
            waiters.remove(waiter)
            if not waiters:
                del self._resume_waiters[stream_id]

    def resumed(self, stream: LiveStream) -> None:
        """``stream`` is live again: its waiting followers go on with it."""
        for waiter in self._resume_waiters.pop(stream.id, []):
            try:
                waiter.stream_resumed(stream)
            except Exception:
                # A broken follower must not fail the resuming producer, nor keep the
                # followers after it from going on.
                log.failure("a follower of resumed stream {stream_id} failed; it is dropped",
                            stream_id=stream.id)
                _let_go(waiter)

    def abandon(self, stream_id: str) -> None:
        for waiter in self._resume_waiters.pop(stream_id, []):
            waiter.resume_abandoned()

    def abandon_all(self) -> None:
        """The server is stopping: nobody resumes anything."""
        for stream_id in list(self._resume_waiters):
            self.abandon(stream_id)

    @property
    def waiting(self) -> dict[str, list]:
        """The followers waiting for each stream to resume (for tests)."""
        return self._resume_waiters


def _let_go(reader) -> None:
    """Tell a reader whose callback raised that it was dropped (``listener_failed``): it
    lets go of its client and its files; a failure doing so is logged too."""
    failed = getattr(reader, "listener_failed", None)
    if failed is None:
        return
    try:
        failed()
    except Exception:
        log.failure("dropping a failed reader failed too")
