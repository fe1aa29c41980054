"""Bulk loading a friends file into the subscription store.

A friends file has one friendship per line, ``A B``: two different ids
separated by white space (blank lines are allowed; ``A A`` is an error, as
nobody subscribes to themselves). By default each line stores both
``A subscribes to B`` and ``B subscribes to A``; ``directed=True`` stores only
the first, as the seed's ``readfriends`` did.

Theory of operation
-------------------
The whole file is checked before anything is written, so a malformed line
stops the load with its line number and *nothing* stored: there is no
half-loaded database to reason about.

Parsing runs in chunks. A chunk made only of canonical integer pairs (the bulk
of real data, and all of ``genfriends`` output) is recognised by one regular
expression and converted with numpy; any other chunk is read line by line in
Python, which also pinpoints errors. Integer pairs are then packed as
``key << 32 | value`` into one uint64 array per keyspace, sorted, de-duplicated
and cut into one set value per key, so LevelDB receives each user's key once,
in sorted order, in large unsynced batches with one sync at the end.
"""

from __future__ import annotations

import os
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from cometd.ids import MAX_INT_ID, InvalidId, encode_key, int_value
from cometd.store import SelfSubscription, SubscriptionStore, check_pair, encode_set

__all__ = ["LoadError", "LoadResult", "load_friends"]

CHUNK_BYTES = 8 << 20
_INT = rb"(?:0|[1-9][0-9]{0,9})"
_INT_LINES = re.compile(rb"(?:" + _INT + rb" " + _INT + rb"\n)*")

#: progress callback: (stage, done, total)
Progress = Callable[[str, int, int], None]


class LoadError(ValueError):
    """A friends file that cannot be loaded; nothing of it was stored."""


@dataclass
class LoadResult:
    """What a load did."""

    #: lines read from the file
    lines: int
    #: subscriptions (subscriber, subscribee pairs) that were not stored before
    stored: int
    #: wall-clock seconds
    seconds: float

    def summary(self) -> str:
        return (
            f"read {self.lines:,} lines, stored {self.stored:,} new subscriptions "
            f"in {self.seconds:.1f} s"
        )


class _Parsed:
    """Pairs read so far: integer pairs as numpy chunks, the rest as strings."""

    def __init__(self) -> None:
        self.int_chunks: list[np.ndarray] = []
        self.other: list[tuple[str, str]] = []
        self.lines = 0


def _read_chunks(path: str) -> Iterator[tuple[bytes, int]]:
    """Yield (chunk of whole lines, bytes consumed so far)."""
    done = 0
    with open(path, "rb") as f:
        tail = b""
        while True:
            block = f.read(CHUNK_BYTES)
            if not block:
                break
            block = tail + block
            cut = block.rfind(b"\n") + 1
            if cut == 0:
                tail = block
                continue
            tail = block[cut:]
            done += cut
            yield block[:cut], done
        if tail:
            yield tail + b"\n", done + len(tail)


def _parse_chunk_fast(chunk: bytes) -> np.ndarray | None:
    """The (n, 2) integer pairs of a chunk of plain integer lines, else None."""
    if _INT_LINES.fullmatch(chunk) is None:
        return None
    numbers = np.array(chunk.split(), dtype=np.int64)
    if numbers.size and numbers.max() > MAX_INT_ID:
        return None
    pairs = numbers.astype(np.uint32).reshape(-1, 2)
    if (pairs[:, 0] == pairs[:, 1]).any():
        return None  # the slow path names the line
    return pairs


def _parse_chunk_slow(chunk: bytes, first_line: int, parsed: _Parsed, path: str) -> None:
    ints: list[int] = []
    for offset, raw in enumerate(chunk.split(b"\n")[:-1]):
        lineno = first_line + offset
        parts = raw.split()
        if not parts:
            continue
        try:
            text = [p.decode("ascii") for p in parts]
        except UnicodeDecodeError:
            raise _bad(path, lineno, raw, "not ASCII") from None
        if len(text) != 2:
            raise _bad(path, lineno, raw, f"expected two ids, found {len(text)}")
        try:
            a, b = check_pair(text[0], text[1])
        except (InvalidId, SelfSubscription) as exc:
            raise _bad(path, lineno, raw, str(exc)) from None
        ia, ib = int_value(a), int_value(b)
        if ia is not None and ib is not None:
            ints += (ia, ib)
        else:
            parsed.other.append((a, b))
    if ints:
        parsed.int_chunks.append(np.array(ints, dtype=np.uint32).reshape(-1, 2))


