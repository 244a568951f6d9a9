"""Where streams live: the stream store and the roles it is composed of.

``DiskStore`` keeps a data directory (a SQLite catalog and one file per
stream); ``MemoryStore`` keeps everything in dictionaries, for tests. Both are
a ``StreamStore`` composed of a catalog, a byte log and a live signal (see
loom.store.interfaces and docs/architecture.md).
"""

from loom.model import (
    ABORTED,
    COMPLETE,
    DAMAGED,
    DELETED,
    INTERRUPTED,
    REPLACED,
    TAKEN_OVER,
    StreamRecord,
    new_storage_name,
    stream_id_of_storage,
)
from loom.store.disk import DataDirectory, DiskStore
from loom.store.files import DataFile, FileLog, PartialWrite
from loom.store.interfaces import IByteLog, ICatalog, ILiveSignal, IStreamData, IStreamStore
from loom.store.live import LiveStream, StreamListener
from loom.store.memory import MemoryCatalog, MemoryFile, MemoryLog, MemoryStore
from loom.store.signal import LocalSignal
from loom.store.sqlite import SQLiteCatalog
from loom.store.streams import ENDING_WAIT, TAKEOVER_QUIET, StreamHandle, StreamStore
from loom.store.threads import InlineRunners, Runners, ThreadRunners

__all__ = [
    "ABORTED", "COMPLETE", "DAMAGED", "DELETED", "ENDING_WAIT", "INTERRUPTED", "REPLACED",
    "TAKEN_OVER", "TAKEOVER_QUIET", "DataDirectory", "DataFile", "DiskStore", "FileLog",
    "IByteLog", "ICatalog", "ILiveSignal", "IStreamData", "IStreamStore", "InlineRunners",
    "LiveStream", "LocalSignal", "MemoryCatalog", "MemoryFile", "MemoryLog", "MemoryStore",
    "PartialWrite", "Runners", "SQLiteCatalog", "StreamHandle", "StreamListener", "StreamRecord",
    "StreamStore", "ThreadRunners", "new_storage_name", "stream_id_of_storage",
]
