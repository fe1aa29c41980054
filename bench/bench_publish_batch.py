#!/usr/bin/env python3
"""CPU per message of a ``POST /publish`` batch's parts, in process: parse, history, the whole.

    [PYTHONPATH=CHECKOUT] bench/bench_publish_batch.py [--batches 400] [--runs 3]

The body is bench/bench_publish.py's: 100 lines of ``{"from": "<n>", "body":
"<100 bytes>"}``, subjects cycling over 1..1000, nobody online. Three
figures, each the median of --runs fresh runs, in µs per message:

- ``parse_batch``: the body's reading alone (the best of 5 timeit repeats:
  warm caches).
- ``History.record_batch``: --batches batches into a fresh LevelDB in a
  temp dir, in three regimes: 1,000 subjects, no bound reached; 100
  subjects, each at its size bound; 5,000 subjects over a 1 MB total size
  bound. Process CPU (every thread: LevelDB compacts in its own), to the
  database's close, which waits for its background work.
- ``answer_publish``: the whole batch as the fast path runs it (parse, the
  router with a real store, history and pool-mode connection table, the
  answer's bytes), --batches batches, process CPU.

With PYTHONPATH set to another checkout, that checkout's code is measured,
so a before and an after can be run side by side. No network; every loop is
bounded by --batches.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path

if "PYTHONPATH" not in os.environ:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import plyvel  # noqa: E402

from cometd.auth import Authenticator  # noqa: E402
from cometd.config import AuthConfig  # noqa: E402
from cometd.connections import ConnectionTable  # noqa: E402
from cometd.history import History  # noqa: E402
from cometd.publish import _answer_bytes, answer_publish, parse_batch  # noqa: E402
from cometd.router import Router  # noqa: E402
from cometd.server import LocalBackend  # noqa: E402
from cometd.store import SubscriptionStore  # noqa: E402

PER_BATCH = 100
BODY = b"m" * 100


def bodies(subjects: int = 1000, count: int = 10) -> list[bytes]:
    """*count* request bodies of PER_BATCH lines, subjects cycling over 1..*subjects*."""
    line = b'{"from": "%d", "body": "' + BODY + b'"}\n'
    return [b"".join(line % ((b * PER_BATCH + j) % subjects + 1) for j in range(PER_BATCH))
            for b in range(count)]


def parse_us() -> float:
    body = bodies()[0]
    assert len(parse_batch(body)) == PER_BATCH
    n = 1000
    return min(timeit.repeat(lambda: parse_batch(body), number=n, repeat=5)) / n / PER_BATCH * 1e6


def history_us(batches: int, subjects: int, max_bytes: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        db = plyvel.DB(tmp, create_if_missing=True)
        history = History(db, max_bytes=max_bytes)
        lists = [[(str((b * PER_BATCH + j) % subjects + 1), BODY) for j in range(PER_BATCH)]
                 for b in range(50)]
        for i in range(batches):  # to the regime's steady state
            history.record_batch(lists[i % 50])
        start = time.process_time()
        for i in range(batches):
            history.record_batch(lists[i % 50])
        db.close()
        return (time.process_time() - start) / batches / PER_BATCH * 1e6


def publish_us(batches: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        store = SubscriptionStore(str(Path(tmp) / "db"))
        table = ConnectionTable("pool")
        router = Router(store, table, History(store.db))
        backend = LocalBackend(store, router, table)
        auth = Authenticator(AuthConfig())
        requests = bodies()

        def one(i: int) -> bytes:
            answer = answer_publish(backend, auth, None, None, lambda limit: requests[i % 10])
            assert answer.status == 200, answer
            return _answer_bytes(answer, False, "", False)

        for i in range(50):
            one(i)
        start = time.process_time()
        for i in range(batches):
            one(i)
        store.close()
        return (time.process_time() - start) / batches / PER_BATCH * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, default=400, help="batches of 100 per run")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    import cometd
    print(f"checkout: {Path(cometd.__file__).resolve().parent.parent}")
    cases = {
        "parse_batch": parse_us,
        "History.record_batch, 1000 subjects, no bound":
            lambda: history_us(args.batches, 1000, 64 << 20),
        "History.record_batch, 100 subjects at their size bound":
            lambda: history_us(args.batches * 3, 100, 64 << 20),
        "History.record_batch, 5000 subjects over 1 MB in all":
            lambda: history_us(args.batches, 5000, 1 << 20),
        "answer_publish, the whole batch": lambda: publish_us(args.batches),
    }
    for name, case in cases.items():
        runs = [case() for _ in range(args.runs)]
        print(f"{name:58} {statistics.median(runs):6.2f} µs a message "
              f"({min(runs):.2f}-{max(runs):.2f})")


if __name__ == "__main__":
    main()
