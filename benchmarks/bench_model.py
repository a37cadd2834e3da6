"""Model benchmarks: training step split into its parts, training and sampling throughput, and the
loader against the model step.

Shape: ``B=8`` sets of ``S=256`` cells over ``G=2000`` genes, the CrossDiT denoiser at the ``tiny``,
``small`` and ``paper`` sizes, energy kernel, unbiased MMD, x0 prediction (the defaults); the tiny size
also at the set size and gene count of the bundled CPU demos that train it, and made wider. Parts of a step:

* ``data``: how long the training loop waits for its next SetBatch on the device: the Trainer's
  loader (:func:`~perturbdiff_core.runs.training.training_loader`, ``train.num_workers: auto``: no
  workers on a CPU, worker processes and pinned memory on a GPU) over an in-memory synthetic screen,
  with a whole training step run (untimed) before each fetch, as in training, so workers build
  batches while steps run;
* ``denoiser``: the denoiser's forward with gradients and its backward, once without and once with
  a self-conditioning estimate (each is half of the steps, ``self_condition_prob=0.5``), so the
  table counts half of the two;
* ``self_cond``: the no-gradient forward that makes that estimate on half of the steps, so the
  table counts half of it;
* ``loss``: the rest of the loss, forward and backward: noising, MSE and MMD^2 of a prediction;
* ``ema``: the EMA update; ``optimizer``: the Trainer's AdamW step (fused) and zeroing the gradients;
* ``step``: a whole training step as the Trainer runs it (data excluded), to check the parts add up.

Targets (the issues): everything but the denoiser (data, loss, EMA, optimizer) at most 25% of the
step; the loader's sets/s at least the model's consumption rate ``B / step`` (never the bottleneck).

Run with pytest-benchmark (``pytest benchmarks/bench_model.py --benchmark-only``), or as a script
printing the tables and writing them with the machine and the command::

    OMP_NUM_THREADS=1 python benchmarks/bench_model.py --sizes tiny small paper --output benchmarks/MODEL_RESULTS.md
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import anndata as ad
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_loader import BATCHES, CASES, CELLS, B, G, S, case_id, endless, make_screen, screen_loader, take
from cases import DEVICE
from machine_record import env_prefix, machine

from perturbdiff_core.data import ConditionSets, DataConfig, PerturbationData
from perturbdiff_core.data.synthetic import synthetic_screen
from perturbdiff_core.io import atomic_write_text
from perturbdiff_core.runs.config import ModelConfig, TrainConfig
from perturbdiff_core.runs.training import build_model, make_optimizer, resolve_workers, training_loader

SIZES = ("tiny", "small", "paper")
PARTS = ("data", "denoiser", "self_cond", "loss", "ema", "optimizer", "step")
#: Parts that are not the denoiser (the issue's target: at most 25% of the step).
OVERHEAD = ("data", "loss", "ema", "optimizer")
TARGET_SHARE = 0.25
#: Worker processes of the Trainer's loader at the default ``train.num_workers: auto`` on DEVICE.
WORKERS = resolve_workers(TrainConfig().num_workers, DEVICE)
SAMPLING_STEPS = (5, 10, 20, 50)
#: Sampling at the paper size on a CPU is linear in the steps and slow: only the first two there.
PAPER_CPU_STEPS = (5, 10)


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


@cache
def screen_data(cells: int = S, genes: int = G) -> PerturbationData:
    """A 4,000-cell screen over ``genes`` genes (8 perturbations x 2 cell types), fitted, sets of ``cells``."""
    adata = synthetic_screen(4000, genes, perturbations=[f"p{i}" for i in range(8)], mean_count=0.3)
    return PerturbationData(adata, DataConfig(cell_type_key="cell_type", set_size=cells)).fit()


@dataclass
class Setup:
    """A model, its optimizer, the Trainer's batches, a batch on the device and fixed draws, for timing the parts."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    batches: Iterator
    batch: object
    t: torch.Tensor
    noise: torch.Tensor

    @classmethod
    def make(cls, size: str, cells: int = S, genes: int = G, hidden: int | None = None) -> Setup:
        """The denoiser at preset ``size``, ``hidden`` wide if given, over a screen of sets of ``cells`` cells and ``genes`` genes."""
        data = screen_data(cells, genes)
        torch.manual_seed(0)
        params = {"size": size} if hidden is None else {"size": size, "hidden": hidden}
        model = build_model(ModelConfig(denoiser_params=params), data, "centred").to(DEVICE)
        train = TrainConfig(batch_size=B)  # the defaults: AdamW, train.num_workers auto
        optimizer = make_optimizer(model.trainable_parameters(), train)
        sets = ConditionSets(data, [c.label for c in data.perturbed_conditions])
        batches = iter(training_loader(sets, train, seed=0, start=0, stop=10**9, device=DEVICE))
        batch = next(batches).to(DEVICE)
        gen = torch.Generator().manual_seed(1)
        t = torch.randint(1, model.schedule.num_steps + 1, (B,), generator=gen).to(DEVICE)
        noise = torch.randn(batch.target.shape, generator=gen).to(DEVICE)
        return cls(model, optimizer, batches, batch, t, noise)

    def part(self, name: str) -> Callable[[], None]:
        """The callable timing part ``name`` (see the module docstring)."""
        model, batch, t, noise = self.model, self.batch, self.t, self.noise
        net = model.denoiser
        x0 = batch.target
        x_t = model.schedule.q_sample(x0, t, noise)
        ab = model.schedule.alpha_bar(t)
        grad_out = torch.randn_like(x0)
        prediction = x0 + 0.1 * torch.randn_like(x0)

        def data() -> None:
            next(self.batches).to(DEVICE, non_blocking=True)  # as Trainer._train_step

        def denoiser() -> None:
            net(x_t, t, batch.cond).backward(grad_out)
            net(x_t, t, batch.cond, prediction).backward(grad_out)  # a step with a self-conditioning estimate

        def self_cond() -> None:
            with torch.no_grad():
                net(x_t, t, batch.cond)

        def loss() -> None:
            noisy = model.schedule.q_sample(x0, t, noise)
            pred = prediction.clone().requires_grad_(True)  # stands for the denoiser's output
            mse, mmd = model.denoising_loss(pred, x0, noise, noisy, ab)
            (mse + model.mmd_weight * mmd).mean().backward()

        def ema() -> None:
            model.update_ema()

        def optimizer() -> None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=False)

        def step() -> None:
            model.train()
            terms = model.loss(batch)
            self.optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), 1.0)
            self.optimizer.step()
            model.update_ema()

        if name == "optimizer":  # gradients to step on
            denoiser()
        return {"data": data, "denoiser": denoiser, "self_cond": self_cond, "loss": loss, "ema": ema,
                "optimizer": optimizer, "step": step}[name]

    def before(self, name: str) -> Callable[[], None] | None:
        """What runs untimed before each timed call of part ``name``: a whole step before ``data``,
        so the loader's workers build batches while a step runs, as in training."""
        return self.part("step") if name == "data" else None

    def warm_up_calls(self, name: str) -> int:
        """Untimed calls before timing part ``name``: for ``data``, enough for the workers' first
        batches (``prefetch_factor`` 2 each) to be used up, so the timed fetches are the steady state."""
        return 2 * WORKERS + 1 if name == "data" else 1

    def sampler(self, steps: int) -> Callable[[], None]:
        """Sampling ``B`` sets of ``S`` cells in ``steps`` DDIM steps."""
        self.model.update_ema()
        return lambda: self.model.sample(self.batch.cond, steps=steps)


