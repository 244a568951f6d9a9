"""Stream metadata: parsing X-Stream-Metadata into a JSON object Loom can store and echo."""

from __future__ import annotations

import json
import math
from typing import Any

from loom.errors import InvalidMetadata, PayloadTooLarge

MAX_DEPTH = 32


def _refuse_constant(name: str) -> Any:
    raise InvalidMetadata(f"X-Stream-Metadata may not contain {name}: it is not JSON.")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise InvalidMetadata(f"X-Stream-Metadata number {text[:40]} is out of range.")
    return value


def _depth(value: Any) -> int:
    """Nesting depth, computed without recursion."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        pending.extend((child, depth + 1) for child in children)
    return deepest


def parse_metadata(raw: bytes | None, limit: int) -> tuple[dict, str]:
    """Return the metadata object and its canonical ASCII JSON text.

    Missing metadata is an empty object. The text escapes every non-ASCII
    character, so it is always a valid header value; ``limit`` bounds both
    what arrives and that text.
    """
    if raw is None or not raw.strip():
        return {}, "{}"
    if len(raw) > limit:
        raise PayloadTooLarge(
            f"X-Stream-Metadata is {len(raw)} bytes; the limit is {limit} bytes."
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidMetadata("X-Stream-Metadata is not valid UTF-8.")
    try:
        value = json.loads(
            text, parse_constant=_refuse_constant, parse_float=_finite_float
        )
    except RecursionError:
        raise InvalidMetadata("X-Stream-Metadata is nested too deeply.")
    except InvalidMetadata:
        raise
    except ValueError as e:
        # JSONDecodeError, and ValueError for integers too long to convert.
        reason = e.msg if isinstance(e, json.JSONDecodeError) else str(e).split(";")[0]
        raise InvalidMetadata(f"X-Stream-Metadata is not valid JSON: {reason}.")
    if not isinstance(value, dict):
        raise InvalidMetadata("X-Stream-Metadata must be a JSON object.")
    if _depth(value) > MAX_DEPTH:
        raise InvalidMetadata(
            f"X-Stream-Metadata is nested deeper than {MAX_DEPTH} levels."
        )
    try:
        # JSON escapes can spell lone surrogates, which are no Unicode text.
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidMetadata("X-Stream-Metadata holds a lone surrogate (\\ud800-\\udfff): "
                              "it is not Unicode text.") from None
    canonical = json.dumps(value, ensure_ascii=True, separators=(",", ":"))
    if len(canonical) > limit:
        # The limit is on what Loom sends back, where every non-ASCII character
        # is escaped (6 or 12 bytes): what is accepted can always be returned.
        raise PayloadTooLarge(
            f"X-Stream-Metadata is {len(canonical)} bytes once encoded as Loom sends it "
            f"back (non-ASCII characters escaped); the limit is {limit} bytes."
        )
    return value, canonical
