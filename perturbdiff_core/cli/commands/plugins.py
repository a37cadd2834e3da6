"""``perturbdiff plugins``: every entry-point group with its installed plug-ins."""

from __future__ import annotations

import argparse

from ...docstrings import plain_text
from ...registry import GROUPS, list_plugins


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``perturbdiff plugins``."""
    parser = subparsers.add_parser(
        "plugins",
        help="list installed plug-ins by entry-point group",
        description=(
            "List every plug-in group and its plug-ins: name, the distribution that provides it "
            "and the first line of its docstring (as plain text). Describing a plug-in imports it; one that fails "
            "to import shows as BROKEN with the error and does not stop the listing."
        ),
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print one table per entry-point group."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    for group in GROUPS:
        table = Table(title=group, title_justify="left", expand=False)
        table.add_column("name", style="bold", no_wrap=True)
        table.add_column("distribution", no_wrap=True)
        table.add_column("description")
        infos = list_plugins(group, all_distributions=True)
        collisions = any(info.others for info in infos)
        if collisions:
            table.add_column("name collision", style="yellow")
        for info in infos:
            description = escape(plain_text(info.describe()))
            if description.startswith("BROKEN"):
                description = f"[red]{description}[/red]"
            table.add_row(info.name, info.distribution, description, *([escape(info.collision)] if collisions else []))
        if not table.rows:
            table.add_row("[dim](none installed)[/dim]", "", "")
        console.print(table)
    return 0