@cache
def setup(size: str, cells: int = S, genes: int = G, hidden: int | None = None) -> Setup:
    return Setup.make(size, cells, genes, hidden)


def timed(
    run: Callable[[], None],
    rounds: int,
    warm_up: Callable[[], None] | None = None,
    *,
    before: Callable[[], None] | None = None,
    warm_up_calls: int = 1,
) -> float:
    """Median seconds of ``rounds`` calls after ``warm_up_calls`` warm-up calls (of ``warm_up``,
    default ``run``); ``before`` runs untimed before each call, warm-up calls included."""
    times = []
    for call in range(warm_up_calls + rounds):
        if before is not None:
            before()
            sync()
        start = time.perf_counter()
        (warm_up or run)() if call < warm_up_calls else run()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times[warm_up_calls:])


def part_time(size: str, part: str, rounds: int, cells: int = S, genes: int = G, hidden: int | None = None) -> float:
    """Median seconds of one part of a training step (see the module docstring)."""
    bench = setup(size, cells, genes, hidden)
    return timed(bench.part(part), rounds, before=bench.before(part), warm_up_calls=bench.warm_up_calls(part))


# ------------------------------------------------------------------------------ pytest-benchmark


@pytest.mark.parametrize("part", PARTS)
@pytest.mark.parametrize("size", SIZES)
def test_step_part(benchmark, size: str, part: str) -> None:
    bench = setup(size)
    run, before = bench.part(part), bench.before(part)

    def call() -> None:
        run()
        sync()

    def untimed() -> None:
        if before is not None:
            before()
            sync()

    for _ in range(bench.warm_up_calls(part)):
        untimed()
        call()
    benchmark.group = f"model step B{B}-S{S}-G{G} {size}"
    benchmark.extra_info.update(size=size, part=part, batch=B, cells=S, genes=G, device=DEVICE.type, workers=WORKERS)
    benchmark.pedantic(call, setup=untimed, rounds=3 if size == "paper" else 10, iterations=1)


