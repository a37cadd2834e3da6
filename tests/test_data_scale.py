"""Backed reading keeps the loader's peak memory flat when the file grows tenfold."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from perturbdiff_core.data.synthetic import synthetic_screen

#: Cells of the shared norman19 file: the 1x size.
BASE_CELLS = 6_000

#: Iterates the loader over a file and prints the peak resident memory (KiB) of the process.
SCRIPT = textwrap.dedent(
    """
    import re, sys
    from perturbdiff_core.data import DataConfig, PerturbationData, make_loader

    path, backed, n_batches = sys.argv[1], sys.argv[2] == "backed", int(sys.argv[3])
    data = PerturbationData(path, DataConfig(cell_type_key="cell_type", backed=backed)).fit()
    loader = make_loader(data, [c.label for c in data.perturbed_conditions], batch_size=8, set_size=256)
    seen = 0
    while seen < n_batches:
        for batch in loader:
            assert batch.target.shape == (8, 256, 500)
            seen += 1
            if seen == n_batches:
                break
    with open("/proc/self/status") as status:  # VmHWM: peak RSS of this program (ru_maxrss keeps the parent's)
        print(re.search(r"VmHWM:\\s+(\\d+) kB", status.read()).group(1))
    """
)


def _peak_mib(runs: list[tuple[str, str]], n_batches: int = 5) -> list[float]:
    """Peak RSS (MiB) of the script on each ``(path, mode)``, run side by side (it is memory, not time)."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SCRIPT, path, mode, str(n_batches)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for path, mode in runs
    ]
    peaks = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        peaks.append(int(out.split()[-1]) / 1024)
    return peaks


@pytest.mark.slow
def test_backed_loader_peak_memory_is_flat_at_ten_times_the_cells(tmp_path):
    paths = {}
    for scale in (1, 10):
        adata = synthetic_screen(
            BASE_CELLS * scale,
            500,
            perturbations=[f"p{i}" for i in range(16)],
            cell_types=("t1", "t2", "t3", "t4"),
            seed=scale,
        )
        paths[scale] = str(tmp_path / f"screen_{scale}x.h5ad")
        adata.write_h5ad(paths[scale])
        matrix_mib = (adata.X.data.nbytes + adata.X.indices.nbytes) / 2**20 if scale == 10 else 0
        del adata
    small, large, in_memory = _peak_mib([(paths[1], "backed"), (paths[10], "backed"), (paths[10], "memory")])
    assert large < 1.3 * small + 20, f"backed peak grew from {small:.0f} MiB to {large:.0f} MiB"
    # the same measurement does see a file that is loaded: the in-memory run holds the 10x matrix
    assert in_memory > large + 0.5 * matrix_mib, f"in-memory {in_memory:.0f} MiB, backed {large:.0f} MiB"
