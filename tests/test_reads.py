"""Increases as new reads: the gamma-Poisson posterior rates against a float64 NumPy formula, the
bisected fold meeting each gene's target mean on the lattice, and decode_cells using them; decreases as
thinned reads: binomial against SciPy, each gene at the nearest reachable mean."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from perturbdiff_core.data import reads
from perturbdiff_core.data.output_space import decode_cells
from perturbdiff_core.data.reads import gain_reads, lose_reads, posterior_rates
from perturbdiff_core.errors import DataError


def negative_binomial_cells(n: int = 400, genes: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Counts ``(n, genes)`` from gamma-Poisson rates (shapes 0.2 to 20: patchy to even) and steps ``(n, 1)``."""
    rng = np.random.default_rng(seed)
    units = rng.uniform(0.2, 0.6, size=(n, 1))
    shapes = np.geomspace(0.2, 20.0, genes)
    rates = rng.gamma(shapes, 1.0 / shapes, size=(n, genes)) * 0.8  # mean normalised rate 0.8
    return rng.poisson(rates / units).astype(np.float64), units


def test_posterior_rates_follow_the_gamma_poisson_formula() -> None:
    counts, units = negative_binomial_cells()
    counts[:, -1] = 0.0  # a gene no cell expresses
    level = counts * units
    mean = level.mean(0)
    shape = np.clip(mean**2 / np.maximum(level.var(0) - mean * units.mean(), 1e-300), 1e-3, 1e6)
    expected = (shape + counts) / (shape / np.where(mean > 0, mean, 1.0) + 1.0 / units)
    expected[:, -1] = 1.0
    rates = posterior_rates(torch.from_numpy(counts), torch.from_numpy(units)).numpy()
    np.testing.assert_allclose(rates, expected, rtol=1e-12)
    patchy = rates[:, 0]  # the smallest shape: a cell at 0 has a low rate, an expressing one a high one
    assert patchy[counts[:, 0] == 0].mean() < 0.5 * patchy[counts[:, 0] > 0].mean()


def test_new_reads_raise_each_gene_to_its_target_mean_on_the_lattice() -> None:
    counts, units = negative_binomial_cells(seed=1)
    before = np.log1p(counts * units).mean(0)
    targets = before + np.linspace(0.05, 1.0, counts.shape[1])
    values = gain_reads(
        torch.from_numpy(counts), torch.from_numpy(units), torch.from_numpy(targets), torch.Generator().manual_seed(3)
    ).numpy()
    new_counts = np.expm1(values) / units
    np.testing.assert_allclose(new_counts, np.round(new_counts), atol=1e-6)  # on each cell's lattice
    assert (np.round(new_counts) >= counts).all()  # reads are only added
    np.testing.assert_allclose(values.mean(0), targets, atol=5e-3)  # the fold meets the target
    gained = np.round(new_counts) - counts
    assert gained[counts[:, 0] == 0, 0].mean() < 0.5 * gained[counts[:, 0] > 0, 0].mean()  # patchy gene
    again = gain_reads(
        torch.from_numpy(counts), torch.from_numpy(units), torch.from_numpy(targets), torch.Generator().manual_seed(3)
    ).numpy()
    np.testing.assert_array_equal(values, again)


def test_poisson_quantiles_equal_scipys_from_the_tails_to_large_means() -> None:
    """Reference: SciPy's ``poisson.ppf``, on means from 0 to 1e4 and uniforms down to 1e-300 and up to 1 - 1e-13."""
    rng = np.random.default_rng(11)
    means = np.exp(rng.uniform(np.log(1e-5), np.log(1e4), 60_000))
    means[:300] = 0.0
    uniforms = rng.random(60_000)
    uniforms[300:600] = 10.0 ** rng.uniform(-300, -5, 300)
    uniforms[600:900] = 1.0 - 10.0 ** rng.uniform(-13, -5, 300)
    uniforms = np.maximum(uniforms, np.finfo(np.float64).tiny)
    quantiles = reads.poisson_quantiles(uniforms, means)
    np.testing.assert_array_equal(quantiles, stats.poisson.ppf(uniforms, means))
    assert quantiles.max() > 1e4 and (quantiles[:300] == 0).all()


