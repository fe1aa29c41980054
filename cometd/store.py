"""The persistent subscription store: who subscribes to whom, on LevelDB.

This is the seed's Mnesia "subsmanager". Two keyspaces are kept consistent:

- ``subscribers`` (prefix ``r``): subscribee -> the users subscribed to it. The
  router reads this on every send, so it is the hot path.
- ``subscriptions`` (prefix ``f``): subscriber -> the users it subscribes to.

Theory of operation
-------------------
Prefix-iterating one key per pair costs an iterator and a key decode per
subscriber (~31,000 lookups/s at a fan-out of 30). Instead each user has *one*
key per keyspace whose value is the whole set, so a lookup is a single
``get`` and one decode. A set value is::

    [n: uint32 LE][n x uint32 LE, sorted integer ids][names, sorted, joined by b" "]

Integer ids (see :mod:`cometd.ids`) take four bytes and decode with one
``array`` copy; names follow as plain text (ids never contain spaces). Ids
come back sorted: integers numerically, then names in byte order.

The router does not decode at all: :meth:`SubscriptionStore.subscriber_view`
returns a :class:`SetView` over the stored bytes (a zero-copy ``uint32`` view
and the names text), which answers "is X in the set?" by binary search, so a
send from a user with a million subscribers costs in proportion to who is
online, not to the set (see :mod:`cometd.online`). Sets of 256 KB or more
(64K ids) stay in memory once read, up to 64 MB in all, so a popular user's
sends do not each copy and decompress megabytes out of LevelDB; smaller ones
stay too, up to 16 MB, so a friends feed's sends cost no LevelDB read either;
every write drops what it changed from there.

Nobody subscribes to themselves (everyone always gets their own messages):
adding such a pair raises :class:`SelfSubscription`; removing one is allowed,
so a self-loop stored before this rule can be cleaned up.

A change reads the affected sets, merges, and writes both keyspaces in one
synced ``WriteBatch`` under a lock, so readers never see one side without the
other and an acknowledged change survives a crash. Readers take no lock: LevelDB
reads see whole batches or nothing.
"""

from __future__ import annotations

import os
import sys
import threading
from array import array
from bisect import bisect_left
from collections import OrderedDict, defaultdict
from collections.abc import Iterable
from typing import NamedTuple

import plyvel

from cometd.ids import check_id, encode_key, int_value

__all__ = [
    "SubscriptionStore",
    "StoreError",
    "StoreLockedError",
    "IdSet",
    "SetView",
    "SelfSubscription",
    "check_pair",
    "encode_set",
    "decode_set",
    "merge_value",
    "set_size",
]

SUBSCRIBERS = b"r"
SUBSCRIPTIONS = b"f"

if array("I").itemsize != 4 or sys.byteorder != "little":  # pragma: no cover
    raise ImportError("cometd.store needs a little-endian platform with 4-byte unsigned ints")


#: subscriber sets at least this big stay in memory once read (64K integer ids)
CACHE_MIN_BYTES = 256 * 1024
#: at most this much of them (sixteen users with a million subscribers)
CACHE_BYTES = 64 * 1024 * 1024
#: smaller sets kept once read, at most this much (values and their entries, see
#: SMALL_ENTRY_BYTES): ~70,000 friends lists of 30
SMALL_CACHE_BYTES = 16 * 1024 * 1024
#: what keeping one small set costs beyond its bytes (the bytes object and its dict entry)
SMALL_ENTRY_BYTES = 120
#: the value of a user nobody subscribes to, as kept
_EMPTY = b"\0\0\0\0"

_open_lock = threading.Lock()
_open_paths: set[str] = set()


class StoreError(Exception):
    """The store could not be opened or used."""


class StoreLockedError(StoreError):
    """Another process holds the database open (LevelDB allows one opener)."""


class IdSet(NamedTuple):
    """A decoded set value: integer ids and name ids, each as a set."""

    ints: set[int]
    names: set[str]


