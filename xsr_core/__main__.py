"""``python -m xsr_core`` / ``xsr``: entry point listing the XSR command-line tools."""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

# subcommand -> (module with a main(argv) function, one-line help)
COMMANDS = {
    "refdb": ("xsr_core.refdb.cli", "build, search and inspect reference databases"),
    "train": ("xsr_core.train.cli", "prepare data and train RFA / I2T / AdaIN adapter"),
    "eval": ("xsr_core.eval.cli", "batch x16 inference and Table-1 metrics"),
    "zoo": ("xsr_core.testing.zoo", "write the tiny random-weight model zoo (tests, demos)"),
    "demo": ("xsr_core.demo", "run the x16 demo graph headless through a real ComfyUI"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="xsr",
        description=f"XSR {__version__}: retrieval-augmented x16 super-resolution tools.",
        epilog="\n".join(f"  {name:<6} {help_}" for name, (_, help_) in COMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", nargs="?", choices=sorted(COMMANDS), help="tool to run")
    parser.add_argument("--version", action="version", version=__version__)
    if not argv or argv[0] in ("-h", "--help", "--version"):
        parser.parse_args(argv)
        parser.print_help()
        return 0
    args, rest = parser.parse_known_args(argv[:1])
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