@pytest.mark.parametrize("steps", SAMPLING_STEPS)
@pytest.mark.parametrize("size", SIZES)
def test_sampling(benchmark, size: str, steps: int) -> None:
    if size == "paper" and DEVICE.type == "cpu" and steps not in PAPER_CPU_STEPS:
        pytest.skip(f"paper-size sampling on CPU is linear in the steps; timed at {PAPER_CPU_STEPS} only")
    run = setup(size).sampler(steps)
    setup(size).sampler(1)()  # warm-up at the cost of one step
    benchmark.group = f"sampling B{B}-S{S}-G{G} {size}"
    benchmark.extra_info.update(size=size, steps=steps, device=DEVICE.type)
    benchmark.pedantic(lambda: (run(), sync()), rounds=2, iterations=1, warmup_rounds=0)


# ---------------------------------------------------------------------------------------- script

#: Report sections of the script: step split and training throughput, the tiny size at the bundled
#: CPU demos' shapes, the tiny size made wider, sampling, loader vs model.
SECTIONS = ("step", "demos", "widths", "sampling", "loader")
#: Widths (``hidden``) the ``widths`` section gives the tiny preset (depth and heads unchanged), to
#: show where the step split would meet the target; examples/ablation_tiny_width.yaml shows what the
#: kang18 demo pays for them.
TINY_WIDTHS = (128, 192)
#: (cells per set, genes) of the bundled CPU demos, which train the tiny size (examples/*.yaml:
#: ``data.set_size`` and the genes kept).
DEMO_SHAPES = {"kang18_holdout_celltype": (128, 1000), "norman19_holdout_*": (64, 500)}


def header(script: str, argv: list[str] | None) -> list[str]:
    """Markdown bullets: the machine record (:mod:`machine_record`), the load average now and the exact command."""
    command = f"{env_prefix()}python benchmarks/{script} {shlex.join(sys.argv[1:] if argv is None else argv)}".rstrip()
    info = {**machine(), "load_average_1_5_15_min": os.getloadavg(), "reproduce": command}
    return [f"- {key}: {value}" for key, value in info.items()]


@cache
def step_times(size: str, rounds: int, cells: int = S, genes: int = G, hidden: int | None = None) -> dict[str, float]:
    """Median seconds of each part of a training step, ``denoiser`` and ``self_cond`` already halved (see the module docstring)."""
    times = {part: part_time(size, part, rounds, cells, genes, hidden) for part in PARTS}
    times["denoiser"] *= 0.5
    times["self_cond"] *= 0.5
    return times


