#!/usr/bin/env python3
"""Server CPU per stream opened: the accept callback vs pywsgi, side by side.

    bench/bench_accept.py [--streams 5000] [--batch 250] [--runs 5] [--auth] [--limits]

A pool-mode ``bin/cometd`` is sent --streams stream requests per run in
batches: every socket of a batch connects and sends a first part, then, 20 ms
later, the rest. With the whole request in the first part the accept callback
answers it (cometd.streamhttp); with only ``GET /test`` in the first part it
is incomplete at accept time and goes to pywsgi and bottle. The client does
the same thing in both cases; the server's CPU (from /proc/<pid>/schedstat,
exact rather than tick-sampled) is divided by the streams whose welcome
arrived. Runs alternate between the two paths; the table shows medians and
the spread. With --auth, a second server with --jwt-secret takes the same
requests carrying an HS256 token each (?token=, minted by the client), and
its runs alternate with the first server's. With --limits, two more servers:
one with every admission limit off (--max-streams-per-user 0), one with
every one on but none refusing (per address 100,000, 1,000,000 a second).
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

import jwt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cometd.loadtest.sampling import schedstat_cpu_ns as server_cpu_ns  # noqa: E402

SECRET = "bench-accept-secret-of-at-least-32-bytes"


def open_batch(port: int, first: int, n: int, split: int | None,
               secret: str | None = None) -> list[socket.socket]:
    """*n* streams for users first.. ; *split*: bytes sent before the pause (None: all);
    *secret*: each request carries a token signed with it."""
    exp = int(time.time()) + 3600
    requests = []
    for user in range(first, first + n):  # all minted first: the connects come as fast
        query = b""
        if secret:
            query = b"?token=" + jwt.encode({"sub": str(user), "exp": exp}, secret).encode()
        requests.append(b"GET /test/%d%s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % (user, query))
    socks = []
    for request in requests:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(request[:split] if split else request)
        socks.append(sock)
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
             first: int, secret: str | None = None) -> float:
    """Server CPU microseconds per stream opened."""
    held: list[socket.socket] = []
    before = server_cpu_ns(pid)
    try:
        for start in range(first, first + streams, batch):
            held += open_batch(port, start, min(batch, first + streams - start), split, secret)
        return (server_cpu_ns(pid) - before) / len(held) / 1000
    finally:
        linger = struct.pack("ii", 1, 0)
        for sock in held:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            sock.close()
        time.sleep(1)  # the server handles the resets before the next run


def print_table(title: str, results: dict[str, list[float]]) -> None:
    """A Markdown table of CPU µs per stream: median and each run, per contender."""
    print(f"| {title} | server CPU µs per stream, median | min–max (each run) |")
    print("|---|---:|---|")
    for name, values in results.items():
        print(f"| {name} | {statistics.median(values):.1f} | {min(values):.1f}–"
              f"{max(values):.1f} ({' / '.join(f'{v:.1f}' for v in values)}) |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--auth", action="store_true",
                    help="also a server with --jwt-secret, every request with a token")
    ap.add_argument("--limits", action="store_true",
                    help="also servers with every admission limit off, and every one on "
                         "(none refusing)")
    args = ap.parse_args()
    # label -> (extra server flags, token secret)
    variants: dict[str, tuple[list[str], str | None]] = {"": ([], None)}
    if args.auth:
        variants[", HS256 token"] = (["--jwt-secret", SECRET], SECRET)
    if args.limits:
        variants[", limits off"] = (["--max-streams-per-user", "0"], None)
        variants[", every limit on"] = (["--max-streams-per-address", "100000",
                                         "--stream-rate-per-address", "1000000"], None)
    tmp = tempfile.mkdtemp(prefix="bench-accept-")
    servers: dict[str, subprocess.Popen] = {}
    try:
        for label, (flags, _secret) in variants.items():
            servers[label] = proc = subprocess.Popen(
                [sys.executable, os.path.join(ROOT, "bin", "cometd"), "--port", "0",
                 "--admin-port", "-1", "--mode", "pool", "--db",
                 os.path.join(tmp, f"db{len(servers)}"), *flags],
                stdout=subprocess.PIPE, text=True)
            line = proc.stdout.readline()
            proc.port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        paths = {"accept callback (whole request at accept)": None,
                 "pywsgi + bottle (request split in two)": len(b"GET /test")}
        cases = {name + label: (label, split) for name, split in paths.items()
                 for label in servers}
        results: dict[str, list[float]] = {name: [] for name in cases}
        first = 1
        for _ in range(args.runs):
            for name, (label, split) in cases.items():
                proc = servers[label]
                results[name].append(run_once(proc.port, proc.pid, args.streams, args.batch,
                                              split, first, variants[label][1]))
                first += args.streams
        print_table(f"stream opened through ({args.runs} runs of {args.streams})", results)
    finally:
        for proc in servers.values():
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
