"""Command line: ``peftkit demo`` (also ``python -m peftkit demo``)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="peftkit", description="Parameter-efficient fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="train every registered method briefly on an embedded model and task; print a table",
    )
    demo.add_argument("--model", metavar="DIR", help="a local HF causal-LM directory instead")
    demo.add_argument(
        "--steps", type=int, default=40, help="training steps per method (default 40)"
    )
    demo.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate (default 1e-2)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    from .demo import run_demo

    run_demo(args.model, steps=args.steps, lr=args.lr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