def loader_note() -> str:
    """How the ``data`` part gets its batches here (the Trainer's loader at the default ``train.num_workers``)."""
    return (f"data: the wait for the next batch from the Trainer's loader (train.num_workers auto: {WORKERS} "
            f"worker{'s' * (WORKERS != 1)}{', pinned memory' if DEVICE.type == 'cuda' else ''}), a whole step running before each fetch.")


def step_rows(label: str, times: dict[str, float]) -> list[str]:
    """Markdown rows of one size (and shape), named ``label``: each part, its share, and the share outside the denoiser against the target."""
    parts = [p for p in PARTS if p != "step"]
    total = sum(times[p] for p in parts)
    share = sum(times[p] for p in OVERHEAD) / total
    rows = [f"| {label} | {p} | {times[p] * 1e3:.1f} | {times[p] / total:.1%} |" for p in parts]
    rows.append(f"| {label} | sum of parts | {total * 1e3:.1f} | 100% |")
    rows.append(f"| {label} | whole step (measured, without data) | {times['step'] * 1e3:.1f} | |")
    rows.append(f"| {label} | **outside the denoiser** ({', '.join(OVERHEAD)}) | | **{share:.1%}** "
                f"({'pass' if share <= TARGET_SHARE else 'FAIL'}: target <= {TARGET_SHARE:.0%}) |")
    return rows


def throughput_row(size: str, times: dict[str, float]) -> str:
    """Training throughput of one size: ``cells/s = B * S / (step + data)`` (data: the wait for the Trainer's loader)."""
    seconds = times["step"] + times["data"]
    return f"| {size} | {seconds * 1e3:.1f} | {1 / seconds:.2f} | {B / seconds:.2f} | {B * S / seconds:.0f} |"


def sampling_row(size: str, steps: int) -> str:
    """Seconds to sample ``B`` sets of ``S`` cells in ``steps`` DDIM steps, per step, and cells/s."""
    seconds = timed(setup(size).sampler(steps), 1, warm_up=setup(size).sampler(1))
    return f"| {size} | {steps} | {seconds:.2f} | {seconds / steps:.3f} | {B * S / seconds:.0f} |"


def loader_rate(adata: ad.AnnData, path: Path, case: tuple[bool, str, int], rounds: int) -> float:
    """Sets/s of one loader set-up of ``bench_loader.CASES``: median of ``rounds`` rounds of
    ``BATCHES`` batches, after one warm-up round (which starts the workers)."""
    backed, pairing, workers = case
    stream = endless(screen_loader(adata, path, backed=backed, pairing=pairing, workers=workers))
    seconds = timed(lambda: take(stream), rounds)
    stream.close()  # frees the loader and stops its workers
    return B * BATCHES / seconds


