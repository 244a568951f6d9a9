"""Where streams live: the stream store and its parts.

``DiskStore`` keeps a data directory (a SQLite catalog and one file per
stream); ``MemoryStore`` keeps everything in dictionaries, for tests. Both
provide ``IStreamStore``. See docs/architecture.md.
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
from loom.store.disk import DiskStore
from loom.store.files import DataFile, PartialWrite
from loom.store.interfaces import IStreamStore
from loom.store.live import LiveStream, StreamListener
from loom.store.memory import MemoryFile, MemoryStore
from loom.store.streams import ENDING_WAIT, TAKEOVER_QUIET, StreamHandle
from loom.store.threads import InlineRunners, Runners, ThreadRunners

__all__ = [
    "ABORTED", "COMPLETE", "DAMAGED", "DELETED", "ENDING_WAIT", "INTERRUPTED", "REPLACED",
    "TAKEN_OVER", "TAKEOVER_QUIET", "DataFile", "DiskStore", "IStreamStore", "InlineRunners",
    "LiveStream", "MemoryFile", "MemoryStore", "PartialWrite", "Runners", "StreamHandle",
    "StreamListener", "StreamRecord", "ThreadRunners", "new_storage_name",
    "stream_id_of_storage",
]
