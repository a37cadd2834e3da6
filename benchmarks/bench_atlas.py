"""Atlas scale: train the tiny model from a collection of 2,000,000 cells in 16 ``.h5ad`` shards, backed.

    python benchmarks/bench_atlas.py [--root DIR] [--cells 2000000] [--shards 16] [--steps 300] \\
        [--workers 0 2] [--output benchmarks/ATLAS_RESULTS.md] [--delete]

The collection and one ten times smaller (same shards, genes and conditions) are generated once
under ``--root`` (``$PERTURBDIFF_ATLAS_DIR``, default ``/tmp/perturbdiff_atlas``) by
``atlas_collection.py`` and reused; ``--delete`` removes them at the end. Each measurement runs
``perturbdiff``'s own :class:`~perturbdiff_core.runs.training.Trainer` (``data.path`` = the shard folder,
tiny CrossDiT, B=8 sets of S=256 cells, 2,000 genes, CPU, one torch thread) in a fresh child
process, while this process samples the memory of the child and its DataLoader workers:

* **time to first step**: from the child's start (imports included) to the end of its first
  optimizer step; *cold* with the shard index removed first (the index is built: obs codes and
  a scan of every value, vectorised, block by block), *warm* with the index cached beside the shards;
* **training**: ``--steps`` steps through ``Trainer.fit`` (data wait included) and the share of that
  time spent waiting for the next batch;
* **model consumption**: sets per second the model takes, B / (step time without the data wait);
* **loader alone**: sets per second the same training loader gives with no model running;
* **peak memory**: the child's peak resident set (``VmHWM``), and the peak, sampled every 0.2 s, of
  the proportional set size (``Pss``: pages shared by forked workers counted once) summed over the
  child and its workers.

The Markdown table is written atomically, headed by the machine record, the load average and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

START = time.perf_counter()  # the child's clock starts before its heavy imports

HERE = Path(__file__).resolve().parent
B, S = 8, 256
#: Batches the loader is timed on alone (after one to start its workers).
LOADER_BATCHES = 30
#: Targets: peak memory, and its growth from the small to the large collection.
PEAK_LIMIT_MIB = 2048
FLAT_FACTOR = 1.25


# ----------------------------------------------------------------------------------- the child


def overrides(collection: Path, steps: int, workers: int) -> list[str]:
    """``--set`` pairs of the benchmarked run."""
    return [
        f"data.path={collection}", "data.cell_type_key=cell_type", f"data.set_size={S}",
        "split.kind=random", "split.test_fraction=0.1", "split.val_fraction=0",
        "model.denoiser_params={size: tiny}", f"train.batch_size={B}", f"train.steps={steps}",
        f"train.num_workers={workers}", "train.val_every=0", "train.checkpoint_every=1000000",
        "train.log_every=1000000", "train.device=cpu", "train.threads=1", "seed=0",
    ]


class TimedLoader:
    """A DataLoader whose iteration adds the time spent waiting for each batch to ``wait``."""

    wait = 0.0

    def __init__(self, loader) -> None:
        self.loader = loader

    def __iter__(self):
        batches = iter(self.loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            TimedLoader.wait += time.perf_counter() - start
            yield batch


def peak_rss_mib() -> float:
    """This process's peak resident set size (``VmHWM``), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(spec: dict) -> dict:
    """One measurement in this (fresh) process: time to first step, then training, then the loader alone."""
    from perturbdiff_core import training
    from perturbdiff_core.runs.config import load_config

    real_loader = training.training_loader
    training.training_loader = lambda *args, **kwargs: TimedLoader(real_loader(*args, **kwargs))
    config = load_config(None, overrides(Path(spec["collection"]), spec["steps"] + 1, spec["workers"]))
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = training.Trainer(config, run_dir, progress=False)
        ready = time.perf_counter() - START
        trainer.fit(stop_at=1)
        result = {"ready_s": ready, "first_step_s": time.perf_counter() - START}
        if spec["steps"]:
            TimedLoader.wait = 0.0
            start = time.perf_counter()
            trainer.fit()
            seconds = time.perf_counter() - start
            compute = seconds - TimedLoader.wait
            loader = real_loader(trainer.train_sets, config.train, seed=0, start=0, stop=LOADER_BATCHES + 1,
                                 device=trainer.device)
            batches = iter(loader)
            next(batches)  # workers started
            start = time.perf_counter()
            for _ in range(LOADER_BATCHES):
                next(batches)
            loader_s = time.perf_counter() - start
            del batches
            result |= {
                "steps": spec["steps"], "train_s": seconds, "wait_share": TimedLoader.wait / seconds,
                "model_sets_per_s": B * spec["steps"] / compute, "loader_sets_per_s": B * LOADER_BATCHES / loader_s,
                "train_cells_per_s": B * S * spec["steps"] / seconds,
            }
    return result | {"peak_rss_mib": peak_rss_mib()}


# ---------------------------------------------------------------------------------- the parent


def tree_pss_mib(pid: int) -> float:
    """Summed ``Pss`` of ``pid`` and its descendants, MiB (0 for processes that are gone)."""
    total, stack = 0.0, [pid]
    while stack:
        p = stack.pop()
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) / 1024
                    break
            stack += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total


def measure(collection: Path, steps: int, workers: int) -> dict:
    """Run :func:`child` in a fresh process, sampling its tree's memory; its result with ``peak_pss_mib``."""
    spec = json.dumps({"collection": str(collection), "steps": steps, "workers": workers})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, __file__, "--child", spec], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, tree_pss_mib(proc.pid))
        time.sleep(0.2)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"the measurement of {collection.name} with {workers} workers failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1]) | {"peak_pss_mib": peak}


