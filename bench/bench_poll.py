#!/usr/bin/env python3
"""Server memory per waiting long poll, next to an idle SSE stream, in one run.

    bench/bench_poll.py [--connections 10000] [--runs 3] [--modes greenlet,pool]

Each round, for each connection mode, starts a fresh ``bin/cometd`` twice:
once holding --connections idle SSE streams (``GET /events/<id>``), once
--connections waiting polls (``GET /poll/<id>?timeout=60``), every one for a
distinct id subscribed to one publisher. It reports the server's RSS growth
divided by the connections (after 200 of each to warm up), and, for the
polls, the seconds from one ``POST /send`` by the publisher until every poll
has its whole answer (10,000 answers, each closing or keeping its connection;
a check that they are all woken, not a latency target). Contenders take turns
in each round; the table gives the median, the spread and every run.
Loopback only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WARM = 200
PUBLISHER = "boss"


def start(mode: str, db: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "bin", "cometd"), "--port", "0", "--admin-port",
         "-1", "--mode", mode, "--db", db, "--max-streams-per-user", "0"],
        stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    return proc, int(line.split("http://127.0.0.1:")[1].split("/")[0])


def call(port: int, method: str, path: str, body: bytes | None = None) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def table_connections(port: int) -> int:
    return call(port, "GET", "/stats")["connections"]


def open_many(port: int, paths: list[str], expect: int,
              timeout: float = 120) -> list[socket.socket]:
    """Connect and send each request; wait until the server holds *expect* connections."""
    socks = []
    for i, path in enumerate(paths):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
        socks.append(s)
        if i % 500 == 499:
            time.sleep(0.05)  # let the server's accept loop keep up
    deadline = time.monotonic() + timeout
    while table_connections(port) < expect:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {table_connections(port)} of {expect} connections held")
        time.sleep(0.1)
    return socks


def read_answers(socks: list[socket.socket], timeout: float = 120) -> None:
    """Wait until every poll's whole answer (its Content-Length of body) is in."""
    poller = select.epoll()
    bufs: dict[int, bytes] = {}
    by_fd = {}
    for s in socks:
        s.setblocking(False)
        poller.register(s.fileno(), select.EPOLLIN)
        bufs[s.fileno()] = b""
        by_fd[s.fileno()] = s
    left = set(bufs)
    deadline = time.monotonic() + timeout
    try:
        while left:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(left)} polls not answered")
            for fd, _ in poller.poll(1.0):
                try:
                    data = by_fd[fd].recv(65536)
                except BlockingIOError:
                    continue
                bufs[fd] += data
                head, sep, body = bufs[fd].partition(b"\r\n\r\n")
                if sep:
                    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                    if len(body) >= length:
                        assert b'"body": "wake"' in body, body
                        left.discard(fd)
                        poller.unregister(fd)
                elif not data:
                    raise RuntimeError("a poll closed without an answer")
    finally:
        poller.close()


def run_once(kind: str, mode: str, n: int, tmp: str, round_: int) -> tuple[float, float | None]:
    """(KiB of server RSS per connection, seconds to answer all polls or None)."""
    proc, port = start(mode, os.path.join(tmp, f"{kind}-{mode}-{round_}"))
    socks: list[socket.socket] = []
    try:
        users = [f"u{i}" for i in range(WARM + n)]
        call(port, "POST", "/subscriptions",
             json.dumps([[u, PUBLISHER] for u in users]).encode())
        path = "/events/{}" if kind == "sse" else "/poll/{}?timeout=60"
        socks += open_many(port, [path.format(u) for u in users[:WARM]], WARM)
        time.sleep(0.5)
        process = psutil.Process(proc.pid)
        before = process.memory_info().rss
        socks += open_many(port, [path.format(u) for u in users[WARM:]], WARM + n)
        time.sleep(1.0)
        per = (process.memory_info().rss - before) / n / 1024
        woken = None
        if kind == "poll":
            started = time.monotonic()
            call(port, "POST", f"/send/{PUBLISHER}", b"wake")
            read_answers(socks)
            woken = time.monotonic() - started
        return per, woken
    finally:
        for s in socks:
            s.close()
        proc.terminate()
        proc.wait(30)


def cell(values: list[float], fmt: str) -> str:
    return (f"**{statistics.median(values):{fmt}}** ({min(values):{fmt}}–{max(values):{fmt}}; "
            f"{' / '.join(f'{v:{fmt}}' for v in values)})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--connections", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--modes", default="greenlet,pool")
    args = ap.parse_args()
    modes = args.modes.split(",")
    cases = [(kind, mode) for mode in modes for kind in ("sse", "poll")]
    rss: dict[tuple[str, str], list[float]] = {c: [] for c in cases}
    woken: dict[str, list[float]] = {m: [] for m in modes}
    tmp = tempfile.mkdtemp(prefix="bench-poll-")
    try:
        for round_ in range(args.runs):
            for kind, mode in cases:
                per, seconds = run_once(kind, mode, args.connections, tmp, round_)
                rss[(kind, mode)].append(per)
                if seconds is not None:
                    woken[mode].append(seconds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"| {args.connections:,} connections, median of {args.runs} (min–max; each run) "
          f"| server RSS per connection, KiB | all polls answered after one send, s |")
    print("|---|---:|---:|")
    for kind, mode in cases:
        label = "idle SSE stream" if kind == "sse" else "waiting poll"
        seconds = cell(woken[mode], ".2f") if kind == "poll" else ""
        print(f"| `--mode {mode}`, {label} | {cell(rss[(kind, mode)], '.2f')} | {seconds} |")


if __name__ == "__main__":
    main()
