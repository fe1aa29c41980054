"""A sans-I/O decoder of HTTP/1.1 chunked bodies: bytes in, events out.

``ChunkedDecoder().feed(data)`` takes the body bytes of a chunked response as
they arrive, split anywhere, and returns the events they complete:
:class:`Chunk` for each chunk, then one :class:`End` for the last (zero-size)
chunk. Bad framing raises :class:`FramingError` (a :class:`ValueError`). It
never reads a socket, so floodtest's epoll loop and the tests' blocking
clients share it.

Theory of operation
-------------------
The decoder is a small state machine over the body grammar (RFC 9112 §7.1)::

    chunk-size [ ";" ext ] CRLF  chunk-data CRLF  ...  "0" [ ";" ext ] CRLF  *trailer CRLF

Only an incomplete size (or trailer) line, at most :data:`MAX_LINE` bytes, or
one incomplete CRLF is kept between calls; chunk data is sliced out of each
``feed`` as it comes. With ``keep=N`` only the first ``N`` bytes of each chunk
are kept (``Chunk.size`` is still the whole size): floodtest holds thousands
of streams and needs just a payload's head (``ts=<time>;``), so a large
message costs it no memory.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["Chunk", "End", "FramingError", "ChunkedDecoder", "MAX_LINE"]

#: Longest size or trailer line accepted (without its CRLF).
MAX_LINE = 16384
_HEX = b"0123456789abcdefABCDEF"
_SIZE, _DATA, _CRLF, _TRAILER, _DONE = range(5)


class Chunk(NamedTuple):
    """One chunk: its payload (or the first ``keep`` bytes of it) and its size."""

    data: bytes
    size: int


class End(NamedTuple):
    """The last chunk (size 0) and its trailer section: the body is complete."""


class FramingError(ValueError):
    """The bytes are not a chunked body."""


class ChunkedDecoder:
    """Incremental decoder of one chunked body; see the module docstring."""

    __slots__ = ("_state", "_buf", "_left", "_want", "_parts", "_size", "_keep")

    def __init__(self, keep: int | None = None) -> None:
        self._state = _SIZE
        self._buf = b""  # an incomplete line or CRLF, from the previous feed
        self._left = 0  # chunk-data bytes still to come
        self._want = 0  # of those, how many are still to be kept
        self._parts: list[bytes] = []
        self._size = 0
        self._keep = keep

    @property
    def ended(self) -> bool:
        """True once the last chunk and the trailer section have been read."""
        return self._state == _DONE

    def feed(self, data: bytes) -> list[Chunk | End]:
        """Decode *data*, the next body bytes; return the events it completes."""
        if self._buf:
            data = self._buf + data
            self._buf = b""
        events: list[Chunk | End] = []
        pos, end = 0, len(data)
        while pos < end:
            st = self._state
            if st == _DATA:
                take = self._left if self._left <= end - pos else end - pos
                want = self._want
                if want:
                    self._parts.append(data[pos:pos + (want if want < take else take)])
                    self._want = want - take if want > take else 0
                pos += take
                self._left -= take
                if not self._left:
                    self._state = _CRLF
            elif st == _CRLF:
                if end - pos < 2:
                    if data[pos:] != b"\r":
                        raise FramingError(f"chunk of {self._size} bytes not followed by CRLF")
                    self._buf = data[pos:]
                    return events
                if data[pos:pos + 2] != b"\r\n":
                    raise FramingError(f"chunk of {self._size} bytes not followed by CRLF")
                pos += 2
                parts = self._parts
                events.append(Chunk(parts[0] if len(parts) == 1 else b"".join(parts),
                                    self._size))
                self._parts = []
                self._state = _SIZE
            elif st == _DONE:
                raise FramingError("bytes after the end of the chunked body")
            else:  # _SIZE or _TRAILER: a line
                nl = data.find(b"\r\n", pos)
                if nl < 0:
                    if end - pos > MAX_LINE:
                        raise FramingError(f"line longer than {MAX_LINE} bytes")
                    self._buf = data[pos:]
                    return events
                line = data[pos:nl]
                pos = nl + 2
                if st == _TRAILER:
                    if not line:
                        self._state = _DONE
                        events.append(End())
                    continue
                size_s = line.split(b";", 1)[0].rstrip(b" \t")
                if not size_s or size_s.strip(_HEX) or len(size_s) > 16:
                    raise FramingError(f"bad chunk-size line {line[:40]!r}")
                size = int(size_s, 16)
                if not size:
                    self._state = _TRAILER
                    continue
                keep = self._keep
                self._size = self._left = size
                self._want = size if keep is None or size < keep else keep
                self._state = _DATA
        return events
