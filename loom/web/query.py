"""Query strings and numbers from requests: parsed without trusting a byte of them.

Every percent-encoded byte decodes (to bytes: a name or value is decoded as
text only where it is used as text); a parameter Loom reads once may be given
once; numbers are ASCII digits of bounded length, so no client-sent number
reaches ``int()`` unchecked. Everything wrong is a ``BadRequest`` naming it.
"""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

from loom.errors import BadRequest

# The largest offset or size a request may name: what fits a signed 64-bit integer.
MAX_NUMBER = 2**63 - 1
_MAX_DIGITS = len(str(MAX_NUMBER))
_DIGITS = frozenset(b"0123456789")


def parse_query(query: bytes) -> dict[bytes, list[bytes]]:
    """``a=1&b&a=2`` as ``{b"a": [b"1", b"2"], b"b": [b""]}``, every byte percent-decoded.

    Not urllib's parse_qs: on bytes it decodes and re-encodes as ASCII and so
    raises on any non-ASCII byte, and it drops bare flags such as ``?notail``.
    """
    args: dict[bytes, list[bytes]] = {}
    for field in query.split(b"&"):
        if not field:
            continue
        name, _, value = field.partition(b"=")
        args.setdefault(_unquote(name), []).append(_unquote(value))
    return args


def _unquote(text: bytes) -> bytes:
    return unquote_to_bytes(text.replace(b"+", b" "))


def text(name: bytes, value: bytes) -> str:
    """A name or value as text; BadRequest if it is not UTF-8."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(
            f"Query parameter {describe(name)} is not UTF-8 text once percent-decoded."
        ) from None


def describe(name: bytes) -> str:
    """A parameter name fit for an error sentence, whatever bytes it holds."""
    shown = name[:40].decode("utf-8", "replace")
    return "".join(c if c.isprintable() else "?" for c in shown) + ("…" if len(name) > 40 else "")


def single(args: dict[bytes, list[bytes]], name: bytes) -> bytes | None:
    """The one value of ``name``, None if absent; BadRequest if it is given twice."""
    values = args.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise BadRequest(f"Give the query parameter {describe(name)} once, not {len(values)} times.")
    return values[0]


def flag(args: dict[bytes, list[bytes]], name: bytes) -> bool:
    """A flag such as the original ``?notail``: present (bare, true, 1, yes) or false/0/no."""
    value = single(args, name)
    if value is None:
        return False
    value = value.lower()
    if value in (b"", b"true", b"1", b"yes"):
        return True
    if value in (b"false", b"0", b"no"):
        return False
    raise BadRequest(f"Query parameter {describe(name)} takes true or false.")


def strict_flag(args: dict[bytes, list[bytes]], name: bytes) -> bool:
    """A parameter that does something drastic (``force``, ``append``): exactly true or false.

    Anything else (``1``, ``yes``, empty, a bare name) is refused rather than
    guessed at: a replacement of a stream must be asked for in so many words.
    """
    value = single(args, name)
    if value is None or value == b"false":
        return False
    if value == b"true":
        return True
    raise BadRequest(f"Query parameter {describe(name)} takes true or false, "
                     f"written exactly so ({describe(name)}=true).")


def count(value: bytes, what: str) -> int:
    """A non-negative number of ASCII digits, at most MAX_NUMBER; BadRequest naming ``what``."""
    value = value.strip()
    if not value or not _DIGITS.issuperset(value):
        raise BadRequest(f"{what} takes a whole number (0 or more).")
    if len(value) > _MAX_DIGITS or int(value) > MAX_NUMBER:
        raise BadRequest(f"{what} is too large (at most {MAX_NUMBER}).")
    return int(value)


def capped(value: str) -> int:
    """ASCII digits as a number, capped at MAX_NUMBER + 1 however many there are.

    For a Range header: a position beyond any stream is past its end, which
    is an answer (416, or the whole stream), not an error.
    """
    if len(value) > _MAX_DIGITS:
        return MAX_NUMBER + 1
    return min(int(value), MAX_NUMBER + 1)
