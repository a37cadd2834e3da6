"""Arguments the commands share, light enough to import when the parser is built (no rich, no torch)."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An argparse ``type``: a whole number of at least 1 (``--jobs``), else the usage error says which."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_jobs_option(parser: argparse.ArgumentParser, noun: str) -> None:
    """``--jobs N`` of a command running many run folders (``ablate``, ``suite``); ``noun`` names one of them."""
    parser.add_argument(
        "--jobs", type=positive_int, metavar="N", default=1,
        help=f"run N {noun}s side by side in N worker processes that share the CPUs, with no progress bar "
        "(default 1: one at a time with every CPU)",
    )
