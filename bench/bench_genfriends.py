"""Benchmark ``bin/genfriends`` against networkx's own generator.

Runs ``bin/genfriends --n N --m M`` as a subprocess (output to a temporary file,
deleted afterwards) several times and reports the median wall time and the peak
resident set size of the child. For comparison it times
``networkx.barabasi_albert_graph`` (in a subprocess too, so its memory is measured
the same way) on a smaller n and extrapolates linearly to N -- the work of that
generator is proportional to n*m -- or on the full size with ``--nx-full``.
Prints a Markdown table.

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


def bench_genfriends(n: int, m: int, runs: int) -> tuple[list[float], list[float], int]:
    walls, rsss = [], []
    size = 0
    with tempfile.TemporaryDirectory(prefix="bench-genfriends-") as tmp:
        out = os.path.join(tmp, "friends.txt")
        for i in range(runs):
            cmd = [sys.executable, SCRIPT, "--n", str(n), "--m", str(m), "--seed", str(i)]
            cmd += ["-o", out]
            wall, rss = run_measured(cmd)
            with open(out, "rb") as f:
                lines = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 24), b""))
            expected = m + (n - m - 1) * m
            if lines != expected:
                raise SystemExit(f"bad output: {lines} lines, expected {expected}")
            size = os.path.getsize(out)
            os.unlink(out)
            walls.append(wall)
            rsss.append(rss)
            print(f"  genfriends run {i + 1}: {wall:.2f} s, {rss:.0f} MB", file=sys.stderr)
    return walls, rsss, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--m", type=int, default=15)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--nx-n", type=int, default=100_000, help="n for the networkx comparison")
    ap.add_argument("--nx-full", action="store_true", help="run networkx at the full n too")
    args = ap.parse_args()
    n, m = args.n, args.m

    print(f"bin/genfriends --n {n} --m {m}, {args.runs} runs ...", file=sys.stderr)
    walls, rsss, size = bench_genfriends(n, m, args.runs)
    small_walls, small_rsss, _ = bench_genfriends(args.nx_n, m, args.runs)

    nx_n = n if args.nx_full else args.nx_n
    print(f"networkx.barabasi_albert_graph({nx_n}, {m}) ...", file=sys.stderr)
    nx_wall, nx_rss = run_measured([sys.executable, "-c", NX_SNIPPET, str(nx_n), str(m)])
    # Interpreter + imports, which do not grow with n.
    _, base_rss = run_measured([sys.executable, "-c", NX_SNIPPET, str(m + 1), str(m)])
    scale = n / nx_n

    cmd = f"bin/genfriends --n {n} --m {m} -o <tmp>"
    print()
    print(f"Host: {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"median of {args.runs} runs; peak RSS of the child process.")
    print()
    print("| what | n | m | wall (s) | peak RSS (MB) | note |")
    print("|---|---:|---:|---:|---:|---|")
    print(f"| `{cmd}` | {n:,} | {m} | {statistics.median(walls):.2f} | "
          f"{max(rsss):.0f} | writes {m + (n - m - 1) * m:,} lines, {size / 1e6:.0f} MB; "
          f"runs: {', '.join(f'{w:.2f}' for w in walls)} s |")
    print(f"| `bin/genfriends` | {args.nx_n:,} | {m} | {statistics.median(small_walls):.2f} | "
          f"{max(small_rsss):.0f} | same, smaller n |")
    print(f"| `networkx.barabasi_albert_graph` | {nx_n:,} | {m} | {nx_wall:.2f} | {nx_rss:.0f} | "
          f"measured, one run, graph only (no file) |")
    if scale != 1:
        print(f"| networkx, **extrapolated** (x{scale:g}, linear in n) | {n:,} | {m} | "
              f"~{nx_wall * scale:.0f} | ~{base_rss + (nx_rss - base_rss) * scale:.0f} | "
              f"estimate, not measured ({base_rss:.0f} MB of imports not scaled) |")


if __name__ == "__main__":
    main()
