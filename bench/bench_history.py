#!/usr/bin/env python3
"""The history's costs: on the publish path, and per resumed stream.

    bench/bench_history.py [--users 1000] [--fanout 30] [--sends 2000] [--senders 20]
                           [--resumes 200] [--missed 20] [--runs 3] [--json FILE]
                           [--resume-only] [--root DIR] [--burst 1]

A database is built once in a temp dir: each of --users users subscribes to
--fanout others, picked at random (seed 1), so a message from anyone reaches
about --fanout subscribers and the sender. Then, for each of --runs
interleaved rounds, each with a fresh single-process ``bin/cometd`` (greenlet
mode) on a copy of that database:

1. *publish*, once with the default history (``--history-size 100``) and once
   with ``--history-size 0``: every user holds a stream (``/test``, read and
   thrown away by one client thread), --senders threads send --sends
   messages from random users, and the server's CPU over those sends
   (schedstat, every thread) gives messages per server CPU-second. Every
   ``delivered`` count is checked (= subscribers online + 1).
2. *resume* (default history): user 0 subscribes to --fanout others; --missed
   messages are sent from them, then --resumes times, one after the other, a
   stream of user 0 resumes from the id before them (``Last-Event-ID``) and
   is read until those --missed events have arrived, then closed. Beside it,
   the same number of fresh ``/events`` streams (read until the welcome) and
   of resumes from the newest id (nothing to replay). Server CPU per stream.

``--resume-only`` skips step 1; ``--root DIR`` runs the server of another
checkout (its ``bin/cometd``), such as a frozen one of main, for a before and
after. ``--burst N`` opens the streams N at a time (all sent, then each read
and closed), as a reconnect storm brings them: one at a time, every stream
the accept callback takes waits out its listener's 20 ms rest
(cometd.server.ACCEPT_PAUSE), and each such wakeup costs the server ~0.3 ms
of CPU on this machine, more than a resume itself.

Loopback only; every loop is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from bench_popular import Server, cpu_seconds  # noqa: E402

from cometd.store import SubscriptionStore  # noqa: E402


def build_db(path: str, users: int, fanout: int) -> dict[int, int]:
    """Each user subscribes to *fanout* random others; returns subscriber counts."""
    rng = random.Random(1)
    pairs = set()
    for u in range(users):
        for v in rng.sample([x for x in range(users) if x != u], fanout):
            pairs.add((u, v))
    with SubscriptionStore(path) as store:
        store.add_subscriptions(sorted(pairs))
    counts = dict.fromkeys(range(users), 0)
    for _, v in pairs:
        counts[v] += 1
    return counts


class Streams:
    """Streams of the given users on one port, read and discarded by one thread."""

    def __init__(self, port: int, users: list[int]) -> None:
        self.socks = []
        for user in users:
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            sock.sendall(b"GET /test/%d HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % user)
            self.socks.append(sock)
        for sock in self.socks:
            while b"Welcome" not in sock.recv(4096):
                pass
            sock.setblocking(False)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        sel = selectors.DefaultSelector()
        for sock in self.socks:
            sel.register(sock, selectors.EVENT_READ)
        while not self._stop.is_set():
            for key, _ in sel.select(0.1):
                try:
                    key.fileobj.recv(1 << 16)
                except BlockingIOError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock in self.socks:
            sock.close()


def publish_run(db: str, history: bool, users: int, counts: dict[int, int], sends: int,
                senders: int) -> dict:
    extra = [] if history else ["--history-size", "0"]
    server = Server(ROOT, db, extra)
    streams = Streams(server.port, list(range(users)))
    try:
        time.sleep(0.5)  # every login in
        rng = random.Random(2)
        plan = [rng.randrange(users) for _ in range(sends)]
        bad: list[tuple[int, int]] = []

        def sender(t: int) -> None:
            for k in range(t, sends, senders):
                got = server.request("POST", f"/send/{plan[k]}", b"m%d" % k)["delivered"]
                if got != counts[plan[k]] + 1:
                    bad.append((plan[k], got))

        def send_all() -> None:
            threads = [threading.Thread(target=sender, args=(t,)) for t in range(senders)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        before = cpu_seconds(server.proc.pid)
        started = time.monotonic()
        send_all()
        wall = time.monotonic() - started
        cpu = cpu_seconds(server.proc.pid) - before
        if bad:
            raise RuntimeError(f"delivered counts off: {bad[:5]}")
        return {"messages_per_cpu_s": sends / cpu, "cpu_ms_per_send": cpu / sends * 1e3,
                "wall_s": wall}
    finally:
        streams.close()
        server.stop()


def _open(port: int, path: str, last_id: str | None) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    extra = b"Last-Event-ID: %s\r\n" % last_id.encode() if last_id else b""
    sock.sendall(b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n%s\r\n" % (path.encode(), extra))
    return sock


def _read_until(sock: socket.socket, count: bytes, n: int) -> None:
    got = b""
    while got.count(count) < n:
        data = sock.recv(1 << 16)
        if not data:
            raise RuntimeError(f"closed after {got.count(count)} of {n}: {got[-200:]!r}")
        got += data
    if b"Cometd-Recovered: false" in got:
        raise RuntimeError("a resume was not recovered")


def resume_run(db: str, fanout: int, resumes: int, missed: int, root: str = ROOT,
               burst: int = 1) -> dict:
    # One user opens every stream, one after the other: the per-id limit would
    # count the ones just closed that the server has not seen close yet.
    server = Server(root, db, ["--max-streams-per-user", "0"])
    try:
        me = "reader"
        friends = [str(i) for i in range(fanout)]
        server.request("POST", "/subscriptions", json.dumps([[me, f] for f in friends]).encode())
        before_id = server.request("POST", f"/send/{me}", b"before")["id"]
        for k in range(missed):
            server.request("POST", f"/send/{friends[k % fanout]}", b"missed %d" % k)
        newest = server.request("POST", f"/send/{friends[0]}", b"newest")["id"]
        out = {}
        cases = {
            "fresh": (None, b"Welcome", 1),
            "resume_nothing_missed": (newest, b"Welcome", 1),
            f"resume_{missed + 1}_missed": (before_id, b"\nid: ", missed + 1),
        }
        for name, (last_id, marker, n) in cases.items():
            cpu0 = cpu_seconds(server.proc.pid)
            for first in range(0, resumes, burst):
                socks = [_open(server.port, f"/events/{me}", last_id)
                         for _ in range(min(burst, resumes - first))]
                for sock in socks:
                    _read_until(sock, marker, n)
                for sock in socks:
                    sock.close()
            out[name] = (cpu_seconds(server.proc.pid) - cpu0) / resumes * 1e3
        return out
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--fanout", type=int, default=30)
    parser.add_argument("--sends", type=int, default=2000)
    parser.add_argument("--senders", type=int, default=20)
    parser.add_argument("--resumes", type=int, default=200)
    parser.add_argument("--missed", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--resume-only", action="store_true", help="skip the publish runs")
    parser.add_argument("--burst", type=int, default=1,
                        help="streams opened at once (each read, then all closed)")
    parser.add_argument("--root", default=ROOT, metavar="DIR",
                        help="the checkout whose bin/cometd serves (default: this one)")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="bench-history-")
    try:
        template = os.path.join(work, "template")
        counts = build_db(template, args.users, args.fanout)
        rounds = []
        for r in range(args.runs):
            row = {}
            for name, history in () if args.resume_only else (("history", True),
                                                                ("no_history", False)):
                db = os.path.join(work, f"db-{r}-{name}")
                shutil.copytree(template, db)
                row[name] = publish_run(db, history, args.users, counts, args.sends,
                                        args.senders)
            db = os.path.join(work, f"db-{r}-resume")
            shutil.copytree(template, db)
            row["resume_cpu_ms"] = resume_run(db, args.fanout, args.resumes, args.missed,
                                              args.root, args.burst)
            rounds.append(row)
            print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def cell(values: list[float], fmt: str = "{:,.0f}") -> str:
        return (f"{fmt.format(statistics.median(values))} "
                f"({fmt.format(min(values))}–{fmt.format(max(values))})")

    print(f"\nload average {os.getloadavg()[0]:.1f}; git {_commit(args.root)}")
    if not args.resume_only:
        with_h = [r["history"]["messages_per_cpu_s"] for r in rounds]
        without = [r["no_history"]["messages_per_cpu_s"] for r in rounds]
        ratio = [a / b for a, b in zip(with_h, without, strict=True)]
        print("| | messages per server CPU-second |\n|---|---:|")
        print(f"| --history-size 100 | {cell(with_h)} |")
        print(f"| --history-size 0 | {cell(without)} |")
        print(f"| ratio (per round) | {cell(ratio, '{:.3f}')} |")
    print("\n| stream | server CPU ms per stream |\n|---|---:|")
    for name in rounds[0]["resume_cpu_ms"]:
        print(f"| {name} | {cell([r['resume_cpu_ms'][name] for r in rounds], '{:.3f}')} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rounds": rounds}, f, indent=1)


def _commit(root: str = ROOT) -> str:
    try:
        return subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        return "?"


if __name__ == "__main__":
    main()
