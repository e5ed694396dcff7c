"""Command line: ``python -m autoperm demo`` (also installed as the ``autoperm`` script)."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="autoperm", description="Compile and use the permutation "
                                     "symmetries of PyTorch models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train two small residual CNNs on digits, compile the spec, merge them "
                          "(naive, weight / activation matching, REPAIR) and write the spec graph and curve")
    demo.add_argument("--out", default="autoperm_demo", help="output folder (default: autoperm_demo)")
    demo.add_argument("--epochs", type=int, default=8, help="training epochs per model (default: 8)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if args.command == "demo":
        from .demo import run_demo

        print(run_demo(args.out, args.epochs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
