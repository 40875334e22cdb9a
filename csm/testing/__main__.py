"""`python -m csm.testing make-tiny DIR [--format original|transformers] [--seed N]`."""

from __future__ import annotations

import argparse
from pathlib import Path

from .tiny import FORMATS, make_tiny


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m csm.testing")
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("make-tiny", help="write a tiny random-weight model folder (noise)")
    tiny.add_argument("dir", type=Path)
    tiny.add_argument("--format", choices=FORMATS, default="original")
    tiny.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    folder = make_tiny(args.dir, args.format, args.seed)
    print(f"wrote a random-weight model folder (noise, not speech) to {folder}")


if __name__ == "__main__":
    main()
