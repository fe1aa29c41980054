"""Benchmark ``bin/genfriends`` against networkx's own generator.

Runs ``bin/genfriends --n N --m M`` as a subprocess (output to a temporary file,
deleted afterwards) and reports the median wall time, its spread and the peak
resident set size of the child. For comparison it times
``networkx.barabasi_albert_graph`` (in a subprocess too, so its memory is measured
the same way) next to ``genfriends`` at the same smaller n, and extrapolates
linearly to N -- the work of that generator is proportional to n*m -- or runs
it at the full size with ``--nx-full``. The three commands take turns in each
of ``--runs`` rounds, so machine load hits them alike. Prints a Markdown table.

Usage: ``.venv/bin/python bench/bench_genfriends.py [--n 1000000] [--m 15]
[--runs 3] [--nx-n 100000] [--nx-full]``
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bin", "genfriends")

NX_SNIPPET = """
import sys, networkx as nx
G = nx.barabasi_albert_graph(int(sys.argv[1]), int(sys.argv[2]), seed=1)
print(G.number_of_edges())
"""


def run_measured(cmd: list[str]) -> tuple[float, float]:
    """Run cmd; return (wall seconds, peak RSS of the child in MB)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd!r} failed with exit code {proc.returncode}")
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    rss = usage.ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    return wall, rss


def bench_genfriends(n: int, m: int, seed: int) -> tuple[float, float, int]:
    """(wall s, peak RSS MB, file bytes) of one checked genfriends run."""
    with tempfile.TemporaryDirectory(prefix="bench-genfriends-") as tmp:
        out = os.path.join(tmp, "friends.txt")
        cmd = [sys.executable, SCRIPT, "--n", str(n), "--m", str(m), "--seed", str(seed)]
        wall, rss = run_measured(cmd + ["-o", out])
        with open(out, "rb") as f:
            lines = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 24), b""))
        expected = m + (n - m - 1) * m
        if lines != expected:
            raise SystemExit(f"bad output: {lines} lines, expected {expected}")
        size = os.path.getsize(out)
    print(f"  genfriends --n {n}: {wall:.2f} s, {rss:.0f} MB", file=sys.stderr)
    return wall, rss, size


def spread(values: list[float]) -> str:
    return (f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f}; runs "
            + " / ".join(f"{v:.2f}" for v in values) + ")")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--m", type=int, default=15)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--nx-n", type=int, default=100_000, help="n for the networkx comparison")
    ap.add_argument("--nx-full", action="store_true", help="run networkx at the full n too")
    args = ap.parse_args()
    n, m = args.n, args.m

    nx_n = n if args.nx_full else args.nx_n
    walls, rsss, small_walls, small_rsss, nx_walls, nx_rsss = [], [], [], [], [], []
    for i in range(args.runs):
        print(f"round {i + 1} of {args.runs} ...", file=sys.stderr)
        wall, rss, size = bench_genfriends(n, m, i)
        walls.append(wall)
        rsss.append(rss)
        wall, rss, _ = bench_genfriends(args.nx_n, m, i)
        small_walls.append(wall)
        small_rsss.append(rss)
        wall, rss = run_measured([sys.executable, "-c", NX_SNIPPET, str(nx_n), str(m)])
        print(f"  networkx.barabasi_albert_graph({nx_n}, {m}): {wall:.2f} s, {rss:.0f} MB",
              file=sys.stderr)
        nx_walls.append(wall)
        nx_rsss.append(rss)
    nx_wall, nx_rss = statistics.median(nx_walls), max(nx_rsss)
    # Interpreter + imports, which do not grow with n.
    _, base_rss = run_measured([sys.executable, "-c", NX_SNIPPET, str(m + 1), str(m)])
    scale = n / nx_n

    cmd = f"bin/genfriends --n {n} --m {m} -o <tmp>"
    print()
    print(f"Host: {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"median (min–max; each run) of {args.runs} interleaved rounds; peak RSS of the child "
          "process, max over runs.")
    print()
    print("| what | n | m | wall (s) | peak RSS (MB) | note |")
    print("|---|---:|---:|---:|---:|---|")
    print(f"| `{cmd}` | {n:,} | {m} | {spread(walls)} | "
          f"{max(rsss):.0f} | writes {m + (n - m - 1) * m:,} lines, {size / 1e6:.0f} MB |")
    print(f"| `bin/genfriends` | {args.nx_n:,} | {m} | {spread(small_walls)} | "
          f"{max(small_rsss):.0f} | same, smaller n |")
    print(f"| `networkx.barabasi_albert_graph` | {nx_n:,} | {m} | {spread(nx_walls)} | "
          f"{nx_rss:.0f} | graph only (no file) |")
    if scale != 1:
        print(f"| networkx, **extrapolated** (x{scale:g}, linear in n) | {n:,} | {m} | "
              f"~{nx_wall * scale:.0f} | ~{base_rss + (nx_rss - base_rss) * scale:.0f} | "
              f"estimate, not measured ({base_rss:.0f} MB of imports not scaled) |")


if __name__ == "__main__":
    main()
