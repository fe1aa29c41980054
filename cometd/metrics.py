"""``GET /metrics``: this process's figures in the Prometheus text format.

Theory of operation
-------------------
Nothing here runs per delivery. The counters of the hot path stay plain ints
where they are bumped (``ConnectionTable.deliveries``, ``table.disconnects``,
:data:`cometd.counts.COUNTS`); :class:`StateCollector` reads them, and the
gauges (connections by transport, pending output), only when Prometheus
scrapes, and yields prometheus_client families. The histograms
(:class:`Histogram`: bucket counts in a list, a family when scraped) are
observed once per *message* (publish-to-write latency, fan-out size) or per
backplane round trip, never per recipient.

Each process has one :data:`REGISTRY`. Scaled out (``--workers N``, or
routers and edges started by hand), every process also writes its own
exposition to Redis once a second under ``cometd:metrics:<role>:<id>``, kept
for :data:`SHARE_TTL` seconds (:class:`Sharing`), and an edge answers a
scrape with every process's families merged, each sample labelled with the
``process`` it came from (:func:`merged`). So whichever edge the shared port
hands the scrape to, it sees the router and all edges; a process that died
drops out within SHARE_TTL. prometheus_client's multiprocess mode was the
other way: it needs a directory and an environment variable set before
import, cannot do live gauges (connections) without per-process files and
"livesum" guesses, and leaves a killed worker's files behind; and it would not
reach the router when it runs on another host.
"""

from __future__ import annotations

import math
import os
import socket
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from cometd.counts import COUNTS, REJECT_STATUSES

__all__ = ["REGISTRY", "Histogram", "PUBLISH_TO_WRITE", "FANOUT_SIZE", "BACKPLANE_BATCH",
           "REDIS_RTT", "StateCollector", "Sharing", "exposition", "merged", "SHARE_TTL"]

SHARE_KEY = "cometd:metrics:"
SHARE_EVERY = 1.0
SHARE_TTL = 5

#: this process's metrics; StateCollectors are registered by the server lifecycle
REGISTRY = CollectorRegistry(auto_describe=True)

class Histogram(Collector):
    """A histogram whose observation is a bisect and two adds; a prometheus family when scraped.

    prometheus_client's Histogram takes a lock twice and walks its buckets
    per observation; with two per message that showed as ~4% more CPU per
    ``POST /send`` (BENCHMARKS.md). The hub is one thread: no lock is needed.
    """

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...] = (),
                 buckets: tuple[float, ...] = (),
                 registry: CollectorRegistry | None = None) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self.bounds = tuple(float(b) for b in buckets)
        #: label values -> that label set's buckets
        self._series: dict[tuple[str, ...], _Series] = {}
        self._plain = None if labelnames else self.labels()
        if registry is not None:
            registry.register(self)

    def observe(self, value: float) -> None:
        self._plain.observe(value)

    def observe_many(self, value: float, count: int) -> None:
        """*count* observations of *value* (a batch's messages that share one)."""
        self._plain.observe_many(value, count)

    def labels(self, *values: str) -> _Series:
        series = self._series.get(values)
        if series is None:
            series = self._series[values] = _Series(self.bounds)
        return series

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation,
                                       labels=list(self.labelnames))
        for values, series in sorted(self._series.items()):
            cumulative, buckets = 0, []
            for bound, n in zip((*self.bounds, math.inf), series.counts, strict=True):
                cumulative += n
                buckets.append((floatToGoString(bound), cumulative))
            family.add_metric(list(values), buckets, series.sum)
        yield family


