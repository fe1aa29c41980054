#!/usr/bin/env python3
"""Server CPU per stream opened: the accept callback vs pywsgi, side by side.

    bench/bench_accept.py [--streams 5000] [--batch 250] [--runs 5]

A pool-mode ``bin/cometd`` is sent --streams stream requests per run in
batches: every socket of a batch connects and sends a first part, then, 20 ms
later, the rest. With the whole request in the first part the accept callback
answers it (cometd.streamhttp); with only ``GET /test`` in the first part it
is incomplete at accept time and goes to pywsgi and bottle. The client does
the same thing in both cases; the server's CPU (from /proc/<pid>/schedstat,
exact rather than tick-sampled) is divided by the streams whose welcome
arrived. Runs alternate between the two paths; the table shows medians and
the spread.
Loopback only; every loop is bounded.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cometd.loadtest.sampling import schedstat_cpu_ns as server_cpu_ns  # noqa: E402


def open_batch(port: int, first: int, n: int, split: int | None) -> list[socket.socket]:
    """*n* streams for users first.. ; *split*: bytes sent before the pause (None: all)."""
    socks, requests = [], []
    for user in range(first, first + n):
        request = b"GET /test/%d HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % user
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(request[:split] if split else request)
        socks.append(sock)
        requests.append(request)
    time.sleep(0.02)
    for sock, request in zip(socks, requests, strict=True):
        if split:
            sock.sendall(request[split:])
    for sock in socks:
        head = b""
        while b"Welcome" not in head:
            data = sock.recv(4096)
            if not data:
                raise RuntimeError(f"stream closed before its welcome: {head!r}")
            head += data
    return socks


def run_once(port: int, pid: int, streams: int, batch: int, split: int | None,
             first: int) -> float:
    """Server CPU microseconds per stream opened."""
    held: list[socket.socket] = []
    before = server_cpu_ns(pid)
    try:
        for start in range(first, first + streams, batch):
            held += open_batch(port, start, min(batch, first + streams - start), split)
        return (server_cpu_ns(pid) - before) / len(held) / 1000
    finally:
        linger = struct.pack("ii", 1, 0)
        for sock in held:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            sock.close()
        time.sleep(1)  # the server handles the resets before the next run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-accept-")
    server = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "bin", "cometd"), "--port", "0", "--admin-port",
         "-1", "--mode", "pool", "--db", os.path.join(tmp, "db")],
        stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        paths = {"accept callback (whole request at accept)": None,
                 "pywsgi + bottle (request split in two)": len(b"GET /test")}
        results: dict[str, list[float]] = {name: [] for name in paths}
        first = 1
        for _ in range(args.runs):
            for name, split in paths.items():
                results[name].append(run_once(port, server.pid, args.streams, args.batch,
                                              split, first))
                first += args.streams
        print(f"| stream opened through ({args.runs} runs of {args.streams}) "
              f"| server CPU µs per stream, median | min–max (each run) |")
        print("|---|---:|---|")
        for name, values in results.items():
            print(f"| {name} | {statistics.median(values):.1f} | {min(values):.1f}–"
                  f"{max(values):.1f} ({' / '.join(f'{v:.1f}' for v in values)}) |")
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