def loader_rows(sizes: list[str], consumption: dict[str, float], rounds: int) -> Iterator[str]:
    """A row per loader set-up: its sets/s and, per size, its ratio to the model's consumption rate."""
    with tempfile.TemporaryDirectory() as folder:
        adata, path = make_screen(Path(folder))
        for case in CASES:
            rate = loader_rate(adata, path, case, rounds)
            verdicts = [f"{rate / consumption[s]:.1f} ({'pass' if rate >= consumption[s] else 'FAIL'})" for s in sizes]
            yield f"| {case_id(*case)} | {rate:.1f} | {' | '.join(verdicts)} |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=SIZES)
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS,
                        help="step: step split and training throughput; demos: the tiny size at the bundled CPU demos' shapes; "
                             f"widths: the tiny size at hidden {TINY_WIDTHS}; sampling: DDIM steps; loader: loader vs model step")
    parser.add_argument("--rounds", type=int, default=5, help="timed calls per step part (median; half at the larger sizes)")
    parser.add_argument("--loader-rounds", type=int, default=3, help=f"timed rounds of {BATCHES} batches per loader set-up")
    parser.add_argument("--output", type=Path, default=None, help="also write the tables (markdown) here, atomically")
    args = parser.parse_args(argv)
    lines = ["# Model benchmark", "", *header("bench_model.py", argv)]

    def emit(*new: str) -> None:
        lines.extend(new)
        print("\n".join(new), flush=True)

    rounds = {size: args.rounds if size == "tiny" else max(1, args.rounds // 2) for size in args.sizes}
    if "step" in args.sections:
        emit("", f"## Training step, B={B}, S={S}, G={G}", "", loader_note(), "", "| size | part | ms | share |", "|---|---|---|---|")
        for size in args.sizes:
            emit(*step_rows(size, step_times(size, rounds[size])))
        emit("", f"## Training throughput, B={B}, S={S}, G={G}", "",
             "A step here is the whole step plus the data wait (the data part above); cells/s = B * S / step.", "",
             "| size | ms / step | steps/s | sets/s | cells/s |", "|---|---|---|---|---|")
        emit(*(throughput_row(size, step_times(size, rounds[size])) for size in args.sizes))
    if "demos" in args.sections:
        emit("", f"## Training step of the tiny size at the bundled CPU demos' shapes, B={B}", "",
             "The same parts at the set size and gene count of each example config that trains the tiny size.", "",
             "| demo (S, G) | part | ms | share |", "|---|---|---|---|")
        for demo, (cells, genes) in DEMO_SHAPES.items():
            emit(*step_rows(f"{demo} ({cells}, {genes})", step_times("tiny", args.rounds, cells, genes)))
    if "widths" in args.sections:
        emit("", f"## Training step of the tiny size made wider, B={B}, S={S}, G={G}", "",
             "The tiny preset (depth and heads unchanged) at other widths: the loss costs the same at every width, "
             "the denoiser grows with it. What the kang18 demo pays for a wider tiny: examples/ablation_tiny_width.yaml.", "",
             "| size | part | ms | share |", "|---|---|---|---|")
        emit(*step_rows("tiny (preset)", step_times("tiny", args.rounds)))
        for hidden in TINY_WIDTHS:
            emit(*step_rows(f"tiny, hidden {hidden}", step_times("tiny", args.rounds, hidden=hidden)))
    if "sampling" in args.sections:
        emit("", f"## Sampling B={B} sets of S={S} cells, DDIM", "",
             "| size | steps | s | s / step | cells/s |", "|---|---|---|---|---|")
        for size in args.sizes:
            for steps in SAMPLING_STEPS:
                if size == "paper" and DEVICE.type == "cpu" and steps not in PAPER_CPU_STEPS:
                    continue
                emit(sampling_row(size, steps))
    if "loader" in args.sections:
        consumption = {size: B / step_times(size, rounds[size])["step"] for size in args.sizes}
        emit("", f"## Loader against the model step, B={B}, S={S}, G={G}", "",
             f"Loader: sets/s over a {CELLS:,}-cell synthetic screen, median of {args.loader_rounds} rounds of "
             f"{BATCHES} batches after a warm-up round, measured alone (in training, workers share the CPU "
             "with the model). Model consumption rate: B / whole step (without data), in sets/s: "
             + ", ".join(f"{size} {rate:.2f}" for size, rate in consumption.items())
             + ". Ratio: loader rate / consumption rate, pass if >= 1.", "",
             f"| loader | sets/s | {' | '.join(f'{size}: ratio' for size in args.sizes)} |",
             "|---|---|" + "---|" * len(args.sizes))
        for row in loader_rows(args.sizes, consumption, args.loader_rounds):
            emit(row)
    emit("", "## DDP scaling, 1 to 2 processes", "",
         "Measured separately, with its own machine record and command, by `benchmarks/bench_ddp.py` "
         "(`python benchmarks/bench_ddp.py --processes 1 2 --output benchmarks/DDP_RESULTS.md`): see `DDP_RESULTS.md`.")
    if args.output is not None:
        atomic_write_text(args.output, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
