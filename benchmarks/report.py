"""Markdown table of a pytest-benchmark JSON file: each time as a ratio to the GEMM floor and GeomLoss.

    python benchmarks/report.py bench.json [--stat median] [--output benchmarks/RESULTS.md]

Ratios to the floor of the same shape cancel most of the machine's speed; the targets are
checked on them (see ``TARGETS``). Cases timed in a child process (16384 cells) use the call
time measured inside the child and also report peak resident memory.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cases import EXACT, TRAINING

from perturbdiff_core.io import atomic_write_text

#: Exact estimators at the training shape: time / GEMM floor at most this, per mode.
FLOOR_TARGETS = {"fwd": 3.5, "fwdbwd": 6.0}
#: Exact estimators: GeomLoss time / ours at least this.
GEOMLOSS_SPEEDUP_TARGET = 1.25
#: Chunked (exact) estimator, forward+backward at 16384 cells: peak resident memory below this.
PEAK_RSS_TARGET_MIB = 1024.0
TRAINING_SHAPE = TRAINING.id
TARGETS = (
    f"exact estimators ({', '.join(EXACT)}) at {TRAINING_SHAPE}: forward <= {FLOOR_TARGETS['fwd']}x floor, "
    f"forward+backward <= {FLOOR_TARGETS['fwdbwd']}x floor, >= {GEOMLOSS_SPEEDUP_TARGET}x faster than GeomLoss; "
    f"chunked forward+backward at 16384 cells under {PEAK_RSS_TARGET_MIB:.0f} MiB peak RSS"
)


@dataclass(frozen=True)
class Row:
    """One benchmark case: its labels, its time in seconds and, from a child process, its memory."""

    role: str
    shape: str
    kernel: str
    estimator: str
    mode: str
    device: str
    seconds: float
    rounds: int | None  # calls timed in a child process; None when pytest-benchmark timed it
    peak_rss_mib: float | None
    baseline_rss_mib: float | None

    @classmethod
    def from_json(cls, bench: dict[str, Any], stat: str) -> Row:
        info = bench["extra_info"]
        in_child = "seconds" in info
        return cls(
            **{key: info[key] for key in ("role", "shape", "kernel", "estimator", "mode", "device")},
            seconds=info["seconds"] if in_child else bench["stats"][stat],
            rounds=info.get("rounds"),
            peak_rss_mib=info.get("peak_rss_mib"),
            baseline_rss_mib=info.get("baseline_rss_mib"),
        )


def _fmt_time(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _ratio(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _targets(row: Row, to_floor: float | None, speedup: float | None) -> str:
    """Pass/fail marks of the targets that apply to ``row``."""
    marks = []
    if row.estimator == "keops" and row.device == "cpu":
        return "n/a"
    if row.role == "ours" and row.estimator in EXACT and row.shape == TRAINING_SHAPE:
        if to_floor is not None:
            marks.append(("floor", to_floor <= FLOOR_TARGETS[row.mode]))
        if speedup is not None:
            marks.append(("GeomLoss", speedup >= GEOMLOSS_SPEEDUP_TARGET))
    if row.role == "ours" and row.estimator == "chunked" and row.mode == "fwdbwd" and row.peak_rss_mib is not None:
        marks.append(("memory", row.peak_rss_mib < PEAK_RSS_TARGET_MIB))
    return ", ".join(f"{name} {'pass' if ok else 'FAIL'}" for name, ok in marks) or "-"


def _notes(row: Row) -> str:
    notes = []
    if row.estimator == "keops" and row.device == "cpu":
        notes.append("KeOps on CPU")
    if row.rounds is not None:
        notes.append(f"child process, {row.rounds} call(s)")
    return "; ".join(notes)


def table(rows: list[Row]) -> list[str]:
    """Markdown lines: one table per shape, rows by kernel, estimator and mode."""
    floors = {r.shape: r.seconds for r in rows if r.role == "floor"}
    geomloss = {(r.shape, r.kernel, r.mode): r.seconds for r in rows if r.role == "geomloss"}
    order = {"floor": 0, "geomloss": 1, "kernel": 2, "ours": 3}
    lines = []
    for shape in sorted({r.shape for r in rows}, key=lambda s: (int(s.split("-S")[1].split("-")[0]), s)):
        lines += [
            f"### {shape}",
            "",
            "| kernel | estimator | mode | time | / floor | GeomLoss / this | peak RSS (working) | targets | notes |",
            "|---|---|---|---:|---:|---:|---:|---|---|",
        ]
        cases = sorted((r for r in rows if r.shape == shape), key=lambda r: (order[r.role], r.kernel, r.estimator, r.mode))
        for r in cases:
            floor = floors.get(shape)
            to_floor = r.seconds / floor if floor and r.role != "floor" else None
            theirs = geomloss.get((shape, r.kernel, r.mode)) if r.role == "ours" else None
            speedup = theirs / r.seconds if theirs else None
            memory = (
                f"{r.peak_rss_mib:.0f} MiB ({r.peak_rss_mib - r.baseline_rss_mib:.0f})" if r.peak_rss_mib is not None else "-"
            )
            lines.append(
                f"| {r.kernel} | {r.estimator} | {r.mode} | {_fmt_time(r.seconds)} | {_ratio(to_floor)} | "
                f"{_ratio(speedup)} | {memory} | {_targets(r, to_floor, speedup)} | {_notes(r)} |"
            )
        lines.append("")
    return lines


def header(data: dict[str, Any], stat: str) -> list[str]:
    """Where and when the numbers were taken, and how to read them."""
    machine = data.get("machine_info", {}).get("perturbdiff", {})
    lines = ["# Benchmark results", ""]
    lines += [f"- {key}: `{value}`" for key, value in machine.items()]
    lines += [
        f"- statistic: {stat} of the rounds (child-process cases: median of their calls)",
        "",
        "`/ floor`: time divided by the GEMM floor (one batched (S, G) @ (G, S) matmul, forward) of "
        "the same shape. `GeomLoss / this`: GeomLoss `SamplesLoss(backend=\"tensorized\")` time "
        "with the matching kernel (rbf: gaussian, laplace: laplacian, energy: energy), same shape "
        "and mode, divided by this case's time (above 1: we are faster). `peak RSS (working)`: "
        "the child process's peak resident memory, and in brackets its growth during the timed "
        "calls.",
        "",
        f"Targets: {TARGETS}.",
        "",
    ]
    return lines


def render(data: dict[str, Any], stat: str) -> str:
    """The whole markdown report of one pytest-benchmark JSON document."""
    rows = [Row.from_json(b, stat) for b in data["benchmarks"] if "role" in b.get("extra_info", {})]
    return "\n".join(header(data, stat) + table(rows))


def main(argv: Iterable[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="file written by pytest --benchmark-json")
    parser.add_argument("--stat", default="median", choices=["min", "median", "mean"], help="statistic of the rounds")
    parser.add_argument("--output", type=Path, help="write the markdown here (atomically) instead of printing it")
    args = parser.parse_args(argv)
    text = render(json.loads(args.json.read_text()), args.stat)
    if args.output:
        atomic_write_text(args.output, text)
    else:
        print(text)


if __name__ == "__main__":
    main()
