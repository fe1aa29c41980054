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
from collections import defaultdict
from collections.abc import Iterable
from typing import NamedTuple

import plyvel

from cometd.ids import check_id, encode_key, int_value

__all__ = [
    "SubscriptionStore",
    "StoreError",
    "StoreLockedError",
    "IdSet",
    "encode_set",
    "decode_set",
    "set_size",
]

SUBSCRIBERS = b"r"
SUBSCRIPTIONS = b"f"

if array("I").itemsize != 4 or sys.byteorder != "little":  # pragma: no cover
    raise ImportError("cometd.store needs a little-endian platform with 4-byte unsigned ints")


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

    # -- lookups -----------------------------------------------------------

    def get_subscribers(self, user: str | int) -> list[str]:
        """Who subscribes to *user*, sorted (integers first, then names)."""
        return decode_list(self._subscribers.get(encode_key(check_id(user))))

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

        All ids are checked first: one bad id raises :class:`~cometd.ids.InvalidId`
        and nothing is stored. Returns once the change is on disk.
        """
        return self._change(pairs, add=True)

    def remove_subscriptions(self, pairs: Iterable[tuple[str | int, str | int]]) -> int:
        """Remove each (subscriber, subscribee) pair; return how many existed."""
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
            return changed

    def _merge(self, db, prefix, batch, user: str, others: set[str], add: bool) -> int:
        key = encode_key(user)
        value = db.get(key)
        current = decode_set(value) if value is not None else IdSet(set(), set())
        delta = _split(others)
        before = len(current.ints) + len(current.names)
        if add:
            current.ints.update(delta.ints)
            current.names.update(delta.names)
        else:
            current.ints.difference_update(delta.ints)
            current.names.difference_update(delta.names)
        after = len(current.ints) + len(current.names)
        if after == before:
            return 0
        if after:
            batch.put(prefix + key, encode_set(current.ints, current.names))
        else:
            batch.delete(prefix + key)
        return abs(after - before)

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
        return added

    def sync(self) -> None:
        """Force everything written so far to disk (ends a bulk load)."""
        with self._write_lock:
            self._db.put(b"m:synced", b"", sync=True)

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

