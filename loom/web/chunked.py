"""The request-body decoder: bytes in, body parts out. Pure: no I/O, no Twisted.

A producer's body arrives in network reads of any size, cut anywhere: in a
chunk's size line, in its CRLF, in the trailer. ``BodyDecoder`` hands over the
payload of every read at once, as memoryviews into it, and says when the body
has ended and which bytes follow it (the next request's).
"""

from __future__ import annotations

_HEX = frozenset(b"0123456789abcdefABCDEF")
_MAX_SIZE_LINE = 1023  # characters before the CRLF, as twisted.web allows
_MAX_TRAILER = 65536  # bytes of the whole trailer section, as twisted.web allows
# What a chunk extension may hold (RFC 9112 section 7.1.1: tokens, quoted strings, and
# the obs-text bytes), as twisted.web accepts it.
_EXTENSION_CHARS = (
    b"\t !\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[]^_`"
    b"abcdefghijklmnopqrstuvwxyz{|}~" + bytes(range(0x80, 0x100))
)


class MalformedBody(ValueError):
    """The body's chunked framing is broken; no more of it can be decoded."""


class BodyDecoder:
    """Decodes a streaming request body, handing over each network read at once.

    Twisted's decoders copy every chunk out of a bytearray and call back once
    per chunk; this one slices the read with memoryviews (no copy) and calls
    ``on_data`` once per read with all the payload it held, so a read that
    carries many small chunks costs one append and one round of wake-ups.
    ``length`` None means chunked transfer coding, else a Content-Length.
    Malformed chunking raises MalformedBody after the well-formed bytes before
    it were delivered.

    A read of tiny chunks (a producer writing a byte at a time, flat out) is
    decoded at most ``MAX_CHUNKS_PER_TURN`` chunks at a time: the rest is held
    and ``on_backlog`` called, for the channel to stop reading and go on with
    it on the next reactor turn, so that no read holds up everyone else.
    """

    MAX_CHUNKS_PER_TURN = 2048

    def __init__(self, length: int | None, on_data, on_end, on_backlog=None):
        self._remaining = length  # bytes left: of the body, or of the current chunk
        self._chunked = length is None
        self._state = "size" if self._chunked else "data"
        self._held = b""  # bytes not decoded yet: an unfinished line, or a backlog
        self._trailer_size = 0  # bytes of the trailer section so far
        self._on_data = on_data
        self._on_end = on_end
        self._on_backlog = on_backlog

    @property
    def backlog(self) -> bool:
        """Whether decoded-later bytes wait (see ``MAX_CHUNKS_PER_TURN``)."""
        return self._backlog

    _backlog = False

    def dataReceived(self, data: bytes) -> None:
        if self._held:
            data = self._held + data
            self._held = b""
        if not self._chunked:
            self._identity(data)
            return
        parts, error = self._chunks(data)
        if parts:
            self._on_data(parts)
        if error is not None:
            raise MalformedBody(error)
        if self._state == "done":
            self._on_end(self._rest)
        elif self._backlog and self._on_backlog is not None:
            self._on_backlog()

    def _identity(self, data: bytes) -> None:
        if len(data) < self._remaining:
            self._remaining -= len(data)
            self._on_data([data])
            return
        view = memoryview(data)
        body, rest = view[: self._remaining], data[self._remaining :]
        self._remaining = 0
        if body:
            self._on_data([body])
        self._on_end(rest)

    def _chunks(self, data: bytes):
        view = memoryview(data)
        parts, position, end = [], 0, len(data)
        budget = self.MAX_CHUNKS_PER_TURN
        self._backlog = False
        while position < end:
            state = self._state
            if state == "data":
                take = min(self._remaining, end - position)
                parts.append(view[position : position + take])
                position += take
                self._remaining -= take
                if not self._remaining:
                    self._state = "crlf"
            elif state == "crlf":
                if end - position < 2:
                    self._held = data[position:]
                    return parts, None
                if data[position : position + 2] != b"\r\n":
                    return parts, "Chunk did not end with CRLF"
                position += 2
                self._state = "size"
            elif state == "size":
                if not budget and self._on_backlog is not None:
                    self._held = data[position:]
                    self._backlog = True
                    return parts, None
                line_end = data.find(b"\r\n", position, position + _MAX_SIZE_LINE + 2)
                if line_end < 0:
                    if end - position > _MAX_SIZE_LINE + 1:
                        return parts, "Chunk size line too long"
                    self._held = data[position:]
                    return parts, None
                size_text, _, extension = data[position:line_end].partition(b";")
                if not size_text or not _HEX.issuperset(size_text):
                    return parts, "Chunk size is not a hexadecimal number"
                if extension and extension.translate(None, _EXTENSION_CHARS):
                    return parts, "Invalid characters in a chunk extension"
                position = line_end + 2
                self._remaining = int(size_text, 16)
                self._state = "data" if self._remaining else "trailer"
                budget -= 1
            elif state == "trailer":
                line_end = data.find(b"\r\n", position)
                if line_end < 0:
                    if self._trailer_size + end - position > _MAX_TRAILER:
                        return parts, "Trailer too long"
                    self._held = data[position:]
                    return parts, None
                empty = line_end == position
                self._trailer_size += line_end + 2 - position
                if self._trailer_size > _MAX_TRAILER:
                    return parts, "Trailer too long"
                position = line_end + 2
                if empty:
                    self._state = "done"
                    self._rest = data[position:]
                    return parts, None
            else:  # done: the channel takes what follows
                break
        return parts, None
