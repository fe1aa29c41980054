"""``python -m cometd``: the ``cometd`` command (how ``--workers`` starts its children)."""

from cometd.cli import main

__all__: list[str] = []

main()
