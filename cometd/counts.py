"""Plain counters an operator reads through ``/metrics``, bumped where things happen.

These are ints and dicts, not prometheus_client objects: bumping one costs an
attribute lookup and an add, so code on a hot path (the accept callback, a
connection's close) can count without showing in its figures.
:mod:`cometd.metrics` turns them into Prometheus families at scrape time.

One :data:`COUNTS` per process, reachable from anywhere that produces an
event: ``COUNTS.rejected["429"] += 1``.
"""

from __future__ import annotations

from collections import Counter

__all__ = ["Counts", "COUNTS", "DISCONNECT_REASONS", "REJECT_STATUSES"]

#: why a stream ended; every one is exposed, zero until it happens
DISCONNECT_REASONS = ("client", "slow", "expired", "kicked", "drain", "shutdown", "error")
#: refusal statuses always exposed (others appear once they happen)
REJECT_STATUSES = ("400", "401", "403", "404", "413", "429", "503")


class Counts:
    """This process's event counters (see the module docstring)."""

    def __init__(self) -> None:
        #: requests refused, by HTTP status as text ("401", "429", ...)
        self.rejected: Counter[str] = Counter()
        #: connections accepted by the HTTP listener
        self.accepts = 0
        #: publish requests answered by the fast path (cometd.publish), not bottle
        self.fast_publishes = 0
        #: streams resumed with every missed message / with some lost (the history feature)
        self.replays_recovered = 0
        self.replays_not_recovered = 0
        #: long polls answered, by whether the answer had messages ("messages", "empty")
        self.polls_answered: Counter[str] = Counter()


COUNTS = Counts()
