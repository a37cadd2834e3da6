"""Peak extra memory of an exact MMD^2 (forward + backward) with the chunked backend.

Each configuration runs in a fresh subprocess; the peak is the resident-set high-water mark
(``ru_maxrss``) after the backward minus the resident set just before the forward, so it counts
every temporary plus the gradient of ``x`` (an ``S x G`` output), not the inputs.

    python benchmarks/scripts/measure_chunked_memory.py --cells 16384 --genes 2000 --block-size 1024
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time


def _resident_kib() -> int:
    """Current resident set size in KiB (Linux ``/proc/self/status``)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status; this script needs Linux")


def child(cells: int, genes: int, block_size: int, unbiased: bool) -> None:
    import torch

    from perturbdiff_core.registry import load

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, cells, genes, generator=gen).requires_grad_(True)
    y = torch.randn(1, cells, genes, generator=gen) + 0.1
    kernel = load("perturbdiff.kernels", "rbf", lengthscale=float(2 * genes) ** 0.5)
    statistic = "unbiased" if unbiased else "biased"
    estimator = load("perturbdiff.estimators", statistic, backend="chunked", backend_params={"block_size": block_size})
    before = _resident_kib()
    start = time.perf_counter()
    value = estimator(x, y, kernel)
    forward = time.perf_counter() - start
    value.sum().backward()
    total = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    inputs = 2 * x.numel() * x.element_size() / 2**20
    print(
        f"S={cells} G={genes} block={block_size} unbiased={unbiased}: MMD^2={value.item():.6f}, "
        f"peak extra memory {(peak - before) / 1024:.0f} MiB (not counting the inputs x, y: "
        f"{inputs:.0f} MiB; counting the gradient of x: {inputs / 2:.0f} MiB), forward {forward:.1f} s, "
        f"forward+backward {total:.1f} s, "
        f"{torch.get_num_threads()} threads"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[16384])
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--biased", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.cells[0], args.genes, args.block_size, not args.biased)
        return
    for cells in args.cells:
        cmd = [sys.executable, __file__, "--child", "--cells", str(cells), "--genes", str(args.genes), "--block-size", str(args.block_size)]
        subprocess.run(cmd + (["--biased"] if args.biased else []), check=True)


if __name__ == "__main__":
    main()
