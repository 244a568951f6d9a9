"""The store's contract: the three roles a backend provides, and the stream store itself.

A stream store composes a **catalog** (the records: which streams exist, their
state, size and metadata), a **byte log** (each stream's bytes, appended at an
offset and read back by range) and a **live signal** (which streams are live,
and who waits for them). One node: SQLite, files and an in-process registry
(loom.store.catalog_db, loom.store.files, loom.store.signal). In memory, for tests:
loom.store.memory. A networked backend implements the same three.

Everything a networked backend would have to wait for returns a Deferred;
the disk store answers from its thread pools (inline under test fakes), so
a caller never assumes an answer comes at once. Reading a stream's bytes
stays synchronous: followers read a local file (the stream's own file here,
a spool or mirror in a cluster), by offset, and treat every notification as
a wake-up only. See docs/architecture.md.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class ICatalog(Interface):
    """Stream records: created, ended, reopened, deleted, listed. Every method returns a
    Deferred; a failure to record is a CatalogError (or Unavailable: the catalog is gone)."""

    def open():
        """Make the catalog ready (synchronous, at start-up, before anything is served)."""

    def close():
        """Let go of the catalog (synchronous, after everything stopped)."""

    def get(stream_id):
        """The StreamRecord of ``stream_id``, or None."""

    def add(record, replace):
        """Add ``record``; StreamExists if its id is taken, unless ``replace``: then the old
        record goes in the same step and its storage name is the result (else None)."""

    def finish(record, state, size, finished_ms, reason):
        """Record how the stream of ``record`` ended; False if its id now names another."""

    def reopen(record):
        """An ended stream is live again (resumed); False if its id now names another."""

    def delete(streams, finished_before_ms=None):
        """Delete (id, storage) pairs together; the storages deleted. Each stays noted as a
        pending delete until ``forget_deletes``, so a crash between cannot orphan its bytes.
        With ``finished_before_ms`` (retention) a stream is deleted only if it is still
        finished, and finished before then: one resumed meanwhile stays."""

    def forget_deletes(storages):
        """The bytes of ``storages`` are gone."""

    def expired(before_ms, limit):
        """(id, storage) of up to ``limit`` finished streams that ended before ``before_ms``."""

    def list(state=None, since_ms=None, until_ms=None, meta=(), before=None, limit=100):
        """Records matching every filter, newest first (see loom.web.listing)."""

    def count():
        """How many streams there are."""

    def health():
        """Fire if the catalog can be read and written; fail with Unavailable if not."""

    def mark_clean_shutdown():
        """Everything was recorded: the next start need not compare files with records."""


class IStreamData(Interface):
    """One stream's bytes as a byte log hands them out (``create``, ``reopen``, ``open``):
    shared by the writer and its readers, and let go of by each exactly once."""

    def acquire():
        """Another reference to the same bytes (itself); release each one."""

    def release():
        """Let go of one reference; the last one closes it."""

    def read(offset, size):
        """Up to ``size`` bytes from ``offset`` (synchronous: a local file)."""

    def size():
        """How many bytes there are now."""

    def thd_sync():
        """Put the bytes on stable storage (blocks: run it in the I/O pool)."""


class IByteLog(Interface):
    """The bytes of every stream, by storage name: appended at an offset, read by range."""

    def create(storage):
        """A new, empty log for ``storage`` to append to (Deferred of its file)."""

    def reopen(storage, size):
        """The log of ``storage`` to append to again, cut to ``size`` (Deferred of its file)."""

    def open(storage):
        """The log of ``storage`` to read (its file; synchronous: a local file)."""

    def append(file, offset, parts):
        """Append ``parts`` at ``offset``: None once they are committed, or a Deferred that
        fires when they are, or fails if the log refuses them after all (the stream then
        ends aborted with what was committed before). Raises PartialWrite, saying how many
        bytes got there."""

    def sync(file):
        """Fire once the file's bytes are on stable storage, through its own fsync."""

    def sync_many(files):
        """Sync several files at once (one syncfs); fail if that cannot be relied on."""

    def remove(storages):
        """Delete the bytes of ``storages`` (Deferred)."""

    def health():
        """Raise Unavailable if no data can be stored now (synchronous)."""


class ILiveSignal(Interface):
    """Which streams are live, and the wake-ups around them."""

    def get(stream_id):
        """The LiveStream of ``stream_id`` if it is live, else None."""

    def live_streams():
        """Every LiveStream."""

    def register(stream):
        """``stream`` is live now (created or resumed): tell the observers."""

    def unregister(stream):
        """``stream`` ended."""

    def observe(observer):
        """Call ``observer(live_stream)`` for every stream that goes live from now on."""

    def unobserve(observer):
        """Stop calling ``observer``."""

    def wait_for_resume(stream_id, waiter):
        """Call ``waiter.stream_resumed(stream)`` if the stream resumes (until it stops)."""

    def stop_waiting(stream_id, waiter):
        """``waiter`` waits no more."""

    def resumed(stream):
        """``stream`` is live again: its waiting followers go on with it."""

    def abandon_all():
        """The server is stopping: every waiting follower is told nobody resumes."""

    observer_count = Attribute("How many observers there are.")

    def abandon(stream_id):
        """The stream will not resume (deleted, replaced): ``resume_abandoned()`` to waiters."""


class IStreamStore(Interface):
    """Creates, finds and ends streams: a catalog, a byte log and a live signal, composed."""

    fsync = Attribute("The fsync policy: always, interval or never.")
    max_stream_bytes = Attribute("The largest a stream may grow, or None.")
    resume_window = Attribute("How long followers of an aborted stream wait for it, or None.")
    bytes_in = Attribute("Bytes stored from producers since the start (for /metrics).")
    errors = Attribute("Storage errors by kind, a collections.Counter (for /metrics).")
    on_sync = Attribute("Called with the seconds each sync took (for /metrics), or None.")
    observer_count = Attribute("How many observers of new streams there are (/spy clients).")

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

    def delete(stream_id):
        """Remove a stream, cutting its producer and followers. Deferred."""

    def open(stream_id):
        """A Deferred StreamHandle to read the stream, or StreamNotFound."""

    def list_streams(**filters):
        """Deferred list of records matching ``filters``, live ones as they are now."""

    def stream_count():
        """Deferred number of streams."""

    def check_health():
        """Deferred that fails with Unavailable unless streams can be read and written."""

    def live_streams():
        """The LiveStreams whose producers are connected now."""

    def observe(observer):
        """Call ``observer(live_stream)`` for every stream that goes live from now on."""

    def unobserve(observer):
        """Stop calling ``observer``."""

    def wait_for_resume(stream_id, follower):
        """``follower.stream_resumed(stream)`` if the aborted stream resumes within the
        resume window, else ``follower.resume_abandoned()``."""

    def stop_waiting(stream_id, follower):
        """``follower`` waits no more."""
