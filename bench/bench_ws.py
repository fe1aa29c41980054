#!/usr/bin/env python3
"""Server RSS of one idle WebSocket next to one idle SSE stream, in each connection mode.

    bench/bench_ws.py [--n 5000] [--runs 3] [--modes greenlet,pool]

Each run starts a fresh ``cometd`` per mode and per kind, opens 100 streams
of that kind first (the first allocations: buffers, dicts growing), takes the
server's RSS (median of 5 samples over a second), opens --n more, waits for
the server to count them all and a second more, takes the RSS again, and
reports (RSS after - RSS before) / n. The streams are ``GET /events/<id>``
(SSE, answered in the accept callback) and ``GET /ws/<id>`` (WebSocket,
through pywsgi and the upgrade), each id its own, opened in batches of 100
from this process and closed with RST. The kinds take turns in each run;
the median, the spread and every run are printed.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import statistics
import struct
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from cometd.loadtest.servers import CometdServer

KINDS = ("sse", "ws")
WARM = 100
BATCH = 100


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def median_rss(pid: int, samples: int = 5, over: float = 1.0) -> float:
    values = []
    for _ in range(samples):
        values.append(rss(pid))
        time.sleep(over / samples)
    return statistics.median(values)


def connections(server: CometdServer) -> int:
    with urllib.request.urlopen(f"{server.url}/stats", timeout=10) as resp:
        return json.load(resp)["connections"]


def request(kind: str, host: str, port: int, user: str) -> bytes:
    if kind == "sse":
        return f"GET /events/{user} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET /ws/{user} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: {key}\r\n\r\n").encode()


def open_streams(kind: str, server: CometdServer, first: int, n: int) -> list[socket.socket]:
    """*n* idle streams of *kind*, ids first.. first+n-1, each answered 200 or 101."""
    want = b" 101 " if kind == "ws" else b" 200 "
    socks: list[socket.socket] = []
    for start in range(first, first + n, BATCH):
        batch = []
        for i in range(start, min(start + BATCH, first + n)):
            s = socket.create_connection((server.host, server.port), timeout=30)
            s.sendall(request(kind, server.host, server.port, f"u{i}"))
            batch.append(s)
        for s in batch:
            head = b""
            while b"\r\n\r\n" not in head:
                data = s.recv(4096)
                if not data:
                    raise RuntimeError(f"{kind}: closed before its head: {head!r}")
                head += data
            status = head.split(b"\r\n", 1)[0]
            if want not in status:
                raise RuntimeError(f"{kind}: {status!r}")
        socks.extend(batch)
    return socks


def reset(socks: list[socket.socket]) -> None:
    for s in socks:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()


def one(mode: str, kind: str, n: int, work: Path) -> float:
    server = CometdServer(mode, str(work / f"db-{mode}-{kind}-{time.monotonic_ns()}"), work)
    socks: list[socket.socket] = []
    try:
        socks += open_streams(kind, server, 0, WARM)
        before = median_rss(server.proc.pid)
        socks += open_streams(kind, server, WARM, n)
        deadline = time.monotonic() + 60
        while connections(server) < WARM + n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{mode} {kind}: the server never counted {WARM + n}")
            time.sleep(0.1)
        time.sleep(1.0)
        after = median_rss(server.proc.pid)
        return (after - before) / n
    finally:
        reset(socks)
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--modes", default="greenlet,pool")
    args = ap.parse_args()
    modes = args.modes.split(",")
    per: dict[tuple[str, str], list[float]] = {(m, k): [] for m in modes for k in KINDS}
    with tempfile.TemporaryDirectory(prefix="bench-ws-") as tmp:
        for run in range(args.runs):
            for mode in modes:
                order = KINDS if run % 2 == 0 else KINDS[::-1]
                for kind in order:
                    value = one(mode, kind, args.n, Path(tmp))
                    per[mode, kind].append(value)
                    print(f"run {run + 1}: {mode} {kind}: {value / 1024:.2f} KiB/conn",
                          file=sys.stderr)
    print(f"{args.n} idle streams per server, {args.runs} runs; server RSS per stream, KiB")
    print("| mode | SSE median | WebSocket median | WebSocket - SSE | SSE runs | WS runs |")
    print("|---|---:|---:|---:|---|---|")
    for mode in modes:
        sse, ws = per[mode, "sse"], per[mode, "ws"]
        print(f"| {mode} | {statistics.median(sse) / 1024:.2f} | "
              f"{statistics.median(ws) / 1024:.2f} | "
              f"{(statistics.median(ws) - statistics.median(sse)) / 1024:+.2f} | "
              f"{', '.join(f'{v / 1024:.2f}' for v in sse)} | "
              f"{', '.join(f'{v / 1024:.2f}' for v in ws)} |")


if __name__ == "__main__":
    main()