class SelfSubscription(ValueError):
    """A (user, user) pair: a user cannot subscribe to itself."""

    def __init__(self, user: str) -> None:
        super().__init__(
            f"{user!r} cannot subscribe to itself (everyone always gets their own messages)"
        )
        self.user = user


def check_pair(subscriber: str | int, subscribee: str | int) -> tuple[str, str]:
    """A pair to add, validated: :class:`~cometd.ids.InvalidId` or :class:`SelfSubscription`."""
    pair = check_id(subscriber), check_id(subscribee)
    if pair[0] == pair[1]:
        raise SelfSubscription(pair[0])
    return pair


class SetView:
    """A stored set value, read in place: membership tests without decoding.

    ``ints`` is a zero-copy ``uint32`` memoryview of the sorted integer ids;
    ``names_text`` the sorted names joined by single spaces.
    """

    __slots__ = ("ints", "names_text")

    def __init__(self, value: bytes | None) -> None:
        if value is None:
            value = b"\0\0\0\0"
        n = int.from_bytes(value[:4], "little")
        whole = memoryview(value)
        self.ints = whole[4 : 4 + 4 * n].cast("I")
        self.names_text = value[4 + 4 * n :]

    @property
    def nbytes(self) -> int:
        """The size of the stored value."""
        return 4 + 4 * len(self.ints) + len(self.names_text)

    def has_int(self, number: int) -> bool:
        ints = self.ints
        i = bisect_left(ints, number)
        return i < len(ints) and ints[i] == number

    def has_name(self, name: str) -> bool:
        # Binary search over the text itself: [lo, hi) always spans whole names.
        text, wanted = self.names_text, name.encode("ascii")
        lo, hi = 0, len(text)
        while lo < hi:
            mid = (lo + hi) // 2
            cut = text.rfind(b" ", lo, mid)
            start = lo if cut < 0 else cut + 1
            end = text.find(b" ", mid, hi)
            if end < 0:
                end = hi
            word = text[start:end]
            if word == wanted:
                return True
            if word < wanted:
                lo = end + 1
            else:
                hi = start - 1
        return False

    def __contains__(self, user: str) -> bool:
        number = int_value(user)
        return self.has_name(user) if number is None else self.has_int(number)

    def __len__(self) -> int:
        text = self.names_text
        return len(self.ints) + (text.count(b" ") + 1 if text else 0)


def encode_set(ints: Iterable[int], names: Iterable[str]) -> bytes:
    numbers = array("I", sorted(ints))
    head = len(numbers).to_bytes(4, "little") + numbers.tobytes()
    names = sorted(names)
    return head + " ".join(names).encode("ascii") if names else head


def decode_set(value: bytes) -> IdSet:
    n = int.from_bytes(value[:4], "little")
    numbers = array("I")
    numbers.frombytes(value[4 : 4 + 4 * n])
    rest = value[4 + 4 * n :]
    return IdSet(set(numbers), set(rest.decode("ascii").split(" ")) if rest else set())


def decode_list(value: bytes | None) -> list[str]:
    """The ids of a set value as sorted strings (the lookup fast path)."""
    if value is None:
        return []
    n = int.from_bytes(value[:4], "little")
    numbers = array("I")
    numbers.frombytes(value[4 : 4 + 4 * n])
    ids = list(map(str, numbers))
    rest = value[4 + 4 * n :]
    if rest:
        ids.extend(rest.decode("ascii").split(" "))
    return ids


def set_size(value: bytes) -> int:
    """How many ids a set value holds, without decoding it."""
    n = int.from_bytes(value[:4], "little")
    rest = value[4 + 4 * n :]
    return n + (rest.count(b" ") + 1 if rest else 0)


