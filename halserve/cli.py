"""halserve command line: serve | generate | chat | probe | conformance | bench.

Each subcommand lives in its own module as ``add_arguments(parser)`` + ``main(args) -> int``;
modules are imported only when their subcommand runs, so ``--help`` and ``probe`` stay fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("halserve.server.cli", "OpenAI-compatible server (default: the shipped demo model)"),
    "generate": ("halserve.generate_cli", "generate text for one prompt"),
    "chat": ("halserve.generate_cli:chat", "interactive chat in the terminal"),
    "probe": ("halserve.hal.probe_cli", "list backends with score and reason, and hardware facts"),
    "conformance": ("halserve.hal.conformance", "HAL conformance: backend x op vs float64; --engine: models"),
    "bench": ("halserve.bench", "benchmarks: serve, latency, throughput, startup, offload"),
}


class CliError(Exception):
    """A user error: printed as one line, exit code 2."""


def _module(spec: str):
    mod_name, _, prefix = spec.partition(":")
    mod = importlib.import_module(mod_name)
    add = getattr(mod, f"add_{prefix}_arguments" if prefix else "add_arguments")
    run = getattr(mod, f"{prefix}_main" if prefix else "main")
    return add, run


ARGV: list[str] = []  # the argv being parsed, for subcommands with their own sub-subcommands


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    from halserve import __version__

    ARGV[:] = argv

    parser = argparse.ArgumentParser(prog="halserve", description="Portable LLM inference and serving engine.")
    parser.add_argument("--version", action="version", version=f"halserve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Only the module of the chosen subcommand is imported (its flags are needed to parse).
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (spec, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == chosen:
            add, run = _module(spec)
            add(p)
            p.set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # user-facing errors: one line, no traceback
        from halserve.errors import is_user_error

        if is_user_error(e):
            print(f"halserve {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":  # run the imported module so subcommands see the same ARGV
    from halserve.cli import main as _main

    sys.exit(_main())
