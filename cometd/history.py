"""Message ids and the persistent history that lets a stream resume from one.

Every routed message gets an id where it is routed (the single-process
server, or the router when scaled out). An id is ``<epoch>-<seq>``: the epoch
counts the openings of the database (incremented and synced at each one), the
sequence counts the messages routed since, so an id from before a restart is
never reissued, even after a kill -9. Ids compare as ``(epoch, seq)``; inside
the server one is the integer ``epoch << 64 | seq`` (a *key*), and in LevelDB
its 12 big-endian bytes, so keys sort by id.

Each subject's recent messages are kept in the subscription database, so a
client that missed some can ask for everything after the last id it saw
(:meth:`History.replay`) and learn whether that is provably all of it.

Theory of operation
-------------------
Keyspaces (beside the store's ``r`` and ``f``)::

    h <len><subject key> <id>  -> body            one subject's messages, in id order
    T <id>                     -> <time f64>      when the messages from this id on were kept
    k <subject key>            -> <id>            the newest id trimmed from a subject's history
    m:epoch, m:history-epoch, m:history-floor     see below
    i...                       -> <id>            an entry routed, not acked (cometd.ingest)

A message is one ``h`` put, written in the same loop turn that gives it its
id, so at any moment every id handed out is in the history. A batch of
messages (:meth:`History.record_batch`, ``POST /publish``, one ingest read)
gets consecutive ids and goes in one write. A message's time is not kept
with it: a ``T`` stamp is written with the first message kept a second or
more after the last stamp, so a message was kept within a second after the
newest stamp at or below its id (its *stamp*), and there is at most one
``T`` a second of history. (Before, every message also had a ``t <id>`` ->
``<time><size><subject key>`` record, a second put each: such a database is
rewritten to stamps when it is opened, see :meth:`History._migrate`.)
Writes are **not synced**: LevelDB hands each one to the operating system at
once, so the history survives a kill -9 of the server, but not a power loss
or a kernel crash (the last writes may be gone; the subscriptions, which are
synced, are not). A sync per message would cost a disk flush (~ms) per send.

Three bounds trim it, and each trim is remembered, so a replay knows when it
is not complete:

- ``size`` messages per subject (trimmed once a subject holds a few more,
  so the cost is one short scan per few sends); the subject's ``k`` mark is
  the newest id removed;
- ``ttl`` seconds (a message goes once its stamp is ``ttl`` + 1 seconds
  old: never early, at most a second late), and ``max_bytes`` of bodies in
  all: the oldest messages of all subjects go first, and the
  ``m:history-floor`` is the newest id removed that way. The floor also
  starts at the first id of an epoch whose previous epoch kept no history
  (``--history-size 0``, or a database from before there was a history):
  ``m:history-epoch`` is the last epoch that kept one.

The oldest messages of all subjects are found by merging the subjects'
histories: in memory, each subject with history has its message count and
its oldest id, and a heap holds ``(oldest id, subject key)`` (an entry whose
id is no longer its subject's oldest is stale, and skipped when it comes
up). A trim by age takes every message below the first id whose stamp is
not due; a trim by size takes the heap's oldest subject's messages while
they are the oldest of all. Each subject's first message found is one
LevelDB seek; the messages after it are read in order.

The history of subject S reaches back to id X when X >= the floor and X >= S's
mark: every message of S after X is still there. The counts, oldest ids,
marks and total size are read from ``h`` and ``k`` at open (a scan of the
history, bounded by ``max_bytes``).

A replay for a user reads, for the user and each subject it subscribes to
that has messages kept (the counts say which, with no read), that subject's
messages after X (one range scan each), merges them by id and
keeps the newest ``limit``. It also returns the newest id handed out when it
was read (*head*): the caller drops a live message with an id up to *head*,
since it was either replayed or is one the replay says it lost.
"""

from __future__ import annotations

import heapq
import re
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import plyvel

from cometd.ids import encode_key

__all__ = ["History", "Replay", "format_id", "format_ids", "parse_id", "id_bytes", "SEQ_BITS"]

