"""Subcommands of ``perturbdiff``, one per module, discovered by :mod:`perturbdiff_core.cli`.

A command module exposes ``add_parser(subparsers) -> None``, which registers its parser and
sets ``func=run`` with ``set_defaults``; ``run(args) -> int`` returns the exit status.
Modules whose name starts with ``_`` are helpers, not commands.
"""
