#!/usr/bin/env python3
"""Reconnect storms: every stream kicked at once, or an edge killed, while messages flow.

    bench/bench_storm.py [--users 15000] [--friends 15] [--rate 200] [--publish 10]
                         [--workers 0] [--scenario kick|kill] [--runs 3] [--json FILE]
                         [--kick-batch 2000] [--root DIR]

Each of --runs rounds starts afresh in a temp dir: ``genfriends --n USERS --m
FRIENDS --seed 1`` loaded into a new database, then the server (one process
in pool mode, or with --workers N a router and N edges over a Redis started
here; keep-alives off, ``--keepalive 3600``, so that the end of the deliveries
shows as a quiet floodtest), ``floodtest --events --reconnect --record`` holding one SSE stream per
user, and, once all are counted, ``msggen --record`` publishing --rate
messages a second from random users for --publish seconds. Two seconds into
it, the storm:

- *kick*: one admin connection sends ``kick <user> <user> ...`` for every
  --kick-batch users at once (pipelined: one burst) and reads the replies
  (``--kick-batch 1``: a command a user, for a server from before multi-id kicks);
- *kill*: one edge is killed with SIGKILL (needs --workers >= 2); its clients
  reconnect through the shared port to the others (the supervisor also
  starts a replacement).

Then, from the storm's start (T0):

- *all back*: the first poll (every 20 ms, ``GET /stats``) at which the
  server counts USERS streams again, after the last kick was answered and,
  scaled out or killed, after the count was seen to move. Scaled out, the
  count is the router's presence, which lags the edges by ~0.1 s (more than
  a kick in one command takes) and counts a killed edge's streams until it
  sees the edge gone (within 0.5 s);
- *caught up*: once all are back, a message is sent to a subject nobody
  follows; its id marks the storm's end. Caught up is the time the last
  delivery of a message older than that marker was read by floodtest (its
  record's time column): everything missed during the storm has arrived;
- *server CPU*: CPU seconds the server's processes (all of them, Redis
  aside) used from T0 to all back: next to *all back*, whether the server's
  CPU is what bounds it;
- *lost*, *dup*, *unexpected*: the delivery check (:mod:`cometd.loadtest.delivery`)
  over the whole run, every message msggen published against every user.
  A send whose reply msggen lost (its connection was on the killed edge)
  may still have been routed: its deliveries are counted as *unrecorded*.

``--root DIR`` runs another checkout's server (its ``bin/cometd``; the load
tools stay this one's), such as a frozen one of main, for a before and after.

Prints one line per run and the medians; --json writes them all. Loopback
only; every process is bounded in time and ended at the end of its round.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cometd.history import parse_id  # noqa: E402
from cometd.lifecycle import free_port  # noqa: E402
from cometd.loadtest.delivery import check, read_pairs, subscriptions  # noqa: E402
from cometd.loadtest.procs import raise_nofile, tool  # noqa: E402

MARKER = "storm-marker"  # a subject nobody follows: its id marks the end of a storm
POLL = 0.02


def log(msg: str) -> None:
    print(f"storm: {msg}", file=sys.stderr, flush=True)


class Round:
    """One run: its temp dir, its processes (all ended in close()), its figures."""

    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.tmp = Path(tempfile.mkdtemp(prefix="storm-"))
        self.procs: list[subprocess.Popen] = []
        self.port = free_port()
        self.admin_port = free_port()
        self.friends = self.tmp / "friends.txt"
        self.published = self.tmp / "published.txt"
        self.received = self.tmp / "received.txt"

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        out = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed with the round
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def run_tool(self, name: str, argv: list[str], timeout: float) -> None:
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if done.returncode:
            raise SystemExit(f"{name} failed: {done.stdout}{done.stderr}")

    def stats(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stats", timeout=5) as r:
            return json.loads(r.read())

    def connections(self) -> int:
        try:
            return int(self.stats()["connections"])
        except (OSError, ValueError, KeyError):
            return -1

    def wait(self, pred, timeout: float, what: str) -> float:
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out after {timeout:g}s waiting for {what}")
            time.sleep(POLL)
        return time.time()

    def start(self) -> None:
        a = self.a
        db = self.tmp / "db"
        self.run_tool("genfriends", [*tool("genfriends"), "--n", str(a.users), "--m",
                                     str(a.friends), "--seed", "1", "-o", str(self.friends)], 120)
        self.run_tool("load", [*tool("cometd"), "load", "--db", str(db), str(self.friends)], 300)
        # No keep-alives within a run: spread over their interval, they would keep
        # floodtest's chunk count moving, and settle() would wait its whole 60 s.
        server = [sys.executable, os.path.join(a.root, "bin", "cometd"), "--port",
                  str(self.port), "--mode", a.mode, "--db", str(db), "--admin-port",
                  str(self.admin_port), "--history-size", "1000",
                  "--replay-max", "10000", "--keepalive", "3600"]
        if a.workers:
            redis_port = free_port()
            self.spawn("redis", ["redis-server", "--port", str(redis_port), "--bind",
                                 "127.0.0.1", "--save", "", "--appendonly", "no"])
            server += ["--workers", str(a.workers), "--redis",
                       f"redis://127.0.0.1:{redis_port}/0"]
        self.server = self.spawn("server", server)
        self.wait(lambda: self.connections() == 0, 60, "the server")
        self.flood = self.spawn("floodtest", [
            *tool("floodtest"), "--server", f"127.0.0.1:{self.port}", "--n", str(a.users),
            "--rate", "0", "--events", "--reconnect", "--record", str(self.received),
            "--source-ips", "127.0.3.1-127.0.3.4", "--duration", "180", "--interval", "0.5",
            "--json", str(self.tmp / "floodtest.json")])
        self.wait(lambda: self.connections() == a.users, 120, f"{a.users} streams")

    def storm(self) -> dict:
        a = self.a
        duration = a.publish
        self.gen = self.spawn("msggen", [
            *tool("msggen"), "--url", f"http://127.0.0.1:{self.port}", "--rate", str(a.rate),
            "--duration", str(duration), "--users", str(a.users), "--seed", "1",
            "--record", str(self.published), "--interval", "60",
            "--json", str(self.tmp / "msggen.json")])
        time.sleep(2)
        cpu0 = self.server_cpu()
        t0 = time.time()
        if a.scenario == "kick":
            self.kick_all()
            log(f"kicked {a.users} in {time.time() - t0:.2f}s")
        else:
            self.kill_an_edge()
        if a.scenario == "kill" or a.workers:
            # The router's count lags: it counts the dead edge's streams until
            # it sees the edge gone (<= 0.5 s), and kicked ones until the edges
            # report them (~0.1 s, longer than a one-command kick takes).
            try:
                self.wait(lambda: self.connections() not in (-1, a.users), 10,
                          "the count to move")
            except SystemExit:
                log("the count did not move within 10 s")
        back = self.wait(lambda: self.connections() == a.users, a.storm_budget, "all back")
        cpu1 = self.server_cpu()
        self.storm_cpu = sum(t - cpu0.get(pid, 0.0) for pid, t in cpu1.items())
        marker = self.send(MARKER)
        self.gen.wait(duration + 30)
        self.settle()
        self.not_recovered = self.metric("cometd_replays_total", 'result="not_recovered"')
        self.ended = {reason: self.metric("cometd_disconnects_total", f'reason="{reason}"')
                      for reason in ("client", "slow", "error", "kicked", "expired")}
        self.flood.send_signal(signal.SIGTERM)
        self.flood.wait(60)
        return self.figures(t0, back, marker)

    def settle(self, quiet: float = 2.0, most: float = 60.0) -> None:
        """Wait until floodtest has read no message for *quiet* s (at most *most* s).

        A loaded server may still be delivering seconds after msggen's last
        reply: stopping floodtest then would count those deliveries missing.
        """
        log_path = self.tmp / "floodtest.log"
        seen, since, deadline = -1, time.monotonic(), time.monotonic() + most
        while time.monotonic() < deadline:
            found = re.findall(r"Chunks=(\d+)", log_path.read_text())
            chunks = int(found[-1]) if found else 0
            if chunks != seen:
                seen, since = chunks, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return
            time.sleep(0.25)
        log(f"deliveries still coming after {most:g}s")

    def metric(self, name: str, label: str) -> float:
        """The sum of the server's /metrics samples of *name* with *label* (every process's)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as r:
            lines = r.read().decode().splitlines()
        (self.tmp / "metrics.txt").write_text("\n".join(lines))
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines
                   if line.startswith(name + "{") and label in line)

    def server_cpu(self) -> dict[int, float]:
        """pid -> CPU seconds (user + system) each of the server's processes used so far.

        A killed edge is missing from a later call: its CPU in between is not counted.
        """
        try:
            procs = [psutil.Process(self.server.pid)]
            procs += procs[0].children(recursive=True)
        except psutil.Error:
            return {}
        out = {}
        for proc in procs:
            try:
                cpu = proc.cpu_times()
            except psutil.Error:
                continue
            out[proc.pid] = cpu.user + cpu.system
        return out

    def kick_all(self) -> None:
        with socket.create_connection(("127.0.0.1", self.admin_port), timeout=30) as sock:
            reader = sock.makefile("rb")
            while not reader.peek(8).startswith(b"cometd> ") and reader.read(1):
                pass
            users, batch = self.a.users, self.a.kick_batch
            commands = [b"kick " + b" ".join(b"%d" % u for u in range(first, min(first + batch,
                                                                             users + 1)))
                        + b"\n" for first in range(1, users + 1, batch)]
            sock.sendall(b"".join(commands))
            replies = 0
            while replies < len(commands):
                line = reader.readline()
                if not line:
                    raise SystemExit("the admin console closed during the kicks")
                replies += b"OK kicked" in line

    def kill_an_edge(self) -> None:
        # The edges share one listening socket, so they need not hold alike:
        # kill the one with the most open files (streams).
        edges = [p for p in psutil.Process(self.server.pid).children()
                 if "edge" in p.cmdline()]
        if not edges:
            raise SystemExit("--scenario kill needs --workers >= 2")
        victim = max(edges, key=lambda p: p.num_fds())
        self.killed_streams = victim.num_fds()
        victim.send_signal(signal.SIGKILL)

    def send(self, subject: str) -> int:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/send/{subject}",
                                     data=b"end of the storm", method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            return parse_id(json.loads(r.read())["id"])

    def figures(self, t0: float, back: float, marker: int) -> dict:
        held = {str(u) for u in range(1, self.a.users + 1)}
        published = read_pairs(str(self.published))
        received = read_pairs(str(self.received))
        report = check(subscriptions(read_pairs(str(self.friends)), held), published, received)
        # A send whose reply was lost (msggen's connection was on the killed
        # edge) was routed but is not in msggen's record: its deliveries are
        # "unrecorded", not unexpected.
        known = {message_id for _, message_id in published}
        unrecorded = sum(message_id not in known for _, message_id in received)
        caught = t0
        with open(self.received) as f:
            for line in f:
                _, message_id, when = line.split()
                key = parse_id(message_id)
                if key is not None and key < marker:
                    caught = max(caught, float(when))
        gen = json.loads((self.tmp / "msggen.json").read_text())
        flood = json.loads((self.tmp / "floodtest.json").read_text())
        return {"all_back_s": round(back - t0, 3), "caught_up_s": round(caught - t0, 3),
                "server_cpu_s": round(self.storm_cpu, 2),
                "lost": report.missing, "dup": report.duplicates,
                "unexpected": report.unexpected - unrecorded, "unrecorded": unrecorded,
                "not_recovered": self.not_recovered, "ended": self.ended,
                "lost_examples": report.examples.get("missing", []),
                "msggen_errors": gen["errors_by_kind"],
                "published": report.published, "expected": report.expected,
                "reconnects": flood.get("reconnects"),
                "killed_edge_fds": getattr(self, "killed_streams", None)}

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        if not self.a.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=15_000)
    p.add_argument("--friends", type=int, default=15, help="genfriends --m")
    p.add_argument("--rate", type=float, default=200, help="msggen messages a second")
    p.add_argument("--mode", default="pool", choices=("pool", "greenlet"))
    p.add_argument("--workers", type=int, default=0, help="edges (0: one process)")
    p.add_argument("--scenario", default="kick", choices=("kick", "kill"))
    p.add_argument("--publish", type=float, default=10,
                   help="seconds msggen publishes for (the storm comes 2 s in)")
    p.add_argument("--storm-budget", type=float, default=30,
                   help="seconds all may take to come back before the run fails")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json", help="write every run's figures and the medians here")
    p.add_argument("--keep", action="store_true", help="keep each run's temp dir (logs)")
    p.add_argument("--kick-batch", type=int, default=2000,
                   help="users a kick command names (1: a command each, as servers before "
                        "multi-id kicks need; each line stays under the console's 64 KiB)")
    p.add_argument("--root", default=ROOT, metavar="DIR",
                   help="the checkout whose bin/cometd serves (default: this one)")
    a = p.parse_args()
    if a.publish <= 2:
        p.error("--publish must be over 2 s: the storm comes 2 s in")
    if a.scenario == "kill" and a.workers < 2:
        p.error("--scenario kill needs --workers >= 2")
    if not 1 <= a.kick_batch <= 5000:
        p.error("--kick-batch must be from 1 to 5000")
    raise_nofile()
    runs = []
    for i in range(a.runs):
        r = Round(a)
        try:
            r.start()
            runs.append(r.storm())
        finally:
            r.close()
        log(f"run {i + 1}: {json.dumps(runs[-1])}" + (f" (kept {r.tmp})" if a.keep else ""))
    keys = ("all_back_s", "caught_up_s", "server_cpu_s", "lost", "dup", "unexpected")
    medians = {k: statistics.median(run[k] for run in runs) for k in keys}
    setup = (f"{a.users} users, {a.scenario}, "
             + (f"--workers {a.workers}" if a.workers else f"one process, {a.mode} mode")
             + f", msggen {a.rate:g}/s, genfriends --m {a.friends}")
    print(setup)
    for k in keys:
        print(f"  {k:12} median {medians[k]:g}  runs {[run[k] for run in runs]}")
    if a.json:
        Path(a.json).write_text(json.dumps({"setup": setup, "runs": runs,
                                            "medians": medians}, indent=1))
    if any(run["lost"] or run["dup"] or run["unexpected"] for run in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
