"""Load tools for cometd: ``floodtest``, ``msggen`` and the ``cometd-bench`` harness.

The server imports nothing from here; the harness's graphs need matplotlib,
which ``pip install 'cometd[loadtest]'`` brings. Modules, from the wire up:

- :mod:`cometd.loadtest.chunked` — a sans-I/O decoder of chunked bodies (also the tests').
- :mod:`cometd.loadtest.common` — the latency histogram, the loopback-only check, summaries.
- :mod:`cometd.loadtest.floodtest` — holds many streams and times deliveries (``floodtest``).
- :mod:`cometd.loadtest.msggen` — publishes timestamped messages at a rate (``msggen``).
- :mod:`cometd.loadtest.procs` — the harness's child processes, started as ``python -m``.
- :mod:`cometd.loadtest.servers` — the servers under test: cometd, nginx + nchan.
- :mod:`cometd.loadtest.sampling` — RSS, CPU and kernel counters over time.
- :mod:`cometd.loadtest.report` — machine info, Markdown, graphs, CSV.
- :mod:`cometd.loadtest.streamreader` — holds streams of any server and counts messages.
- :mod:`cometd.loadtest.idle`, :mod:`cometd.loadtest.versus`, :mod:`cometd.loadtest.fanout`
  — the scenarios (idle cost; fan-out beside nchan; fan-out latency).
- :mod:`cometd.loadtest.cli` — the ``cometd-bench`` command.
"""

__all__: list[str] = []
