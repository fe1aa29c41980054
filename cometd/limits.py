"""Admission limits: whether a new stream may open, and the answer when it may not.

One :class:`Admission` per HTTP server decides for both ways a stream opens
(the accept callback's fast path and pywsgi/bottle, see :mod:`cometd.server`),
just before the stream's head would be sent:

- ``--max-connections``: 503, counted as ``connections`` (this process's streams)
- ``--max-streams-per-user``: 429, ``per_user`` (one id's streams in this process)
- ``--max-streams-per-address``: 429, ``per_address`` (one client address's streams)
- ``--stream-rate-per-address``: 429, ``rate`` (new streams a second from one address)

Each refusal is a short JSON error with ``Retry-After`` and
``Connection: close``; the connection is then closed and nothing else changes.
0 turns a limit off. The address is the TCP peer's: behind a reverse proxy
every client has the proxy's, so keep the per-address limits off there (no
``X-Forwarded-For`` is trusted).

Theory of operation
-------------------
The checks cost a few dict lookups: the per-user count is the table's own
list of the user's connections, the per-address count a dict the table keeps
(address -> open streams, an entry gone with its last stream). The rate limit
is a token bucket per address holding ``burst`` tokens, refilled at ``rate``
per second; an address with no entry has a full bucket. So an entry that has
been idle long enough to be full again says nothing and may go: past
``MAX_BUCKETS`` entries, the full ones are swept out, and if a flood from
that many distinct addresses leaves none full, all are dropped (the limit
then forgives rather than grows without bound).
"""

from __future__ import annotations

import json
import math
import time

__all__ = ["Admission", "refusal", "RETRY_AFTER", "MAX_BUCKETS", "REASONS"]

#: seconds a client refused for a count limit is told to wait
RETRY_AFTER = 5
#: rate-limit buckets kept before the idle ones are swept
MAX_BUCKETS = 100_000
#: rejection reasons, as /stats counts them
REASONS = ("connections", "per_user", "per_address", "rate")

_STATUS = {429: "Too Many Requests", 503: "Service Unavailable"}


def refusal(status: int, message: str, retry_after: int) -> bytes:
    """A whole HTTP/1.1 error response: JSON body, ``Retry-After``, connection closed."""
    body = json.dumps({"error": message}).encode()
    return (f"HTTP/1.1 {status} {_STATUS[status]}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nRetry-After: {retry_after}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


class Admission:
    """The limits of one server process over its connection table.

    *table* is a :class:`~cometd.connections.ConnectionTable`; the other
    arguments are the options of the same names (0: no limit).
    """

    def __init__(self, table, max_connections: int, per_user: int = 10, per_address: int = 0,
                 rate: float = 0.0, burst: int = 0) -> None:
        self.table = table
        self.max_connections = max_connections
        self.per_user = per_user
        self.per_address = per_address
        self.rate = rate
        #: tokens a bucket holds: a client may open this many at once, then ``rate`` a second
        self.burst = max(1, burst or math.ceil(rate))
        #: address -> (tokens, monotonic time they were counted)
        self._buckets: dict[str, tuple[float, float]] = {}
        #: reason -> streams refused for it: the table's, so /stats shows them
        self.rejected: dict[str, int] = table.rejected
        self.rejected.update(dict.fromkeys(REASONS, 0))
        self._full = refusal(503, "server full: too many connections", RETRY_AFTER)
        self._user = refusal(429, f"too many streams for this id (at most {per_user})",
                             RETRY_AFTER)
        self._address = refusal(429, "too many streams from this address (at most "
                                f"{per_address})", RETRY_AFTER)

    def admit(self, user: str, address: str) -> bytes | None:
        """None if a stream of *user* from *address* may open, else the response refusing it."""
        table = self.table
        if self.max_connections and table.connections >= self.max_connections:
            self.rejected["connections"] += 1
            return self._full
        if self.per_user and table.online(user) >= self.per_user:
            self.rejected["per_user"] += 1
            return self._user
        if self.per_address and table.addresses.get(address, 0) >= self.per_address:
            self.rejected["per_address"] += 1
            return self._address
        if self.rate:
            wait = self._take(address)
            if wait:
                self.rejected["rate"] += 1
                return refusal(429, f"too many new streams from this address (at most "
                               f"{self.rate:g} a second)", wait)
        return None

    def _take(self, address: str) -> int:
        """Take a token from *address*'s bucket: 0, or the seconds until there is one."""
        now = time.monotonic()
        buckets = self._buckets
        entry = buckets.get(address)
        if entry is None:
            if len(buckets) >= MAX_BUCKETS:
                buckets = self._sweep(now)
            tokens = float(self.burst)
        else:
            tokens = min(float(self.burst), entry[0] + (now - entry[1]) * self.rate)
        if tokens < 1.0:
            buckets[address] = (tokens, now)
            return max(1, math.ceil((1.0 - tokens) / self.rate))
        buckets[address] = (tokens - 1.0, now)
        return 0

    def _sweep(self, now: float) -> dict[str, tuple[float, float]]:
        """Drop the buckets full again (or all, if none is); return the new dict."""
        full = self.burst / self.rate  # seconds an empty bucket takes to fill
        kept = {a: e for a, e in self._buckets.items() if now - e[1] < full}
        self._buckets = kept if len(kept) < MAX_BUCKETS else {}
        return self._buckets
