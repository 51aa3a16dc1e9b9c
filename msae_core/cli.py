"""The `msae` command: collects each module's subcommand and turns user errors into one line."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from msae_core import __version__
from msae_core.errors import MsaeError

# each module exposes add_cli(subparsers); order is the order of `msae --help`
SUBCOMMAND_MODULES = (
    "msae_core.data.harvest",
    "msae_core.data.synth",
    "msae_core.training.cli",
    "msae_core.runs.sweep",
    "msae_core.runs.saelens",
    "msae_core.evals.cli",
    "msae_core.inspect.compare",
    "msae_core.inspect.dashboard",
    "msae_core.demo",
    "msae_core.study",
)


def os_error_line(exc: OSError) -> str:
    """One line for an OS error: the path it names and the OS's own words for the cause."""
    where = exc.filename if exc.filename is not None else ""
    cause = exc.strerror or str(exc) or type(exc).__name__
    return f"cannot use {where}: {cause}" if where else cause


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="msae", description="Harvest activations, train and evaluate sparse autoencoders.")
    parser.add_argument("--version", action="version", version=f"msae {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a subcommand still being built must not break the rest
            if exc.name and exc.name.startswith("msae_core"):
                continue
            raise
        module.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except MsaeError as exc:
        print(f"msae: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an output path the OS refuses: a file, read-only, too long, ...
        print(f"msae: error: {os_error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("msae: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
