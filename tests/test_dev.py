"""``bin/dev``, the bootstrap script: its help and its refusal of unknown commands.

Only the paths that stop before making a virtualenv run here; ``run`` and
``test`` themselves are what the rest of the suite (and every developer) uses.
"""

from __future__ import annotations

import os
import subprocess

import pytest

DEV = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bin", "dev")


def dev(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([DEV, *args], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("word", ["help", "-h", "--help"])
def test_help_is_a_full_usage_and_exits_0(word):
    proc = dev(word)
    assert proc.returncode == 0, proc
    for text in ("run [ARGS...]", "test [ARGS...]", "bin/dev run --port 9000 --mode pool",
                 "bin/dev test -k name", ".venv/bin", ". .venv/bin/activate",
                 "already open in another process"):
        assert text in proc.stdout, text
    assert proc.stderr == ""


@pytest.mark.parametrize("args", [["bogus"], [], ["bogus", "run"]])
def test_an_unknown_or_missing_command_exits_2_with_the_usage(args):
    proc = dev(*args)
    assert proc.returncode == 2, proc
    assert proc.stdout == ""
    assert "usage: bin/dev COMMAND [ARGS...]" in proc.stderr
    assert ("unknown command 'bogus'" in proc.stderr) == bool(args)
