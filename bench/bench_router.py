#!/usr/bin/env python3
"""The scale-out router's and an edge's CPU per delivery, in-process, at the 1M run's shape.

    .venv/bin/python bench/bench_router.py [--users 1000000] [--edges 53] [--m 15]
        [--messages 20000] [--per-flush 165] [--runs 3]

Router: a :class:`cometd.backplane.Presence` with ``--users`` users online
(one stream each, spread at random over ``--edges`` edges, as SO_REUSEPORT
spreads floodtest's connections), and messages from random senders to the
sender and its friends in a real ``genfriends --m M`` graph over the same
users (:func:`cometd.graphgen.generate_edges`, the sets encoded as the store
stores them). Each round hands ``--per-flush`` messages to
``deliver_many`` (3,300 messages/s and a 50 ms flush pause at 1M) and runs
the flush, recipients walk, grouping by edge and each edge's payload
encoding included, Redis replaced by a client that keeps what is published.
Edge: one edge's payloads from those flushes, decoded and delivered by
:meth:`cometd.backplane.EdgeLink._deliver` into a real
:class:`cometd.connections.ConnectionTable` of SSE streams (``/events``, as
c1m's ``floodtest --events``) whose sockets take every byte at once (the
kernel's send is not measured: it is most of an edge's time, and the same
whatever the router does).

CPU time of this process (``time.process_time``), per delivery: the router
per connection reached, the edge per delivery it made. The median of
``--runs`` passes over the same messages. Runs against whatever source tree
it sits in (``bench/`` of a checkout), so a copy in another checkout
measures that one; that tree's router walk is used
(``Presence.recipients`` if it has one, else :func:`cometd.online.recipients`).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cometd import backplane  # noqa: E402
from cometd.backplane import EdgeLink, Presence, decode_batch  # noqa: E402
from cometd.connections import ConnectionTable  # noqa: E402
from cometd.graphgen import generate_edges  # noqa: E402
from cometd.online import recipients  # noqa: E402
from cometd.store import SetView, encode_set  # noqa: E402
from cometd.streamhttp import SSE_CHUNKED, Message  # noqa: E402

EPOCH = 1 << 64  # message keys as the router's history makes them (epoch 1)


class KeepPublished:
    """A redis client that publishes through a pipeline into a list (nobody hears)."""

    def __init__(self, keep: str) -> None:
        self.keep = keep  # the channel whose payloads are kept
        self.kept: list[bytes] = []

    def pipeline(self, transaction: bool = True) -> KeepPublished:
        self._n = 0
        return self

    def publish(self, channel: str, payload: bytes) -> None:
        self._n += 1
        if channel == self.keep:
            self.kept.append(payload)

    def execute(self) -> list[int]:
        return [1] * self._n


class Sink:
    """A stream's socket that takes every byte at once."""

    def send(self, data: bytes) -> int:
        return len(data)

    def close(self) -> None:
        pass


def friends_graph(n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR adjacency of genfriends' graph: node k's friends are nbr[ptr[k]:ptr[k+1]]."""
    edges = generate_edges(n, m, seed=1)
    src = np.concatenate((edges[:, 0], edges[:, 1]))
    dst = np.concatenate((edges[:, 1], edges[:, 0]))
    order = np.argsort(src, kind="stable")
    ptr = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(src, minlength=n), out=ptr[1:])
    return ptr, dst[order]


def build(args: argparse.Namespace) -> tuple[Presence, KeepPublished, list[str], list]:
    rng = np.random.default_rng(2)
    names = [f"edge{i}" for i in range(args.edges)]
    where = rng.integers(0, args.edges, args.users)
    client = KeepPublished(backplane.EDGE.format(names[0]))
    presence = Presence(client)
    for e, edge in enumerate(names):
        users = np.flatnonzero(where == e) + 1  # user ids 1..n, node k is user k+1
        presence.update(edge, dict.fromkeys(map(str, users.tolist()), 1), snapshot=True)
    ptr, nbr = friends_graph(args.users, args.m)
    senders = rng.integers(0, args.users, args.messages)
    body = b"ts=0;from=1;seq=0;" + b"x" * 80
    sends = []
    for seq, node in enumerate(senders.tolist(), 1):
        view = SetView(encode_set((nbr[ptr[node] : ptr[node + 1]] + 1).tolist(), ()))
        sends.append((str(node + 1), view, body, EPOCH | seq))
    return presence, client, names, sends


def route(presence: Presence, sends: list, per_flush: int) -> tuple[float, int]:
    """CPU seconds and connections reached, routing *sends* in flushes of *per_flush*."""
    walk = getattr(presence, "recipients", recipients)
    index = presence.index
    reached = 0
    start = time.process_time()
    for i in range(0, len(sends), per_flush):
        batch = [(walk(subject, view, index), Message(subject, body, key))
                 for subject, view, body, key in sends[i : i + per_flush]]
        reached += sum(presence.deliver_many(batch))
    return time.process_time() - start, reached


def deliver(payloads: list[bytes]) -> tuple[float, int]:
    """CPU seconds and deliveries of one edge decoding and delivering *payloads*."""
    table = ConnectionTable()
    link = EdgeLink("redis://127.0.0.1:1/0", table, "edge0")  # its Redis is never used
    users = {u for payload in payloads for _, us in decode_batch(payload) for u in us}
    # One fd per stream, never readable (a UDP socket, unbound): the table
    # watches it as it would a stream's, and its sends go to the Sink.
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in users]
    try:
        for user, sock in zip(sorted(users), socks, strict=True):
            table.adopt(sock, user, SSE_CHUNKED).sock = Sink()
        before = table.deliveries
        start = time.process_time()
        for payload in payloads:
            link._deliver(decode_batch(payload))
        return time.process_time() - start, table.deliveries - before
    finally:
        table.on_presence = None
        table.close()
        for sock in socks:
            sock.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--edges", type=int, default=53)
    ap.add_argument("--m", type=int, default=15, help="genfriends --m")
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--per-flush", type=int, default=165, help="messages per delivery flush")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    if not (args.m < args.users <= 2_000_000 and 1 <= args.edges <= 200
            and 1 <= args.messages <= 200_000 and args.per_flush >= 1 and 1 <= args.runs <= 9):
        ap.error("--users m+1..2,000,000, --edges 1..200, --messages 1..200,000, --runs 1..9")
    # No pause between flushes: only the CPU is measured, not the waiting.
    backplane.DELIVERY_FLUSH = 0.0
    backplane.flush_pause = lambda payloads: 0.0
    presence, client, names, sends = build(args)
    presence.settle(EPOCH | 1)  # as a router does: every key before the first is done
    router, edge = [], []
    for _ in range(args.runs):
        client.kept.clear()
        seconds, reached = route(presence, sends, args.per_flush)
        router.append(seconds / reached * 1e6)
        seconds, delivered = deliver(client.kept)
        edge.append(seconds / delivered * 1e6)
    print(f"| {args.users:,} users on {args.edges} edges, genfriends --m {args.m}, "
          f"{args.messages:,} messages in flushes of {args.per_flush} | µs CPU per delivery |")
    print("|---|---:|")
    print(f"| router: walk, group, encode (median of {args.runs}) | "
          f"**{statistics.median(router):.2f}** ({' / '.join(f'{v:.2f}' for v in router)}) |")
    print(f"| edge: decode, look up, frame, deliver to a sink (median of {args.runs}) | "
          f"**{statistics.median(edge):.2f}** ({' / '.join(f'{v:.2f}' for v in edge)}) |")


if __name__ == "__main__":
    main()
