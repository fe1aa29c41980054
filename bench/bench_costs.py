#!/usr/bin/env python3
"""Unit costs behind the fan-out figures, side by side in one run.

    bench/bench_costs.py [--streams 4000] [--messages 20] [--runs 3]

- CPU per delivery, in-process: a ConnectionTable in each mode holding
  --streams loopback streams (their readers never read, so no wake-ups),
  fanning --messages messages out to all of them;
- the floor: a bare non-blocking send() loop over the same kind of sockets;
- server CPU per POST /send with no recipients: bin/cometd driven by
  bin/msggen --rate 0 for 4 s.

Each of --runs rounds measures every cost once, in turn, so machine load hits
them alike; the table gives the median, the spread and every run. Loopback
only; every loop is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _pairs(n: int) -> tuple[list[socket.socket], list[socket.socket]]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(n)
    clients, servers = [], []
    for _ in range(n):
        clients.append(socket.create_connection(listener.getsockname()))
        servers.append(listener.accept()[0])
    listener.close()
    return clients, servers


def delivery_us(mode: str, streams: int, messages: int) -> float:
    """CPU microseconds per delivery through a ConnectionTable in *mode*."""
    code = f"""
import gevent, resource, socket, sys
sys.path[:0] = [{ROOT!r}, {os.path.join(ROOT, "bench")!r}]
from greenlet import greenlet
from cometd.connections import ConnectionTable
from cometd.streamhttp import CHUNKED, Message
from bench_costs import _cpu, _pairs
table = ConnectionTable({mode!r})
clients, servers = _pairs({streams})
users = [str(i) for i in range(len(servers))]
conns = [table.adopt(s, u, CHUNKED) for s, u in zip(servers, users)]
if {mode!r} == "greenlet":
    hub = gevent.get_hub()
    for conn in conns:
        hub.loop.run_callback(greenlet(conn.run, parent=hub).switch)
gevent.sleep(0.1)
start = _cpu()
for k in range({messages}):
    table.deliver(users, Message("1", b"ts=1764140000.123456;from=1;seq=%d;" % k))
    gevent.sleep(0)
gevent.sleep(0.2)
print((_cpu() - start) / ({messages} * len(users)) * 1e6)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT, timeout=300)
    return float(out.stdout.strip())


def bare_send_us(streams: int, messages: int) -> float:
    clients, servers = _pairs(streams)
    for s in servers:
        s.setblocking(False)
    data = b"2a\r\nts=1764140000.123456;from=1;seq=1;xxxxxxxx\r\n"
    start = _cpu()
    for _ in range(messages):
        for s in servers:
            s.send(data)
    per = (_cpu() - start) / (messages * streams) * 1e6
    for s in clients + servers:
        s.close()
    return per


def post_us(mode: str) -> float:
    import psutil

    db = tempfile.mkdtemp(prefix="cometd-bench-costs-")
    server = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "bin", "cometd"), "--port", "0", "--admin-port", "-1",
         "--db", os.path.join(db, "db"), "--mode", mode], stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        port = line.split("http://127.0.0.1:")[1].split("/")[0]
        proc = psutil.Process(server.pid)
        before = proc.cpu_times()
        summary = os.path.join(db, "msggen.json")
        subprocess.run([sys.executable, os.path.join(ROOT, "bin", "msggen"), "--url",
                        f"http://127.0.0.1:{port}", "--rate", "0", "--duration", "4",
                        "--concurrency", "8", "--interval", "100", "--json", summary],
                       check=True, stdout=subprocess.DEVNULL, timeout=60)
        after = proc.cpu_times()
        sent = json.load(open(summary))["sent"]
        return ((after.user - before.user) + (after.system - before.system)) / sent * 1e6
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(db, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", type=int, default=4000)
    ap.add_argument("--messages", type=int, default=20)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    costs = {
        "one delivery, greenlet mode (in-process)":
            lambda: delivery_us("greenlet", args.streams, args.messages),
        "one delivery, pool mode (in-process)":
            lambda: delivery_us("pool", args.streams, args.messages),
        "bare send() on the same kind of socket": lambda: bare_send_us(args.streams,
                                                                       args.messages),
        "POST /send with no recipients, greenlet mode (server CPU)": lambda: post_us("greenlet"),
        "POST /send with no recipients, pool mode (server CPU)": lambda: post_us("pool"),
    }
    runs: dict[str, list[float]] = {name: [] for name in costs}
    for r in range(args.runs):
        for name, measure in costs.items():
            runs[name].append(measure())
        print(f"round {r + 1}: " + ", ".join(f"{v[-1]:.2f}" for v in runs.values()),
              file=sys.stderr)
    print(f"| cost | CPU µs, median of {args.runs} | min–max (each run) |")
    print("|---|---:|---|")
    for name, values in runs.items():
        print(f"| {name} | {statistics.median(values):.2f} | {min(values):.2f}–"
              f"{max(values):.2f} ({' / '.join(f'{v:.2f}' for v in values)}) |")


if __name__ == "__main__":
    main()