SEQ_BITS = 64
_SEQ_MASK = (1 << SEQ_BITS) - 1
_ID = re.compile(r"([0-9]{1,10})-([0-9]{1,20})\Z")
_STAMP = struct.Struct(">d")
_OLD_T_VALUE = struct.Struct(">dI")

HISTORY = b"h"
STAMPS = b"T"
#: the layout before stamps: t <id> -> <time f64><size u32><subject key>, one a message
OLD_TIMELINE = b"t"
MARKS = b"k"
EPOCH_KEY = b"m:epoch"
HISTORY_EPOCH_KEY = b"m:history-epoch"
FLOOR_KEY = b"m:history-floor"
#: subjects whose encoded key and history prefix a History keeps (a few MB at most)
SUBJECT_KEYS = 16_384
#: seconds between two stamps at least: a message's time is known to within this
STAMP_SECONDS = 1.0
_LAST_ID = b"\xff" * 12  # above every id's bytes


def format_id(key: int) -> str:
    """The id string (``epoch-seq``) of a key."""
    return f"{key >> SEQ_BITS}-{key & _SEQ_MASK}"


def format_ids(first: int, count: int) -> list[str]:
    """The id strings of the *count* consecutive keys from *first* (one batch's)."""
    # One epoch: 2**64 messages are never routed in one opening of the database.
    epoch, seq = f"{first >> SEQ_BITS}-", first & _SEQ_MASK
    return [epoch + str(n) for n in range(seq, seq + count)]


def parse_id(text: str) -> int | None:
    """The key of an id string, or None when *text* is not one."""
    match = _ID.match(text)
    if match is None:
        return None
    epoch, seq = int(match.group(1)), int(match.group(2))
    if epoch >= 1 << 32 or seq > _SEQ_MASK:
        return None
    return epoch << SEQ_BITS | seq


def id_bytes(key: int) -> bytes:
    """A key as 12 big-endian bytes (epoch u32, seq u64): they sort as ids do."""
    return key.to_bytes(12, "big")


def _range(db: plyvel.DB, prefix: bytes, first: int):
    """The ``(key, value)`` pairs of one subject's history (*prefix*) from key *first* on."""
    return db.iterator(start=prefix + id_bytes(first), stop=prefix + _LAST_ID)


def _prefix(subject_key: bytes) -> bytes:
    # A length byte, so one name's messages never run into a longer name's.
    return HISTORY + bytes((len(subject_key),)) + subject_key


class Replay(NamedTuple):
    """What a resuming stream is sent, and whether that is provably all it missed."""

    #: (key, subject, body), oldest first
    messages: list[tuple[int, str, bytes]]
    recovered: bool
    #: why not recovered ("" when it is)
    reason: str
    #: the newest key handed out when the history was read
    head: int


