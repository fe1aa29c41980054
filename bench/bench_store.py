#!/usr/bin/env python3
"""Store benchmarks: bulk-load time and peak RSS, and cold get_subscribers lookups/s.

    bench/bench_store.py [--n 1000000] [--m 15] [--lookups 200000] [--runs 3]
                         [--zipf 1.0] [--json FILE]

Everything is built in a temporary directory (deleted afterwards): the friends
file (``bin/genfriends --seed 1``), --runs databases loaded from it with
``bin/cometd load`` (each a child process into a fresh directory, so its wall
time and peak RSS are its own), and the issue's comparison layout: one key per
(subscribee, subscriber) pair, read by prefix iteration.

Theory of operation
-------------------
A lookup figure is only honest if it reads users the timed run has not read
before: re-timing the same sample measures LevelDB's block cache. So each
round draws its own sample of --lookups users, disjoint from every other
round's (one ``random.sample`` of runs x lookups users, cut in pieces), and a
Zipf-skewed sample (rank k drawn with weight 1/k**s, ranks mapped to users by
a fresh permutation per round, so each round's hot users are new). Every pass
opens a fresh database handle, so LevelDB's block cache (8 MiB by default) and
table cache start cold. The OS page cache is *not* dropped (that needs root
and would disturb everything else on the machine): both databases were just
written and sit in it, so "cold" means LevelDB-cold, not disk-cold.

The comparison is like for like: the pair layout holds the same subscriptions
(the ``subscribers`` keyspace of the same file, with the store's key encoding),
both layouts read the same users in the same round, both return ``list[str]``,
and the rounds alternate which layout goes first. Per round and layout:
cold pass over the uniform sample, a warm second pass over the same users on
the same handle, then a fresh handle for the Zipf sample.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import plyvel  # noqa: E402

from cometd.ids import encode_key  # noqa: E402
from cometd.store import SUBSCRIBERS, SubscriptionStore  # noqa: E402

Lookup = Callable[[str], list[str]]
LAYOUTS = ("one key per user (cometd)", "one key per pair, prefix scan")
PASSES = ("cold, uniform", "warm, same users again", "cold, Zipf")


def run(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of a child command."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{cmd!r} failed")
    return wall, usage.ru_maxrss / 1024


def timed(fn: Lookup, users: list[str]) -> tuple[float, int]:
    """(lookups/s, subscribers returned in all) of one pass."""
    start = time.perf_counter()
    total = 0
    for user in users:
        total += len(fn(user))
    return len(users) / (time.perf_counter() - start), total


def build_pairs(friends: str, path: str) -> float:
    """The pair layout of *friends*' subscribers keyspace; returns seconds taken."""
    start = time.monotonic()
    chunks = []
    with open(friends, "rb") as f:
        tail = b""
        while block := f.read(8 << 20):
            block = tail + block
            cut = block.rfind(b"\n") + 1
            tail = block[cut:]
            chunks.append(np.array(block[:cut].split(), dtype=np.uint32).reshape(-1, 2))
        if tail.strip():
            chunks.append(np.array(tail.split(), dtype=np.uint32).reshape(-1, 2))
    pairs = np.concatenate(chunks)
    del chunks
    # Undirected, as `cometd load` stores it: each line is two subscriptions.
    packed = np.concatenate([pairs[:, 0].astype(np.uint64) << 32 | pairs[:, 1],
                             pairs[:, 1].astype(np.uint64) << 32 | pairs[:, 0]])
    del pairs
    packed = np.unique(packed)  # sorted: LevelDB gets keys in order
    # key = prefix + tag + subscribee (4 bytes BE) + tag + subscriber (4 bytes BE)
    keys = np.zeros((packed.size, 11), dtype=np.uint8)
    keys[:, 0] = SUBSCRIBERS[0]
    keys[:, 1] = keys[:, 6] = encode_key("1")[0]
    keys[:, 2:6] = (packed >> 32).astype(">u4").view(np.uint8).reshape(-1, 4)
    keys[:, 7:11] = (packed & 0xFFFFFFFF).astype(">u4").view(np.uint8).reshape(-1, 4)
    del packed
    db = plyvel.DB(path, create_if_missing=True, error_if_exists=True)
    step = 1 << 20
    for i in range(0, len(keys), step):
        raw = keys[i:i + step].tobytes()
        with db.write_batch() as batch:
            for j in range(0, len(raw), 11):
                batch.put(raw[j:j + 11], b"")
    db.close()
    return time.monotonic() - start


def pair_lookup(db: plyvel.DB) -> Lookup:
    def get(user: str) -> list[str]:
        prefix = SUBSCRIBERS + encode_key(user)
        return [str(int.from_bytes(k[6:10], "big"))
                for k in db.iterator(prefix=prefix, include_value=False)]
    return get


def zipf_sample(rng: random.Random, n: int, k: int, s: float) -> list[str]:
    """*k* users drawn with rank weights 1/rank**s, ranks mapped by a fresh permutation."""
    cum = np.cumsum(1.0 / np.arange(1, n + 1, dtype=np.float64) ** s)
    nrng = np.random.default_rng(rng.getrandbits(64))
    ranks = np.searchsorted(cum, nrng.random(k) * cum[-1])
    users = nrng.permutation(n) + 1
    return [str(u) for u in users[np.minimum(ranks, n - 1)]]


