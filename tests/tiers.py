"""The two test tiers: system tests start processes, the fast tier starts none.

``bin/dev test -m "not system"`` runs the fast tier (pure logic, in-process
gevent servers, real LevelDB in temp dirs, loopback sockets) in seconds;
``bin/dev test`` runs everything. tests/conftest.py imports the hooks below;
setup.cfg registers the marker.

Theory of operation
-------------------
No test module declares its tier. At collection, a test is marked ``system``
when its function, a fixture it uses, or any function or class of the test
suite those reach by name refers to a way of starting a process
(:mod:`subprocess`, :mod:`multiprocessing`, ``os.fork``/``os.posix_spawn``/
``os.system``/``os.exec*``, :mod:`pty`). conftest's ``start_server``,
``start_cometd`` and ``RedisServer`` use :mod:`subprocess`, so every test
reaching them is a system test without a list of fixture or helper names to
keep up to date, and a module keeps its tier when it moves. The walk follows
global names only, so a reference it cannot resolve (a method reached through
an attribute, a process started inside the cometd package) escapes it: for
that, while a test of the fast tier is set up and runs, starting a process
fails the test with a message saying to mark it ``@pytest.mark.system``. The
fast tier therefore starts no process, whatever the walk missed. (Teardown is
not guarded: in a full run, the last test of a module finalizes the module's
fixtures, such as a server some earlier system test used. A fast test's own
fixture that starts a process on teardown is seen by the walk, which reads
the whole fixture function.)
"""

from __future__ import annotations

import _posixsubprocess
import multiprocessing
import os
import pty
import subprocess
import types
from collections.abc import Iterator

import pytest

__all__ = [
    "pytest_collection_modifyitems", "pytest_runtest_setup", "pytest_runtest_call",
    "starts_processes",
]

TESTS = os.path.dirname(os.path.abspath(__file__))
_SPAWNING_MODULES = (subprocess, multiprocessing, pty)
_OS_SPAWNS = frozenset(
    name for name in dir(os)
    if name in ("fork", "forkpty", "system", "popen")
    or name.startswith(("exec", "spawn", "posix_spawn"))
)


def _codes(code: types.CodeType) -> Iterator[types.CodeType]:
    """*code* and the code of every function, lambda and comprehension inside it."""
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


def _in_tests(obj: object) -> bool:
    code = getattr(obj, "__code__", None)
    return code is not None and os.path.abspath(code.co_filename).startswith(TESTS + os.sep)


def _functions(obj: object) -> Iterator[types.FunctionType]:
    """The test suite's functions that *obj* (a function or class) stands for."""
    if isinstance(obj, types.FunctionType):
        if _in_tests(obj):
            yield obj
    elif isinstance(obj, type):
        for cls in obj.__mro__:
            for attr in vars(cls).values():
                func = getattr(attr, "__func__", getattr(attr, "fget", attr))
                if isinstance(func, types.FunctionType) and _in_tests(func):
                    yield func


def _spawns(value: object, names: tuple[str, ...]) -> bool:
    if value is os:
        return any(name in _OS_SPAWNS for name in names)
    if isinstance(value, types.ModuleType):
        return value in _SPAWNING_MODULES
    module = getattr(value, "__module__", None) or ""
    return module.split(".")[0] in ("subprocess", "multiprocessing", "pty") or (
        module in ("os", "posix") and getattr(value, "__name__", "") in _OS_SPAWNS)


def starts_processes(roots: list[object]) -> bool:
    """Whether any of *roots* (functions) or what they reach in tests/ names a process start."""
    stack = [f for root in roots for f in _functions(root)]
    seen: set[types.CodeType] = set()
    while stack:
        func = stack.pop()
        if func.__code__ in seen:
            continue
        seen.add(func.__code__)
        env = func.__globals__
        for code in _codes(func.__code__):
            for name in code.co_names:
                if name not in env:
                    continue
                value = env[name]
                if _spawns(value, code.co_names):
                    return True
                stack.extend(_functions(value))
    return False


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if not isinstance(item, pytest.Function) or item.get_closest_marker("system"):
            continue
        # _fixtureinfo: pytest's own record of the fixtures an item uses, transitively
        fixtures = [d.func for defs in item._fixtureinfo.name2fixturedefs.values() for d in defs]
        if starts_processes([item.function, *fixtures]):
            item.add_marker(pytest.mark.system)


# -- the guard: no process from the fast tier --------------------------------------


class _Guard:
    """While installed, starting a process raises; see the module docstring."""

    def __init__(self, item: pytest.Item) -> None:
        self.item = item
        self.saved: list[tuple[object, str, object]] = []

    def _refuse(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError(
            f"{self.item.nodeid} started a process but is not a system test: "
            "mark it @pytest.mark.system (tests/tiers.py says why)")

    def __enter__(self) -> None:
        # Popen's own entry point, and the fork+exec that multiprocessing's spawn uses
        targets = [(subprocess.Popen, "_execute_child"), (_posixsubprocess, "fork_exec"),
                   (os, "fork"), (os, "forkpty")]
        targets += [(os, name) for name in sorted(_OS_SPAWNS) if name.startswith("posix_spawn")]
        targets += [(os, "system"), (os, "execv"), (os, "execve")]
        for owner, name in targets:
            if hasattr(owner, name):
                self.saved.append((owner, name, getattr(owner, name)))
                setattr(owner, name, self._refuse)

    def __exit__(self, *exc: object) -> None:
        for owner, name, original in reversed(self.saved):
            setattr(owner, name, original)


def _guarded(item: pytest.Item):
    if item.get_closest_marker("system"):
        return (yield)
    with _Guard(item):
        return (yield)


pytest_runtest_setup = pytest.hookimpl(wrapper=True)(_guarded)
pytest_runtest_call = pytest.hookimpl(wrapper=True)(_guarded)
