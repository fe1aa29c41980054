"""Load tools for cometd: ``floodtest``, ``msggen`` and the ``cometd-bench`` harness.

Installed with the ``loadtest`` extra (``pip install 'cometd[loadtest]'``); the
server itself imports nothing from here.
"""
