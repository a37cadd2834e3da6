"""Write the generated reference pages, docs/config.md and docs/metrics.md, from the code.

    .venv/bin/python scripts/make_docs.py

tests/test_docs.py fails when a committed page differs from what this writes.
"""

from __future__ import annotations

from pathlib import Path

from perturbdiff_core.cli.reference import CONFIG_PAGE, METRICS_PAGE, config_reference, metrics_reference
from perturbdiff_core.io import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    for page, text in ((CONFIG_PAGE, config_reference()), (METRICS_PAGE, metrics_reference())):
        atomic_write_text(ROOT / page, text)
        print(f"wrote {page}")