def test_the_bisection_drawing_only_open_cells_equals_one_drawing_every_cell() -> None:
    """Reference: bisect the fold drawing every cell's Poisson quantile each time (same uniforms)."""
    from scipy import stats

    from perturbdiff_core.data.reads import BISECTION_STEPS, GROWTH_STEPS

    counts, units = negative_binomial_cells(n=150, genes=8, seed=4)
    counts[:, 0] = 0.0
    targets = np.log1p(counts * units).mean(0) + np.linspace(0.02, 2.0, 8)
    values = gain_reads(
        torch.from_numpy(counts), torch.from_numpy(units), torch.from_numpy(targets), torch.Generator().manual_seed(5)
    ).numpy()
    uniforms = torch.rand(counts.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).numpy()
    per_fold = posterior_rates(torch.from_numpy(counts), torch.from_numpy(units)).numpy() / units

    def raised(fold: np.ndarray) -> np.ndarray:
        return np.log1p((counts + stats.poisson.ppf(uniforms, (fold - 1.0) * per_fold)) * units)

    low, high = np.ones(8), np.full(8, 2.0)
    for _ in range(GROWTH_STEPS):
        short = raised(high).mean(0) < targets
        if not short.any():
            break
        high = np.where(short, 2 * high, high)
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        below = raised(middle).mean(0) < targets
        low, high = np.where(below, middle, low), np.where(below, high, middle)
    reach_low, reach_high = raised(low), raised(high)
    nearer_low = np.abs(reach_low.mean(0) - targets) < np.abs(reach_high.mean(0) - targets)
    np.testing.assert_allclose(values, np.where(nearer_low, reach_low, reach_high), rtol=0, atol=1e-12)


def test_each_gene_ends_at_the_reachable_mean_nearest_its_target() -> None:
    """Whole reads move a gene's mean in steps: a target under half the first step adds nothing, and
    over many small targets the reached means are not biased upwards (the bracket's upper end would be)."""
    counts, units = negative_binomial_cells(n=60, genes=200, seed=6)
    before = np.log1p(counts * units).mean(0)
    rng = np.random.default_rng(7)
    one_read = (np.log1p((counts + 1) * units) - np.log1p(counts * units)).min(0) / counts.shape[0]  # smallest step
    tiny = before + 0.4 * one_read
    values = gain_reads(torch.from_numpy(counts), torch.from_numpy(units), torch.from_numpy(tiny), torch.Generator().manual_seed(8))
    np.testing.assert_allclose(values.numpy(), np.log1p(counts * units), rtol=0, atol=1e-12)  # no read is nearest
    targets = before + rng.uniform(0.0, 0.05, counts.shape[1])
    reached = gain_reads(
        torch.from_numpy(counts), torch.from_numpy(units), torch.from_numpy(targets), torch.Generator().manual_seed(9)
    ).numpy().mean(0)
    errors = reached - targets
    assert abs(errors.mean()) < 0.25 * np.abs(errors).mean()  # as often below the target as above it
    assert (errors < 0).sum() > 0.3 * errors.size


def test_decode_with_reads_changes_only_the_genes_that_rise() -> None:
    counts, units = negative_binomial_cells(n=200, seed=2)
    donors = torch.from_numpy(np.log1p(counts * units)).float()
    cells = donors + torch.tensor([0.3, -0.2, 0.0, 0.5, -0.1, 0.0])  # genes 0 and 3 rise
    plain = decode_cells(cells, donors, torch.Generator().manual_seed(0))
    with_reads = decode_cells(cells, donors, torch.Generator().manual_seed(0), reads=torch.Generator().manual_seed(1))
    torch.testing.assert_close(with_reads[:, [1, 2, 4, 5]], plain[:, [1, 2, 4, 5]], rtol=0, atol=0)
    assert not torch.equal(with_reads[:, [0, 3]], plain[:, [0, 3]])
    torch.testing.assert_close(with_reads[:, [0, 3]].double().mean(0), cells[:, [0, 3]].double().mean(0), rtol=0, atol=1e-2)
    assert (with_reads[:, [0, 3]] >= donors[:, [0, 3]] - 1e-6).all()
    with pytest.raises(DataError, match=r"needs \(cells, genes\)"):
        decode_cells(cells[None], donors[None], reads=torch.Generator())


