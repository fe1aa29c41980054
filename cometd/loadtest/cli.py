"""cometd-bench: run a benchmark scenario end to end and write a report.

``cometd-bench idle`` (:mod:`cometd.loadtest.idle`) ramps one fresh server per
connection mode (and nginx + nchan as a peer, when installed) to N idle streams
and measures what each connection costs: server RSS, kernel slab and
socket-buffer memory, ramp rate.

``cometd-bench fanout`` (:mod:`cometd.loadtest.versus`) runs cometd in both
modes side by side with nginx + nchan on three fan-out scenarios (nobody
online, one subject to many subscribers, a friends feed), the server pinned to
one core and the clients to the other, and reports CPU per publish and
deliveries per server CPU-second with cometd's ratios to nchan.

``cometd-bench fanout-latency`` (:mod:`cometd.loadtest.fanout`) loads a Barabási–Albert
friends graph, connects C users, finds the message rate at which the server
saturates with a short step-up, then publishes at half of it for D seconds and
measures deliveries per server CPU-second and delivery latency.

Both start every process themselves (:mod:`cometd.loadtest.procs`: servers,
``floodtest``, ``msggen``), sample the server and the kernel every
``--interval`` seconds with a thread of this process
(:mod:`cometd.loadtest.sampling`), and write ``report.md``, PNG graphs,
``summary.json`` and ``samples.csv`` (raw samples) plus the tools' logs into
``--out`` (:mod:`cometd.loadtest.report`).

``cometd-bench check`` (:mod:`cometd.loadtest.delivery`) holds what msggen
published against what floodtest received: missing deliveries, duplicates.
"""

from __future__ import annotations

import signal

import click

from cometd.loadtest.delivery import check_command
from cometd.loadtest.fanout import fanout_command
from cometd.loadtest.idle import idle_command
from cometd.loadtest.procs import stop_all
from cometd.loadtest.versus import versus_command

__all__ = ["cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Run a cometd benchmark scenario end to end and write a Markdown report with graphs.

    Every scenario starts its own servers and load tools on loopback, samples
    server RSS/CPU and kernel socket memory over time, and writes report.md,
    PNG graphs, summary.json, samples.csv and logs/ into --out. Heavy runs on a
    shared machine should be serialised: flock /tmp/cometd-bench.lock cometd-bench ...
    """


cli.add_command(idle_command)
cli.add_command(versus_command)
cli.add_command(fanout_command)
cli.add_command(check_command)


def main() -> None:
    def _term(_sig, _frame):
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, _term)
    try:
        cli(prog_name="cometd-bench")
    finally:
        stop_all()


if __name__ == "__main__":
    main()