class _Series:
    """One label set's buckets (not cumulative; :meth:`Histogram.collect` adds them up)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le: the first bound >= value
        self.sum += value

    def observe_many(self, value: float, count: int) -> None:
        self.counts[bisect_left(self.bounds, value)] += count
        self.sum += value * count


PUBLISH_TO_WRITE = Histogram(
    "cometd_publish_to_write_seconds",
    "Seconds from a message's arrival in this process to its last write to a socket "
    "(or to its socket's queue, when the kernel buffer is full)",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
             0.5, 1.0, 2.5), registry=REGISTRY)
FANOUT_SIZE = Histogram(
    "cometd_fanout_size", "Connections one message was written to in this process",
    buckets=(0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000, 20000, 100000),
    registry=REGISTRY)
BACKPLANE_BATCH = Histogram(
    "cometd_backplane_batch_size", "Items per backplane batch (calls pushed or "
    "popped, messages per delivery payload)", ("kind",),
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500), registry=REGISTRY)
REDIS_RTT = Histogram(
    "cometd_redis_roundtrip_seconds", "Seconds a backplane Redis round trip took", ("op",),
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0),
    registry=REGISTRY)

_TRANSPORTS = ("chunked", "raw", "sse", "sse_raw", "poll", "ws")  # by kind, cometd.streamhttp


class StateCollector(Collector):
    """The plain counters and gauges of one server's parts, read at scrape time.

    *table*: the ConnectionTable (single, edge); *router*: the Router (single,
    router); *presence*: the backplane Presence (router); *link*: the
    EdgeLink (edge); *calls*: a dict op -> backplane calls (router, edge).
    """

    def __init__(self, table: Any = None, router: Any = None, presence: Any = None,
                 link: Any = None, calls: dict[str, int] | None = None) -> None:
        self.table = table
        self.router = router
        self.presence = presence
        self.link = link
        self.calls = calls

    def collect(self) -> Iterator[Metric]:
        table = self.table
        if table is not None:
            yield from self._table(table)
        if self.router is not None:
            yield CounterMetricFamily("cometd_messages_published", "Messages accepted by "
                                      "POST /send", value=self.router.messages_sent)
        if self.presence is not None:
            p = self.presence
            yield GaugeMetricFamily("cometd_presence_users", "Users online on any edge, "
                                    "as the router knows", value=len(p.users))
            yield GaugeMetricFamily("cometd_presence_edges", "Edges the router hears from",
                                    value=len(p.edges))
            yield CounterMetricFamily("cometd_backplane_batches_lost", "Delivery batches "
                                      "no edge heard (Redis down)", value=p.batches_lost)
            yield CounterMetricFamily("cometd_router_deliveries", "Connections messages "
                                      "were routed to, as counted from presence",
                                      value=p.deliveries)
        if self.calls is not None:
            calls = CounterMetricFamily("cometd_backplane_calls", "Backplane calls (edge: "
                                        "made, router: answered), by operation", labels=["op"])
            for op, n in sorted(self.calls.items()):
                calls.add_metric([op], n)
            yield calls
        if self.link is not None:
            yield GaugeMetricFamily("cometd_router_reachable", "1 while the router answers "
                                    "this edge's heartbeats", value=int(self.link.router_ok()))
        by_status = COUNTS.rejected.copy()
        if table is not None:
            # New streams refused by admission limits (cometd.limits), by reason;
            # they are answered before any request handling, so counted here too.
            limits = CounterMetricFamily("cometd_streams_refused", "New streams refused by "
                                         "an admission limit, by reason", labels=["reason"])
            for reason, n in sorted(getattr(table, "rejected", {}).items()):
                limits.add_metric([reason], n)
                by_status["503" if reason == "connections" else "429"] += n
            yield limits
        rejected = CounterMetricFamily("cometd_rejected_requests", "Requests refused, by "
                                       "HTTP status", labels=["status"])
        for status in sorted(set(REJECT_STATUSES) | set(by_status)):
            rejected.add_metric([status], by_status[status])
        yield rejected
        if table is not None:
            yield CounterMetricFamily("cometd_accepts", "Connections accepted by the HTTP "
                                      "listener", value=COUNTS.accepts)
            yield CounterMetricFamily("cometd_fast_publishes", "Publish requests answered by "
                                      "the fast path, without pywsgi and bottle",
                                      value=COUNTS.fast_publishes)
            replays = CounterMetricFamily("cometd_replays", "Stream resumes, by whether every "
                                          "missed message was replayed", labels=["result"])
            replays.add_metric(["recovered"], COUNTS.replays_recovered)
            replays.add_metric(["not_recovered"], COUNTS.replays_not_recovered)
            yield replays
            polls = CounterMetricFamily("cometd_polls_answered", "Long polls answered, by "
                                        "whether the answer had messages", labels=["result"])
            for result in ("messages", "empty"):
                polls.add_metric([result], COUNTS.polls_answered[result])
            yield polls
        if self.router is not None:
            # Read at scrape time: the history keeps its own total, so a publish pays nothing.
            yield GaugeMetricFamily("cometd_history_bytes", "Bytes of message history held",
                                    value=self.router.history.stats["history_bytes"])

    @staticmethod
    def _table(table: Any) -> Iterator[Metric]:
        by_kind = [0] * len(_TRANSPORTS)
        pending = 0
        for conn in list(table._by_fd.values()):
            by_kind[conn.kind] += 1
            pending += conn._pending
        conns = GaugeMetricFamily("cometd_connections", "Open streams, by transport and "
                                  "connection mode", labels=["transport", "mode"])
        for transport, n in zip(_TRANSPORTS, by_kind, strict=True):
            conns.add_metric([transport, table.mode], n)
        yield conns
        yield GaugeMetricFamily("cometd_users_online", "Users with at least one stream here",
                                value=table.users_online)
        yield GaugeMetricFamily("cometd_pending_output_bytes", "Bytes written by the server "
                                "but not yet taken by the kernel", value=pending)
        yield CounterMetricFamily("cometd_deliveries", "Messages written to streams",
                                  value=table.deliveries)
        yield CounterMetricFamily("cometd_slow_consumers_dropped", "Streams closed for not "
                                  "reading fast enough", value=table.slow_consumers_dropped)
        reasons = CounterMetricFamily("cometd_disconnects", "Streams ended, by reason",
                                      labels=["reason"])
        for reason, n in table.disconnects.items():
            reasons.add_metric([reason], n)
        yield reasons


def exposition() -> bytes:
    """This process's metrics in the text format."""
    return generate_latest(REGISTRY)


