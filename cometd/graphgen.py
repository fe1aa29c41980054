"""The Barabási–Albert friends-graph generator behind ``bin/genfriends``.

The graph follows exactly the model of :func:`networkx.barabasi_albert_graph`
(default star start, no ``initial_graph``):

- nodes ``0 .. m`` start as a star: node 0 is joined to each of ``1 .. m``;
- each new node ``s = m+1 .. n-1`` is joined to ``m`` *distinct* existing nodes,
  each chosen with probability proportional to its current degree.

networkx realises "proportional to degree" with a list ``repeated_nodes`` that holds
every node once per incident edge (``[0]*m + [1..m]`` for the star); it draws
uniformly from that list, rejecting repeats until it has ``m`` distinct targets,
then appends the ``m`` targets and ``[s]*m``. This module samples from the same
distribution without building a graph (networkx needs about a minute and 2.5 GB
for ``n = 10**6, m = 15``): :func:`generate_edges` produces the edge list with
vectorised numpy code and :func:`write_edges` writes it as a friends file, one
friendship ``"A B"`` per line with user ids ``1 .. n`` (node ``k`` is user
``k + 1``).

The output is reproducible: the same ``(n, m, seed)`` always gives the same edges,
in the same order, on any platform (numpy's ``default_rng`` / PCG64 stream).
"""

from __future__ import annotations

import os
import secrets
import sys
import tempfile
from collections.abc import Callable
from typing import BinaryIO

import click
import numpy as np

__all__ = [
    "DEFAULT_OUTPUT",
    "edge_count",
    "generate_edges",
    "sample_targets",
    "write_edges",
    "main",
]

DEFAULT_OUTPUT = os.path.join("data", "fakefriends.txt")

Progress = Callable[[int], None]

# ---------------------------------------------------------------------------
# Theory of operation of the vectorised sampler
# ---------------------------------------------------------------------------
#
# Rows and slots. Step s (s = m+1 .. n-1) is "row" i = s - m - 1; its m targets are
# "slots" i*m .. i*m + m-1 of one flat array. There are S = n - m - 1 rows.
#
# The list is predictable. networkx's repeated_nodes has length L = 2m + 2m*i
# before row i, and its layout never depends on the random draws:
#
#     [0]*m + [1..m]  |  targets(row 0) + [m+1]*m  |  targets(row 1) + [m+2]*m  | ...
#
# so a uniform position p in [0, L) decodes, with q = p - 2m, b = q // 2m,
# r = q % 2m, into either a known node (the star prefix, or the "[s]*m" half of
# block b, i.e. node b + m + 1) or into "whatever row b put in its target slot r"
# -- a pointer to the earlier slot b*m + r. A draw is stored as a "code": a
# pointer is the slot index (>= 0), a known node v is ~v (= -v - 1, < 0).
#
# Resolving. Following pointers turns codes into nodes. Pointers always lead to
# earlier slots, so the structure is a forest and vectorised pointer jumping
# (a[x] = a[a[x]] for every unresolved x, repeated) resolves all slots in
# O(log depth) passes.
#
# Distinct targets. networkx keeps drawing until it has m distinct nodes, so a
# row's target set is "the first m distinct values of an iid sequence of uniform
# draws". We give every row the same kind of sequence: its m initial draws, then,
# only if they collide, extra draws appended on demand ("candidates"). Candidates
# are never discarded, only re-read, so a row's target set is always the first m
# distinct values of its own iid sequence, evaluated with the *final* values of
# earlier rows -- exactly networkx's law, whatever provisional values the
# iteration saw on the way. Within a row, first occurrences keep their slot and
# the colliding slots take the later distinct candidates in order; since every
# later draw is a uniform position, the order of targets inside a block does not
# change the distribution (networkx itself appends them in set order).
#
# Order of work. Rows are processed in chunks, oldest first, so every pointer out
# of the current chunk lands on a slot whose value is already final (one gather).
# Inside a chunk: draw all codes, resolve, find rows with a repeated target (sort
# each row, compare neighbours), fix those rows from their candidates, re-resolve
# the chunk from the first changed row, and repeat until no row changes (a fix can
# create or remove a repeat in a later row of the same chunk, never in an earlier
# one). Collisions are rare except in the first rows (about m**2 log(s) / 8s per
# row), so the per-row Python work touches a few thousand rows for n = 10**6.
#
# Memory: one resolved-slot array of S*m ints (int32 while positions fit) plus
# per-chunk temporaries; the random stream is consumed in a fixed order (chunk
# draws, then extra draws row by row), so results are reproducible.

