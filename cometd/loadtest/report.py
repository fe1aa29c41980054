"""Reports: the machine and commit, Markdown tables, PNG graphs, CSV samples."""

from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import platform
import resource
import shlex
import subprocess
import sys
from pathlib import Path

import click
import psutil

from cometd.loadtest.procs import ROOT

#: The harness's own files: changes to them do not change what the server does.
HARNESS = [f":!cometd/loadtest/{m}.py" for m in (
    "cli", "procs", "sampling", "servers", "report", "idle", "fanout")] + [":!bin/cometd-bench"]

__all__ = [
    "KIB", "COLORS", "command_line", "machine_info", "pyplot", "save_figure", "write_report",
    "fmt", "write_samples_csv", "finish_info", "machine_lines", "resolve_out",
    "without_samples", "out_option",
]


KIB = 1024.0


COLORS = {"greenlet": "tab:blue", "pool": "tab:orange", "nchan": "tab:green"}


def command_line() -> str:
    argv = list(sys.argv)
    try:
        argv[0] = os.path.relpath(argv[0], os.getcwd())
    except ValueError:
        pass
    if os.path.basename(argv[0]) in ("cometd-bench", "bench.py") and not argv[0].startswith(
            ("bin/", "./", "/", "..")):
        argv[0] = os.path.basename(argv[0])
    return shlex.join(argv)


def machine_info(nginx: str | None = None) -> dict[str, str]:
    """The machine, the software versions and the commit; *nginx*: the binary, when it runs."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
        if not commit:  # an installed package, run outside a checkout
            raise OSError("not a git checkout")
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--",
                                "cometd", "bin", *HARNESS],
                               capture_output=True, text=True, timeout=10).stdout
        files = [line[3:] for line in dirty.splitlines() if line.strip()]
        if files:
            commit += f" + uncommitted changes to {', '.join(files)}"
    except (OSError, subprocess.SubprocessError):
        commit = "?"
    try:
        import gevent

        gv = gevent.__version__
    except ImportError:
        gv = "?"
    info = {
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "memory": f"{psutil.virtual_memory().total / 2**30:.0f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "gevent": gv,
        "nofile": str(resource.getrlimit(resource.RLIMIT_NOFILE)[1]),
        "commit": commit,
        "load": "{:.1f} {:.1f} {:.1f}".format(*os.getloadavg()),
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if nginx:  # only a run that measured nginx + nchan names its version
        r = subprocess.run([nginx, "-v"], capture_output=True, text=True, timeout=10)
        info["nginx"] = (r.stderr or r.stdout).strip().replace("nginx version: ", "") or "?"
    return info


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    import matplotlib.pyplot as plt

    plt.close(fig)


def write_report(out: Path, lines: list[str], graphs: list[str], notes: list[str]) -> str:
    """Finish a report: graphs, notes and what else the run wrote; save report.md."""
    lines += ["## Graphs", ""]
    for g in graphs:
        lines += [f"![{g}]({g})", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["The run also wrote `samples.csv` (every sample), `summary.json` (every figure) "
              "and `logs/` (each tool's output) next to this report.", ""]
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    return text


def fmt(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def write_samples_csv(path: Path, runs: dict[str, list[dict]]) -> None:
    keys = ["t", "phase", "rss", "cpu", "slab", "sunreclaim", "tcp_inuse", "tcp_tw", "tcp_mem",
            "conns", "deliveries", "messages", "slow"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["server", *keys, "client_cpu"])
        for name, samples in runs.items():
            for s in samples:
                w.writerow([name, *(s.get(k) for k in keys), json.dumps(s.get("client_cpu", {}))])


def finish_info(info: dict[str, str], notes: list[str]) -> None:
    """Record the end-of-run load; note when other work competed for the CPUs."""
    load = os.getloadavg()
    info["load_end"] = "{:.1f} {:.1f} {:.1f}".format(*load)
    cores = os.cpu_count() or 1
    worst = max(float(info["load"].split()[0]), load[0])
    if worst > 2 * cores + 1:  # the bench and its own tools account for ~2-3
        notes.append(f"The machine was busy with other work (1-minute load average up to "
                     f"{worst:.1f} on {cores} cores): rates, ramp "
                     "speed and latency are pessimistic; per-connection memory and CPU-seconds "
                     "per delivery are much less affected.")


def machine_lines(info: dict[str, str]) -> list[str]:
    return [
        f"- Date: {info['date']}; commit {info['commit']}",
        f"- Machine: {info['cpu']}, {info['memory']} RAM, Linux {info['kernel']}, "
        f"open files limit {info['nofile']} per process",
        f"- Python {info['python']}, gevent {info['gevent']}"
        + (f", nginx {info['nginx']}" if "nginx" in info else ""),
        f"- Load average (1/5/15 min) at the start: {info['load']}; at the end: "
        f"{info.get('load_end', '?')}",
    ]


def resolve_out(out: str | None, scenario: str) -> Path:
    if out is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = os.path.join("results", f"{scenario}-{stamp}")
    path = Path(out)
    (path / "logs").mkdir(parents=True, exist_ok=True)
    return path


def without_samples(results: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "samples"} for r in results]


out_option = click.option(
    "--out", default=None, metavar="DIR",
    help="Results folder (created). Default: results/<scenario>-<timestamp>.")