def remove_index(collection: Path) -> None:
    """Delete the cached shard index, so the next start builds it (cold)."""
    shutil.rmtree(collection / ".perturbdiff-index", ignore_errors=True)


def describe(collection: Path) -> str:
    """Cells, shards, disk size and density of a generated collection."""
    import h5py

    spec = json.loads((collection / "manifest.json").read_text())
    shards = sorted(collection.glob("*.h5ad"))
    nnz = 0
    for shard in shards:
        with h5py.File(shard, "r") as f:
            nnz += f["X/data"].shape[0]
    density = nnz / (spec["cells"] * spec["genes"])
    size = sum(p.stat().st_size for p in shards) / 2**30
    return (f"{spec['cells']:,} cells x {spec['genes']:,} genes in {len(shards)} shards, {size:.2f} GiB on disk, "
            f"{1 - density:.1%} zeros, {spec['perturbations']} perturbations x {spec['cell_types']} cell lines "
            f"= {spec['perturbations'] * spec['cell_types']} conditions")


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| collection | workers | first step, cold index (s) | first step, cached index (s) | train steps/s | waiting for data | "
        "model consumes (sets/s) | loader alone (sets/s) | loader / model | peak RSS, main (MiB) | peak PSS, all processes (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cold = f"{r['cold_first_step_s']:.1f}" if "cold_first_step_s" in r else ""
        lines.append(
            f"| {r['cells']:,} cells | {r['workers']} | {cold} | {r['first_step_s']:.1f} | {r['steps'] / r['train_s']:.2f} | "
            f"{r['wait_share']:.0%} | {r['model_sets_per_s']:.1f} | {r['loader_sets_per_s']:.1f} | "
            f"{r['loader_sets_per_s'] / r['model_sets_per_s']:.2f} | {r['peak_rss_mib']:.0f} | {r['peak_pss_mib']:.0f} |"
        )
    return lines


def verdicts(rows: list[dict], large: int, small: int) -> list[str]:
    """pass / FAIL of the targets."""
    out = []
    for r in rows:
        peak = max(r["peak_rss_mib"], r["peak_pss_mib"])
        out.append(f"- {r['cells']:,} cells, {r['workers']} workers: peak {peak:.0f} MiB "
                   f"({'pass' if peak < PEAK_LIMIT_MIB else 'FAIL'}: target < {PEAK_LIMIT_MIB} MiB)")
    for workers in sorted({r["workers"] for r in rows}):
        by = {r["cells"]: r for r in rows if r["workers"] == workers}
        if large in by and small in by:
            a, b = by[small]["peak_pss_mib"], by[large]["peak_pss_mib"]
            out.append(f"- {workers} workers, 10x the cells: peak PSS {a:.0f} -> {b:.0f} MiB (x{b / a:.2f}; "
                       f"{'pass' if b <= FLAT_FACTOR * a else 'FAIL'}: flat means at most x{FLAT_FACTOR})")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=None, help="folder of the collections ($PERTURBDIFF_ATLAS_DIR)")
    parser.add_argument("--cells", type=int, default=2_000_000)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--output", type=Path, default=HERE / "ATLAS_RESULTS.md")
    parser.add_argument("--delete", action="store_true", help="delete the generated collections at the end")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0

    sys.path.insert(0, str(HERE))
    from atlas_collection import DEFAULT_ROOT, ensure, plan
    from machine_record import env_prefix, machine_line

    from perturbdiff_core.io import atomic_write_text

    root = args.root or DEFAULT_ROOT
    command = env_prefix() + "python benchmarks/bench_atlas.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    load = os.getloadavg()
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    sizes = [args.cells // 10, args.cells]
    collections = {n: ensure(root, plan(n, args.shards, 2000, 100, 4, 0), log=log) for n in sizes}
    rows = []
    for n in sizes:
        remove_index(collections[n])
        cold = measure(collections[n], 0, 0)
        log(f"atlas: {n:,} cells, cold index: first step after {cold['first_step_s']:.1f} s")
        for workers in args.workers:
            row = measure(collections[n], args.steps, workers) | {"cells": n, "workers": workers}
            if workers == args.workers[0]:
                row["cold_first_step_s"] = cold["first_step_s"]
            log(f"atlas: {n:,} cells, {workers} workers: {json.dumps({k: round(v, 3) for k, v in row.items()})}")
            rows.append(row)
    text = [
        "# Atlas-scale benchmark: training from a sharded collection, backed",
        "",
        f"- machine: {machine_line()}",
        f"- load average (1, 5, 15 min) at the start: {', '.join(f'{v:.2f}' for v in load)}",
        f"- reproduce: `{command}`",
        *[f"- collection: {describe(collections[n])}" for n in sizes],
        f"- run: tiny CrossDiT, B={B} sets of S={S} cells, random split (10% of conditions held out), "
        f"{args.steps} steps, one torch thread, `train.num_workers` as in the table",
        "",
        *table(rows),
        "",
        "Targets:",
        "",
        *verdicts(rows, args.cells, args.cells // 10),
        "",
    ]
    atomic_write_text(args.output, "\n".join(text))
    log(f"atlas: wrote {args.output}")
    if args.delete:
        for folder in collections.values():
            shutil.rmtree(folder)
        log(f"atlas: deleted {', '.join(map(str, collections.values()))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