def merged(texts: Iterable[tuple[str, str]]) -> bytes:
    """Expositions of several processes, ``(process, text)``, as one, labelled by process."""
    families: dict[str, Metric] = {}
    for process, text in texts:
        for family in text_string_to_metric_families(text):
            into = families.get(family.name)
            if into is None:
                into = families[family.name] = Metric(family.name, family.documentation,
                                                      family.type, family.unit)
            for s in family.samples:
                into.samples.append(s._replace(labels={**s.labels, "process": process}))

    class _Merged(Collector):
        def collect(self) -> Iterator[Metric]:
            return iter(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())
    return generate_latest(registry)


class Sharing:
    """A scaled-out process's metrics in Redis, for whichever edge is scraped."""

    def __init__(self, client: Any, role: str, ident: str | None = None) -> None:
        self.client = client
        self.name = f"{role}:{ident or f'{socket.gethostname()}-{os.getpid()}'}"

    def publish_forever(self) -> None:
        import gevent
        import redis

        while True:
            try:
                self.client.set(SHARE_KEY + self.name, exposition(), ex=SHARE_TTL)
            except (redis.RedisError, OSError):
                pass  # Redis is away: an edge's scrape shows its own figures meanwhile
            gevent.sleep(SHARE_EVERY)

    def everyone(self) -> bytes:
        """Every live process's metrics, this one's fresh; this one's alone if Redis is away."""
        import redis

        own = exposition().decode()
        texts = {self.name: own}
        try:
            keys = list(self.client.scan_iter(match=SHARE_KEY + "*", count=1000))
            for key, value in zip(keys, self.client.mget(keys) if keys else [], strict=True):
                name = key.decode()[len(SHARE_KEY):]
                if value is not None and name != self.name:
                    texts[name] = value.decode()
        except (redis.RedisError, OSError):
            pass
        return merged(sorted(texts.items()))