def test_a_limit_stops_each_cell_and_the_others_make_up_the_rise() -> None:
    """With ``limit`` no cell's count passes it (cells above it already keep theirs), reads are only added, and
    the mean still meets a target the limit leaves reachable."""
    counts, units = negative_binomial_cells(seed=2)
    before = np.log1p(counts * units).mean(0)
    targets = before + 1.0
    limit = np.maximum(counts, np.floor(np.expm1(before + 2.0) / units))  # room for every cell to reach the target
    generator = torch.Generator().manual_seed(6)
    free = gain_reads(torch.from_numpy(counts), torch.from_numpy(units), torch.from_numpy(targets), generator).numpy()
    capped = gain_reads(
        torch.from_numpy(counts), torch.from_numpy(units), torch.from_numpy(targets), torch.Generator().manual_seed(6),
        torch.from_numpy(limit),
    ).numpy()
    new_counts = np.round(np.expm1(capped) / units)
    assert (new_counts <= limit).all() and (new_counts >= counts).all()
    assert (np.round(np.expm1(free) / units) > limit).any()  # the limit binds somewhere without it
    np.testing.assert_allclose(capped.mean(0), targets, atol=5e-3)


def test_a_target_beyond_every_cells_limit_ends_with_every_cell_at_it() -> None:
    """No fold reaches further once every cell is at its limit: the gene ends there, finite (SciPy's Poisson quantile
    of a mean past about 1e12 is NaN, which a fold doubled until the target is met would reach)."""
    counts, units = negative_binomial_cells(seed=3)
    limit = counts + 2.0
    targets = np.log1p(limit * units).mean(0) + 0.5  # out of reach
    values = gain_reads(
        torch.from_numpy(counts), torch.from_numpy(units), torch.from_numpy(targets), torch.Generator().manual_seed(1),
        torch.from_numpy(limit),
    ).numpy()
    assert np.isfinite(values).all()
    np.testing.assert_allclose(values, np.log1p(limit * units), rtol=1e-12)


def test_response_weights_are_each_cells_mean_change_over_the_populations() -> None:
    """Closed form ``max(mean_i / mean, 0.1)``; all 1 when the population's mean change is not positive."""
    from perturbdiff_core.data.reads import MIN_RESPONSE_WEIGHT, response_weights

    changes = torch.tensor([[0.2, 0.4], [0.6, 0.8], [-0.3, -0.5], [0.0, 1.0]], dtype=torch.float64)
    means = changes.mean(1).numpy()
    expected = np.maximum(means / means.mean(), MIN_RESPONSE_WEIGHT)[:, None]
    np.testing.assert_allclose(response_weights(changes).numpy(), expected, rtol=1e-12)
    np.testing.assert_array_equal(response_weights(-changes.abs()).numpy(), np.ones((4, 1)))


def test_weighted_cells_gain_in_proportion_and_the_target_is_still_met() -> None:
    """Cells weighted 3 gain about three times the reads of cells weighted 1 at the same rate; the mean meets the target."""
    counts, units = negative_binomial_cells(n=600, seed=4)
    counts[:], units[:] = 2.0, 0.5  # every cell alike but for its weight
    weights = np.where(np.arange(600) % 2 == 0, 3.0, 1.0)[:, None]
    targets = np.log1p(counts * units).mean(0) + 0.6
    values = gain_reads(
        torch.from_numpy(counts), torch.from_numpy(units), torch.from_numpy(targets), torch.Generator().manual_seed(2),
        weights=torch.from_numpy(weights),
    ).numpy()
    gained = np.round(np.expm1(values) / units) - counts
    ratio = gained[weights[:, 0] == 3.0].mean(0) / gained[weights[:, 0] == 1.0].mean(0)
    np.testing.assert_allclose(ratio, 3.0, rtol=0.15)
    np.testing.assert_allclose(values.mean(0), targets, atol=5e-3)


def test_thinning_keeps_each_read_with_one_chance_per_gene() -> None:
    """Cells with the same count end binomial: thinned to a quarter of its mean log1p value, a gene of 4 reads per
    cell keeps Binomial(4, q) of them, q fixed by the mean (SciPy's binomial, float64)."""
    n, units = 20000, np.full((20000, 1), 0.5)
    counts = np.full((n, 1), 4.0)
    target = 0.25 * np.log1p(4.0 * 0.5)
    kept = lose_reads(torch.from_numpy(counts), torch.from_numpy(units), torch.tensor([target]), torch.Generator().manual_seed(0))
    kept_reads = np.round(np.expm1(kept.numpy()[:, 0]) / 0.5)
    levels = np.log1p(np.arange(5) * 0.5)
    grid = np.linspace(0.0, 1.0, 100001)
    q = grid[np.argmin(np.abs(stats.binom.pmf(np.arange(5)[:, None], 4, grid).T @ levels - target))]
    observed = np.bincount(kept_reads.astype(int), minlength=5) / n
    np.testing.assert_allclose(observed, stats.binom.pmf(np.arange(5), 4, q), atol=0.01)
    assert abs(kept.numpy().mean() - target) <= (levels[1] - levels[0]) / n


