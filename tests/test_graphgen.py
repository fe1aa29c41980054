"""Tests for the Barabási–Albert friends generator (cometd.graphgen, bin/genfriends)."""

from __future__ import annotations

import collections
import io
import itertools
import math
import os
import re
import subprocess
import sys

import networkx as nx
import numpy as np
import pytest
from click.testing import CliRunner
from scipy import stats

from cometd import graphgen

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bin", "genfriends")
LINE = re.compile(rb"[1-9][0-9]* [1-9][0-9]*\n")


def run_script(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, SCRIPT, *args], capture_output=True, cwd=cwd or ROOT, timeout=120
    )


def parse(data: bytes) -> np.ndarray:
    """The friends file as an (E, 2) array, checking every line's exact form."""
    lines = data.splitlines(keepends=True)
    assert all(LINE.fullmatch(x) for x in lines), "every line is 'A B\\n', no leading zeros"
    return np.array([x.split() for x in lines], dtype=np.int64).reshape(-1, 2)


def check_graph(edges: np.ndarray, n: int, m: int) -> None:
    """The structural guarantees of a friends file with user ids 1..n."""
    assert edges.shape == (m + (n - m - 1) * m, 2)
    assert edges.min() >= 1 and edges.max() <= n
    assert not (edges[:, 0] == edges[:, 1]).any(), "no self-friendships"
    pairs = {(min(a, b), max(a, b)) for a, b in edges.tolist()}
    assert len(pairs) == len(edges), "no pair twice, in either orientation"
    deg = np.bincount(edges.ravel(), minlength=n + 1)[1:]
    assert deg.min() >= 1, "every user has a friend"


# -- the script, end to end ---------------------------------------------------


