"""Data-parallel training throughput on CPU (gloo): cells/s at 1, 2, ... processes under torchrun.

    python benchmarks/bench_ddp.py [--processes 1 2] [--steps 20] [--warmup 3] [--output benchmarks/DDP_RESULTS.md]

For each process count the script launches itself under ``torchrun --standalone`` (one thread
per process, ``OMP_NUM_THREADS=1``); every rank builds the :class:`~perturbdiff_core.runs.training.Trainer`
of a tiny-denoiser run on a synthetic screen (B=8 sets of S=256 cells, G=2000 genes by default),
trains ``--warmup`` steps, then times ``--steps`` more between barriers. Throughput is
``steps * B * S / seconds`` (B is the global batch, so the work per step is the same at every
process count). The Markdown table names the machine, the date, the commit and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from perturbdiff_core.data.synthetic import synthetic_screen
from perturbdiff_core.io import atomic_write_text
from perturbdiff_core.runs import distributed
from perturbdiff_core.runs.config import load_config
from perturbdiff_core.runs.training import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine_record import machine_line


def run_config(screen: Path, args: argparse.Namespace) -> list[str]:
    """``--set`` overrides of the benchmarked run: tiny denoiser, no validation, no periodic checkpoint."""
    return [
        f"data.path={screen}", "data.cell_type_key=cell_type", f"data.set_size={args.set_size}",
        "split.kind=holdout_combination", "split.holdout=[A+B]", "split.val_fraction=0",
        "model.denoiser_params={size: tiny}", f"train.batch_size={args.batch_size}",
        f"train.steps={args.warmup + args.steps}", "train.val_every=0", "train.checkpoint_every=1000000",
        "train.log_every=1000000", "train.device=cpu", "seed=0",
    ]


def worker(args: argparse.Namespace) -> None:
    """One rank: warm up, time ``args.steps`` training steps, rank 0 writes ``{"seconds": ...}`` to ``args.result``."""
    with distributed.process_group(torch.device("cpu")):
        config = load_config(None, run_config(args.screen, args))
        trainer = Trainer(config, args.run_dir, progress=False)
        trainer.fit(stop_at=args.warmup)
        distributed.barrier()
        start = time.perf_counter()
        trainer.fit()
        distributed.barrier()
        seconds = time.perf_counter() - start
        if distributed.is_main():
            atomic_write_text(args.result, json.dumps({"seconds": seconds}))


def measure(processes: int, screen: Path, folder: Path, args: argparse.Namespace) -> float:
    """Seconds of ``args.steps`` timed steps with ``processes`` ranks (a fresh run folder each time)."""
    result = folder / f"result_{processes}.json"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
        __file__, "--worker", "--screen", str(screen), "--run-dir", str(folder / f"run_{processes}"),
        "--result", str(result), "--steps", str(args.steps), "--warmup", str(args.warmup),
        "--batch-size", str(args.batch_size), "--set-size", str(args.set_size),
    ]
    subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
    return json.loads(result.read_text())["seconds"]


def report(rows: list[tuple[int, float]], args: argparse.Namespace, command: str) -> str:
    """The Markdown table: processes, seconds per step, cells/s and speed-up over the first row."""
    cells = args.steps * args.batch_size * args.set_size
    base = cells / rows[0][1]
    lines = [
        f"# Data-parallel training throughput (gloo, CPU, tiny denoiser, B={args.batch_size}, "
        f"S={args.set_size}, G={args.genes})",
        "",
        f"Machine: {machine_line()}. One thread per process. Command: `{command}`",
        "",
        "| processes | s/step | cells/s | speed-up |",
        "|---:|---:|---:|---:|",
    ]
    for processes, seconds in rows:
        rate = cells / seconds
        lines.append(f"| {processes} | {seconds / args.steps:.3f} | {rate:,.0f} | {rate / base:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts to time")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per process count")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=8, help="global batch B (sets per step)")
    parser.add_argument("--set-size", type=int, default=256, help="cells per set S")
    parser.add_argument("--genes", type=int, default=2000, help="genes G of the synthetic screen")
    parser.add_argument("--output", type=Path, default=None, help="also write the table here (atomically)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--screen", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    command = shlex.join(["python", "benchmarks/bench_ddp.py", *(sys.argv[1:] if argv is None else argv)])
    with tempfile.TemporaryDirectory(prefix="bench_ddp_") as tmp:
        folder = Path(tmp)
        screen = folder / "screen.h5ad"
        synthetic_screen(3000, args.genes, seed=0).write_h5ad(screen)
        rows = [(p, measure(p, screen, folder, args)) for p in args.processes]
    table = report(rows, args, command)
    print(table)
    if args.output is not None:
        atomic_write_text(args.output, table)


if __name__ == "__main__":
    main()
