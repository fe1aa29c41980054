#!/usr/bin/env python3
"""An edge's CPU per Redis message received: the scale-out delivery reader, measured alone.

    .venv/bin/python bench/bench_edge_reader.py [--edges 4] [--streams 200] [--rate 1000]
        [--messages 1] [--seconds 10] [--runs 3] [--parser hiredis|python]

Starts a throwaway redis-server and ``--edges`` real ``cometd edge`` processes
(no router: the bench plays it), opens ``--streams`` ``/test`` streams on each
(their output is read and dropped by a thread here), then PUBLISHes delivery
payloads straight to each edge's channel (``cometd:edge:<id>``, the router's
own encoding, :func:`cometd.backplane.encode_batch`) at ``--rate`` payloads a
second per edge for ``--seconds``, each payload carrying ``--messages``
messages for one random stream each, pipelined every 10 ms as the router
flushes. It reads each edge's CPU time (user + system) before and after,
less its idle CPU over as long (measured first), and prints the median per
payload and per message. ``--parser python`` starts the edges with hiredis
hidden, so redis-py parses in Python, as before hiredis was a dependency.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import psutil
import redis

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cometd.backplane import EDGE, encode_batch  # noqa: E402
from cometd.lifecycle import free_port  # noqa: E402
from cometd.streamhttp import Message  # noqa: E402

EDGE_BANNER = re.compile(r"cometd edge (\S+): listening on http://127\.0\.0\.1:(\d+)/")
HIDE_HIREDIS = "import sys; sys.modules['hiredis'] = None; import runpy; " \
               "sys.argv[0] = 'cometd'; runpy.run_module('cometd', run_name='__main__')"
TICK = 0.01


def start_redis(workdir: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([shutil.which("redis-server") or "/usr/bin/redis-server", "--port",
                             str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                             "no", "--dir", workdir], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    for _ in range(200):
        try:
            client.ping()
            return proc, url
        except redis.ConnectionError:
            time.sleep(0.02)
    raise RuntimeError("redis-server did not start")


def start_edge(url: str, parser: str) -> tuple[subprocess.Popen, str, int]:
    argv = ["edge", "--redis", url, "--port", "0", "--max-streams-per-user", "0"]
    cmd = ([sys.executable, "-c", HIDE_HIREDIS, *argv] if parser == "python"
           else [sys.executable, "-m", "cometd", *argv])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    line = proc.stdout.readline()
    match = EDGE_BANNER.search(line)
    if not match:
        proc.kill()
        raise RuntimeError(f"edge did not start: {line!r}")
    return proc, match.group(1), int(match.group(2))


def open_streams(port: int, users: list[str], sel: selectors.BaseSelector) -> list[socket.socket]:
    socks = []
    for user in users:
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(f"GET /test/{user} HTTP/1.1\r\nHost: b\r\n\r\n".encode())
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        socks.append(s)
    return socks


def drain(sel: selectors.BaseSelector, stop: threading.Event) -> None:
    while not stop.is_set():
        for key, _ in sel.select(0.1):
            try:
                key.fileobj.recv(1 << 16)
            except BlockingIOError:
                pass


def cpu(proc: subprocess.Popen) -> float:
    t = psutil.Process(proc.pid).cpu_times()
    return t.user + t.system


def one_run(args: argparse.Namespace) -> tuple[float, float]:
    """Median over the edges of (µs of CPU per payload, per message)."""
    with tempfile.TemporaryDirectory() as tmp:
        redis_proc, url = start_redis(tmp)
        edges: list[tuple[subprocess.Popen, str, int]] = []
        sel = selectors.DefaultSelector()
        stop = threading.Event()
        try:
            edges = [start_edge(url, args.parser) for _ in range(args.edges)]
            users = {eid: [f"e{i}u{j}" for j in range(args.streams)]
                     for i, (_, eid, _) in enumerate(edges)}
            for _, eid, port in edges:
                open_streams(port, users[eid], sel)
            reader = threading.Thread(target=drain, args=(sel, stop), daemon=True)
            reader.start()
            time.sleep(1.0)  # streams in the tables, presence reported
            idle = [cpu(p) for p, _, _ in edges]
            time.sleep(args.seconds)
            idle = [(cpu(p) - c) / args.seconds for (p, _, _), c in zip(edges, idle,
                                                                          strict=True)]
            client = redis.Redis.from_url(url)
            rng = random.Random(1)
            body = b"ts=0;from=1;seq=0;" + b"x" * 80
            before = [cpu(p) for p, _, _ in edges]
            start = time.monotonic()
            sent = 0
            per_tick = args.rate * TICK
            due = 0.0
            while time.monotonic() - start < args.seconds:
                due += per_tick
                n, due = int(due), due - int(due)
                pipe = client.pipeline(transaction=False)
                for _, eid, _ in edges:
                    for _ in range(n):
                        entries = [(Message("1", body, 1), [rng.choice(users[eid])])
                                   for _ in range(args.messages)]
                        pipe.publish(EDGE.format(eid), encode_batch(entries))
                heard = pipe.execute()
                assert all(heard), "an edge does not listen on its channel"
                sent += n
                time.sleep(max(0.0, start + (sent / args.rate) - time.monotonic()))
            elapsed = time.monotonic() - start
            time.sleep(0.5)  # the last payloads handled
            used = [cpu(p) - b - i * (elapsed + 0.5)
                    for (p, _, _), b, i in zip(edges, before, idle, strict=True)]
            per_payload = statistics.median(u / sent * 1e6 for u in used)
            return per_payload, per_payload / args.messages
        finally:
            stop.set()
            for key in list(sel.get_map().values()):
                key.fileobj.close()
            for proc, _, _ in edges:
                proc.terminate()
            for proc, _, _ in edges:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
            redis_proc.terminate()
            redis_proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--edges", type=int, default=4)
    ap.add_argument("--streams", type=int, default=200, help="streams held per edge")
    ap.add_argument("--rate", type=float, default=1000.0, help="payloads a second per edge")
    ap.add_argument("--messages", type=int, default=1, help="messages per payload")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--parser", choices=("hiredis", "python"), default="hiredis")
    args = ap.parse_args()
    if not 1 <= args.edges <= 32 or not 1 <= args.streams <= 5000 or args.seconds > 120:
        ap.error("--edges 1..32, --streams 1..5000, --seconds at most 120")
    runs = [one_run(args) for _ in range(args.runs)]
    payload = [r[0] for r in runs]
    message = [r[1] for r in runs]
    print(f"| {args.edges} edges x {args.streams} streams, {args.rate:g} payloads/s/edge x "
          f"{args.messages} msg, {args.seconds:g} s, parser {args.parser} | µs CPU per payload "
          f"| µs CPU per message |")
    print("|---|---:|---:|")
    print(f"| median of {args.runs} (each run) | **{statistics.median(payload):.0f}** "
          f"({' / '.join(f'{v:.0f}' for v in payload)}) | "
          f"**{statistics.median(message):.0f}** ({' / '.join(f'{v:.0f}' for v in message)}) |")


if __name__ == "__main__":
    main()
