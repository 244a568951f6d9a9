"""Stream ids: what a valid one looks like, and how Loom makes new ones."""

from __future__ import annotations

import re
import secrets

from loom.errors import InvalidStreamId

MAX_ID_LENGTH = 128
_VALID = re.compile(r"[A-Za-z0-9._~-]{1,128}\Z")


def validate_id(raw: bytes | str) -> str:
    """Return ``raw`` as a stream id, or raise InvalidStreamId saying why not.

    Ids are 1-128 characters of ``[A-Za-z0-9._~-]`` and do not start with a
    dot, so no id can name a hidden file, a parent directory or a path.
    """
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("ascii")
        except UnicodeDecodeError:
            raise InvalidStreamId("Stream ids are ASCII: letters, digits and ._~-")
    if not raw:
        raise InvalidStreamId("The stream id is empty.")
    if len(raw) > MAX_ID_LENGTH:
        raise InvalidStreamId(
            f"The stream id is {len(raw)} characters long; the limit is {MAX_ID_LENGTH}."
        )
    if not _VALID.match(raw):
        raise InvalidStreamId(
            "Stream ids may only contain letters, digits and the characters ._~-"
        )
    if raw.startswith("."):
        raise InvalidStreamId("Stream ids may not start with a dot.")
    return raw


class IdGenerator:
    """Makes ids like ``loom-01764201234567-k3j5x9qa`` that sort by creation time.

    The millisecond part never goes backwards within a process, even if the
    wall clock does, and the random part keeps ids from different processes
    (or restarts within the same millisecond) apart.
    """

    _ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"

    def __init__(self, clock, choice=secrets.choice):
        self._clock = clock
        self._choice = choice
        self._last_ms = 0

    def __call__(self) -> str:
        now_ms = int(self._clock.seconds() * 1000)
        self._last_ms = max(now_ms, self._last_ms + 1)
        suffix = "".join(self._choice(self._ALPHABET) for _ in range(10))
        return f"loom-{self._last_ms:014d}-{suffix}"