_FIRST_CHUNK_ROWS = 1024
_MAX_CHUNK_SLOTS = 1 << 20
_WRITE_CHUNK_LINES = 1 << 19


def edge_count(n: int, m: int) -> int:
    """Number of edges (friendships) of the Barabási–Albert graph on n nodes."""
    return m + (n - m - 1) * m


def _check_params(n: int, m: int) -> None:
    if not (isinstance(n, int | np.integer) and isinstance(m, int | np.integer)):
        raise TypeError("n and m must be integers")
    if m < 1 or m >= n:
        raise ValueError(f"Barabási–Albert graph needs n > m >= 1, got n={n}, m={m}")


def _index_dtype(n: int, m: int) -> type[np.signedinteger]:
    # The largest number the sampler handles is a list length, 2m(n - m).
    return np.int32 if 2 * m * n < 2**31 else np.int64


def _draw_codes(rng: np.random.Generator, m: int, row0: int, row1: int, dtype) -> np.ndarray:
    """Codes of the m initial draws of rows row0 .. row1-1, shape (rows, m)."""
    rows = np.arange(row0, row1, dtype=dtype)
    pos = rng.integers(0, (2 * m * (rows + 1))[:, None], size=(row1 - row0, m), dtype=dtype)
    b, r = np.divmod(pos - 2 * m, 2 * m)
    code = np.where(r < m, b * m + r, ~(b + m + 1))
    star = pos < 2 * m
    p = pos[star]
    code[star] = ~np.where(p < m, 0, p - m + 1)
    return code


def _draw_code(rng: np.random.Generator, m: int, row: int) -> int:
    """Code of one extra draw for ``row`` (a Python int)."""
    p = int(rng.integers(0, 2 * m * (row + 1)))
    if p < 2 * m:
        return ~0 if p < m else ~(p - m + 1)
    b, r = divmod(p - 2 * m, 2 * m)
    return b * m + r if r < m else ~(b + m + 1)


def _resolve(code: np.ndarray, val: np.ndarray, lo: int) -> None:
    """Resolve the codes of slots lo .. lo+len(code)-1 into nodes, stored in val.

    Pointers below ``lo`` must already be resolved in ``val``.
    """
    a = code.copy()
    out = (a >= 0) & (a < lo)
    a[out] = ~val[a[out]]
    a[a >= 0] -= lo  # the remaining pointers, as local indices
    todo = np.flatnonzero(a >= 0)
    while todo.size:
        a[todo] = a[a[todo]]
        todo = todo[a[todo] >= 0]
    val[lo : lo + a.size] = ~a


def _rows_with_repeats(vals: np.ndarray) -> np.ndarray:
    """Indices of the rows of a 2-D array that hold some value twice."""
    if vals.shape[0] == 0 or vals.shape[1] < 2:
        return np.empty(0, dtype=np.intp)
    s = np.sort(vals, axis=1)
    return np.flatnonzero((s[:, 1:] == s[:, :-1]).any(axis=1))


def _select(
    row: int, cands: list[int], val: np.ndarray, m: int, rng: np.random.Generator
) -> list[int]:
    """Codes for the m slots of ``row``: its first m distinct candidates.

    First occurrences among the m initial candidates keep their slot; repeated
    slots take the next distinct candidates in order. Extra candidates are drawn
    (and remembered in ``cands``) when the existing ones run out.
    """
    seen: set[int] = set()
    slots = list(cands[:m])
    free: list[int] = []
    for k in range(m):
        c = cands[k]
        v = int(val[c]) if c >= 0 else ~c
        if v in seen:
            free.append(k)
        else:
            seen.add(v)
    j = m
    for k in free:
        while True:
            if j == len(cands):
                cands.append(_draw_code(rng, m, row))
            c = cands[j]
            j += 1
            v = int(val[c]) if c >= 0 else ~c
            if v not in seen:
                seen.add(v)
                slots[k] = c
                break
    return slots