def test_script_writes_valid_reproducible_file(tmp_path):
    n, m = 3000, 4
    out = tmp_path / "new" / "dir" / "friends.txt"  # parent dirs do not exist yet
    r = run_script("--n", str(n), "--m", str(m), "--seed", "7", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stderr == b"", "no progress bar or seed message when stderr is not a tty"
    data = out.read_bytes()
    check_graph(parse(data), n, m)
    assert data.count(b"\n") == m + (n - m - 1) * m
    assert list(tmp_path.joinpath("new", "dir").iterdir()) == [out], "no temp file left"

    again = tmp_path / "again.txt"
    assert run_script("--n", str(n), "--m", str(m), "--seed", "7", "-o", str(again)).returncode == 0
    assert again.read_bytes() == data, "same seed, byte-identical file"

    other = tmp_path / "other.txt"
    assert run_script("--n", str(n), "--m", str(m), "--seed", "8", "-o", str(other)).returncode == 0
    assert other.read_bytes() != data, "different seed, different graph"


def test_script_random_seed_is_reported_and_replays(tmp_path):
    first = tmp_path / "a.txt"
    r = run_script("--n", "500", "--m", "3", "-o", str(first))
    assert r.returncode == 0, r.stderr
    found = re.search(rb"seed (\d+)", r.stderr)
    assert found, r.stderr
    replay = tmp_path / "b.txt"
    r2 = run_script("--n", "500", "--m", "3", "--seed", found.group(1).decode(), "-o", str(replay))
    assert r2.returncode == 0
    assert replay.read_bytes() == first.read_bytes()


def test_script_default_output_path(tmp_path):
    r = run_script("--n", "50", "--m", "2", "--seed", "1", cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    check_graph(parse((tmp_path / "data" / "fakefriends.txt").read_bytes()), 50, 2)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--n", "5", "--m", "5"], "greater than --m"),
        (["--n", "3", "--m", "7"], "greater than --m"),
        (["--n", "10", "--m", "0"], "--m"),
        (["--n", "-4", "--m", "1"], "--n"),
        (["--n", "ten", "--m", "2"], "--n"),
        (["--m", "2"], "--n"),
        (["--n", "10", "--m", "2", "--seed", "-1"], "--seed"),
    ],
)
def test_bad_arguments_exit_2_with_message(args, message):
    result = CliRunner().invoke(graphgen.main, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_bad_arguments_via_script_no_traceback():
    r = run_script("--n", "5", "--m", "5")
    assert r.returncode == 2
    assert b"--n must be greater than --m" in r.stderr
    assert b"Traceback" not in r.stderr


def test_help_explains_model_and_options():
    result = CliRunner().invoke(graphgen.main, ["--help"])
    assert result.exit_code == 0
    for word in ("Barabási–Albert", "proportional", "--n", "--m", "--seed", "-o", "fakefriends"):
        assert word in result.output


def test_stdout_output():
    result = CliRunner().invoke(graphgen.main, ["--n", "30", "--m", "3", "--seed", "5", "-o", "-"])
    assert result.exit_code == 0
    check_graph(parse(result.stdout_bytes), 30, 3)


# -- the library ----------------------------------------------------------------


@pytest.mark.parametrize("n, m", [(2, 1), (5, 4), (6, 1), (40, 3), (300, 12), (2000, 1)])
def test_generate_edges_structure(n, m):
    edges = graphgen.generate_edges(n, m, seed=3)
    assert len(edges) == graphgen.edge_count(n, m) == m + (n - m - 1) * m
    check_graph(edges.astype(np.int64) + 1, n, m)
    # The star comes first, then every later node s joins m earlier nodes.
    assert sorted(map(tuple, edges[:m].tolist())) == [(0, k) for k in range(1, m + 1)]
    src, dst = edges[m:, 0], edges[m:, 1]
    assert (src == np.repeat(np.arange(m + 1, n), m)).all()
    assert (dst < src).all()


def test_wide_index_path(monkeypatch):
    # Graphs with 2*m*n >= 2**31 use int64 throughout; exercise that path small.
    monkeypatch.setattr(graphgen, "_index_dtype", lambda n, m: np.int64)
    edges = graphgen.generate_edges(500, 6, seed=9)
    assert edges.dtype == np.int64
    check_graph(edges + 1, 500, 6)


def test_generate_edges_rejects_bad_parameters():
    for n, m in [(5, 5), (5, 0), (1, 1), (3, 9)]:
        with pytest.raises(ValueError):
            graphgen.generate_edges(n, m, seed=1)


def test_write_edges_matches_plain_formatting():
    rng = np.random.default_rng(0)
    special = [0, 8, 9, 10, 98, 99, 100, 999, 1000, 99999, 999999]
    a = np.concatenate([special, rng.integers(0, 1_000_000, 5000)])
    b = np.concatenate([special[::-1], rng.integers(0, 1_000_000, 5000)])
    edges = np.stack([a, b], axis=1).astype(np.int32)
    buf = io.BytesIO()
    graphgen.write_edges(edges, buf)
    expected = "".join(f"{x + 1} {y + 1}\n" for x, y in edges.tolist()).encode()
    assert buf.getvalue() == expected


def test_degree_distribution_matches_networkx():
    n, m = 20000, 5
    ours = np.bincount(graphgen.generate_edges(n, m, seed=2024).ravel(), minlength=n)
    ref = np.array([d for _, d in nx.barabasi_albert_graph(n, m, seed=4202).degree()])
    assert ours.sum() == ref.sum() == 2 * (m + (n - m - 1) * m)
    assert ours.min() == m
    assert stats.ks_2samp(ours, ref).pvalue > 0.01
    # Scale-free tail: the hub degree grows like m * sqrt(n) (about 700 here).
    assert m * math.sqrt(n) / 4 < ours.max() < 4 * m * math.sqrt(n)
    # Early nodes are the hubs: same mean degree for the first 100 nodes.
    assert stats.ks_2samp(ours[:100], ref[:100]).pvalue > 0.01


def _exact_degree_law(n: int, m: int) -> dict[tuple[int, ...], float]:
    """P(degree sequence) of the BA model, by enumerating every possible run.

    Written from the model's definition (networkx's sampling: targets drawn one
    at a time proportionally to degree, repeats rejected), independently of the
    code under test.
    """

    def set_probability(deg: list[int], targets: tuple[int, ...]) -> float:
        total = sum(deg)
        p_set = 0.0
        for order in itertools.permutations(targets):
            p, used = 1.0, 0
            for x in order:
                p *= deg[x] / (total - used)
                used += deg[x]
            p_set += p
        return p_set

    law = {tuple([m] + [1] * m): 1.0}
    for s in range(m + 1, n):
        nxt: dict[tuple[int, ...], float] = collections.defaultdict(float)
        for deg, p in law.items():
            for targets in itertools.combinations(range(s), m):
                d = list(deg) + [m]
                for x in targets:
                    d[x] += 1
                nxt[tuple(d)] += p * set_probability(list(deg), targets)
        law = nxt
    return law


def test_small_graphs_follow_exact_model_law():
    # Tiny graphs exercise the repeated-target handling hardest: early lists are
    # short, so most rows draw some node twice. Compare the empirical law of the
    # whole degree sequence with the exact one (chi-square goodness of fit).
    n, m, samples = 7, 2, 12000
    law = _exact_degree_law(n, m)
    assert math.isclose(sum(law.values()), 1.0)
    seen = collections.Counter(
        tuple(np.bincount(graphgen.generate_edges(n, m, seed=s).ravel(), minlength=n).tolist())
        for s in range(samples)
    )
    assert set(seen) <= set(law), "only degree sequences the model can produce"
    keys = sorted(law)
    observed = np.array([seen[k] for k in keys], dtype=float)
    expected = np.array([law[k] for k in keys]) * samples
    big = expected >= 5
    observed = np.append(observed[big], observed[~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    assert stats.chisquare(observed, expected).pvalue > 0.01
