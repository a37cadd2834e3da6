"""The Poisson quantiles behind new reads (:func:`~perturbdiff_core.data.reads.gain_reads`).

SciPy's ``poisson.ppf`` inverts the CDF numerically for every entry;
:func:`~perturbdiff_core.data.reads.poisson_quantiles` steps from a Cornish-Fisher guess with the exact CDF.
Both time the same 200 cells x 1000 genes of small means (gamma-distributed, as new reads per cell mostly
are) and first check that they give the same quantiles. Compare the two rows of the ``poisson-quantiles`` group::

    OMP_NUM_THREADS=1 pytest benchmarks/bench_reads.py --benchmark-only --benchmark-columns=median,rounds
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from perturbdiff_core.data.reads import poisson_quantiles

CELLS, GENES = 200, 1000


@pytest.fixture(scope="module")
def draws() -> tuple[np.ndarray, np.ndarray]:
    """Uniforms in (0, 1) and Poisson means of a gene-by-cell block of new reads."""
    rng = np.random.default_rng(0)
    uniforms = np.maximum(rng.random((CELLS, GENES)), np.finfo(np.float64).tiny)
    means = rng.gamma(0.5, 2.0, (CELLS, GENES))
    return uniforms, means


@pytest.mark.parametrize("method", ["scipy_ppf", "poisson_quantiles"])
def test_poisson_quantiles(benchmark, draws, method):
    uniforms, means = draws
    run = stats.poisson.ppf if method == "scipy_ppf" else poisson_quantiles
    np.testing.assert_array_equal(run(uniforms, means), stats.poisson.ppf(uniforms, means))
    benchmark.group = "poisson-quantiles"
    benchmark.extra_info.update(method=method, cells=CELLS, genes=GENES)
    benchmark.pedantic(run, args=(uniforms, means), rounds=5, warmup_rounds=1)