def spread(values: list[float]) -> str:
    runs = " / ".join(f"{v:,.0f}" for v in values)
    return (f"**{statistics.median(values):,.0f}** "
            f"({min(values):,.0f}–{max(values):,.0f}; runs {runs})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="users (genfriends --n)")
    ap.add_argument("--m", type=int, default=15, help="genfriends --m")
    ap.add_argument("--lookups", type=int, default=200_000, help="users per timed pass")
    ap.add_argument("--runs", type=int, default=3, help="loads, and lookup rounds")
    ap.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent s of the skewed sample")
    ap.add_argument("--json", help="also write the raw figures here")
    args = ap.parse_args()
    if args.runs * args.lookups > args.n:
        ap.error("--runs x --lookups must not exceed --n (each round reads new users)")
    tmp = tempfile.mkdtemp(prefix="cometd-bench-store-")
    out: dict = {"args": vars(args), "python": platform.python_version()}
    try:
        friends = os.path.join(tmp, "friends.txt")
        gen_wall, gen_rss = run([sys.executable, os.path.join(ROOT, "bin", "genfriends"),
                                 "--n", str(args.n), "--m", str(args.m), "--seed", "1",
                                 "-o", friends])
        print(f"genfriends: {gen_wall:.1f} s", file=sys.stderr)
        loads, peaks = [], []
        for i in range(args.runs):
            wall, peak = run([sys.executable, os.path.join(ROOT, "bin", "cometd"), "load",
                              friends, "--db", os.path.join(tmp, f"db{i}")])
            loads.append(wall)
            peaks.append(peak)
            print(f"load run {i + 1}: {wall:.1f} s, peak RSS {peak:.0f} MB", file=sys.stderr)
        for i in range(1, args.runs):
            shutil.rmtree(os.path.join(tmp, f"db{i}"))  # lookups read db0 only
        pair_path = os.path.join(tmp, "pairs")
        pair_build = build_pairs(friends, pair_path)
        print(f"pair layout built: {pair_build:.1f} s", file=sys.stderr)
        out.update(genfriends_s=gen_wall, genfriends_rss_mb=gen_rss, load_s=loads,
                   load_rss_mb=peaks, pair_build_s=pair_build)

        rng = random.Random(7)
        fresh = [str(u) for u in rng.sample(range(1, args.n + 1), args.runs * args.lookups)]
        rates = {(lay, p): [] for lay in LAYOUTS for p in PASSES}
        fanout: dict[str, list[float]] = {p: [] for p in PASSES}
        for r in range(args.runs):
            uniform = fresh[r * args.lookups:(r + 1) * args.lookups]
            zipf = zipf_sample(rng, args.n, args.lookups, args.zipf)
            totals = {}
            order = LAYOUTS if r % 2 == 0 else LAYOUTS[::-1]
            for layout in order:
                for sample, passes in ((uniform, PASSES[:2]), (zipf, PASSES[2:])):
                    if layout == LAYOUTS[0]:
                        handle = SubscriptionStore(os.path.join(tmp, "db0"))
                        fn: Lookup = handle.get_subscribers
                    else:
                        handle = plyvel.DB(pair_path)
                        fn = pair_lookup(handle)
                    try:
                        for p in passes:
                            rate, total = timed(fn, sample)
                            rates[(layout, p)].append(rate)
                            totals.setdefault(p, set()).add(total)
                    finally:
                        handle.close()
            for p, seen in totals.items():
                if len(seen) != 1:  # the layouts disagree: not like for like
                    raise SystemExit(f"round {r + 1}, {p}: subscriber totals differ: {seen}")
                fanout[p].append(seen.pop() / args.lookups)
            print(f"round {r + 1}: " + ", ".join(
                f"{lay.split(' (')[0]}, {p}: {rates[(lay, p)][-1]:,.0f}/s" for lay in LAYOUTS
                for p in PASSES),
                file=sys.stderr)
            if r == 0:
                out["zipf_distinct_users"] = len(set(zipf))
        out["lookups_per_s"] = {f"{lay} / {p}": v for (lay, p), v in rates.items()}
        out["avg_fanout"] = fanout

        print(f"| figure ({args.runs} runs: median (min–max; each run)) | measured |")
        print("|---|---|")
        print(f"| `bin/genfriends --n {args.n} --m {args.m}` (one run) | {gen_wall:.1f} s, "
              f"peak RSS {gen_rss:.0f} MB |")
        print(f"| `bin/cometd load` of that file, fresh database each run | "
              f"{statistics.median(loads):.1f} s ({min(loads):.1f}–{max(loads):.1f}; runs "
              f"{' / '.join(f'{v:.1f}' for v in loads)}), peak RSS {max(peaks):.0f} MB |")
        print(f"| one-key-per-pair layout of the same subscriptions, built by this script | "
              f"{pair_build:.1f} s (one run, not a load path we ship) |")
        print()
        print(f"| get_subscribers pass, {args.lookups:,} users, lookups/s | "
              + " | ".join(LAYOUTS) + " | avg subscribers |")
        print("|---|---:|---:|---:|")
        for p in PASSES:
            print(f"| {p} | " + " | ".join(spread(rates[(lay, p)]) for lay in LAYOUTS)
                  + f" | {statistics.median(fanout[p]):.1f} |")
        print()
        print(f"Zipf s={args.zipf:g}: {out['zipf_distinct_users']:,} distinct users in the first "
              f"round's sample of {args.lookups:,}.")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
