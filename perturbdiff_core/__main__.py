"""``python -m perturbdiff_core``: the ``perturbdiff`` command line."""

from .cli import main

raise SystemExit(main())
