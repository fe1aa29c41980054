#!/usr/bin/env python3
"""RSS of one parked gevent greenlet: the floor under greenlet mode's per-connection cost.

    bench/bench_parked.py [--greenlets 20000] [--runs 3]

Each run is a fresh interpreter that imports gevent and parks --greenlets
greenlets, then reports (RSS after - RSS before) / greenlets, for two kinds:

- bare: ``greenlet.greenlet`` objects that each switch back to their creator
  once started, so they stay suspended inside their function (what a
  greenlet-mode connection's writer is while it waits: a raw greenlet);
- spawned: ``gevent.spawn`` greenlets blocked on one shared
  ``gevent.event.Event`` (the common gevent idiom; a Greenlet object more).

No sockets: this is the greenlet alone (its Python frame-stack chunk and saved
C stack). The kinds take turns in each round; median, spread and every run
are printed.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

CODE = """
import sys, gevent, gevent.event, greenlet
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
kind, n = sys.argv[1], int(sys.argv[2])
ev = gevent.event.Event()
main = greenlet.getcurrent()
def park():
    main.switch()
def make(count):
    if kind == "spawned":
        out = [gevent.spawn(ev.wait) for _ in range(count)]
        gevent.sleep(0.1)
    else:
        out = [greenlet.greenlet(park) for _ in range(count)]
        for g in out:
            g.switch()
    assert all(g and not g.dead for g in out)  # started and suspended
    return out
warm = make(100)  # the hub and first allocations
before = rss()
parked = make(n)
print((rss() - before) / n)
"""
KINDS = ("bare", "spawned")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--greenlets", type=int, default=20_000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    per: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for _ in range(args.runs):
        for kind in KINDS:
            out = subprocess.run([sys.executable, "-c", CODE, kind, str(args.greenlets)],
                                 check=True, capture_output=True, text=True, timeout=120)
            per[kind].append(float(out.stdout) / 1024)
    import gevent
    import greenlet

    print(f"| {args.greenlets:,} parked greenlets (gevent {gevent.__version__}, greenlet "
          f"{greenlet.__version__}, Python {sys.version.split()[0]}) | KiB RSS each |")
    print("|---|---:|")
    for kind, values in per.items():
        print(f"| {kind}, median of {args.runs} (min–max; each run) | "
              f"**{statistics.median(values):.2f}** ({min(values):.2f}–{max(values):.2f}; "
              f"{' / '.join(f'{v:.2f}' for v in values)}) |")


if __name__ == "__main__":
    main()
