"""The `bitsmith` command. Each subcommand lives in its own module with ``add_parser(subparsers)``
and ``run(args) -> int``; heavy imports happen inside ``run`` so ``bitsmith --help`` stays fast.
The CLI is the only layer that prints."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

COMMANDS = [
    "demo", "quantize", "generate", "eval", "compare", "tasks", "inspect", "fit", "export",
    "serve", "probe", "sweep", "distill",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bitsmith", description="Quantize LLM weights, run them, and measure what quality they kept.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the library does")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"bitsmith.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"bitsmith.cli.{name}":
                raise
            continue
        module.add_parser(sub)
    return parser


# commands whose calibrated passes run batches in threads: one shared heap arena keeps their peak RSS down
ARENA_SHARING_COMMANDS = ("quantize",)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # bitsmith never downloads at run time
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.command:
        parser.print_help()
        return 2
    if args.command in ARENA_SHARING_COMMANDS:  # before any thread allocates (kernels.alloc.share_arenas)
        from bitsmith.kernels.alloc import share_arenas

        share_arenas()
    from bitsmith.cli.common import friendly_errors

    with friendly_errors():
        return int(args.run(args) or 0)
    return 1


if __name__ == "__main__":
    sys.exit(main())