def sample_targets(
    n: int, m: int, rng: np.random.Generator, progress: Progress | None = None
) -> np.ndarray:
    """Targets of nodes m+1 .. n-1: an array of shape (n-m-1, m), row i for node i+m+1.

    Each row holds m distinct earlier nodes, drawn as in networkx's
    ``barabasi_albert_graph``. ``progress``, if given, is called with the number
    of rows finished after each chunk.
    """
    _check_params(n, m)
    dtype = _index_dtype(n, m)
    nrows = n - m - 1
    val = np.empty(nrows * m, dtype=dtype)
    rows_per_chunk_max = max(1, _MAX_CHUNK_SLOTS // m)
    row0 = 0
    chunk_rows = min(_FIRST_CHUNK_ROWS, rows_per_chunk_max)
    while row0 < nrows:
        row1 = min(nrows, row0 + chunk_rows)
        code = _draw_codes(rng, m, row0, row1, dtype).ravel()
        base = row0 * m
        _resolve(code, val, base)
        check = _rows_with_repeats(val[base : row1 * m].reshape(-1, m)) + row0
        cands: dict[int, list[int]] = {}  # rows that needed extra draws, this chunk
        while True:
            first = row1  # earliest row whose slots changed in this pass
            for row in sorted(set(check.tolist()) | cands.keys()):
                lo = (row - row0) * m
                if row not in cands:
                    v = val[base + lo : base + lo + m]
                    if np.unique(v).size == m:
                        continue
                    cands[row] = code[lo : lo + m].tolist()
                new = _select(row, cands[row], val, m, rng)
                if new != code[lo : lo + m].tolist():
                    code[lo : lo + m] = new
                    first = min(first, row)
                    # Later rows in this pass may read this row: keep val current.
                    _resolve(code[lo : lo + m], val, base + lo)
            if first == row1:
                break
            lo = (first - row0) * m
            old = val[base + lo : row1 * m].copy()
            _resolve(code[lo:], val, base + lo)
            changed = np.flatnonzero(old != val[base + lo : row1 * m])
            check = np.unique(changed // m) + first
        if progress is not None:
            progress(row1 - row0)
        row0 = row1
        chunk_rows = min(2 * chunk_rows, rows_per_chunk_max)
    return val.reshape(nrows, m)


def generate_edges(
    n: int, m: int, seed: int | None = None, progress: Progress | None = None
) -> np.ndarray:
    """Edges of a Barabási–Albert graph as an (E, 2) integer array of node indices.

    Nodes are ``0 .. n-1``; E = :func:`edge_count` (n, m). The star edges
    ``(0, k)`` for k = 1..m come first, then ``(s, t)`` for each new node s in
    order, t its m targets. There are no self-loops and no repeated pairs, and
    the graph has the distribution of ``networkx.barabasi_albert_graph(n, m)``.
    ``seed`` (an int >= 0) makes the result reproducible. ``progress``, if given,
    is called with the number of nodes processed as the work advances.
    """
    _check_params(n, m)
    rng = np.random.default_rng(seed)
    targets = sample_targets(n, m, rng, progress)
    dtype = targets.dtype
    edges = np.empty((edge_count(n, m), 2), dtype=dtype)
    edges[:m, 0] = 0
    edges[:m, 1] = np.arange(1, m + 1, dtype=dtype)
    edges[m:, 0] = np.repeat(np.arange(m + 1, n, dtype=dtype), m)
    edges[m:, 1] = targets.ravel()
    return edges


def _format_lines(a: np.ndarray, b: np.ndarray, width: int) -> np.ndarray:
    """The bytes of lines "a b\\n" (positive ints, at most ``width`` digits)."""
    k = a.size
    buf = np.empty((k, 2 * width + 2), dtype=np.uint8)
    keep = np.ones(buf.shape, dtype=bool)
    for x, col in ((a, 0), (b, width + 1)):
        x = x.astype(np.int64)
        ndig = np.ones(k, dtype=np.int64)
        for j in range(1, width):
            ndig += x >= 10**j
        for j in range(width - 1, -1, -1):
            x, d = np.divmod(x, 10)
            buf[:, col + j] = d + 48
        # Drop the leading zeros: digit column j is kept iff j >= width - ndig.
        keep[:, col : col + width] = np.arange(width) >= (width - ndig)[:, None]
    buf[:, width] = ord(" ")
    buf[:, -1] = ord("\n")
    return buf[keep]


def write_edges(
    edges: np.ndarray, out: BinaryIO, offset: int = 1, progress: Progress | None = None
) -> None:
    """Write (E, 2) edges to a binary file, one ``"A B\\n"`` line per edge.

    ``offset`` is added to every node index (1: node k is user id k+1).
    ``progress``, if given, is called with the number of lines written per chunk.
    """
    if edges.size == 0:
        return
    top = int(edges.max()) + offset
    if int(edges.min()) + offset < 1:
        raise ValueError("write_edges writes positive ids only")
    width = len(str(top))
    for lo in range(0, edges.shape[0], _WRITE_CHUNK_LINES):
        chunk = edges[lo : lo + _WRITE_CHUNK_LINES]
        out.write(_format_lines(chunk[:, 0] + offset, chunk[:, 1] + offset, width).data)
        if progress is not None:
            progress(chunk.shape[0])


class _NoBar:
    """Stand-in for a click progress bar when stderr is not a terminal."""

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, k: int) -> None:
        pass


def _bar(label: str, length: int):
    if sys.stderr.isatty():
        return click.progressbar(length=length, label=label, file=sys.stderr)
    return _NoBar()


_HELP = """Generate a fake friends graph: a Barabási–Albert random graph.

\b
The model is exactly networkx.barabasi_albert_graph(N, M):
  - users 1 .. M+1 start as a star: user 1 is friends with users 2 .. M+1;
  - each further user joins with M friends among the existing users, all
    distinct, each picked with probability proportional to how many friends
    that user already has (preferential attachment).

The result has N users and M + (N-M-1)*M friendships, with the heavy-tailed
("scale-free") degree distribution of real social graphs: most users have about
M friends, a few have thousands.

FILE gets one friendship per line, two user ids separated by one space
("12 345"), no self-friendships and no pair twice. The same --n, --m and --seed
always give a byte-identical file; without --seed a random seed is chosen and
printed on stderr so the run can be repeated. The graph is sampled with numpy,
without building it in memory: N=1,000,000 M=15 takes seconds.
"""


@click.command(help=_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--n", "n", type=click.IntRange(min=1), required=True, metavar="N",
    help="Number of users (nodes), N > M.",
)
@click.option(
    "--m", "m", type=click.IntRange(min=1), required=True, metavar="M",
    help="Friends each new user makes on joining (edges per new node), M >= 1.",
)
@click.option(
    "--seed", type=click.IntRange(min=0), default=None, metavar="S",
    help="Random seed (integer >= 0). Default: random, printed on stderr.",
)
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False, allow_dash=True), default=DEFAULT_OUTPUT,
    show_default=True, metavar="FILE",
    help="Output file ('-' for stdout); its directory is created if needed.",
)
def main(n: int, m: int, seed: int | None, output: str) -> None:
    """``bin/genfriends``: write a Barabási–Albert friends file."""
    if not n > m:
        raise click.UsageError(f"--n must be greater than --m (got --n {n}, --m {m})")
    if seed is None:
        seed = secrets.randbits(63)
        click.echo(f"genfriends: seed {seed}", err=True)
    with _bar("sampling", n - m - 1) as bar:
        edges = generate_edges(n, m, seed, progress=bar.update)
    with _bar("writing ", edges.shape[0]) as bar:
        if output == "-":
            write_edges(edges, sys.stdout.buffer, progress=bar.update)
            sys.stdout.buffer.flush()
            return
        folder = os.path.dirname(os.path.abspath(output))
        try:
            os.makedirs(folder, exist_ok=True)
            # Write next to the target and rename, so FILE is never half-written.
            fd, tmp = tempfile.mkstemp(prefix=".genfriends-", dir=folder)
        except OSError as e:
            raise click.FileError(output, hint=str(e)) from None
        try:
            with os.fdopen(fd, "wb") as f:
                write_edges(edges, f, progress=bar.update)
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, output)
        except BaseException:
            os.unlink(tmp)
            raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


if __name__ == "__main__":
    main()
