"""cometd: a comet (HTTP push) server.

Clients hold long-lived HTTP streams; every message a user publishes is pushed to
that user's own connections and to everyone subscribed to that user. Reading the
module names in order follows a request from the socket to a message on every
recipient's stream:

- :mod:`cometd.server` — the HTTP server: plain stream requests answered in the
  accept callback, everything else through pywsgi, streams handed to the table.
- :mod:`cometd.httprequest` — the HTTP/1.1 request grammar, bytes in, a request or
  an error out (no request smuggling).
- :mod:`cometd.auth` — JWT stream tokens and publisher API keys.
- :mod:`cometd.limits` — admission limits: whether a new stream may open.
- :mod:`cometd.cors` — which other origins' pages may read answers and streams.
- :mod:`cometd.publish` — ``POST /send`` and batch ``POST /publish``: their checks
  and answers, and the fast path that serves them without pywsgi and bottle.
- :mod:`cometd.webapp` — the bottle app: ``POST /send``, streams, subscriptions API.
- :mod:`cometd.router` — routes a message: gives it an id, looks up its recipients.
- :mod:`cometd.ids` — the user id grammar and its compact encoding.
- :mod:`cometd.store` — the persistent subscription store (LevelDB).
- :mod:`cometd.online` — who is online, intersected with a subject's subscribers.
- :mod:`cometd.history` — message ids and the persistent history streams resume from.
- :mod:`cometd.streamhttp` — the bytes of a stream: its request, head and framing.
- :mod:`cometd.websocket` — ``GET /ws/<id>``: the upgrade, its frames, what a client sends.
- :mod:`cometd.connections` — the table of live streams and how bytes reach a socket.
- :mod:`cometd.longpoll` — ``GET /poll/<id>``: a poll waits in the table, answered once.
- :mod:`cometd.expiry` — closes streams when their token stops being accepted.

Around that path:

- :mod:`cometd.config` — every server option, its default and its sources.
- :mod:`cometd.lifecycle` — builds a process in its role, runs it, shuts it down.
- :mod:`cometd.backplane` — scale-out: a router process and edge processes over Redis.
- :mod:`cometd.workers` — ``cometd --workers N``: one router and N edges, supervised.
- :mod:`cometd.admin` — the telnet-style admin console.
- :mod:`cometd.page` — the demo page at ``GET /`` (HTML, CSS and JavaScript as package data).
- :mod:`cometd.counts`, :mod:`cometd.metrics`, :mod:`cometd.log` — counters,
  ``GET /metrics`` and operator logs.
- :mod:`cometd.syscheck` — ``cometd check-system``.
- :mod:`cometd.loader`, :mod:`cometd.graphgen` — bulk loading and generating a friends graph.
- :mod:`cometd.cli` — the ``cometd`` command line.

Load tools, in the :mod:`cometd.loadtest` subpackage (its graphs need the
``loadtest`` extra): ``floodtest`` (many streams from one machine), ``msggen``
(messages at a fixed rate) and the ``cometd-bench`` harness.
"""

__version__ = "0.1.0"
