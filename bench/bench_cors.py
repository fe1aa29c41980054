#!/usr/bin/env python3
"""Server CPU per stream opened by the accept callback, without and with CORS.

    bench/bench_cors.py [--streams 5000] [--batch 250] [--runs 5] [--baseline DIR]

One pool-mode ``bin/cometd`` per configuration: no ``--cors-origin``; a listed
origin, with every request carrying that ``Origin`` (the accept callback
searches the request for it); and ``*`` (no search). With ``--baseline DIR``
(a checkout of another commit, e.g. from ``git archive``), that checkout's
``bin/cometd`` without CORS runs beside them, for before/after. Each run
opens --streams streams in batches of whole requests (see bench_accept.py) and
divides the server's CPU (from /proc/<pid>/schedstat) by the streams whose
welcome arrived; runs alternate between the servers; the table shows medians
and the spread. Loopback only; every loop is bounded.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time

from bench_accept import print_table, server_cpu_ns

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORIGIN = "https://app.example"


def open_batch(port: int, first: int, n: int, origin: bool) -> list[socket.socket]:
    socks = []
    extra = f"Origin: {ORIGIN}\r\n".encode() if origin else b""
    for user in range(first, first + n):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"GET /test/%d HTTP/1.1\r\nHost: 127.0.0.1\r\n%s\r\n" % (user, extra))
        socks.append(sock)
    for sock in socks:
        head = b""
        while b"Welcome" not in head:
            data = sock.recv(4096)
            if not data:
                raise RuntimeError(f"stream closed before its welcome: {head!r}")
            head += data
        if origin and b"Access-Control-Allow-Origin" not in head:
            raise RuntimeError(f"no CORS header in {head!r}")
    return socks


def run_once(port: int, pid: int, streams: int, batch: int, origin: bool, first: int) -> float:
    """Server CPU microseconds per stream opened."""
    held: list[socket.socket] = []
    before = server_cpu_ns(pid)
    try:
        for start in range(first, first + streams, batch):
            held += open_batch(port, start, min(batch, first + streams - start), origin)
        return (server_cpu_ns(pid) - before) / len(held) / 1000
    finally:
        linger = struct.pack("ii", 1, 0)
        for sock in held:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            sock.close()
        time.sleep(1)  # the server handles the resets before the next run


def start(root: str, tmp: str, name: str, args: list[str]) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, os.path.join(root, "bin", "cometd"), "--port", "0", "--admin-port",
         "-1", "--mode", "pool", "--db", os.path.join(tmp, name), *args],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=root))
    line = proc.stdout.readline()
    return proc, int(line.split("http://127.0.0.1:")[1].split("/")[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--baseline", metavar="DIR", help="another checkout, run without CORS")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-cors-")
    configs = {"no --cors-origin": (ROOT, [], False),
               f"--cors-origin {ORIGIN}, requests with that Origin": (
                   ROOT, ["--cors-origin", ORIGIN], True),
               "--cors-origin '*'": (ROOT, ["--cors-origin", "*"], False)}
    if args.baseline:
        configs = {f"baseline {args.baseline}, no --cors-origin": (args.baseline, [], False),
                   **configs}
    servers = {}
    try:
        for i, (name, (root, flags, _)) in enumerate(configs.items()):
            servers[name] = start(root, tmp, f"db{i}", flags)
        results: dict[str, list[float]] = {name: [] for name in configs}
        first = 1
        for _ in range(args.runs):
            for name, (proc, port) in servers.items():
                results[name].append(run_once(port, proc.pid, args.streams, args.batch,
                                              configs[name][2], first))
                first += args.streams
        print_table(f"accept callback, pool mode ({args.runs} runs of {args.streams})", results)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
