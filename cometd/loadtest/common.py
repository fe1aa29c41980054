"""What the load tools share: a latency histogram, the loopback-only check, the summary.

``floodtest`` times deliveries and ``msggen`` times POSTs into the same
:class:`LatencyHistogram`, both refuse any address outside 127.0.0.0/8
(:func:`check_loopback`), both read the secrets of a secured server from a
file or cometd's own environment variable (:func:`read_secret`), and both end
with :func:`finish`.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import socket
import sys
from collections.abc import Mapping

from cometd.config import setting_lines

__all__ = ["LatencyHistogram", "check_loopback", "read_secret", "finish"]

_LOOPBACK = ipaddress.ip_network("127.0.0.0/8")


class LatencyHistogram:
    """A fixed-size histogram of durations with log-spaced buckets (2% wide).

    Bucket 0 holds everything below 1 microsecond; bucket ``i >= 1`` holds
    ``[e**((i-1)/K), e**(i/K))`` microseconds with ``K = 1/ln(1.02)``, up to
    about 1000 s (longer values land in the last bucket). Percentiles are
    therefore accurate to ~2%; the maximum is tracked exactly. Memory is
    constant (~1100 ints) however many values are recorded.
    """

    _K = 1.0 / math.log(1.02)
    NBUCKETS = int(math.log(1e9) * _K) + 2

    __slots__ = ("counts", "count", "max")

    def __init__(self) -> None:
        self.counts = [0] * self.NBUCKETS
        self.count = 0
        self.max = 0.0

    @classmethod
    def bucket(cls, seconds: float) -> int:
        """Return the bucket index for a duration in seconds."""
        us = seconds * 1e6
        if us < 1.0:
            return 0
        return min(cls.NBUCKETS - 1, 1 + int(math.log(us) * cls._K))

    def record(self, seconds: float) -> None:
        """Add one duration (negative values, from clock rounding, count as 0)."""
        if seconds < 0.0:
            seconds = 0.0
        self.counts[self.bucket(seconds)] += 1
        self.count += 1
        if seconds > self.max:
            self.max = seconds

    def merge_sparse(self, sparse: dict, max_seconds: float) -> None:
        """Add a ``{bucket: count}`` mapping (keys may be str, as after JSON)."""
        for idx, n in sparse.items():
            self.counts[int(idx)] += n
            self.count += n
        if max_seconds > self.max:
            self.max = max_seconds

    def drain(self) -> tuple[dict[int, int], float]:
        """Return ``({bucket: count}, max)`` for the non-empty buckets and reset."""
        sparse = {i: n for i, n in enumerate(self.counts) if n}
        mx = self.max
        self.reset()
        return sparse, mx

    def reset(self) -> None:
        """Forget everything recorded so far."""
        self.counts = [0] * self.NBUCKETS
        self.count = 0
        self.max = 0.0

    def percentile(self, q: float) -> float:
        """Return the *q*-quantile (0 < q <= 1) in seconds; 0.0 if empty."""
        if not self.count:
            return 0.0
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for idx, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                if idx == 0:
                    return 0.0
                mid_us = math.exp((idx - 0.5) / self._K)
                return min(mid_us / 1e6, self.max)
        return self.max

    def summary_ms(self) -> dict[str, float | int]:
        """Return ``{"count", "p50", "p99", "max"}`` with times in milliseconds."""
        return {
            "count": self.count,
            "p50": round(self.percentile(0.50) * 1e3, 3),
            "p99": round(self.percentile(0.99) * 1e3, 3),
            "max": round(self.max * 1e3, 3),
        }


def check_loopback(host: str, what: str = "address") -> str:
    """Resolve *host* to an IPv4 address and return it if it is in 127.0.0.0/8.

    Raises :class:`ValueError` with a readable message otherwise: the load tools
    must never be pointed at (or send from) another machine.
    """
    try:
        ip = ipaddress.IPv4Address(host)
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise ValueError(f"{what} {host!r}: cannot resolve ({e.strerror})") from None
        ips = {ipaddress.IPv4Address(info[4][0]) for info in infos}
        if not ips or any(a not in _LOOPBACK for a in ips):
            shown = ", ".join(sorted(map(str, ips)))
            raise ValueError(
                f"{what} {host!r} resolves to {shown}: only loopback (127.0.0.0/8) is allowed"
            ) from None
        ip = min(ips)
    if ip not in _LOOPBACK:
        raise ValueError(f"{what} {host}: only loopback addresses (127.0.0.0/8) are allowed")
    return str(ip)


def read_secret(path: str | None, variable: str, flag: str, list_separator: str = "",
                environ: Mapping[str, str] = os.environ) -> str | None:
    """The secret in the file *path* (given as *flag*), else in *variable*; None if neither.

    The file holds it on its first line that is neither blank nor a ``#``
    comment, stripped, so that cometd's own ``--api-keys-file`` serves as it
    is. The variable is read as cometd reads it: as it is, or with a
    *list_separator* (``COMETD_API_KEY=key1,key2``) its first item, stripped.
    A secret is never a command line argument (other users see those in ps),
    and no message here shows it.
    """
    if path is not None:
        for _, line in setting_lines(path, flag, ValueError):
            return line
        raise ValueError(f"{flag}: {path} holds no secret")
    value = environ.get(variable, "")
    if list_separator:
        value = value.split(list_separator)[0].strip()
    return value or None


def finish(summary: dict, json_path: str | None) -> None:
    """Write the summary as JSON (to a file, or stdout for '-'); exit 3 if timed out."""
    if json_path:
        text = json.dumps(summary, indent=2) + "\n"
        if json_path == "-":
            sys.stdout.write(text)
        else:
            with open(json_path, "w") as f:
                f.write(text)
    if summary["timed_out"]:
        sys.exit(3)