class History:
    """Ids and per-subject history in the plyvel database *db* (the store's).

    *size* 0 keeps no history; ids are handed out all the same.
    """

    def __init__(self, db: plyvel.DB, size: int = 100, ttl: float = 3600.0,
                 max_bytes: int = 64 * 1024 * 1024,
                 clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self.size = size
        self.ttl = ttl
        self.max_bytes = max_bytes
        self._clock = clock
        stored = db.get(EPOCH_KEY)
        #: this opening's epoch: every id it hands out starts with it
        self.epoch = (int(stored) if stored else 0) + 1
        if self.epoch >= 1 << 32:  # pragma: no cover - four billion restarts
            raise OverflowError("message id epochs exhausted")
        db.put(EPOCH_KEY, b"%d" % self.epoch, sync=True)
        self._last = self.epoch << SEQ_BITS  # the newest key handed out
        #: subject key -> messages kept
        self._counts: dict[bytes, int] = {}
        #: subject key -> its oldest key kept, and the heap of them (see the module docstring)
        self._firsts: dict[bytes, int] = {}
        self._heap: list[tuple[int, bytes]] = []
        # subject -> (its key, its h prefix): encoding one cost ~0.5 µs a message
        self._subject_keys: dict[str, tuple[bytes, bytes]] = {}
        self._marks: dict[bytes, int] = {}
        self._bytes = 0
        self._oldest = 0.0  # the oldest stamp kept (0: none)
        self._stamp = 0.0  # the newest stamp written
        self.floor = 0
        if size:
            self._load()

    # -- opening -------------------------------------------------------------

    def _load(self) -> None:
        db = self._db
        kept = db.get(HISTORY_EPOCH_KEY)
        floor = db.get(FLOOR_KEY)
        self.floor = int.from_bytes(floor, "big") if floor else 0
        if kept is None or int(kept) != self.epoch - 1:
            # The previous epoch kept nothing: its ids cannot be replayed.
            self.floor = self.epoch << SEQ_BITS
        with db.write_batch(sync=True) as batch:
            batch.put(HISTORY_EPOCH_KEY, b"%d" % self.epoch)
            batch.put(FLOOR_KEY, id_bytes(self.floor))
        self._migrate()
        counts, firsts = self._counts, self._firsts
        for hkey, body in db.iterator(prefix=HISTORY):
            end = 2 + hkey[1]  # h, the length byte, the subject key
            skey = hkey[2:end]
            count = counts.get(skey)
            if count is None:  # a subject's first key is its oldest: keys sort by id
                counts[skey] = 1
                firsts[skey] = int.from_bytes(hkey[end:], "big")
            else:
                counts[skey] = count + 1
            self._bytes += len(body)
        self._heap = [(key, skey) for skey, key in firsts.items()]
        heapq.heapify(self._heap)
        for value in db.iterator(prefix=STAMPS, include_key=False):
            self._oldest = _STAMP.unpack(value)[0] if counts else 0.0
            break
        for key, value in db.iterator(prefix=MARKS):
            mark = int.from_bytes(value, "big")
            if mark > self.floor:
                self._marks[key[1:]] = mark
        self._trim_oldest()

    def _migrate(self) -> None:
        """Rewrite the per-message ``t`` records of the layout before stamps as stamps.

        One synced write: the ``t`` records go and a stamp is written where
        their times moved on by :data:`STAMP_SECONDS` (each message keeps its
        time to within that), so a crash leaves one layout or the other.
        """
        db = self._db
        last = None
        with db.write_batch(sync=True) as batch:
            for tkey, value in db.iterator(prefix=OLD_TIMELINE):
                when = _OLD_T_VALUE.unpack_from(value)[0]
                if last is None or when - last >= STAMP_SECONDS:
                    batch.put(STAMPS + tkey[1:], _STAMP.pack(when))
                    last = when
                batch.delete(tkey)

    # -- publishing ----------------------------------------------------------

    @property
    def last(self) -> int:
        """The newest key handed out."""
        return self._last

    def record(self, subject: str, body: bytes, mark: bytes | None = None) -> int:
        """Give a message of *subject* the next id, keep it; return its key.

        *mark*, if given, is a key written with the message, in the same
        batch, holding its id (:mod:`cometd.ingest` marks a stream entry routed).
        """
        return self.record_batch(((subject, body),), (mark,))[0]

    def record_batch(self, messages: Sequence[tuple[str, bytes]],
                     marks: Sequence[bytes | None] | None = None) -> list[int]:
        """Give each ``(subject, body)`` the next id, in order; keep them all.

        *marks*, if given, has one key or None per message (see :meth:`record`).
        All the messages and their marks go in **one** LevelDB write, so a
        kill -9 keeps the whole batch or (before the write) none of it.
        Trimming a subject over its bound is a second write: lost in a crash,
        it leaves a few messages more, trimmed by the next record.
        """
        first = self._last + 1
        self._last += len(messages)
        keys = list(range(first, self._last + 1))
        if not self.size:
            if marks is not None and any(mark is not None for mark in marks):
                with self._db.write_batch() as batch:
                    for key, mark in zip(keys, marks, strict=True):
                        if mark is not None:
                            batch.put(mark, id_bytes(key))
            return keys
        now = self._clock()
        added: dict[bytes, list[int]] = {}  # subject key -> [its first key here, messages]
        known = self._subject_keys
        total = 0
        with self._db.write_batch() as batch:
            put = batch.put  # the loop runs per message: no lookups it can skip
            if now - self._stamp >= STAMP_SECONDS:
                put(STAMPS + first.to_bytes(12, "big"), _STAMP.pack(now))
                self._stamp = now
            if not self._oldest:
                self._oldest = self._stamp  # this batch's, the only one kept
            for key, (subject, body) in zip(keys, messages, strict=True):
                keyed = known.get(subject)
                if keyed is None:
                    if len(known) >= SUBJECT_KEYS:
                        known.clear()
                    skey = encode_key(subject)
                    keyed = known[subject] = (skey, _prefix(skey))
                skey, prefix = keyed
                put(prefix + key.to_bytes(12, "big"), body)
                got = added.get(skey)
                if got is None:
                    added[skey] = [key, 1]
                else:
                    got[1] += 1
                total += len(body)
            if marks is not None:
                for key, mark in zip(keys, marks, strict=True):
                    if mark is not None:
                        put(mark, id_bytes(key))
        self._bytes += total
        counts, firsts, bound = self._counts, self._firsts, self.size + max(4, self.size // 4)
        over = []
        for skey, (key, n) in added.items():
            count = counts.get(skey)
            if count is None:
                count = 0
                firsts[skey] = key
                self._push(key, skey)
            counts[skey] = count = count + n
            if count > bound:
                over.append(skey)
        if over:
            with self._db.write_batch() as batch:
                for skey in over:
                    counts[skey] -= self._trim_subject(batch, skey, counts[skey] - self.size)
        if self._bytes > self.max_bytes or now - self._oldest > self.ttl + STAMP_SECONDS:
            self._trim_oldest()
        return keys

    def _trim_subject(self, batch, skey: bytes, excess: int) -> int:
        """Delete the oldest *excess* messages of one subject; how many it deleted."""
        prefix = _prefix(skey)
        mark = 0
        removed = 0
        # From its oldest, not the prefix: past the tombstones of its earlier trims.
        for hkey, body in _range(self._db, prefix, self._firsts.get(skey, 0)):
            idb = hkey[len(prefix):]
            if removed == excess:
                # The subject's oldest now (it keeps size messages, never none).
                self._firsts[skey] = first = int.from_bytes(idb, "big")
                self._push(first, skey)
                break
            batch.delete(hkey)
            self._bytes -= len(body)
            mark = int.from_bytes(idb, "big")
            removed += 1
        if mark:
            self._marks[skey] = mark
            batch.put(MARKS + skey, id_bytes(mark))
        return removed

    def _push(self, key: int, skey: bytes) -> None:
        """File *key*, now the oldest of subject *skey* (already in the firsts), in the heap."""
        heap = self._heap
        if len(heap) > 2 * len(self._firsts) + 1024:
            # Mostly stale (a subject's trims each file one): rebuild it from the firsts.
            heap[:] = [(first, s) for s, first in self._firsts.items()]
            heapq.heapify(heap)
            return
        heapq.heappush(heap, (key, skey))

    def _trim_oldest(self) -> None:
        """Drop the oldest messages of all subjects past the age or size bound."""
        db = self._db
        due = self._clock() - self.ttl - STAMP_SECONDS  # a stamp at or before it is due
        with db.write_batch() as batch:
            # Every key below the first stamp not due is due (all of them, if none is not).
            cutoff = self._last + 1
            for tkey, value in db.iterator(prefix=STAMPS):
                if _STAMP.unpack(value)[0] > due:
                    cutoff = int.from_bytes(tkey[1:], "big")
                    break
                batch.delete(tkey)
            floor = self._drop(batch, cutoff)
            if floor > self.floor:
                self.floor = floor
                batch.put(FLOOR_KEY, id_bytes(floor))
            # A stamp is needed while a key it covers may be left: it goes once
            # the next one starts at or below floor + 1 (the oldest go first).
            self._oldest = 0.0
            previous = None
            for tkey, value in db.iterator(start=STAMPS + id_bytes(cutoff), stop=STAMPS + _LAST_ID):
                if previous is not None:
                    if int.from_bytes(tkey[1:], "big") > self.floor + 1:
                        break
                    batch.delete(previous)
                previous = tkey
                self._oldest = _STAMP.unpack(value)[0] if self._counts else 0.0

    def _drop(self, batch, cutoff: int) -> int:
        """Delete every message below key *cutoff*, and the oldest while over max_bytes.

        The oldest messages of all subjects, in key order (the heap's merge);
        the newest key deleted (0: none).
        """
        heap, firsts, counts = self._heap, self._firsts, self._counts
        newest = 0
        while heap:
            key, skey = heap[0]
            if firsts.get(skey) != key:
                heapq.heappop(heap)  # stale: the subject was trimmed since
                continue
            if key >= cutoff and self._bytes <= self.max_bytes:
                break
            heapq.heappop(heap)
            # The next subject's oldest (or a stale key below it), never below key.
            after = heap[0][0] if heap else self._last + 1
            prefix = _prefix(skey)
            start = len(prefix)
            left = None
            for hkey, body in _range(self._db, prefix, key):
                k = int.from_bytes(hkey[start:], "big")
                if k >= cutoff and (self._bytes <= self.max_bytes or k > after):
                    left = k
                    break
                batch.delete(hkey)
                self._bytes -= len(body)
                counts[skey] -= 1
                if k > newest:  # below cutoff, one subject's go at once, not in key order
                    newest = k
            if left is not None:
                firsts[skey] = left
                self._push(left, skey)
                continue
            del counts[skey], firsts[skey]
            if self._marks.pop(skey, None) is not None:
                batch.delete(MARKS + skey)  # implied by the floor now
        return newest

    # -- resuming ------------------------------------------------------------

    def replay(self, subjects: Iterable[str], since: str, limit: int = 1000) -> Replay:
        """The messages of *subjects* after id *since*, newest *limit* of them."""
        head = self._last
        key = parse_id(since)
        if key is None:
            return Replay([], False, "malformed id", head)
        if key > head:
            return Replay([], False, "unknown id", head)
        if not self.size:
            return Replay([], False, "no history is kept", head)
        if self._oldest and self._clock() - self._oldest > self.ttl + STAMP_SECONDS:
            self._trim_oldest()
        reason = "" if key >= self.floor else "the id predates the history"
        after = id_bytes(key + 1)
        found: list[tuple[int, str, bytes]] = []
        counts, known, marks = self._counts, self._subject_keys, self._marks
        for subject in dict.fromkeys(subjects):
            keyed = known.get(subject)
            skey, prefix = keyed if keyed is not None else (encode_key(subject), None)
            if not reason and key < marks.get(skey, 0):
                reason = f"the history of {subject} no longer reaches back to the id"
            if skey not in counts:
                # Nothing kept of it: no seek. Most of a user's subjects, when
                # a reconnect storm asks for everyone's replay at once.
                continue
            prefix = prefix or _prefix(skey)
            start = len(prefix)
            # At most size (and a few) messages per subject; keep the newest limit + 1.
            newest = deque(self._db.iterator(start=prefix + after, stop=prefix + _LAST_ID),
                           maxlen=limit + 1)
            found.extend((int.from_bytes(hkey[start:], "big"), subject, body)
                         for hkey, body in newest)
        found.sort(key=lambda m: m[0])
        if len(found) > limit:
            found = found[-limit:]
            reason = reason or f"more than {limit} messages to replay"
        return Replay(found, not reason, reason, head)

    @property
    def stats(self) -> dict[str, int]:
        """What ``/stats`` shows of the history."""
        return {"history_messages": sum(self._counts.values()), "history_bytes": self._bytes}
