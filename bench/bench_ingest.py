#!/usr/bin/env python3
"""Publishing through the Redis Stream vs POST /send: CPU per message, scaled out.

    .venv/bin/python bench/bench_ingest.py [--edges 2] [--users 1000] [--rate 2000]
        [--seconds 10] [--runs 3]

Starts a throwaway redis-server, one ``cometd router --ingest-stream`` and
``--edges`` ``cometd edge`` processes sharing a port, holds one ``/test``
stream for each of ``--users`` users (read and dropped by a thread here),
then, in each round, runs ``msggen`` at ``--rate`` for ``--seconds`` twice,
in turn: ``--via redis-stream`` (one XADD per message, the router reads the
stream) and ``--via http`` (POST /send to the edges, which call the router
through Redis). Each message goes to its sender's own stream (no friends
graph), so the figures are the publishing path's, not the fan-out's. For each
it reports the rate msggen achieved and the CPU (user + system) the router,
the edges together and Redis spent per message, less their idle CPU over as
long (measured first); medians of ``--runs`` rounds, each round's figure in
brackets.
"""

from __future__ import annotations

import argparse
import json
import os
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

from bench_edge_reader import drain  # noqa: E402

from cometd.lifecycle import free_port  # noqa: E402

STREAM = "cometd:messages"
VIAS = ("redis-stream", "http")


def start(cmd: list[str], ready: str, tmp: str, name: str) -> subprocess.Popen:
    log = open(os.path.join(tmp, name + ".log"), "w")  # noqa: SIM115 - the child holds it
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    line = proc.stdout.readline()
    if not re.search(ready, line):
        proc.kill()
        raise RuntimeError(f"{name} did not start: {line!r}; see {log.name}")
    return proc


def cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        t = psutil.Process(pid).cpu_times()
        total += t.user + t.system
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--edges", type=int, default=2)
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=2000.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    if not 1 <= args.edges <= 16 or not 1 <= args.users <= 10_000 or args.seconds > 120:
        ap.error("--edges 1..16, --users 1..10000, --seconds at most 120")
    py = sys.executable
    procs: list[subprocess.Popen] = []
    sel = selectors.DefaultSelector()
    stop = threading.Event()
    figures: dict[str, dict[str, list[float]]] = {v: {} for v in VIAS}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            rport, port = free_port(), free_port()
            procs.append(subprocess.Popen(
                [shutil.which("redis-server") or "/usr/bin/redis-server", "--port", str(rport),
                 "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", tmp],
                stdout=subprocess.DEVNULL))
            url = f"redis://127.0.0.1:{rport}/0"
            client = redis.Redis.from_url(url)
            for _ in range(200):
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.02)
            router = start([py, "-m", "cometd", "router", "--redis", url, "--db",
                            os.path.join(tmp, "db"), "--admin-port", "-1", "--ingest-stream",
                            STREAM], "cometd router", tmp, "router")
            procs.append(router)
            edges = [start([py, "-m", "cometd", "edge", "--redis", url, "--port", str(port),
                            "--reuse-port"], "listening on", tmp, f"edge{i}")
                     for i in range(args.edges)]
            procs += edges
            for u in range(1, args.users + 1):
                s = socket.create_connection(("127.0.0.1", port))
                s.sendall(f"GET /test/{u} HTTP/1.1\r\nHost: b\r\n\r\n".encode())
                s.setblocking(False)
                sel.register(s, selectors.EVENT_READ)
            threading.Thread(target=drain, args=(sel, stop), daemon=True).start()
            time.sleep(1.5)  # presence reported
            groups = {"router": [router.pid], "edges": [e.pid for e in edges],
                      "redis": [procs[0].pid]}
            before = {g: cpu(p) for g, p in groups.items()}
            time.sleep(args.seconds)
            idle = {g: (cpu(p) - before[g]) / args.seconds for g, p in groups.items()}
            for _ in range(args.runs):
                for via in VIAS:
                    target = (["--via", "redis-stream", "--redis", url, "--stream", STREAM]
                              if via == "redis-stream" else ["--url", f"http://127.0.0.1:{port}"])
                    out = os.path.join(tmp, "msggen.json")
                    before = {g: cpu(p) for g, p in groups.items()}
                    t = time.monotonic()
                    subprocess.run([py, "-m", "cometd.loadtest.msggen", *target, "--rate",
                                    f"{args.rate:g}", "--duration", f"{args.seconds:g}",
                                    "--users", str(args.users), "--interval", "600",
                                    "--json", out], check=True, cwd=ROOT,
                                   stdout=subprocess.DEVNULL, timeout=args.seconds + 60)
                    if via == "redis-stream":  # until the router has read and acked it all
                        deadline = time.monotonic() + 30
                        while time.monotonic() < deadline:
                            g = [x for x in client.xinfo_groups(STREAM)][0]
                            if not g["pending"] and not g["lag"]:
                                break
                            time.sleep(0.05)
                    elapsed = time.monotonic() - t
                    with open(out) as f:
                        sent = json.load(f)["sent"]
                    f_ = figures[via]
                    f_.setdefault("rate", []).append(sent / args.seconds)
                    for g, p in groups.items():
                        used = cpu(p) - before[g] - idle[g] * elapsed
                        f_.setdefault(g, []).append(used / max(sent, 1) * 1e6)
        finally:
            stop.set()
            for proc in reversed(procs):
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()

    def cell(values: list[float], fmt: str = "{:.0f}") -> str:
        return (f"**{fmt.format(statistics.median(values))}** "
                f"({' / '.join(fmt.format(v) for v in values)})")

    print(f"| {args.edges} edges, {args.users} streams, msggen {args.rate:g}/s for "
          f"{args.seconds:g} s, median of {args.runs} | msg/s achieved | router µs/msg | "
          f"edges µs/msg | Redis µs/msg |")
    print("|---|---:|---:|---:|---:|")
    for via in VIAS:
        f_ = figures[via]
        name = "XADD to the ingested stream" if via == "redis-stream" else "POST /send"
        print(f"| {name} | {cell(f_['rate'])} | {cell(f_['router'])} | {cell(f_['edges'])} | "
              f"{cell(f_['redis'])} |")


if __name__ == "__main__":
    main()
