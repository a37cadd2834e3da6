"""``perturbdiff predict``: apply a trained run to the control cells of its own or another file."""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import anndata as ad
import torch

from ..anchor import NO_ANCHOR, fit_anchor
from ..checkpoint import CHECKPOINT_DIR, Checkpoint, load_checkpoint, load_run_checkpoint
from ..data.dataset import LABEL_SEPARATOR, Condition, Context, PerturbationData
from ..data.prepare import SPLIT_FILE, STATE_FILE
from ..errors import DataError, InputError
from ..model_predictor import DiffusionPredictor
from ..evaluation.report import REPORT_FILE
from ..io import check_output_file, check_output_folder, write_new
from ..pipeline import METRICS_FILE, PREDICTIONS_FILE, write_predictions
from ..predictors import POPULATION_KEY, Predictor, predict_anndata
from ..run_config import CONFIG_FILE, PLUGINS_FILE
from ..training import LOG_FILE, resolve_device

#: Stem of the files predict writes into a run folder without --out: predictions_1.h5ad, predictions_2.h5ad, ...
NEW_PREDICTIONS = "predictions"

#: Files of a run folder that predict never replaces.
RUN_FILES = (PREDICTIONS_FILE, METRICS_FILE, REPORT_FILE, CONFIG_FILE, PLUGINS_FILE, LOG_FILE, SPLIT_FILE, STATE_FILE)


_EPILOG = f"""\
--conditions takes perturbation names (every context of the data where the perturbation
has cells; every context with control cells when it has none) or full condition labels
'perturbation|cell_type|batch' (only the parts the run's data config has: e.g.
'stimulated|CD14+Mono' with a cell type key and no batch key). Without --conditions: the
run's test conditions, or with --data every perturbed condition of that file.
Each condition gets as many cells as it really has, or --n-cells (required for a condition
without cells in the data). With --data, genes are aligned to the model's by name; missing
genes are read as zeros and reported (at most data.max_missing_genes of them).
The output holds the predicted cells with the input's obs keys and the model's genes, plus the
real control cells of their contexts unchanged, ready for perturbdiff evaluate or cell-eval; it
is written atomically. Without --out it is a new file in the run folder,
{NEW_PREDICTIONS}_<n>.h5ad with the first free n (the name is printed): predict never replaces
the run's own {PREDICTIONS_FILE}, which its metrics.csv and report.html describe, nor any other
file of the run (--out naming one is refused). With --populations K every
condition gets K independent populations (other control draws and noise), labelled in obs
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


def predictions(checkpoint: Checkpoint, args: argparse.Namespace, device: torch.device | None = None) -> ad.AnnData:
    """The predicted AnnData of ``args`` (conditions, cells, seed) from ``checkpoint``, sampled on ``device``
    (default: ``args.device``)."""
    device = resolve_device(args.device, option="--device") if device is None else device
    if args.seed is not None and args.seed < 0:
        raise InputError(f"--seed must be a non-negative integer, got {args.seed}.")
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
    anchor = run_anchor(checkpoint, data if args.data is None else None)
    predictor = DiffusionPredictor.from_checkpoint(checkpoint, device=device, anchor=anchor)
    seed = checkpoint.run_config.seed if args.seed is None else args.seed
    if args.populations < 1:
        raise InputError(f"--populations must be a positive integer, got {args.populations}.")
    return predict_anndata(predictor, data, conditions, n_cells=n_cells, seed=seed, populations=args.populations)


def run_anchor(checkpoint: Checkpoint, data: PerturbationData | None) -> Predictor | None:
    """The run's ``model.anchor`` fitted again on its training conditions (of ``data``, the run's
    own data, or else of the run's data file); ``None`` for a run without an anchor."""
    name = checkpoint.run_config.model.anchor_name
    if name == NO_ANCHOR:
        return None
    train_data = open_data(checkpoint, None) if data is None else data
    checkpoint.split.apply(train_data)
    return fit_anchor(name, train_data, checkpoint.split.train)


def check_out(out: str | None, run_dir: Path) -> Path | None:
    """``--out`` checked before anything slow: a writable file that is none of the run's own files
    (``None``: a new file in the run folder, which must then be writable)."""
    if out is None:
        check_output_folder(run_dir)
        return None
    path = check_output_file(out)
    if path.resolve().parent == run_dir.resolve() and path.name in RUN_FILES:
        clash = f"would replace the run's own {path.name}"
    elif run_dir.resolve() / CHECKPOINT_DIR in path.resolve().parents:
        clash = "lies in the run's own checkpoints folder"
    else:
        return path
    raise InputError(
        f"--out {out} {clash}; give another file name, or leave out --out to write a new "
        f"{NEW_PREDICTIONS}_<n>.h5ad in the run folder."
    )


def run(args: argparse.Namespace) -> int:
    """Load the checkpoint, predict, write the file, report what was written."""
    run_dir = Path(args.run)
    if not run_dir.is_dir():
        raise InputError(f"No run folder {run_dir}; give the --out folder of perturbdiff train or run.")
    out = check_out(args.out, run_dir)
    device = resolve_device(args.device, option="--device")
    checkpoint = load_checkpoint(args.checkpoint) if args.checkpoint else load_run_checkpoint(run_dir)
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
