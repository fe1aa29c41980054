"""cometd: a comet (HTTP push) server.

Clients hold long-lived HTTP streams; every message a user publishes is pushed to
that user's own connections and to everyone subscribed to that user. Reading the
module names in order follows a message from ``POST /send`` to a socket:

- :mod:`cometd.ids` — the user id grammar and its compact encoding.
- :mod:`cometd.store` — the persistent subscription store (LevelDB).
- :mod:`cometd.loader` — bulk loading a friends file into the store.
- :mod:`cometd.graphgen` — the Barabási–Albert friends graph generator.
- :mod:`cometd.webapp` — the bottle app: ``POST /send``, streams, subscriptions API.
- :mod:`cometd.router` — looks up subscribers and fans a message out.
- :mod:`cometd.connections` — the table of live streams and how bytes reach a socket.
- :mod:`cometd.admin` — the telnet-style admin console.
- :mod:`cometd.server` — the HTTP server: pywsgi, handing streams to the table.
- :mod:`cometd.cors` — which other origins' pages may read answers and streams (CORS).
- :mod:`cometd.config` — every server option, its default and its sources.
- :mod:`cometd.lifecycle` — builds a process in its role, runs it, shuts it down.
- :mod:`cometd.backplane` — scale-out: a router process and edge processes over Redis.
- :mod:`cometd.workers` — ``cometd --workers N``: one router and N edges, supervised.
- :mod:`cometd.cli` — the ``cometd`` command line.

Load tools, in the :mod:`cometd.loadtest` subpackage (its graphs need the
``loadtest`` extra): ``floodtest`` (many streams from one machine), ``msggen``
(messages at a fixed rate) and the ``cometd-bench`` harness.
"""

__version__ = "0.1.0"
