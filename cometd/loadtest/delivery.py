"""The end-to-end delivery check: did every message reach each recipient, once?

msggen ``--record`` writes ``<subject> <message id>`` for every message the
server took; floodtest ``--events --record`` writes ``<user> <message id>``
for every event a stream received (across its reconnects, with
``--reconnect``; a third column, the time it was read, is not needed here).
:func:`check` holds the two against the friends graph: a
user should get every message from itself and from everyone it subscribes
to, exactly once. It reports, per run, the messages that should have reached
a recipient and did not (*missing*), those that reached one more than once
(*duplicates*), and those that reached someone who should not have had them
(*unexpected*).

A user's recipients come from the same friends file the server was loaded
with (``A B``: A and B subscribe to each other; with *directed*, only A to
B), restricted to the users floodtest held, so memory follows those users,
not the whole graph. ``cometd-bench check`` (:data:`check_command`) runs it
on the files.
"""

from __future__ import annotations

import sys
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import click

__all__ = ["DeliveryReport", "check", "check_command", "read_pairs", "subscriptions"]


@dataclass
class DeliveryReport:
    """What :func:`check` found; the counts are (user, message) pairs."""

    users: int = 0
    published: int = 0
    expected: int = 0
    received: int = 0
    missing: int = 0
    duplicates: int = 0
    unexpected: int = 0
    #: a few (user, message id) examples of each problem, for a report
    examples: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.duplicates or self.unexpected)

    def summary(self) -> str:
        return (f"{self.users} users, {self.published} messages published, "
                f"{self.expected} deliveries expected, {self.received} received: "
                f"{self.missing} missing, {self.duplicates} duplicates, "
                f"{self.unexpected} unexpected")


def read_pairs(path: str) -> list[tuple[str, str]]:
    """The ``<a> <b>`` lines of a file (blank lines skipped, further columns ignored)."""
    pairs = []
    with open(path) as f:
        for line in f:
            words = line.split()
            if words:
                pairs.append((words[0], words[1]))
    return pairs


def subscriptions(friends: Iterable[tuple[str, str]], users: set[str],
                  directed: bool = False) -> dict[str, set[str]]:
    """Whom each of *users* gets messages from: itself and its subscriptions."""
    subs: dict[str, set[str]] = {u: {u} for u in users}
    for a, b in friends:
        if a in subs:
            subs[a].add(b)
        if not directed and b in subs:
            subs[b].add(a)
    return subs


def check(subs: dict[str, set[str]], published: Iterable[tuple[str, str]],
          received: Iterable[tuple[str, str]], examples: int = 5) -> DeliveryReport:
    """Hold what was received by the users of *subs* against what was *published*.

    *published* holds (subject, message id), *received* (user, message id).
    """
    report = DeliveryReport(users=len(subs))
    by_subject: dict[str, list[str]] = defaultdict(list)
    subject_of: dict[str, str] = {}
    for subject, message_id in published:
        by_subject[subject].append(message_id)
        subject_of[message_id] = subject
        report.published += 1
    got: dict[str, Counter] = defaultdict(Counter)
    for user, message_id in received:
        got[user][message_id] += 1
        report.received += 1
    found: dict[str, list[tuple[str, str]]] = {"missing": [], "duplicates": [], "unexpected": []}
    for user, sources in subs.items():
        counts = got.get(user, Counter())
        for subject in sources:
            for message_id in by_subject.get(subject, ()):
                report.expected += 1
                n = counts.get(message_id, 0)
                if n == 0:
                    report.missing += 1
                    found["missing"].append((user, message_id))
                elif n > 1:
                    report.duplicates += n - 1
                    found["duplicates"].append((user, message_id))
        for message_id, n in counts.items():
            if subject_of.get(message_id) not in sources:
                report.unexpected += n
                found["unexpected"].append((user, message_id))
    report.examples = {k: v[:examples] for k, v in found.items() if v}
    return report


@click.command("check")
@click.argument("friends", type=click.Path(exists=True, dir_okay=False))
@click.argument("published", type=click.Path(exists=True, dir_okay=False))
@click.argument("received", type=click.Path(exists=True, dir_okay=False))
@click.option("--users", required=True, metavar="FIRST-LAST",
              help="The user ids floodtest held (its --first-id and --n), e.g. 1-15000.")
@click.option("--directed", is_flag=True, help="FRIENDS was loaded with --directed.")
def check_command(friends: str, published: str, received: str, users: str,
                  directed: bool) -> None:
    """Check a run end to end: nothing lost, nothing twice (exit 1 if anything was).

    FRIENDS is the friends file the server was loaded with, PUBLISHED what
    msggen --record wrote, RECEIVED what floodtest --events --record wrote.
    """
    first, _, last = users.partition("-")
    if not (first.isdigit() and last.isdigit() and int(first) <= int(last)):
        raise click.BadParameter(f"expected FIRST-LAST, e.g. 1-15000: {users!r}",
                                 param_hint="--users")
    held = {str(u) for u in range(int(first), int(last) + 1)}
    report = check(subscriptions(read_pairs(friends), held, directed), read_pairs(published),
                   read_pairs(received))
    click.echo(report.summary())
    for kind, cases in report.examples.items():
        click.echo(f"  {kind}, e.g.: " + ", ".join(f"{u} {m}" for u, m in cases))
    if not report.ok:
        sys.exit(1)
