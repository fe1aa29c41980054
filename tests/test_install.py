"""The package as a user installs it: `pip install .` into a fresh virtualenv.

The plain install carries only what the server needs (no matplotlib); with the
``loadtest`` extra, every command runs from the installed package, outside the
checkout. pip resolves the dependencies from its index or cache (bin/dev's pip
configuration), so this needs no more than the first `bin/dev test` did.

What `pip install .` does, in two steps so that both installs share one: build
the wheel (in an isolated build environment, as for a user), then install it.
It is built from a copy of the checkout as a fresh clone has it: setuptools
builds in the source tree, and a ``build/`` left there by an earlier run would
bring in files the package data no longer names.
The virtualenv has no pip of its own (``--without-pip`` saves ensurepip's ~4 s):
this one drives it with ``--python``, and ``--no-compile`` leaves the bytecode
to the imports that need it (compiling every installed module took ~8 s).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from conftest import ROOT

COMMANDS = ["cometd", "genfriends", "floodtest", "msggen", "cometd-bench"]


def _run(argv: list[str], cwd: str, timeout: float = 300) -> subprocess.CompletedProcess:
    # No PYTHONPATH: what runs must come from the virtualenv, not from this checkout.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_plain_install_leaves_out_the_load_tools_extras_and_loadtest_brings_them(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    py, bindir = str(venv / "bin" / "python"), venv / "bin"
    pip = [sys.executable, "-m", "pip", "--python", py]

    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".*_cache"))
    done = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                 str(tmp_path / "dist"), str(source)], cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp_path / "dist").glob("cometd-*.whl")
    done = _run([*pip, "install", "-q", "--no-compile", str(wheel)], cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert _run([*pip, "show", "matplotlib"], cwd=str(tmp_path)).returncode != 0
    assert _run([py, "-c", "import networkx"], cwd=str(tmp_path)).returncode != 0
    server = _run([py, "-m", "cometd", "--help"], cwd=str(tmp_path))
    assert server.returncode == 0 and "Usage: cometd" in server.stdout, server.stderr
    page = _run([py, "-c", "import importlib.resources as r, cometd.page as p; "
                 "print(all(r.files(p).joinpath(n).is_file() for n, _ in p.PAGES.values()))"],
                cwd=str(tmp_path))
    assert page.stdout.split() == ["True"], page  # the demo page is package data

    done = _run([*pip, "install", "-q", "--no-compile", f"{wheel}[loadtest]"],
                cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    shown = _run([*pip, "show", "matplotlib"], cwd=str(tmp_path))
    assert shown.returncode == 0 and "Name: matplotlib" in shown.stdout
    where = _run([py, "-c", "import cometd.loadtest.servers as s; print(s.__file__); "
                  "print(s.NCHAN_TEMPLATE.exists())"], cwd=str(tmp_path))
    assert where.stdout.split() == [
        str(venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
            / "cometd" / "loadtest" / "servers.py"), "True"], where
    for name in COMMANDS:
        proc = _run([str(bindir / name), "--help"], cwd=str(tmp_path))
        assert proc.returncode == 0 and f"Usage: {name}" in proc.stdout, (name, proc.stderr)
