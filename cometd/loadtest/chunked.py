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

A decoder holds three slots (``state``, ``buf``, ``left``): an incomplete
size or trailer line (at most :data:`MAX_LINE` bytes), a lone CR, or the chunk
data so far. With ``keep = N`` (a class attribute: set it in a subclass) only
the first ``N`` bytes of each chunk are kept and the rest is skipped as it
comes: floodtest holds thousands of streams, needs just a payload's head
(``ts=<time>;``) and subclasses the decoder as its per-connection state, so a
stream costs it no more memory than before and a large message none at all.
A :class:`Chunk` is returned as soon as its data is complete; the CRLF after it
is checked when it arrives.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Chunk", "End", "FramingError", "ChunkedDecoder", "MAX_LINE"]

#: Longest size or trailer line accepted (without its CRLF).
MAX_LINE = 16384
_HEX = b"0123456789abcdefABCDEF"
_SIZE, _DATA, _CRLF, _TRAILER, _DONE = range(5)


# Slotted dataclasses, not NamedTuples: half the cost to make, once per message.
@dataclass(slots=True)
class Chunk:
    """One chunk's payload (its first ``keep`` bytes, when the decoder keeps a head)."""

    data: bytes


@dataclass(slots=True)
class End:
    """The last chunk (size 0) and its trailer section: the body is complete."""


class FramingError(ValueError):
    """The bytes are not a chunked body."""


class ChunkedDecoder:
    """Incremental decoder of one chunked body; see the module docstring."""

    __slots__ = ("state", "buf", "left")
    #: Bytes of each payload to keep; None: all of it.
    keep: int | None = None

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start decoding a new body."""
        self.state = _SIZE
        self.buf = b""  # an incomplete line or CR from the previous feed, or chunk data
        self.left = 0  # chunk-data bytes still to come

    @property
    def ended(self) -> bool:
        """True once the last chunk and the trailer section have been read."""
        return self.state == _DONE

    def whole(self, data: bytes) -> bytes | None:
        """The payload (its kept bytes) if *data* is exactly one whole chunk; else None.

        A shortcut for a reader's common case, one chunk per recv: it applies only
        between chunks, to a size line of hex digits alone, and changes no state.
        Anything else (an extension, a bad size, a split or several chunks, the
        last chunk) is for :meth:`feed`, which decides as it always does.
        """
        if self.state != _SIZE or self.buf:
            return None
        nl = data.find(b"\r\n", 0, 18)
        if nl <= 0:
            return None
        size_s = data[:nl]
        if size_s.strip(_HEX):
            return None
        size = int(size_s, 16)
        if not size or len(data) != nl + size + 4 or data[-2:] != b"\r\n":
            return None
        keep = self.keep
        start = nl + 2
        return data[start:start + (size if keep is None or keep > size else keep)]

    def feed(self, data: bytes) -> list[Chunk | End]:
        """Decode *data*, the next body bytes; return the events it completes."""
        # The state lives in locals while the loop runs (floodtest's hot path) and
        # goes back to the slots when the data is used up.
        st, buf, left, keep = self.state, self.buf, self.left, self.keep
        if buf and st != _DATA:
            data = buf + data
            buf = b""
        events: list[Chunk | End] = []
        pos, end = 0, len(data)
        while pos < end:
            if st == _SIZE or st == _TRAILER:
                nl = data.find(b"\r\n", pos)
                if nl < 0:
                    if end - pos > MAX_LINE:
                        raise FramingError(f"line longer than {MAX_LINE} bytes")
                    buf = data[pos:]
                    break
                line = data[pos:nl]
                pos = nl + 2
                if st == _TRAILER:
                    if not line:
                        st = _DONE
                        events.append(End())
                    continue
                size_s = line.split(b";", 1)[0].rstrip(b" \t")
                if not size_s or size_s.strip(_HEX) or len(size_s) > 16:
                    raise FramingError(f"bad chunk-size line {line[:40]!r}")
                left = int(size_s, 16)
                st = _DATA if left else _TRAILER
            elif st == _DATA:
                take = left if left <= end - pos else end - pos
                if keep is None:
                    buf += data[pos:pos + take]
                elif len(buf) < keep:
                    room = keep - len(buf)
                    buf += data[pos:pos + (room if room < take else take)]
                pos += take
                left -= take
                if not left:
                    events.append(Chunk(buf))
                    buf = b""
                    st = _CRLF
            elif st == _CRLF:
                if data[pos:pos + 2] != b"\r\n"[:end - pos]:
                    raise FramingError("chunk data not followed by CRLF")
                if end - pos < 2:
                    buf = data[pos:]
                    break
                pos += 2
                st = _SIZE
            else:
                raise FramingError("bytes after the end of the chunked body")
        self.state, self.buf, self.left = st, buf, left
        return events
