"""HTTP/1.1 framing arithmetic for responses and request targets: pure functions."""

from __future__ import annotations

# A fresh chunk goes to every follower of its stream: the small ones are framed
# once and the same bytes handed to each (one send each, no per-follower work).
SHARED_FRAME_LIMIT = 16384
_last_frame: list = [None, b""]


def shared_frame(parts: list, size: int) -> bytes:
    """``parts`` as one HTTP chunk, built once for all the followers given the same list."""
    if _last_frame[0] is not parts:
        _last_frame[0] = parts
        _last_frame[1] = b"%x\r\n%s\r\n" % (size, b"".join(parts))
    return _last_frame[1]


def origin_form(target: bytes) -> bytes:
    """The path and query of a request target: ``http://host/a?b`` is ``/a?b`` (RFC 9112
    says a server must accept the absolute form); any other target is returned as it is."""
    scheme, separator, rest = target.partition(b"://")
    if not separator or scheme.lower() not in (b"http", b"https"):
        return target
    cut = min((index for index in (rest.find(b"/"), rest.find(b"?")) if index >= 0),
              default=len(rest))
    path = rest[cut:]
    return path if path.startswith(b"/") else b"/" + path


def chunk_runs(size: int, owed: int) -> list[tuple[bytes | None, int]]:
    """How ``size`` payload bytes go out in chunked coding when the first ``owed`` of them
    finish a chunk begun earlier, in order: payload ``(None, n)``, and framing
    ``(bytes, size of the chunk it opens)`` (0 for the CRLF that ends a chunk)."""
    runs: list[tuple[bytes | None, int]] = []
    if owed:
        first = min(owed, size)
        runs.append((None, first))
        if first < owed:
            return runs
        runs.append((b"\r\n", 0))
        size -= first
        if not size:
            return runs
    runs += [(b"%x\r\n" % size, size), (None, size), (b"\r\n", 0)]
    return runs


def chunks_sent(size: int, owed: int, sent: int) -> tuple[int, int, bytes]:
    """After ``sent`` bytes of ``chunk_runs(size, owed)`` went out: the payload bytes
    taken, the payload still owed to a chunk that was begun, and the framing bytes
    that were begun but not sent (they must follow before anything else)."""
    taken = 0
    for framing, n in chunk_runs(size, owed):
        if framing is None:
            part = min(sent, n)
            taken, owed, sent = taken + part, owed - part, sent - part
            if part < n:
                break
            continue
        part = min(sent, len(framing))
        sent -= part
        if n:  # a chunk's head
            if not part:
                break  # that chunk was not begun: nothing of it is owed
            owed = n
        if part < len(framing):
            return taken, owed, framing[part:]
    return taken, owed, b""
