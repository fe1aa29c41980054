"""The ``cometd`` command line: the server and its database tools.

``cometd`` with no subcommand runs the whole server in one process;
``cometd load FILE`` bulk-loads a friends file into the subscription store.
"""

from __future__ import annotations

import sys

import click

from cometd.loader import LoadError, load_friends
from cometd.store import StoreError, SubscriptionStore

__all__ = ["main", "cli"]

DEFAULT_DB = "data/subscriptions"


class _StageProgress:
    """A progress bar on stderr per load stage, shown only on a terminal."""

    def __init__(self) -> None:
        self._stage: str | None = None
        self._bar = None
        self._done = 0
        self._tty = sys.stderr.isatty()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self._tty:
            return
        if stage != self._stage:
            self.close()
            self._stage, self._done = stage, 0
            self._bar = click.progressbar(length=max(total, 1), label=stage, file=sys.stderr)
            self._bar.__enter__()
        self._bar.update(done - self._done)
        self._done = done

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None


def open_store(db: str) -> SubscriptionStore:
    """Open the store or exit with a one-line error."""
    try:
        return SubscriptionStore(db)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.pass_context
def cli(ctx: click.Context) -> None:
    """cometd: a comet (HTTP push) server.

    Clients hold GET /test/<id> (chunked) or GET /events/<id> (Server-Sent
    Events) open; POST /send/<subject> pushes a message to the subject's own
    connections and to everyone subscribed to the subject.
    """


@cli.command("load")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--db", default=DEFAULT_DB, show_default=True, help="subscription database directory")
@click.option(
    "--directed",
    is_flag=True,
    help='store only "A subscribes to B" for each line "A B" (default: both directions)',
)
def load_command(file: str, db: str, directed: bool) -> None:
    """Bulk-load FILE, one friendship "A B" per line, into the database.

    Each line holds two ids separated by white space; blank lines are allowed.
    The whole file is checked first: a malformed line stops the load with its
    line number and nothing is stored. Loading the same file twice stores
    nothing new.
    """
    store = open_store(db)
    progress = _StageProgress()
    try:
        result = load_friends(store, file, directed=directed, progress=progress)
    except LoadError as exc:
        progress.close()
        raise click.ClickException(str(exc)) from None
    finally:
        progress.close()
        store.close()
    click.echo(f"{file} -> {db}: {result.summary()}")


def main() -> None:
    cli(prog_name="cometd")
