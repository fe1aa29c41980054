"""When streams expire: items filed by the whole second their token stops being accepted.

Theory of operation
-------------------
A million streams cannot each hold a timer. :class:`ExpiryWheel` files each
item in a set for the second it is due; one greenlet of the connection table
asks for :meth:`ExpiryWheel.due` once a second and gets every item whose
second has come, in time proportional to the seconds that passed and the
items due, never to the items filed. An item closed before it is due is
taken out of its set (:meth:`discard`), so nothing closed is held until its
token would have expired.
"""

from __future__ import annotations

import math
import time
from collections.abc import Hashable

__all__ = ["ExpiryWheel"]


class ExpiryWheel:
    """Items by the whole second (Unix time) they are due."""

    def __init__(self, now: float | None = None) -> None:
        #: second -> the items due then
        self._slots: dict[int, set[Hashable]] = {}
        #: the last second :meth:`due` has emptied
        self._swept = int(time.time() if now is None else now)

    def __len__(self) -> int:
        return sum(len(slot) for slot in self._slots.values())

    def _second(self, when: float) -> int:
        # Already due: the next sweep takes it.
        return max(math.ceil(when), self._swept + 1)

    def add(self, item: Hashable, when: float) -> int:
        """File *item* as due at *when*; returns the second it is filed under."""
        second = self._second(when)
        slot = self._slots.get(second)
        if slot is None:
            self._slots[second] = {item}
        else:
            slot.add(item)
        return second

    def discard(self, item: Hashable, second: int) -> None:
        """Forget *item*, filed under *second* (what :meth:`add` returned)."""
        slot = self._slots.get(second)
        if slot is not None:
            slot.discard(item)
            if not slot:
                del self._slots[second]

    def due(self, now: float) -> list[Hashable]:
        """Take out and return every item due at or before *now*."""
        items: list[Hashable] = []
        until = int(now)
        if until - self._swept > len(self._slots):
            # A long gap (the first sweep in a while): visit the filed seconds instead.
            seconds = sorted(s for s in self._slots if s <= until)
        else:
            seconds = range(self._swept + 1, until + 1)
        for second in seconds:
            slot = self._slots.pop(second, None)
            if slot:
                items.extend(slot)
        self._swept = max(self._swept, until)
        return items