def _bad(path: str, lineno: int, raw: bytes, reason: str) -> LoadError:
    shown = raw[:120].decode("ascii", "replace")
    return LoadError(
        f"{path}:{lineno}: {reason}: {shown!r}. Nothing was stored: "
        "the whole file is checked before anything is written."
    )


def _parse(path: str, progress: Progress) -> _Parsed:
    total = os.path.getsize(path)
    parsed = _Parsed()
    for chunk, done in _read_chunks(path):
        n_lines = chunk.count(b"\n")
        pairs = _parse_chunk_fast(chunk)
        if pairs is None:
            _parse_chunk_slow(chunk, parsed.lines + 1, parsed, path)
        else:
            parsed.int_chunks.append(pairs)
        parsed.lines += n_lines
        progress("checking", done, total)
    return parsed


def _int_items(
    keys: np.ndarray, values: np.ndarray, stage: str, progress: Progress
) -> Iterator[tuple[bytes, bytes]]:
    """One encoded (key, set value) per distinct key, in key order."""
    packed = (keys.astype(np.uint64) << np.uint64(32)) | values.astype(np.uint64)
    del keys, values
    packed.sort()
    if packed.size:
        packed = packed[np.concatenate(([True], packed[1:] != packed[:-1]))]
    if not packed.size:
        return
    high = (packed >> np.uint64(32)).astype(np.uint32)
    low = (packed & np.uint64(0xFFFFFFFF)).astype("<u4").tobytes()
    del packed
    starts = np.flatnonzero(np.concatenate(([True], high[1:] != high[:-1]))).tolist()
    users = high[starts].tolist() if starts else []
    starts.append(len(high))
    del high
    for i, user in enumerate(users):
        if i % 50_000 == 0:
            progress(stage, i, len(users))
        start, end = starts[i], starts[i + 1]
        yield (
            b"\x01" + user.to_bytes(4, "big"),
            (end - start).to_bytes(4, "little") + low[4 * start : 4 * end],
        )
    progress(stage, len(users), len(users))


def _other_items(groups: dict[str, set[str]]) -> Iterator[tuple[bytes, bytes]]:
    items = []
    for user, ids in groups.items():
        ints = {int_value(i) for i in ids} - {None}
        names = {i for i in ids if int_value(i) is None}
        items.append((encode_key(user), encode_set(ints, names)))  # type: ignore[arg-type]
    items.sort()
    return iter(items)


def load_friends(
    store: SubscriptionStore,
    path: str | os.PathLike[str],
    directed: bool = False,
    progress: Progress | None = None,
) -> LoadResult:
    """Load the friends file at *path* into *store*.

    Raises :class:`LoadError` (nothing stored) for a malformed line and
    ``OSError`` for an unreadable file. Loading the same file twice stores
    nothing the second time.
    """
    progress = progress or (lambda stage, done, total: None)
    path = os.fspath(path)
    started = time.monotonic()
    parsed = _parse(path, progress)

    pairs = (
        np.concatenate(parsed.int_chunks)
        if parsed.int_chunks
        else np.zeros((0, 2), dtype=np.uint32)
    )
    parsed.int_chunks.clear()
    subscriber, subscribee = pairs[:, 0], pairs[:, 1]
    if not directed:
        subscriber, subscribee = (
            np.concatenate((subscriber, subscribee)),
            np.concatenate((subscribee, subscriber)),
        )
    del pairs

    other_forward: dict[str, set[str]] = defaultdict(set)
    other_reverse: dict[str, set[str]] = defaultdict(set)
    for a, b in parsed.other:
        other_forward[a].add(b)
        other_reverse[b].add(a)
        if not directed:
            other_forward[b].add(a)
            other_reverse[a].add(b)

    stored = store.bulk_merge(
        "subscriptions",
        _int_items(subscriber, subscribee, "storing subscriptions", progress),
    )
    stored += store.bulk_merge("subscriptions", _other_items(other_forward))
    store.bulk_merge(
        "subscribers", _int_items(subscribee, subscriber, "storing subscribers", progress)
    )
    store.bulk_merge("subscribers", _other_items(other_reverse))
    store.sync()
    return LoadResult(parsed.lines, stored, time.monotonic() - started)