def test_thinned_genes_end_at_the_reachable_mean_nearest_their_target() -> None:
    """Reads only go, onto the lattice; each gene ends within half a read's step of its target (the nearer of the
    two reachable means around it), as often above as below; a target at the current mean keeps every read, 0 none."""
    counts, units = negative_binomial_cells(n=80, genes=200, seed=3)
    counts[:, -1] = 0.0  # a gene without reads, last: nothing to thin
    before = np.log1p(counts * units).mean(0)
    targets = before * np.random.default_rng(4).uniform(0.0, 1.0, counts.shape[1])
    targets[0], targets[1] = before[0], 0.0
    values = lose_reads(
        torch.from_numpy(counts), torch.from_numpy(units), torch.from_numpy(targets), torch.Generator().manual_seed(4)
    ).numpy()
    kept = np.round(np.expm1(values) / units)
    np.testing.assert_allclose(np.expm1(values) / units, kept, rtol=0, atol=1e-9)
    assert (kept <= counts).all()
    np.testing.assert_allclose(values[:, 0], np.log1p(counts[:, 0] * units[:, 0]), rtol=0, atol=1e-12)
    assert (values[:, 1] == 0).all()
    errors = values.mean(0) - targets
    largest_step = np.log1p(units).max() / counts.shape[0]  # a cell's first read moves the mean the most
    assert (np.abs(errors) <= largest_step / 2 + 1e-12).all()
    assert abs(errors.mean()) < 0.25 * np.abs(errors).mean() and (errors < 0).sum() > 0.3 * errors.size


def test_decode_with_thinning_changes_only_the_genes_that_fall() -> None:
    counts, units = negative_binomial_cells(n=300, seed=5)
    counts[:, 2] = 1.0  # every cell has a count of 1, so its lattice step is its unit
    donors = torch.from_numpy(np.log1p(counts * units)).float()
    cells = (donors * torch.tensor([1.0, 0.5, 1.0, 1.0, 0.3, 1.0])).clamp_min(0.0) + torch.tensor([0.3, 0, 0, 0, 0, 0])
    plain = decode_cells(cells, donors, torch.Generator().manual_seed(0))
    thinned = decode_cells(cells, donors, torch.Generator().manual_seed(0), thinning=torch.Generator().manual_seed(1))
    torch.testing.assert_close(thinned[:, [0, 2, 3, 5]], plain[:, [0, 2, 3, 5]], rtol=0, atol=0)
    torch.testing.assert_close(thinned[:, [1, 4]].double().mean(0), cells[:, [1, 4]].double().mean(0), rtol=0, atol=1e-2)
    assert (thinned[:, [1, 4]] <= donors[:, [1, 4]] + 1e-6).all()
    fewer = (thinned[:, [1, 4]] == 0).double().mean(0) - (plain[:, [1, 4]] == 0).double().mean(0)
    assert (fewer > 0).all()  # thinning takes the cells with few reads to 0, scaling keeps them detected
    with pytest.raises(DataError, match=r"needs \(cells, genes\)"):
        decode_cells(cells[None], donors[None], thinning=torch.Generator())


def test_thinning_in_blocks_of_genes_draws_as_in_one(monkeypatch) -> None:
    """Genes thinned in blocks of a few reads (one gene beyond the block size alone) give the cells one block gives."""
    counts, units = negative_binomial_cells(n=120, genes=12, seed=8)
    targets = torch.from_numpy(np.log1p(counts * units).mean(0) * 0.4)
    whole = lose_reads(torch.from_numpy(counts), torch.from_numpy(units), targets, torch.Generator().manual_seed(9))
    monkeypatch.setattr(reads, "READS_PER_BLOCK", int(counts.sum(0).max()) // 2)
    blocks = lose_reads(torch.from_numpy(counts), torch.from_numpy(units), targets, torch.Generator().manual_seed(9))
    torch.testing.assert_close(blocks, whole, rtol=0, atol=0)
