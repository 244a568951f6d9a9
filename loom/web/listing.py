"""GET /streams: find streams by state, time and metadata, newest first, a page at a time."""

from __future__ import annotations

import base64
import json
import re
import time
from datetime import datetime

from loom.model import STATES, StreamRecord
from loom.errors import BadRequest, InvalidStreamId
from loom.ids import validate_id
from loom.web.query import describe as describe_name
from loom.web.query import single, text

DEFAULT_LIMIT, MAX_LIMIT = 100, 1000


def iso(ms: int | None) -> str | None:
    """Milliseconds since the epoch as ISO 8601 UTC (``2026-11-26T19:00:30.123Z``)."""
    if ms is None:
        return None
    seconds, millis = divmod(ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


# Times beyond this (in ms since the epoch) fit no SQLite integer: year 9999 is far enough.
MAX_MS = 253402300800000


def parse_time(name: str, text: str) -> int:
    """An ISO 8601 time (a zone is required, or Z) or seconds since the epoch, as ms."""
    ms = None
    if re.fullmatch(r"\d{1,15}(\.\d{1,9})?", text, re.ASCII):
        ms = int(float(text) * 1000)
    elif len(text) <= 64:
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            moment = None
        if moment is not None and moment.tzinfo is not None:
            ms = int(moment.timestamp() * 1000)
    if ms is None or not 0 <= ms <= MAX_MS:
        raise BadRequest(
            f"{name} takes a time like 2026-11-26T19:00:00Z or seconds since the epoch."
        )
    return ms


def encode_cursor(record: StreamRecord) -> str:
    raw = json.dumps([record.created_ms, record.id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


# A cursor Loom gives out holds a time and an id: never longer than this.
_MAX_CURSOR = 256


def decode_cursor(text: str) -> tuple[int, str]:
    if len(text) <= _MAX_CURSOR:
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            created_ms, stream_id = json.loads(raw)
            if (type(created_ms) is int and 0 <= created_ms <= MAX_MS
                    and isinstance(stream_id, str)):
                return created_ms, validate_id(stream_id)
        except (ValueError, TypeError, UnicodeDecodeError, RecursionError, InvalidStreamId):
            pass
    raise BadRequest("The cursor is not one Loom gave out.")


MAX_META_FILTERS = 20
_PARAMETERS = "state, since, until, meta.<key>, limit, cursor"


def filters_from(args: dict[bytes, list[bytes]]) -> dict:
    """The listing filters of a query string; BadRequest names anything wrong."""
    filters: dict = {"meta": []}
    for raw_name, values in args.items():
        name = text(raw_name, raw_name)
        if name.startswith("meta.") and len(name) > 5:
            for value in values:
                filters["meta"].append((name[5:], text(raw_name, value)))
            if len(filters["meta"]) > MAX_META_FILTERS:
                raise BadRequest(f"A listing takes at most {MAX_META_FILTERS} metadata filters.")
            continue
        if name not in ("state", "since", "until", "limit", "cursor"):
            raise BadRequest(f"Unknown parameter {describe_name(raw_name)}: use {_PARAMETERS}.")
        value = text(raw_name, single(args, raw_name))
        if name == "state":
            if value not in STATES:
                raise BadRequest(f"state is one of {', '.join(STATES)}.")
            filters["state"] = value
        elif name == "since":
            filters["since_ms"] = parse_time("since", value)
        elif name == "until":
            filters["until_ms"] = parse_time("until", value)
        elif name == "limit":
            if not re.fullmatch(r"\d{1,4}", value, re.ASCII) or not 1 <= int(value) <= MAX_LIMIT:
                raise BadRequest(f"limit is a whole number from 1 to {MAX_LIMIT}.")
            filters["limit"] = int(value)
        else:
            filters["before"] = decode_cursor(value)
    filters["meta"] = tuple(filters["meta"])
    filters.setdefault("limit", DEFAULT_LIMIT)
    return filters


def describe(record: StreamRecord) -> str:
    """A stream as the listing shows it: a JSON object, as text.

    Written out directly rather than built as a dict and encoded: a page of a
    thousand streams is rendered on the reactor thread, and this way costs
    about a third as much. The metadata is spliced in as stored: the
    canonical ASCII JSON object ``parse_metadata`` made of it.
    """
    reason = f', "reason": {_string(record.reason)}' if record.reason else ""
    metadata = record.metadata
    if not metadata.isascii():  # (not written by this Loom: made canonical here)
        metadata = json.dumps(json.loads(metadata), separators=(",", ":"))
    return (f'{{"id": {_string(record.id)}, "state": "{record.state}", "size": {record.size}, '
            f'"created": {_time(record.created_ms)}, "finished": {_time(record.finished_ms)}, '
            f'"metadata": {metadata}{reason}}}')


_string = json.JSONEncoder(ensure_ascii=True).encode


def _time(ms: int | None) -> str:
    return "null" if ms is None else f'"{iso(ms)}"'


async def page(store, filters: dict) -> bytes:
    """One page of the listing (``filters`` from filters_from), as a JSON document:
    ``{"streams": [...], "next": cursor or null}``."""
    limit = filters["limit"]
    # One more than asked tells whether there is a next page.
    records = await store.list_streams(**{**filters, "limit": limit + 1})
    shown = records[:limit]
    after = f'"{encode_cursor(shown[-1])}"' if len(records) > limit else "null"
    streams = ", ".join(map(describe, shown))
    return f'{{"streams": [{streams}], "next": {after}}}\n'.encode("ascii")
