"""What the commands running many resumable run folders share (``ablate``, ``suite``): statuses, Ctrl-C, output."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from ...errors import exit_status

#: Run-folder statuses in the order their counts are printed (see :func:`~perturbdiff_core.ablation.cell_status`).
STATUSES = ("new", "resume", "evaluate", "done")


def list_statuses(rows: Sequence[tuple[str, str]], console: Console, noun: str, where: Path) -> None:
    """Print ``status  name`` per run folder, then the counts: ``4 cells (1 new, 3 done) into DIR; ...``."""
    for name, status in rows:
        console.print(f"{status:>8}  {escape(name)}")
    statuses = [status for _, status in rows]
    counts = ", ".join(f"{statuses.count(s)} {s}" for s in STATUSES if statuses.count(s))
    console.print(f"{len(rows)} {noun}s ({counts}) into {escape(str(where))}; all configurations are valid.")


def interrupted(stop: KeyboardInterrupt, console: Console, whole: str) -> int:
    """Say where Ctrl-C or SIGTERM stopped (training saved a checkpoint first) and how to continue; the exit status (130, 143)."""
    where = f": {stop}" if str(stop) else ""
    console.print(  # one line however long: the checkpoint path in it is copied and pasted
        f"perturbdiff: interrupted{escape(where)}; run the same command again to continue the {whole}.", soft_wrap=True
    )
    return exit_status(stop)


def screen() -> Console:
    """The console of the final summary: stdout, one line per table row when written to a file or pipe."""
    console = Console(highlight=False)
    if not console.is_terminal:  # a file or pipe: one line per row, however wide
        console.width = 200
    return console
