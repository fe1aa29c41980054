"""How long a server's history takes to open when it holds all it may.

``History(db)`` scans every kept message once at startup (keys and bodies:
see :mod:`cometd.history`), so its time grows with ``--history-bytes``. This
fills a fresh database in a temp dir with *subjects* x 100 messages of
100 bytes (by default the whole 64 MiB default bound), then reopens it
*runs* times and prints the wall and CPU time of each opening::

    .venv/bin/python bench/bench_history_open.py            # --subjects 7000 --runs 3
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time

import plyvel

from cometd.history import History

BODY = b"x" * 100
PER_SUBJECT = 100  # the default --history-size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", type=int, default=7000,
                        help="subjects of 100 messages each (7,000: ~64 MiB of bodies)")
    parser.add_argument("--runs", type=int, default=3, help="openings timed")
    parser.add_argument("--history-bytes", type=int, default=64 * 1024 * 1024)
    args = parser.parse_args()
    path = tempfile.mkdtemp(prefix="cometd-history-open-")
    try:
        db = plyvel.DB(path, create_if_missing=True)
        history = History(db, size=PER_SUBJECT, max_bytes=args.history_bytes)
        subjects = [str(i) for i in range(args.subjects)]
        for _ in range(PER_SUBJECT):
            history.record_batch([(s, BODY) for s in subjects])
        db.close()
        print(f"filled: {args.subjects:,} subjects, {history._bytes:,} bytes of bodies kept")
        for run in range(1, args.runs + 1):
            db = plyvel.DB(path)
            wall, cpu = time.perf_counter(), time.process_time()
            history = History(db, size=PER_SUBJECT, max_bytes=args.history_bytes)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
            print(f"open {run}: {wall:.2f} s wall, {cpu:.2f} s CPU, {len(history._counts):,} "
                  f"subjects, {history._bytes:,} bytes; peak RSS {rss} MB")
            db.close()
    finally:
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
