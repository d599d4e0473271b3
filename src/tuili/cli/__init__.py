"""The `tuili` command line: one module per command (its parser beside its handler), each calling
the library; `main` puts them together."""

from __future__ import annotations

import argparse
import sys

from tuili.cli import distill, evaluate, export, generate, optimize, prune, quantize, serve
from tuili.errors import TuiliError

COMMANDS = (optimize, export, quantize, prune, distill, evaluate, generate, serve)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except (TuiliError, ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def parser() -> argparse.ArgumentParser:
    """`tuili`'s parser: each command module adds its subcommands, in COMMANDS' order."""
    from tuili import __version__

    root = argparse.ArgumentParser(prog="tuili", description="Make language models smaller and faster, and measure it.")
    root.add_argument("--version", action="version", version=f"tuili {__version__}")
    sub = root.add_subparsers(required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return root
