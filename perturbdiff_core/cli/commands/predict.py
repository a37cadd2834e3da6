"""``perturbdiff predict``: apply a trained run to the control cells of its own or another file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import InputError
from ...io import check_output_file, check_output_folder, write_new
from ...names import METRICS_FILE, NEW_PREDICTIONS, POPULATION_KEY, PREDICTIONS_FILE, REPORT_FILE
from ...runs.folder import RunDir

if TYPE_CHECKING:  # torch and AnnData are imported when the command runs, not for --help
    import anndata as ad
    import torch

    from ...runs.checkpoint import Checkpoint

_EPILOG = f"""\
--conditions takes perturbation names (every context of the data where the perturbation
has cells; every context with control cells when it has none) or full condition labels
'perturbation|cell_type|batch' (only the parts the run's data config has: e.g.
'stimulated|CD14+Mono' with a cell type key and no batch key), as split.json, metrics.csv and
the report write them; with a batch key, 'perturbation|cell_type' (metrics.csv's label before
it kept batches apart) means the perturbation in every batch of that cell type, and so does the
older 'cell_type/perturbation'. A combination may name its parts in any order (B+A is the data's
A+B), and a condition named twice is predicted once. Without --conditions: the run's test conditions, or with --data every
perturbed condition of that file.
Each condition gets as many cells as it really has, or --n-cells (required for a condition
without cells in the data). With --data, genes are aligned to the model's by name; missing
genes are read as zeros and reported (at most data.max_missing_genes of them).
The output holds the predicted cells with the input's obs keys and the model's genes, plus the
real control cells of their contexts unchanged, ready for perturbdiff evaluate or cell-eval; it
is written atomically. Without --out it is a new file in the run folder,
{NEW_PREDICTIONS}_<n>.h5ad with the first free n (the name is printed): predict never replaces
the run's own {PREDICTIONS_FILE}, which its {METRICS_FILE} and {REPORT_FILE} describe, nor any other
file of the run (--out naming one is refused). With --populations K every
condition gets K independent populations (other control draws and noise; where the model
extrapolates, to an unseen context or a new combination, populations after the first also move by
an error measured on training conditions held out alike), labelled in obs
'{POPULATION_KEY}': perturbdiff evaluate then reports where the real population falls among them
(calibration_pvalue, population_coverage); for cell-eval keep population '0'.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``perturbdiff predict``."""
    parser = subparsers.add_parser(
        "predict",
        help="sample perturbed cells from a trained run (on its data or a new file)",
        description="Predict perturbed cells of conditions from their control cells with a trained run.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--run", metavar="DIR", required=True, help="run folder written by perturbdiff train / run")
    parser.add_argument("--checkpoint", metavar="PATH", default=None, help="checkpoint (default: DIR/checkpoints/last.pt)")
    parser.add_argument("--data", metavar="NEW.h5ad", default=None, help="file whose control cells to use (default: the run's data)")
    parser.add_argument("--conditions", nargs="+", metavar="LABEL", default=None, help="perturbations or condition labels to predict")
    parser.add_argument("--n-cells", type=int, default=None, metavar="N", help="cells per condition (default: as many as the real condition)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: the run's seed)")
    parser.add_argument(
        "--populations", type=int, default=1, metavar="K",
        help=f"independent populations per condition, labelled 0..K-1 in obs '{POPULATION_KEY}' (default: %(default)s)",
    )
    parser.add_argument("--device", default="auto", help="torch device for sampling (default: %(default)s)")
    parser.add_argument("--out", metavar="FILE", default=None, help=f"output .h5ad (default: a new DIR/{NEW_PREDICTIONS}_<n>.h5ad)")
    parser.set_defaults(func=run)


def predictions(checkpoint: Checkpoint, args: argparse.Namespace, device: torch.device | None = None) -> ad.AnnData:
    """The predicted AnnData of ``args`` (conditions, cells, seed) from ``checkpoint``, sampled on ``device``
    (default: ``args.device``); see :func:`~perturbdiff_core.runs.prediction.predict_run`."""
    from ...runs.prediction import predict_run
    from ...runs.training import resolve_device

    device = resolve_device(args.device, option="--device") if device is None else device
    return predict_run(
        checkpoint, device=device, data=args.data, conditions=args.conditions, n_cells=args.n_cells,
        seed=args.seed, populations=args.populations,
    )


def check_out(out: str | None, run_dir: Path) -> Path | None:
    """``--out`` checked before anything slow: a writable file that is none of the run's own files
    (``None``: a new file in the run folder, which must then be writable)."""
    if out is None:
        check_output_folder(run_dir)
        return None
    path = check_output_file(out)
    files = RunDir(run_dir.resolve())
    if path.resolve().parent == files.path and path.name in {f.name for f in files.results()}:
        clash = f"would replace the run's own {path.name}"
    elif files.checkpoints in path.resolve().parents:
        clash = "lies in the run's own checkpoints folder"
    elif path.suffix.lower() != ".h5ad":
        raise InputError(f"--out {out} would hold an AnnData under another extension; give a file name ending in .h5ad.")
    else:
        return path
    raise InputError(
        f"--out {out} {clash}; give another file name, or leave out --out to write a new "
        f"{NEW_PREDICTIONS}_<n>.h5ad in the run folder."
    )


def run(args: argparse.Namespace) -> int:
    """Load the checkpoint, predict, write the file, report what was written."""
    from ...runs.checkpoint import load_checkpoint, load_run_checkpoint
    from ...runs.pipeline import write_predictions
    from ...runs.training import resolve_device

    run_dir = Path(args.run)
    if not run_dir.is_dir():
        raise InputError(f"No run folder {run_dir}; give the --out folder of perturbdiff train or run.")
    out = check_out(args.out, run_dir)
    device = resolve_device(args.device, option="--device")
    checkpoint = load_checkpoint(args.checkpoint) if args.checkpoint else load_run_checkpoint(run_dir)
    if not checkpoint.complete:
        print(
            f"perturbdiff: note: this checkpoint is at step {checkpoint.step} of train.steps = "
            f"{checkpoint.run_config.train.steps}: training did not finish (perturbdiff run ... --resume finishes it).",
            file=sys.stderr,
        )
    adata = predictions(checkpoint, args, device)
    if out is None:
        out = write_new(run_dir, NEW_PREDICTIONS, ".h5ad", adata.write_h5ad)
    else:
        out = write_predictions(adata, out)
    control = checkpoint.run_config.data.control_label
    is_control = adata.obs[checkpoint.run_config.data.perturbation_key].astype(str) == control
    print(
        f"Wrote {int((~is_control).sum())} predicted cells and {int(is_control.sum())} real control cells "
        f"({adata.n_vars} genes) to {out}",
        file=sys.stderr,
    )
    return 0
