"""perturbdiff in a notebook: train, predict and evaluate on an AnnData in memory.

    import perturbdiff as pdiff
    model = pdiff.PerturbDiff(adata, perturbation_key="condition", control_label="control",
                              cell_type_key="cell_type",
                              split={"kind": "holdout_cell_type", "holdout": ["CD14+Mono"]},
                              **{"train.steps": 500})
    model.train()                         # progress bar; resumable
    pred = model.predict()                # AnnData, like predictions.h5ad
    metrics = pdiff.evaluate(pred, adata) # DataFrame, like metrics.csv
    model.save("runs/my_model"); model = pdiff.PerturbDiff.load("runs/my_model", adata)

The same machinery as the ``perturbdiff`` command line, so the same config and seed give the same
numbers. The core library is :mod:`perturbdiff_core`; names load on first use (PEP 562).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from perturbdiff_core import __version__
from perturbdiff_core._lazy import lazy_exports

#: Public name -> the submodule that defines it.
_EXPORTS = {
    "PerturbDiff": "model",
    "evaluate": "evaluation",
    "run_config": "options",
}

__all__ = sorted([*_EXPORTS, "__version__"])

if TYPE_CHECKING:
    from .evaluation import evaluate
    from .model import PerturbDiff
    from .options import run_config


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
