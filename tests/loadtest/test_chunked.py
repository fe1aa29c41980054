"""The chunked-body decoder on its own: every way a sample body can be split."""

from __future__ import annotations

import itertools

import pytest

from cometd.loadtest.chunked import MAX_LINE, Chunk, ChunkedDecoder, End, FramingError

BIG = bytes(range(256)) * 3
SAMPLE = (b"7\r\nWelcome\r\n"
          b"1c;name=value\r\nts=1700000000.123456;hello  \r\n"
          b"300\r\n" + BIG + b"\r\n"
          b"2\r\n\r\n\r\n"  # a payload that is itself CRLF
          b"0\r\nX-Trailer: yes\r\n\r\n")
EXPECTED = [Chunk(b"Welcome"), Chunk(b"ts=1700000000.123456;hello  "), Chunk(BIG),
            Chunk(b"\r\n"), End()]


class HeadDecoder(ChunkedDecoder):
    __slots__ = ()
    keep = 15


def decode(pieces, decoder_class=ChunkedDecoder) -> list:
    decoder = decoder_class()
    events = []
    for piece in pieces:
        events += decoder.feed(piece)
    assert decoder.ended == (events[-1:] == [End()])
    return events


def splits(data: bytes, cuts: tuple[int, ...]) -> list[bytes]:
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def test_whole_body_at_once():
    assert decode([SAMPLE]) == EXPECTED


def test_every_single_split_and_byte_by_byte():
    for i in range(len(SAMPLE) + 1):
        assert decode(splits(SAMPLE, (i,))) == EXPECTED, i
    assert decode([SAMPLE[i:i + 1] for i in range(len(SAMPLE))]) == EXPECTED


def test_every_pair_of_splits_around_the_framing():
    # All pairs of cuts in the parts that are framing, not the 768 bytes of BIG's middle.
    big_at = SAMPLE.index(BIG)
    points = [i for i in range(len(SAMPLE) + 1) if not big_at + 4 < i < big_at + len(BIG) - 4]
    for a, b in itertools.combinations(points, 2):
        assert decode(splits(SAMPLE, (a, b))) == EXPECTED, (a, b)


def test_keep_holds_only_the_head_of_each_payload():
    want = [Chunk(b"Welcome"), Chunk(b"ts=1700000000.1"), Chunk(BIG[:15]), Chunk(b"\r\n"),
            End()]
    for i in range(len(SAMPLE) + 1):
        assert decode(splits(SAMPLE, (i,)), HeadDecoder) == want, i


def test_events_come_as_soon_as_each_chunk_is_complete():
    decoder = ChunkedDecoder()
    assert decoder.feed(b"3\r\nab") == []
    assert decoder.feed(b"c") == [Chunk(b"abc")]
    assert decoder.feed(b"\r") == []
    assert decoder.feed(b"\n1\r\nd\r\n0\r\n") == [Chunk(b"d")]
    assert not decoder.ended
    assert decoder.feed(b"\r\n") == [End()]
    assert decoder.ended


@pytest.mark.parametrize("body, problem", [
    (b"zz\r\nab\r\n", "bad chunk-size"),
    (b"0x2\r\nab\r\n", "bad chunk-size"),
    (b"+2\r\nab\r\n", "bad chunk-size"),
    (b" 2\r\nab\r\n", "bad chunk-size"),
    (b"\r\nab\r\n", "bad chunk-size"),
    (b"1_0\r\n", "bad chunk-size"),
    (b"2\r\nabc\r\n", "not followed by CRLF"),
    (b"2\r\nab\n\r\n", "not followed by CRLF"),
    (b"2\r\nab\r\n0\r\n\r\nmore", "after the end"),
    (b"1" * (MAX_LINE + 1), "longer than"),
    (b"1\r\na\r\n0\r\n" + b"X" * (MAX_LINE + 1), "longer than"),
])
def test_bad_framing_is_an_error_however_it_is_split(body, problem):
    for i in range(0, len(body) + 1, max(1, len(body) // 40)):
        with pytest.raises(FramingError, match=problem):
            decode(splits(body, (i,)))
    assert issubclass(FramingError, ValueError)
