"""The store's contract, as zope Interfaces."""

from __future__ import annotations


from twisted.logger import Logger
from zope.interface import Attribute, Interface


log = Logger()


class IStreamStore(Interface):
    """Creates, finds and ends streams. DiskStore and MemoryStore both provide it."""

    fsync = Attribute("The fsync policy: always, interval or never.")

    def start():
        """Open the storage and reconcile it after a crash; call before serving."""

    def stop():
        """Interrupt live streams, sync and close everything. Returns a Deferred."""

    def create(stream_id, metadata_json, force, on_cut, owner):
        """Create a live stream (id None: generate one). Deferred LiveStream.

        A taken id fails with StreamExists unless ``force``, which replaces the
        old stream: its data is deleted and its producer and followers cut.
        ``on_cut(outcome)`` is bound to the stream as its producer in the same
        step; ``owner`` is the token that producer used.
        """

    def resume(stream_id, offset, on_cut, owner):
        """Continue a stream at ``offset`` (its size) for a new producer. Deferred LiveStream."""

    def discard(stream):
        """Remove a stream that holds no byte yet, for a request that proved malformed."""

    def open(stream_id):
        """A StreamHandle to read the stream, or raise StreamNotFound."""

    def live_streams():
        """The LiveStreams whose producers are connected now."""

    def observe(observer):
        """Call ``observer(live_stream)`` for every stream created from now on."""

    def unobserve(observer):
        """Stop calling ``observer``."""