def merge_value(value: bytes | None, delta: IdSet, add: bool) -> tuple[bytes | None, int]:
    """*value* with *delta* added (or removed): (new value, None once empty; ids changed).

    Works on the encoded value: integer ids are found by binary search and
    inserted or deleted with numpy, and the names text is decoded only when
    names change, so one follow of a user with a million subscribers costs a
    copy of its 4 MB, not a million-element Python set (~90 ms, GIL held).
    """
    import numpy as np  # here: ~70 ms that a server start (an edge's above all) need not pay

    value = value or b"\0\0\0\0"
    n = int.from_bytes(value[:4], "little")
    ints = np.frombuffer(value, dtype="<u4", count=n, offset=4)
    text = value[4 + 4 * n :]
    changed = 0
    if delta.ints:
        wanted = np.array(sorted(delta.ints), dtype="<u4")
        at = np.searchsorted(ints, wanted)
        found = np.zeros(len(wanted), dtype=bool)
        inside = at < n
        found[inside] = ints[at[inside]] == wanted[inside]
        if add and not found.all():
            ints = np.insert(ints, at[~found], wanted[~found])  # sorted: inserts keep order
            changed += int((~found).sum())
        elif not add and found.any():
            ints = np.delete(ints, at[found])
            changed += int(found.sum())
    if delta.names:
        names = set(text.decode("ascii").split(" ")) if text else set()
        before = len(names)
        if add:
            names |= delta.names
        else:
            names -= delta.names
        changed += abs(len(names) - before)
        text = " ".join(sorted(names)).encode("ascii")
    if not changed:
        return value, 0
    if not len(ints) and not text:
        return None, changed
    return len(ints).to_bytes(4, "little") + ints.tobytes() + text, changed


def _split(ids: Iterable[str]) -> IdSet:
    out = IdSet(set(), set())
    for user in ids:
        number = int_value(user)
        if number is None:
            out.names.add(user)
        else:
            out.ints.add(number)
    return out


def _check_directory(path: str) -> None:
    """A clear error when *path*, or a parent it would be created under, is not a directory."""
    at = os.path.abspath(path)
    while not os.path.exists(at):
        parent = os.path.dirname(at)
        if parent == at:
            return
        at = parent
    if not os.path.isdir(at):
        where = "is" if at == os.path.abspath(path) else f"would be under {at}, which is"
        raise StoreError(f"subscription database {path} {where} not a directory")


def _open_error(path: str, exc: plyvel.Error) -> StoreError:
    # LevelDB's messages are bytes such as b"IO error: lock <path>/LOCK:
    # Resource temporarily unavailable" (held by another process) or
    # b"IO error: <path>/LOCK: Permission denied": only the first is "locked".
    text = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) \
        else str(exc)
    if isinstance(exc, plyvel.IOError) and text.startswith("IO error: lock ") and (
            "temporarily unavailable" in text or "already held" in text):
        return StoreLockedError(
            f"subscription database {path} is already open in another process (is another"
            " cometd running on this database? stop it, or pass --db another/path)")
    return StoreError(f"cannot open subscription database {path}: {text}")


