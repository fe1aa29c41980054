"""bench/bench_storm.py at a tiny size: it runs end to end and its figures add up.

The figures themselves (15,000 users) are in BENCHMARKS.md; this only keeps
the script working: a kick storm on one process, 150 users, one run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "bench_storm.py")


def test_a_tiny_kick_storm_comes_back_with_nothing_lost(tmp_path):
    out = tmp_path / "storm.json"
    done = subprocess.run(
        [sys.executable, SCRIPT, "--users", "150", "--friends", "3", "--rate", "100",
         "--publish", "3", "--storm-budget", "10", "--runs", "1", "--json", str(out),
         "--kick-batch", "100"],  # two kick commands, one of 100 ids and one of 50
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    (run,) = result["runs"]
    assert run["reconnects"] >= 150, run  # every stream was kicked and came back
    # caught_up_s is 0 when every message sent before the storm's marker was
    # received before the storm began (a loaded machine's paced sends can end so).
    assert 0 < run["all_back_s"] < 10 and 0 <= run["caught_up_s"] < 10, run
    assert (run["lost"], run["dup"], run["unexpected"]) == (0, 0, 0), run
    assert run["published"] > 100 and run["expected"] > run["published"], run
    assert "150 users, kick, one process, pool mode" in done.stdout
