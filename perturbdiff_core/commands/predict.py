"""``perturbdiff predict``: apply a trained run to the control cells of its own or another file."""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import anndata as ad
import torch

from ..checkpoint import Checkpoint, checkpoint_path, load_checkpoint
from ..data.dataset import LABEL_SEPARATOR, Condition, Context, PerturbationData
from ..errors import DataError, InputError
from ..model_predictor import DiffusionPredictor
from ..pipeline import PREDICTIONS_FILE, write_predictions
from ..predictors import predict_anndata
from ..training import resolve_device


_EPILOG = f"""\
--conditions takes perturbation names (every context of the data where the perturbation
has cells; every context with control cells when it has none) or full condition labels
'perturbation|cell_type|batch' (only the parts the run's data config has: e.g.
'stimulated|CD14+Mono' with a cell type key and no batch key). Without --conditions: the
run's test conditions, or with --data every perturbed condition of that file.
Each condition gets as many cells as it really has, or --n-cells (required for a condition
without cells in the data). With --data, genes are aligned to the model's by name; missing
genes are read as zeros and reported (at most data.max_missing_genes of them).
The output ({PREDICTIONS_FILE}, written atomically) holds the predicted cells with the input's
obs keys and the model's genes, plus the real control cells of their contexts unchanged,
ready for perturbdiff evaluate or cell-eval.
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
    parser.add_argument("--device", default="auto", help="torch device for sampling (default: %(default)s)")
    parser.add_argument("--out", metavar="FILE", default=None, help=f"output .h5ad (default: DIR/{PREDICTIONS_FILE})")
    parser.set_defaults(func=run)


def open_data(checkpoint: Checkpoint, path: str | None) -> PerturbationData:
    """The run's data, or ``path`` read with the run's genes (missing genes reported in one stderr line)."""
    config = checkpoint.run_config.data
    if path is not None:
        config = replace(config, path=path)
    elif config.path is None or not Path(config.path).exists():
        raise DataError(f"The run's data file {config.path} is not available here; pass the file with --data.")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*genes are missing from this data", category=UserWarning)
        data = PerturbationData.from_state(checkpoint.data_state, config.path, config)
    if data.missing_genes:
        shown = ", ".join(data.missing_genes[:5]) + (", ..." if len(data.missing_genes) > 5 else "")
        print(
            f"perturbdiff: note: {len(data.missing_genes)} of the model's {data.n_genes} genes are missing from "
            f"{config.path} and are read as zeros: {shown}",
            file=sys.stderr,
        )
    return data


def _context_of(data: PerturbationData, parts: list[str], label: str) -> Context:
    """The context named by the parts of a label after the perturbation, in the data config's order."""
    cfg = data.config
    expected = ["cell_type"] * (cfg.cell_type_key is not None) + ["batch"] * (cfg.batch_key is not None) + cfg.covariate_keys
    if len(parts) != len(expected):
        form = LABEL_SEPARATOR.join(["perturbation", *expected])
        raise InputError(f"Condition label {label!r} has {len(parts)} context part(s); this run's labels read {form!r}.")
    values = dict(zip(expected, parts))
    context = Context(values.get("cell_type"), values.get("batch"), tuple(parts[len(parts) - len(cfg.covariate_keys):]))
    data.control_cells(context)  # DataError listing the contexts with controls when there are none
    return context


def _new_condition(data: PerturbationData, perturbation: str, context: Context) -> Condition:
    """A condition without cells in ``data`` (predicted from its context's controls)."""
    if perturbation == data.config.control_label:
        raise InputError(f"{perturbation!r} is the control label; name perturbed conditions.")
    label = LABEL_SEPARATOR.join([perturbation, context.label]) if context.label else perturbation
    return Condition(label, perturbation, context, None, 0, False)


def resolve_conditions(data: PerturbationData, requested: list[str]) -> list[Condition]:
    """The conditions named by perturbation names or full labels (see the command's help)."""
    by_label = {c.label: c for c in data.perturbed_conditions}
    chosen: list[Condition] = []
    for item in requested:
        if item in by_label:
            chosen.append(by_label[item])
        elif LABEL_SEPARATOR in item:
            perturbation, *parts = item.split(LABEL_SEPARATOR)
            chosen.append(_new_condition(data, perturbation, _context_of(data, parts, item)))
        else:
            seen = [c for c in data.perturbed_conditions if c.perturbation == item]
            chosen += seen or [_new_condition(data, item, context) for context in data.contexts]
    data.encoder.encode([c.perturbation for c in chosen])  # an unencodable perturbation fails before sampling
    return chosen


def predictions(checkpoint: Checkpoint, args: argparse.Namespace, device: torch.device) -> ad.AnnData:
    """The predicted AnnData of ``args`` (conditions, cells, seed) from ``checkpoint``, sampled on ``device``."""
    data = open_data(checkpoint, args.data)
    if args.conditions:
        conditions = resolve_conditions(data, args.conditions)
    elif args.data is None:
        conditions = [data.condition(c) for c in checkpoint.split.test]
    else:
        conditions = data.perturbed_conditions
        if not conditions:
            raise InputError(f"{args.data} has no perturbed cells; name what to predict with --conditions and --n-cells.")
    n_cells = args.n_cells if args.n_cells is not None else checkpoint.run_config.sample.n_cells
    if n_cells is not None and n_cells < 1:
        raise InputError(f"--n-cells must be a positive integer, got {n_cells}.")
    empty = [c.label for c in conditions if c.n_cells == 0]
    if empty and n_cells is None:
        raise InputError(
            f"Condition(s) {', '.join(empty[:5])} have no cells in the data, so the number of cells to predict is "
            f"unknown; pass --n-cells N."
        )
    predictor = DiffusionPredictor.from_checkpoint(checkpoint, device=device)
    seed = checkpoint.run_config.seed if args.seed is None else args.seed
    return predict_anndata(predictor, data, conditions, n_cells=n_cells, seed=seed)


def run(args: argparse.Namespace) -> int:
    """Load the checkpoint, predict, write the file, report what was written."""
    run_dir = Path(args.run)
    if not run_dir.is_dir():
        raise InputError(f"No run folder {run_dir}; give the --out folder of perturbdiff train or run.")
    device = resolve_device(args.device, option="--device")
    checkpoint = load_checkpoint(args.checkpoint or checkpoint_path(run_dir))
    adata = predictions(checkpoint, args, device)
    out = write_predictions(adata, args.out or run_dir / PREDICTIONS_FILE)
    control = checkpoint.run_config.data.control_label
    is_control = adata.obs[checkpoint.run_config.data.perturbation_key].astype(str) == control
    print(
        f"Wrote {int((~is_control).sum())} predicted cells and {int(is_control.sum())} real control cells "
        f"({adata.n_vars} genes) to {out}",
        file=sys.stderr,
    )
    return 0