class SubscriptionStore:
    """Subscriptions held in a LevelDB database at *path* (created if missing).

    Ids may be given as ``str`` or non-negative ``int`` and always come back as
    ``str``. Methods are safe to call from several threads; only one process
    can open a database at a time.
    """

    #: the database directory
    path: str

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._real = os.path.realpath(self.path)
        # LevelDB checks its in-process lock table only after opening the LOCK
        # file, and closing that descriptor drops this process's fcntl lock: a
        # second open here would unlock the database for other processes.
        with _open_lock:
            if self._real in _open_paths:
                raise StoreLockedError(
                    f"subscription database {self.path} is already open in this process"
                )
            _check_directory(self.path)
            try:
                self._db = plyvel.DB(self.path, create_if_missing=True)
            except plyvel.Error as exc:
                raise _open_error(self.path, exc) from None
            _open_paths.add(self._real)
        self._subscribers = self._db.prefixed_db(SUBSCRIBERS)
        self._subscriptions = self._db.prefixed_db(SUBSCRIPTIONS)
        self._write_lock = threading.Lock()
        # Large subscriber sets read by subscriber_view, kept (see _cached).
        self._cache: OrderedDict[bytes, bytes] = OrderedDict()
        self._cache_bytes = 0
        # The other sets read by subscriber_view, kept too (see _cached).
        self._small: dict[bytes, bytes] = {}
        self._small_bytes = 0
        self._cache_lock = threading.Lock()
        self._generation = 0  # bumped by every write, under _cache_lock

    @property
    def db(self) -> plyvel.DB:
        """The LevelDB database, for the message history kept beside the sets."""
        return self._db

    # -- lookups -----------------------------------------------------------

    def get_subscribers(self, user: str | int) -> list[str]:
        """Who subscribes to *user*, sorted (integers first, then names)."""
        return decode_list(self._subscribers.get(encode_key(check_id(user))))

    def subscriber_view(self, user: str | int) -> SetView:
        """Who subscribes to *user*, as a :class:`SetView` (the router's lookup)."""
        return SetView(self._cached(encode_key(check_id(user))))

    def _cached(self, key: bytes) -> bytes:
        # Theory: LevelDB copies a value on every get, and decompresses a large
        # one each time (a 4 MB block does not fit a block-cache shard): ~2.5
        # ms for a million subscribers, on every send of a popular user. So
        # values of CACHE_MIN_BYTES or more stay in memory (LRU, at most
        # CACHE_BYTES). A small set's get is cheaper but runs on every send
        # (a friends feed's, 3 us warm and ~30 us with cold caches against a
        # dict's fraction of that), so the smaller ones stay too, in a dict
        # of at most SMALL_CACHE_BYTES that is emptied when full: no
        # bookkeeping per read, and a large set is never pushed out by them.
        # Writers bump the generation and drop the keys they wrote after
        # their batch is in the database, both under _cache_lock; a reader
        # keeps what it read only if no write finished since before its get,
        # so a stale value can never be kept.
        with self._cache_lock:
            value = self._small.get(key)
            if value is not None:
                return value
            value = self._cache.get(key)
            if value is not None:
                self._cache.move_to_end(key)
                return value
            generation = self._generation
        value = self._subscribers.get(key) or _EMPTY
        with self._cache_lock:
            if generation != self._generation:
                return value
            if len(value) < CACHE_MIN_BYTES:
                if key not in self._small:
                    if self._small_bytes > SMALL_CACHE_BYTES:
                        self._small.clear()
                        self._small_bytes = 0
                    self._small[key] = value
                    self._small_bytes += len(value) + SMALL_ENTRY_BYTES
            elif len(value) <= CACHE_BYTES and key not in self._cache:
                self._cache[key] = value
                self._cache_bytes += len(value)
                while self._cache_bytes > CACHE_BYTES:
                    self._cache_bytes -= len(self._cache.popitem(last=False)[1])
        return value

    def _written(self, keys: Iterable[bytes] | None) -> None:
        """After a write to the subscribers keyspace: forget *keys* (None: all)."""
        with self._cache_lock:
            self._generation += 1
            if keys is None:
                self._cache.clear()
                self._cache_bytes = 0
                self._small.clear()
                self._small_bytes = 0
                return
            for key in keys:
                value = self._cache.pop(key, None)
                if value is not None:
                    self._cache_bytes -= len(value)
                value = self._small.pop(key, None)
                if value is not None:
                    self._small_bytes -= len(value) + SMALL_ENTRY_BYTES

    def get_subscriptions(self, user: str | int) -> list[str]:
        """Whom *user* subscribes to, sorted (integers first, then names)."""
        return decode_list(self._subscriptions.get(encode_key(check_id(user))))

    def count(self) -> tuple[int, int]:
        """(users with subscribers, subscriptions stored): a full scan, for tools."""
        users = pairs = 0
        for value in self._subscribers.iterator(include_key=False):
            users += 1
            pairs += set_size(value)
        return users, pairs

    # -- changes -----------------------------------------------------------

    def add_subscriptions(self, pairs: Iterable[tuple[str | int, str | int]]) -> int:
        """Store each (subscriber, subscribee) pair; return how many were new.

        All pairs are checked first: a bad id raises :class:`~cometd.ids.InvalidId`,
        a (user, user) pair :class:`SelfSubscription`, and nothing is stored.
        Returns once the change is on disk.
        """
        return self._change([check_pair(a, b) for a, b in pairs], add=True)

    def remove_subscriptions(self, pairs: Iterable[tuple[str | int, str | int]]) -> int:
        """Remove each (subscriber, subscribee) pair; return how many existed.

        A (user, user) pair is accepted, so a self-loop stored before
        :class:`SelfSubscription` existed can be removed.
        """
        return self._change(pairs, add=False)

    def _change(self, pairs: Iterable[tuple[str | int, str | int]], add: bool) -> int:
        wanted = {(check_id(a), check_id(b)) for a, b in pairs}
        if not wanted:
            return 0
        forward: dict[str, set[str]] = defaultdict(set)
        reverse: dict[str, set[str]] = defaultdict(set)
        for subscriber, subscribee in wanted:
            forward[subscriber].add(subscribee)
            reverse[subscribee].add(subscriber)
        with self._write_lock:
            changed = 0
            with self._db.write_batch(sync=True) as batch:
                for db, prefix, groups in (
                    (self._subscriptions, SUBSCRIPTIONS, forward),
                    (self._subscribers, SUBSCRIBERS, reverse),
                ):
                    for user, others in groups.items():
                        n = self._merge(db, prefix, batch, user, others, add)
                        if prefix == SUBSCRIPTIONS:
                            changed += n
            self._written([encode_key(user) for user in reverse])
            return changed

    def _merge(self, db, prefix, batch, user: str, others: set[str], add: bool) -> int:
        key = encode_key(user)
        value, changed = merge_value(db.get(key), _split(others), add)
        if changed:
            if value is None:
                batch.delete(prefix + key)
            else:
                batch.put(prefix + key, value)
        return changed

    # -- bulk loading --------------------------------------------------------

    def bulk_merge(
        self, keyspace: str, items: Iterable[tuple[bytes, bytes]], batch_keys: int = 20_000
    ) -> int:
        """Merge encoded (key, set value) items into *keyspace*; return new pairs.

        For bulk loads (see :mod:`cometd.loader`): keys come from
        :func:`~cometd.ids.encode_key`, values from :func:`encode_set`; a value
        already stored under a key is merged with the new one. Batches are
        written unsynced in the order given (give keys sorted: LevelDB writes
        sorted keys several times faster); call :meth:`sync` once at the end.
        *keyspace* is ``"subscribers"`` or ``"subscriptions"``.
        """
        prefix = {"subscribers": SUBSCRIBERS, "subscriptions": SUBSCRIPTIONS}[keyspace]
        db = self._db.prefixed_db(prefix)
        added = 0
        with self._write_lock:
            batch = self._db.write_batch()
            pending = 0
            for key, value in items:
                old = db.get(key)
                if old is None:
                    added += set_size(value)
                else:
                    before = set_size(old)
                    current, new = decode_set(old), decode_set(value)
                    current.ints.update(new.ints)
                    current.names.update(new.names)
                    grown = len(current.ints) + len(current.names) - before
                    if not grown:
                        continue
                    added += grown
                    value = encode_set(current.ints, current.names)
                batch.put(prefix + key, value)
                pending += 1
                if pending >= batch_keys:
                    batch.write()
                    batch = self._db.write_batch()
                    pending = 0
            batch.write()
            if prefix == SUBSCRIBERS:
                self._written(None)
        return added

    def sync(self) -> None:
        """Force everything written so far to disk (ends a bulk load)."""
        with self._write_lock:
            self._db.put(b"m:synced", b"", sync=True)

    @property
    def is_open(self) -> bool:
        """Whether the database is open (``/readyz``)."""
        return not self._db.closed

    def close(self) -> None:
        """Close the database; the store cannot be used afterwards."""
        if not self._db.closed:
            self._db.close()
            with _open_lock:
                _open_paths.discard(self._real)

    def __enter__(self) -> SubscriptionStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SubscriptionStore({self.path!r})"

