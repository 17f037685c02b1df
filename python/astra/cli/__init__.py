"""The ``astra`` command line: one module per command.

Each command module (``astra.cli.<name>``) has ``register(subparsers)``, which adds its
parser and sets ``func`` to the module's ``main(args) -> int``. Command modules import
their heavy dependencies inside ``main``, and the choices and defaults a parser shows come
from :mod:`astra.options` (no torch): ``--help`` and a refused argument take a fraction
of a second (tests/test_cli.py checks that parsing imports no torch).

This package is the only place that turns errors into messages and exit codes: library
code raises ``ValueError`` / ``TypeError`` for bad input, and :func:`main` prints them as
one line (``astra <command>: <message>``) with exit status 2. ``ASTRA_DEBUG=1`` shows the
traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from typing import List, Optional

# command modules, in the order ``astra --help`` lists them
COMMANDS = ("demo", "run", "generate", "bench", "eval", "finetune", "info")


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``astra run: error: ...``), exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="astra", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return p


def run_command(args: argparse.Namespace, prog: str) -> int:
    """Run ``args.func(args)``; bad input (``ValueError``/``TypeError``, a missing file)
    becomes one line on stderr, ``prog: message``, and exit status 2; a run that failed
    (a rank died or stopped answering, training diverged) prints its message, exit 1."""
    try:
        return int(args.func(args) or 0)
    except Exception as e:  # noqa: BLE001 - sorted below; anything else is re-raised
        if os.environ.get("ASTRA_DEBUG"):
            raise
        if isinstance(e, (ValueError, TypeError, FileNotFoundError)):
            print(f"{prog}: {e}", file=sys.stderr)
            return 2
        # imported only now: a refusal above must not wait for torch
        from astra.parallel.job import RunnerError
        if isinstance(e, (RunnerError, FloatingPointError)):
            print(f"{prog}: {e}", file=sys.stderr)
            return 1
        raise


def _terminate(signum, frame):
    # SIGTERM (kill, timeout, service managers) unwinds like Ctrl-C: every ``finally``
    # runs, so worker processes are killed and temporary folders and namespaces removed
    raise SystemExit(128 + signum)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    suite = getattr(args, "suite", None)
    prog = " ".join(["astra", args.command] + ([suite] if suite else []))
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return run_command(args, prog)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
