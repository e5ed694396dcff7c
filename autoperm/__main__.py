"""Command line: ``autoperm spec | merge | demo`` (also ``python -m autoperm``); see docs/cli.md.

The subcommands live in `autoperm.cli`. Example::

    python -m autoperm spec torchvision:resnet18 --input-shape 1,3,64,64 --out spec.png
"""

from __future__ import annotations

import sys

from .cli import EXIT_CODES, main

__all__ = ["main", "EXIT_CODES"]

if __name__ == "__main__":
    sys.exit(main())
