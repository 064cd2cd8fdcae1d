"""Command line: ``peftkit demo``, ``peftkit --version`` (also ``python -m peftkit ...``)."""

from __future__ import annotations

import argparse
import sys

from ._version import __version__


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="peftkit", description="Parameter-efficient fine-tuning.")
    top.add_argument("--version", action="version", version=f"peftkit {__version__}")
    sub = top.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="train every registered method briefly on an embedded model and task; print a table",
    )
    demo.add_argument("--model", metavar="DIR", help="a local HF causal-LM directory instead")
    demo.add_argument(
        "--steps", type=int, default=40, help="training steps per method (default 40)"
    )
    demo.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate (default 1e-2)")
    return top


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (1 when a demo row failed)."""
    top = parser()
    args = top.parse_args(argv)
    if args.command is None:  # no command: say what there is, as `--help` does
        top.print_help()
        return 0
    if args.steps < 1:
        top.error("--steps must be at least 1")
    from .demo import run_demo

    rows = run_demo(args.model, steps=args.steps, lr=args.lr)
    return 0 if all(row.ok for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
