#!/usr/bin/env python3
"""cProfile (or perf) a cometd server through one scenario of ``cometd-bench fanout``.

    bench/profile_fanout.py one pool       # 200 messages at 20/s, one subject, 4,000 online
    bench/profile_fanout.py feed greenlet  # 3,000 at 500/s, 6,000-user friends feed, all online
    bench/profile_fanout.py one pool --top 30 --out /tmp/prof
    bench/profile_fanout.py feed pool --perf   # perf record -g instead: kernel and C shares

The server runs under cProfile timed by the process's CPU clock (so waits and
other processes' load do not count), pinned to CPU 0, driven exactly as the
bench drives it (the cometd.loadtest.versus reader and msggen, pinned to CPU
1); writes OUT/<scenario>-<mode>.prof and prints the run's counts and the top
functions by own time. The databases are the bench's cached ones (run
``cometd-bench fanout`` once first). cProfile slows Python code down, not
system calls: read the shares, not the rates.

With ``--perf`` the server runs as in the bench, and ``perf record -g`` (CPU
clock, 2,000 samples a second) samples it from msggen's start to the end of
the run: OUT/<scenario>-<mode>.perf.data, and the shares of the kernel,
libpython, LevelDB... (``perf report --sort dso``) and the top symbols are
printed. CPython 3.11 has no perf maps, so Python code shows as
``_PyEval_EvalFrameDefault`` and the C functions it calls.
"""

from __future__ import annotations

import argparse
import os
import pstats
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cometd.loadtest.servers as servers  # noqa: E402
from cometd.loadtest import versus  # noqa: E402
from cometd.loadtest.procs import stop_all  # noqa: E402

# python -c: run cometd's __main__ under a CPU-time profiler; SIGTERM ends the
# server with SystemExit, so the profile is written.
PROFILED = """
import cProfile, runpy, sys, time
profile = cProfile.Profile(time.process_time)
sys.argv[0] = "cometd"
profile.enable()
try:
    runpy.run_module("cometd", run_name="__main__")
finally:
    profile.disable()
    profile.dump_stats(%r)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("scenario", choices=("one", "feed"))
    ap.add_argument("mode", choices=("pool", "greenlet"))
    ap.add_argument("--data-dir", default=str(ROOT / "data" / "bench"))
    ap.add_argument("--out", default="/tmp/cometd-profile")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--perf", action="store_true",
                    help="perf record -g the server instead of running it under cProfile")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prof = out / f"{args.scenario}-{args.mode}.{'perf.data' if args.perf else 'prof'}"
    recorders: list[subprocess.Popen] = []
    if args.perf:
        msggen = versus.msggen

        def recorded_msggen(*a, **kw):  # sample from the first publish on
            recorders.append(subprocess.Popen(
                ["perf", "record", "-g", "-F", "2000", "-p", str(server.proc.pid), "-o",
                 str(prof)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(0.5)  # perf attaches
            return msggen(*a, **kw)

        versus.msggen = recorded_msggen
    else:
        tool = servers.tool
        servers.tool = lambda name: ([sys.executable, "-c", PROFILED % str(prof)]
                                     if name == "cometd" else tool(name))
    data = Path(args.data_dir)
    if args.scenario == "one":
        db, paths, users, count, rate = (data / "db-star-4000",
                                         [f"/test/{u}" for u in range(2, 4002)], 1, 200, 20.0)
    else:
        db, paths, users, count, rate = (data / "db-U6000-m15-s1",
                                         [f"/test/{u}" for u in range(1, 6001)], 6000, 3000, 500.0)
    if not (db / "BENCH-LOADED.json").exists():
        sys.exit(f"{db} is missing: run bin/cometd-bench fanout once first")
    os.sched_setaffinity(0, {1})
    try:
        server = servers.CometdServer(args.mode, str(db), out, cpus={0})
        try:
            r = versus._run(server, paths, users, count, rate,
                            {"client_cpu": 1, "seed": 1, "settle": 1.0}, out,
                            f"{args.scenario}-{args.mode}")
        finally:
            for recorder in recorders:
                recorder.send_signal(signal.SIGINT)
                recorder.wait(60)
            server.stop()
    finally:
        stop_all()
    print(f"{args.scenario} {args.mode}: published {r['published']}, deliveries "
          f"{r['deliveries']}, server CPU {r['server_cpu_s']:.2f} s (user "
          f"{r['server_cpu_user_s']:.2f}, system {r['server_cpu_system_s']:.2f}), "
          f"{r['deliveries_per_cpu_s']:,.0f} deliveries per CPU-s (profiled)")
    if not args.perf:
        pstats.Stats(str(prof)).sort_stats("tottime").print_stats(args.top)
        return
    for sort in ("dso", "sym"):
        report = subprocess.run(["perf", "report", "-i", str(prof), "--no-children", "--sort",
                                 sort, "--stdio", "-g", "none"], capture_output=True, text=True)
        rows = [line for line in report.stdout.splitlines() if line.strip()
                and not line.startswith("#")]
        print("\n".join(rows[:8 if sort == "dso" else args.top]))


if __name__ == "__main__":
    main()
