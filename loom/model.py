"""What a stream is, with no I/O: its states, how it can end, its record, its storage name.

Every layer above speaks in these terms; the store persists them, the web
layer shows them. ``StrEnum`` members compare equal to their text, which is
what the catalog stores and the HTTP headers carry.
"""

from __future__ import annotations

import base64
import json
import secrets
from dataclasses import dataclass
from enum import StrEnum


class State(StrEnum):
    """A stream's state, as stored and as shown in ``X-Stream-State``."""

    LIVE = "live"  # its producer is connected
    COMPLETE = "complete"  # the body ended normally, synced and recorded
    ABORTED = "aborted"  # the producer vanished mid-body, storing failed, or a limit was hit
    INTERRUPTED = "interrupted"  # the server stopped or crashed while it was live
    DAMAGED = "damaged"  # its file lost bytes behind Loom's back


STATES = tuple(state.value for state in State)
# What a producer may continue (POST ?append=true).
RESUMABLE = frozenset({State.ABORTED, State.INTERRUPTED})


class Outcome(StrEnum):
    """How a live stream stopped being live: a stored state, or its data going away."""

    COMPLETE = "complete"
    ABORTED = "aborted"
    INTERRUPTED = "interrupted"
    REPLACED = "replaced"  # its data is gone: followers are cut at once
    DELETED = "deleted"
    TAKEN_OVER = "taken over"  # the stream goes on with another producer


# Outcomes after which followers still read what was stored before ending cleanly or not.
DRAINED = frozenset({Outcome.COMPLETE, Outcome.ABORTED})

INTERRUPTED_REASON = "Loom stopped while the stream was live"


@dataclass(frozen=True)
class StreamRecord:
    """A catalog row. ``metadata`` is the stored JSON text; ``reason`` explains an odd state."""

    id: str
    storage: str
    metadata: str
    state: str
    size: int
    created_ms: int
    finished_ms: int | None = None
    reason: str | None = None


def meta_rows(stream_id: str, metadata_json: str) -> list[tuple[str, str, str]]:
    """The (stream, key, value) rows that index a stream's top-level metadata.

    Values are compared as text: strings as they are, anything else as its
    compact JSON (``2``, ``true``, ``null``, ``[1,2]``).
    """
    try:
        metadata = json.loads(metadata_json)
    except ValueError:
        return []
    if not isinstance(metadata, dict):
        return []
    return [(stream_id, key, meta_text(value)) for key, value in metadata.items()]


def meta_text(value) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def new_storage_name(stream_id: str) -> str:
    """A file name for a new generation of ``stream_id``: never the raw id.

    The id is base32-encoded (so the name is safe on any file system and the
    id can be recovered from an orphaned file), then a random suffix makes
    each replacement a different file.
    """
    encoded = base64.b32encode(stream_id.encode("ascii")).decode("ascii").rstrip("=")
    return f"{encoded.lower()}.{secrets.token_hex(4)}"


def stream_id_of_storage(storage: str) -> str | None:
    """The stream id an (orphaned) storage name was made for, if it decodes."""
    encoded, _, _ = storage.partition(".")
    padded = encoded.upper() + "=" * (-len(encoded) % 8)
    try:
        return base64.b32decode(padded).decode("ascii")
    except (ValueError, UnicodeDecodeError):
        return None


# The names the rest of Loom uses for states and outcomes.
LIVE = State.LIVE
DAMAGED = State.DAMAGED
COMPLETE, ABORTED, INTERRUPTED = Outcome.COMPLETE, Outcome.ABORTED, Outcome.INTERRUPTED
REPLACED, DELETED, TAKEN_OVER = Outcome.REPLACED, Outcome.DELETED, Outcome.TAKEN_OVER
