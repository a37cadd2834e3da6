"""Pre-train on unperturbed PBMCs, then predict kang18's held-out stimulated CD14+ monocytes
zero-shot and after fine-tuning on 1%, 5% and 100% of the training cells, against training
from scratch with the same steps; one Markdown table of the model rows of every metrics.csv.

Run from the repository root (one thread; 9-28 minutes here on a shared 2-core machine, by its load):
    OMP_NUM_THREADS=1 python scripts/pretrain_experiment.py
Finished runs (a metrics.csv in their folder) are skipped when the script is run again.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from perturbdiff_core.data.anndata_io import shared_data_dir
from perturbdiff_core.io import atomic_path, atomic_write_text
from perturbdiff_core.runs.pretraining import UnperturbedSource, concat_unperturbed

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from machine_record import machine_line  # the benchmarks' machine record

PRETRAIN_CONFIG = "examples/pretrain_pbmc.yaml"
FINETUNE_CONFIG = "examples/kang18_holdout_celltype.yaml"
METRICS = ["pearson_delta", "mse", "mmd2_energy"]
FRACTIONS = {"1%": 0.01, "5%": 0.05, "100%": 1.0}


def write_pretraining_data(path: Path) -> None:
    """kang18's control cells and pbmc68k_reduced (``.raw``, ``bulk_labels``) on their shared genes."""
    import scanpy as sc

    adata = concat_unperturbed(
        [
            UnperturbedSource(shared_data_dir() / "kang18_pbmc_ifnb.h5ad", "kang18", "cell_type", "condition"),
            UnperturbedSource(sc.datasets.pbmc68k_reduced(), "pbmc68k", "bulk_labels", use_raw=True),
        ]
    )
    print(f"pre-training data: {adata.n_obs} cells x {adata.n_vars} shared genes; genes dropped per source "
          f"{adata.uns['genes_dropped']}", file=sys.stderr)
    adata.uns.clear()
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)


def perturbdiff(*args: str) -> float:
    """Run ``perturbdiff ARGS`` (this interpreter), echoing the command; its wall time in seconds."""
    command = [sys.executable, "-m", "perturbdiff_core", *args]
    print("$ perturbdiff " + " ".join(args), file=sys.stderr, flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - start


def runs(pretrained: Path, genes: Path, steps: int) -> dict[str, list[str]]:
    """Run name -> extra ``perturbdiff run`` arguments."""
    common = ["--set", "data.n_genes=null", f"data.gene_list={genes}", f"train.steps={steps}",
              f"train.warmup_steps={max(1, steps // 10)}", f"train.val_every={steps}", f"train.checkpoint_every={steps}"]
    plan = {"zero-shot (pre-trained, perturbation zeroed)": ["--init-from", str(pretrained), *common,
                                                             "train.steps=0", "sample.guidance=0"]}
    for label, fraction in FRACTIONS.items():
        plan[f"fine-tune {label}"] = ["--init-from", str(pretrained), *common, f"split.train_fraction={fraction}"]
    for label, fraction in FRACTIONS.items():
        plan[f"scratch {label}"] = [*common, f"split.train_fraction={fraction}"]
    return plan


def folder_name(label: str) -> str:
    return label.split(" (")[0].replace(" ", "_").replace("%", "pct")


def table(out: Path, labels: list[str], seconds: dict[str, float]) -> pd.DataFrame:
    """Model rows (all held-out conditions) of every run, and the baselines of the scratch 100% run."""
    rows = []
    for label in labels:
        metrics = pd.read_csv(out / folder_name(label) / "metrics.csv")
        chosen = metrics[metrics["condition"] == "__all__"]
        methods = ["model", *([m for m in chosen["method"].unique() if m != "model"] if label == "scratch 100%" else [])]
        for method in methods:
            values = chosen[chosen["method"] == method].set_index("metric")["value"]
            name = label if method == "model" else f"baseline: {method}"
            rows.append({"run": name, **{m: values.get(m, float("nan")) for m in METRICS},
                         "wall_s": seconds.get(label, float("nan")) if method == "model" else float("nan")})
    return pd.DataFrame(rows)


def markdown(frame: pd.DataFrame) -> str:
    """A Markdown table (numbers to 4 significant digits; pandas' to_markdown needs tabulate)."""
    cells = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row] for row in frame.itertuples(index=False)]
    lines = [list(frame.columns), ["---"] * len(frame.columns), *cells]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/pretrain_experiment"))
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--finetune-steps", type=int, default=600)
    parser.add_argument("--results", type=Path, default=Path("benchmarks/PRETRAIN_RESULTS.md"))
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data_file = out / "pbmc68k_kang18_controls.h5ad"
    if not data_file.exists():
        write_pretraining_data(data_file)
    pretrained = out / "pretrain"
    seconds: dict[str, float] = {}
    if not (pretrained / "checkpoints" / "last.pt").exists():
        seconds["pre-training"] = perturbdiff("train", PRETRAIN_CONFIG, "--out", str(pretrained), "--quiet", "--set",
                                              f"data.path={data_file}", f"train.steps={args.pretrain_steps}")
    genes = out / "genes.txt"
    atomic_write_text(genes, "\n".join(json.loads((pretrained / "data_state.json").read_text())["genes"]) + "\n")
    plan = runs(pretrained, genes, args.finetune_steps)
    for label, extra in plan.items():
        run_dir = out / folder_name(label)
        if not (run_dir / "metrics.csv").exists():
            seconds[label] = perturbdiff("run", FINETUNE_CONFIG, "--out", str(run_dir), "--quiet", *extra)
    result = table(out, list(plan), seconds)
    text = "\n".join([
        "# Marginal pre-training, then fine-tuning on kang18 (held-out stimulated CD14+ monocytes)",
        "",
        f"Command: `OMP_NUM_THREADS=1 python scripts/pretrain_experiment.py --pretrain-steps {args.pretrain_steps} "
        f"--finetune-steps {args.finetune_steps}`",
        f"Machine: {machine_line()}. Total wall time {time.perf_counter() - started:.0f} s "
        f"(pre-training {seconds.get('pre-training', float('nan')):.0f} s; runs done earlier show nan).",
        "",
        f"Pre-training: {PRETRAIN_CONFIG}, {args.pretrain_steps} steps on the control cells of kang18 and "
        "pbmc68k_reduced (473 shared genes, perturbation zeroed). Every kang18 run uses those 473 genes "
        f"and {FINETUNE_CONFIG} with {args.finetune_steps} steps; fine-tunes start from the pre-trained "
        "weights (--init-from), scratch runs from a fresh model; a fraction keeps that share of each training "
        "condition's cells (split.train_fraction, at least one). Zero-shot: the pre-trained weights with 0 "
        "steps, sampled unconditionally (sample.guidance=0, the perturbation encoding zeroed), under the run "
        "config's defaults: with model.anchor and sample.ensemble auto the denoiser's residual is added to the "
        "anchor's prediction and averaged with context_mixture's, both fitted on the training split (all of its "
        "cells here, the fraction's in the other runs). Metrics: evaluate's __all__ rows (one held-out "
        "condition); pearson_delta higher is better, mse and mmd2_energy lower are better.",
        "",
        markdown(result),
        "",
    ])
    atomic_write_text(args.results, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
