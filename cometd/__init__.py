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
- :mod:`cometd.server` — assembles the pieces into one running server.
"""

__version__ = "0.1.0"
