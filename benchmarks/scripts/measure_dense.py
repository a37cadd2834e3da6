"""Speed of the dense MMD reduction against the GEMM floor and GeomLoss, as ratios in one run.

The GEMM floor is one batched ``(S, G) @ (G, S)`` matmul. Every timed function runs round-robin
(so a neighbour process slows all of them alike); the best and the median of ``--reps`` rounds
are reported (on a shared machine the best is the least disturbed run).
"no-check" calls ``estimate`` directly, skipping the input validation of ``__call__``.

    python benchmarks/scripts/measure_dense.py --batch 8 --cells 256 --genes 2000 --reps 15
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from perturbdiff_core.registry import load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cells", type=int, default=256)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from geomloss import SamplesLoss

    b, s, g = args.batch, args.cells, args.genes
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, s, g, generator=gen)
    y = torch.randn(b, s, g, generator=gen) + 0.1
    lengthscale = float(g) ** 0.5
    ours = {
        "rbf": (load("perturbdiff.estimators", "biased", backend="dense"), load("perturbdiff.kernels", "rbf", lengthscale=lengthscale)),
        "energy": (load("perturbdiff.estimators", "biased", backend="dense"), load("perturbdiff.kernels", "energy")),
    }
    theirs = {
        "rbf": SamplesLoss("gaussian", blur=lengthscale, backend="tensorized"),
        "energy": SamplesLoss("energy", backend="tensorized"),
    }
    xg = x.clone().requires_grad_(True)

    def fwd(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                fn(x, y)
        return run

    def fwd_bwd(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[], None]:
        def run() -> None:
            fn(xg, y).sum().backward()
            xg.grad = None
        return run

    w = torch.full((b, s), 1.0 / s)
    cases: dict[str, Callable[[], None]] = {"floor": lambda: torch.bmm(x, y.transpose(1, 2))}
    for name in ours:
        est, kernel = ours[name]
        mine = lambda a, c, est=est, kernel=kernel: est(a, c, kernel)  # noqa: E731
        unchecked = lambda a, c, est=est, kernel=kernel: est.estimate(a, c, kernel, w, w)  # noqa: E731
        cases[f"ours {name} fwd"] = fwd(mine)
        cases[f"ours {name} fwd no-check"] = fwd(unchecked)
        cases[f"ours {name} fwd+bwd"] = fwd_bwd(mine)
        cases[f"ours {name} fwd+bwd no-check"] = fwd_bwd(unchecked)
        cases[f"geomloss {name} fwd"] = fwd(theirs[name])
        cases[f"geomloss {name} fwd+bwd"] = fwd_bwd(theirs[name])
    times: dict[str, list[float]] = {k: [] for k in cases}
    for fn in cases.values():
        fn()  # warm-up
    for _ in range(args.reps):
        for key, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    best = {k: min(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"B={b} S={s} G={g} float32, {torch.get_num_threads()} threads, {args.reps} rounds")
    print(f"{'':34s} {'best':>9s} {'x floor':>8s} {'median':>9s} {'x floor':>8s}")
    for key in cases:
        print(
            f"{key:34s} {best[key] * 1e3:6.1f} ms {best[key] / best['floor']:8.2f} "
            f"{med[key] * 1e3:6.1f} ms {med[key] / med['floor']:8.2f}"
        )
    for name in ours:
        for mode in ("fwd", "fwd+bwd"):
            for check in ("", " no-check"):
                mine, theirs = f"ours {name} {mode}{check}", f"geomloss {name} {mode}"
                print(
                    f"geomloss / ours{check}, {name} {mode}: best {best[theirs] / best[mine]:.2f}, "
                    f"median {med[theirs] / med[mine]:.2f}"
                )


if __name__ == "__main__":
    main()
