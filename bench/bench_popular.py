#!/usr/bin/env python3
"""A popular user's sends: server CPU per send and the delay a concurrent /stats sees.

    bench/bench_popular.py [--followers 1000000,200000] [--online 0,1000] [--sends 100]
                           [--senders 20] [--runs 3] [--server-root DIR] [--json FILE]

For each follower count F a database is built once in a temp dir with
``SubscriptionStore.bulk_merge``: users 1..F subscribe to user 4000000000.
For each (F, K online) case and each run, a fresh single-process
``bin/cometd`` (greenlet mode) is started on that database, K followers spread
over 1..F hold a stream open, and:

1. *cpu*: --senders threads send --sends messages from the popular user, back
   to back; the server's CPU over those sends (from /proc/<pid>/task/*/schedstat:
   like utime + stime, but exact rather than in 10 ms ticks), divided by --sends;
2. *stats*: the same sends again while one client requests ``GET /stats``
   back to back: the median and the max of those requests' latencies.

A case with no followers at all ("F = 0") is the floor: what a send costs
the HTTP path alone. With --server-root the server is another checkout's
``bin/cometd`` (e.g. an older commit in a ``git worktree``), run with this
interpreter, on the same databases: an honest before/after. Every delivered
count is checked against K. Loopback only; every loop is bounded.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from array import array

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cometd.ids import encode_key  # noqa: E402
from cometd.lifecycle import BANNER  # noqa: E402
from cometd.loadtest.sampling import schedstat_cpu_ns  # noqa: E402
from cometd.store import SubscriptionStore  # noqa: E402

POPULAR = 4_000_000_000


def build_db(path: str, followers: int) -> None:
    """Users 1..followers subscribe to POPULAR (both keyspaces, as the loader writes)."""
    with SubscriptionStore(path) as store:
        if followers:
            ids = array("I", range(1, followers + 1))
            store.bulk_merge("subscribers", [(encode_key(str(POPULAR)),
                                              followers.to_bytes(4, "little") + ids.tobytes())])
            mine = (1).to_bytes(4, "little") + array("I", [POPULAR]).tobytes()
            store.bulk_merge("subscriptions", ((encode_key(str(u)), mine) for u in ids))
        store.sync()


def cpu_seconds(pid: int) -> float:
    """CPU time of every thread of *pid* in seconds (schedstat)."""
    return schedstat_cpu_ns(pid) / 1e9


class Server:
    def __init__(self, server_root: str, db: str) -> None:
        cmd = [sys.executable, os.path.join(server_root, "bin", "cometd"), "--port", "0",
               "--admin-port", "-1", "--db", db]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        line = self.proc.stdout.readline()
        match = BANNER.search(line)
        if not match:
            self.proc.kill()
            raise RuntimeError(f"cometd did not start: {line}{self.proc.stdout.read()}")
        self.port = int(match.group(2))
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def request(self, method: str, path: str, body: bytes | None = None) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            conn.request(method, path, body=body)
            resp = conn.getresponse()
            data = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"{method} {path}: {resp.status} {data!r}")
            return json.loads(data)
        finally:
            conn.close()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def open_streams(port: int, users: list[int]) -> list[socket.socket]:
    socks = []
    for user in users:
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(b"GET /test/%d HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % user)
        socks.append(sock)
    for sock in socks:
        got = b""
        while b"Welcome" not in got:
            data = sock.recv(4096)
            if not data:
                raise RuntimeError("a stream closed before its welcome")
            got += data
        sock.setblocking(False)
    return socks


def drain(socks: list[socket.socket]) -> None:
    for sock in socks:
        try:
            while sock.recv(1 << 16):
                pass
        except BlockingIOError:
            pass


def send_all(server: Server, sends: int, senders: int, online: int, tag: str) -> None:
    answers: list[int] = []

    def sender(t: int) -> None:
        for k in range(t, sends, senders):
            answers.append(server.request("POST", f"/send/{POPULAR}", f"{tag}:{k}".encode())[
                "delivered"])

    threads = [threading.Thread(target=sender, args=(t,)) for t in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if answers != [online] * sends:
        raise RuntimeError(f"delivered counts {sorted(set(answers))}, expected {online}")


def one_run(server_root: str, db: str, followers: int, online: int, sends: int,
            senders: int) -> dict:
    server = Server(server_root, db)
    socks: list[socket.socket] = []
    try:
        step = max(followers // max(online, 1), 1)
        socks = open_streams(server.port, [1 + i * step for i in range(online)])
        send_all(server, 5, min(senders, 5), online, "warm")
        drain(socks)
        before = cpu_seconds(server.proc.pid)
        started = time.monotonic()
        send_all(server, sends, senders, online, "cpu")
        wall = time.monotonic() - started
        cpu = cpu_seconds(server.proc.pid) - before
        drain(socks)

        latencies: list[float] = []
        done = threading.Event()

        def poll() -> None:
            while not done.is_set() and len(latencies) < 100_000:
                t = time.monotonic()
                server.request("GET", "/stats")
                latencies.append(time.monotonic() - t)

        poller = threading.Thread(target=poll)
        poller.start()
        send_all(server, sends, senders, online, "stats")
        done.set()
        poller.join()
        drain(socks)
        return {
            "cpu_ms_per_send": cpu / sends * 1e3,
            "wall_s": wall,
            "stats_median_ms": statistics.median(latencies) * 1e3,
            "stats_max_ms": max(latencies) * 1e3,
            "stats_polls": len(latencies),
        }
    finally:
        for sock in socks:
            sock.close()
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--followers", default="1000000,200000",
                        help="comma-separated follower counts (0, the floor, is always added)")
    parser.add_argument("--online", default="0,1000", help="comma-separated online followers")
    parser.add_argument("--sends", type=int, default=100)
    parser.add_argument("--senders", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--server-root", default=ROOT,
                        help="checkout whose bin/cometd is measured (default: this one)")
    parser.add_argument("--dbs", help="keep the databases here and reuse them")
    parser.add_argument("--json", help="write the runs here")
    args = parser.parse_args()
    followers = sorted({0, *map(int, args.followers.split(","))}, reverse=True)
    onlines = sorted(set(map(int, args.online.split(","))))
    work = args.dbs or tempfile.mkdtemp(prefix="cometd-bench-popular-")
    os.makedirs(work, exist_ok=True)
    commit = subprocess.run(["git", "-C", args.server_root, "describe", "--always", "--dirty"],
                            capture_output=True, text=True).stdout.strip()
    results = []
    try:
        for f in followers:
            db = os.path.join(work, f"db-{f}")
            if not os.path.exists(db):
                build_db(db, f)
            for k in onlines:
                if k > f:
                    continue
                runs = [one_run(args.server_root, db, f, k, args.sends, args.senders)
                        for _ in range(args.runs)]
                results.append({"followers": f, "online": k, "runs": runs})
                print(f"followers={f} online={k}: " + "; ".join(
                    f"{r['cpu_ms_per_send']:.2f} ms/send, /stats {r['stats_median_ms']:.1f}"
                    f"/{r['stats_max_ms']:.0f} ms" for r in runs), file=sys.stderr, flush=True)
    finally:
        if not args.dbs:
            shutil.rmtree(work, ignore_errors=True)

    def cell(case: dict, key: str, fmt: str) -> str:
        values = [r[key] for r in case["runs"]]
        return (f"{statistics.median(values):{fmt}} "
                f"({min(values):{fmt}}–{max(values):{fmt}})")

    print(f"\nserver: {args.server_root} at {commit}; {args.sends} sends by {args.senders} "
          f"threads; {args.runs} runs; load average {os.getloadavg()[0]:.1f}\n")
    print("| followers | online | server CPU ms/send | /stats median ms | /stats max ms |")
    print("|---|---|---|---|---|")
    for case in results:
        print(f"| {case['followers']:,} | {case['online']:,} | "
              f"{cell(case, 'cpu_ms_per_send', '.2f')} | {cell(case, 'stats_median_ms', '.1f')} "
              f"| {cell(case, 'stats_max_ms', '.0f')} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"commit": commit, "server_root": args.server_root, "args": vars(args),
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
