"""The `msae` command: collects each module's subcommand and turns user errors into one line."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from msae_core import __version__
from msae_core.errors import MsaeError

# command -> the module whose add_cli(subparsers) adds it; the order is `msae --help`'s. A command
# line naming one command imports that module alone: training and evaluating need only torch,
# transformers, safetensors, numpy and tqdm (what a bare GPU machine holds), never the workbench's
# pandas or plotly that `compare` and `dashboard` import.
SUBCOMMANDS = {
    "harvest": "msae_core.data.harvest",
    "synth": "msae_core.data.synth",
    "train": "msae_core.training.cli",
    "train-group": "msae_core.training.group",
    "sweep": "msae_core.runs.sweep",
    "import": "msae_core.runs.saelens",
    "export": "msae_core.runs.saelens",
    "eval": "msae_core.evals.cli",
    "compare": "msae_core.inspect.compare",
    "dashboard": "msae_core.inspect.dashboard",
    "demo": "msae_core.demo",
    "study": "msae_core.study",
}
SUBCOMMAND_MODULES = tuple(dict.fromkeys(SUBCOMMANDS.values()))


def os_error_line(exc: OSError) -> str:
    """One line for an OS error: the path it names and the OS's own words for the cause."""
    where = exc.filename if exc.filename is not None else ""
    cause = exc.strerror or str(exc) or type(exc).__name__
    return f"cannot use {where}: {cause}" if where else cause


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `msae` parser: every subcommand, or where `command` names one, that one alone."""
    parser = argparse.ArgumentParser(
        prog="msae", description="Harvest activations, train and evaluate sparse autoencoders.")
    parser.add_argument("--version", action="version", version=f"msae {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in ((SUBCOMMANDS[command],) if command in SUBCOMMANDS else SUBCOMMAND_MODULES):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a subcommand still being built must not break the rest
            if exc.name and exc.name.startswith("msae_core"):
                continue
            raise
        module.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
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
