#!/usr/bin/env python3
"""Server CPU per ``POST /send`` of the fast path's connection loop alone, no router.

    [PYTHONPATH=CHECKOUT] bench/bench_publish_loop.py [--count 20000] [--rate 0] [--rounds 3]

:func:`cometd.publish.serve_publisher` serves one keep-alive TCP loopback
connection in this process, publishing to a backend that answers at once
(``delivered: 0``), so what is measured is the loop: waiting for the
request, reading its head, the credential check (none configured), the
answer and its write. A client thread (pinned to CPU 1) sends --count
publishes of 100 bytes one at a time, each after the answer to the last,
paced at --rate a second (0: back to back, with warm caches); the figure is
the CPU time of the server's thread (pinned to CPU 0) divided by --count.
``bench/bench_publish.py`` measures the whole server (router included) the
same way at 2,000 a second; the difference is the router's share.

With PYTHONPATH set to another checkout, that checkout's loop is measured
(one from before the loop served raw sockets is handed a gevent socket).
Loopback only; every loop is bounded by --count.
"""

from __future__ import annotations

import _socket
import argparse
import os
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

if "PYTHONPATH" not in os.environ:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gevent  # noqa: E402
from gevent import socket as gsocket  # noqa: E402

from cometd import publish  # noqa: E402
from cometd.auth import Authenticator  # noqa: E402
from cometd.config import AuthConfig  # noqa: E402

REQUEST = b"POST /send/%d HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"m" * 100


class NullBackend:
    """Takes every message at once, delivered to nobody."""

    def __init__(self) -> None:
        self.sent = 0

    def send(self, subject: str, body: bytes) -> tuple[int, str]:
        self.sent += 1
        return 0, f"1-{self.sent}"


def client(sock: socket.socket, count: int, rate: float) -> None:
    os.sched_setaffinity(threading.get_native_id(), {1})
    reader = sock.makefile("rb")
    start = time.monotonic()
    for i in range(count):
        if rate:
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        sock.sendall(REQUEST % (i % 1000 + 1))
        reader.readline()
        length = 0
        while (line := reader.readline()) != b"\r\n":
            if line.startswith(b"Content-Length:"):
                length = int(line.split(b":")[1])
        reader.read(length)
    sock.shutdown(socket.SHUT_WR)


def one_round(count: int, rate: float) -> float:
    """Server-thread CPU µs per publish."""
    table = type("Table", (), {"loop": gevent.get_hub().loop})()
    server = type("Server", (), {"publisher": NullBackend(), "auth": Authenticator(AuthConfig()),
                                 "cors": None, "table": table, "request_timeout": 10.0})()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        theirs = socket.create_connection(listener.getsockname())
        theirs.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ours, _ = listener.accept()
    ours.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    raw = _socket.socket(fileno=ours.detach())
    sock = raw if hasattr(publish, "_Publisher") else gsocket.socket(fileno=raw.detach())
    thread = threading.Thread(target=client, args=(theirs, count, rate))
    before = time.thread_time()
    thread.start()
    served = gevent.spawn(publish.serve_publisher, server, sock, b"")
    served.join(60 + 2 * count / (rate or 10_000))
    used = time.thread_time() - before
    thread.join(10)
    theirs.close()
    sock.close()
    if server.publisher.sent != count:
        raise RuntimeError(f"{server.publisher.sent} of {count} publishes served")
    return used / count * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=20_000)
    ap.add_argument("--rate", type=float, default=0, help="publishes a second (0: unpaced)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    os.sched_setaffinity(0, {0})
    results = [one_round(args.count, args.rate) for _ in range(args.rounds)]
    print(f"{publish.__file__}: {statistics.median(results):.1f} µs server CPU per publish, "
          f"median of {args.rounds} ({' / '.join(f'{r:.1f}' for r in results)}), "
          f"rate {args.rate:g}/s")


if __name__ == "__main__":
    main()
