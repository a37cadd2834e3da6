"""The count-lattice decoder: each predicted cell moved onto a real cell's lattice log1p(k u)."""

from __future__ import annotations

import pytest
import torch

from perturbdiff_core.data.output_space import cell_units, decode_cells, on_lattice, resolve_output_space, systematic_ups
from perturbdiff_core.errors import ConfigError, DataError


def lattice_cells(n: int, genes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log1p(k u), u)`` for Poisson counts ``k`` (every cell has a count of 1) and random steps ``u``."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.poisson(torch.full((n, genes), 0.4), generator=g)
    counts[:, 0] = 1.0
    units = torch.rand(n, 1, generator=g, dtype=torch.float64) * 2.0 + 0.1
    return torch.log1p(counts.double() * units).float(), units.squeeze(1)


def test_cell_units_are_the_expm1_of_the_smallest_positive_value() -> None:
    cells, units = lattice_cells(30, 50, seed=0)
    torch.testing.assert_close(cell_units(cells), units, rtol=1e-6, atol=0)
    assert torch.isnan(cell_units(torch.zeros(2, 5))).all()


def test_on_lattice_tells_lattice_data_from_continuous_data() -> None:
    cells, _ = lattice_cells(40, 60, seed=1)
    assert on_lattice(cells)
    noisy = cells + 0.05 * torch.rand(cells.shape, generator=torch.Generator().manual_seed(2)) * (cells > 0)
    assert not on_lattice(noisy)
    assert not on_lattice(torch.zeros(3, 4))


def test_decode_recovers_lattice_values_from_small_errors_and_zeroes_the_rest() -> None:
    donors, units = lattice_cells(20, 40, seed=3)
    g = torch.Generator().manual_seed(4)
    counts = torch.poisson(torch.full((20, 40), 1.5), generator=g).double()
    exact = torch.log1p(counts * units.unsqueeze(1)).float()  # cells on their donors' lattices
    gap = (torch.log1p((counts + 1) * units.unsqueeze(1)) - torch.log1p(counts * units.unsqueeze(1))).float()
    jitter = (torch.rand(exact.shape, generator=g) - 0.5) * 0.4 * gap  # well within half a lattice step
    decoded = decode_cells(exact + jitter, donors)
    torch.testing.assert_close(decoded, exact, rtol=1e-6, atol=1e-6)
    below = (torch.log1p(units / 2) * 0.9).float().unsqueeze(1).expand(20, 40).contiguous()
    assert (decode_cells(below, donors) == 0).all()
    assert (decode_cells(-torch.ones(20, 40), donors) == 0).all()


def test_decode_borrows_the_median_step_for_a_donor_without_counts() -> None:
    donors, units = lattice_cells(5, 10, seed=6)
    donors[2] = 0.0
    median_step = units[[0, 1, 3, 4]].sort().values[1]  # torch's median of 4 values is the lower middle one
    value = torch.log1p(3 * median_step).float()
    decoded = decode_cells(torch.full((5, 10), float(value)), donors)
    torch.testing.assert_close(decoded[2], torch.full((10,), float(value)), rtol=1e-5, atol=1e-5)
    with pytest.raises(DataError, match="one donor per cell"):
        decode_cells(torch.zeros(4, 10), donors)


def test_systematic_ups_keep_each_chance_and_fix_each_genes_count() -> None:
    g = torch.Generator().manual_seed(7)
    up = torch.rand(2, 30, 12, generator=g, dtype=torch.float64) ** 2
    up[0, :, 0] = 0.0  # a gene no value of which may go up
    up[1, :5, 1] = 1.0  # values that must
    draws = torch.stack([systematic_ups(up, g) for _ in range(4000)]).double()
    total = up.sum(-2)
    per_gene = draws.sum(-2)
    assert ((per_gene == total.floor()) | (per_gene == total.ceil())).all()
    assert (draws[:, 0, :, 0] == 0).all() and (draws[:, 1, :5, 1] == 1).all()
    se = (up * (1 - up) / draws.shape[0]).sqrt()
    assert ((draws.mean(0) - up).abs() <= 5 * se + 1e-12).all()  # each value's own chance
    both = (draws[..., 2] * draws[..., 3]).mean(0)  # one cell, two genes: independent draws
    pair_se = (up[..., 2] * up[..., 3] / draws.shape[0]).sqrt()
    assert ((both - up[..., 2] * up[..., 3]).abs() <= 5 * pair_se + 1e-12).all()


@pytest.mark.parametrize("systematic", [False, True])
def test_stochastic_rounding_keeps_each_value_on_average(systematic: bool) -> None:
    donors, units = lattice_cells(25, 8, seed=8)
    cells = torch.rand(25, 8, generator=torch.Generator().manual_seed(9)) * 2.0
    g = torch.Generator().manual_seed(10)
    draws = torch.stack([decode_cells(cells, donors, g, systematic=systematic).double() for _ in range(3000)])
    counts = torch.expm1(draws) / units.view(1, -1, 1)
    assert (counts - counts.round()).abs().max() < 1e-3  # on the donors' lattices
    torch.testing.assert_close(draws.mean(0), cells.double(), rtol=0, atol=0.03)


def test_systematic_rounding_takes_the_rounding_noise_out_of_gene_means() -> None:
    donors, _ = lattice_cells(100, 30, seed=11)
    cells = torch.rand(100, 30, generator=torch.Generator().manual_seed(12)) * 0.6  # mostly below the first step
    g = torch.Generator().manual_seed(13)

    def mean_noise(systematic: bool) -> torch.Tensor:
        means = torch.stack([decode_cells(cells, donors, g, systematic=systematic).double().mean(0) for _ in range(400)])
        return means.std(0)

    independent, systematic = mean_noise(False), mean_noise(True)
    assert (systematic < 0.5 * independent).all()


def test_resolve_output_space() -> None:
    cells, _ = lattice_cells(10, 20, seed=7)
    assert resolve_output_space("auto", cells) == "counts"
    assert resolve_output_space("continuous", cells) == "continuous"
    dense = torch.rand(10, 20) + 0.5
    assert resolve_output_space("auto", dense) == "continuous"
    with pytest.raises(DataError, match="do not lie on a count lattice"):
        resolve_output_space("counts", dense)
    with pytest.raises(ConfigError, match="output_space must be one of"):
        resolve_output_space("lattice", cells)


def test_lattice_counts_are_the_largest_count_at_or_under_each_level() -> None:
    """Against a float64 count-by-count search: the largest ``k`` with ``log1p(k u) <= level``, a point within the
    lattice tolerance above a level counting as under it, so a level stored in float32 gives its point's count."""
    import numpy as np

    from perturbdiff_core.data.output_space import LATTICE_TOLERANCE, lattice_counts

    g = torch.Generator().manual_seed(7)
    levels = torch.rand(12, generator=g, dtype=torch.float64) * 4.0
    units = torch.rand(9, 1, generator=g, dtype=torch.float64) * 2.0 + 0.05
    expected = np.zeros((9, 12))
    for i, u in enumerate(units[:, 0].numpy()):
        for j, level in enumerate(levels.numpy()):
            k = 0
            while np.log1p((k + 1 - LATTICE_TOLERANCE) * u) <= level:
                k += 1
            expected[i, j] = k
    np.testing.assert_array_equal(lattice_counts(levels, units).numpy(), expected)
    stored = torch.log1p(torch.tensor([7.0]) * units[:1]).float().double()  # 7 counts of cell 0, as float32 keeps it
    assert lattice_counts(stored[0], units[:1]).item() == 7.0


@pytest.mark.parametrize("reads", [False, True])
def test_decoded_cells_stay_at_or_under_the_ceiling(reads: bool) -> None:
    """Every decoded value is at most the highest point of its cell's lattice under the gene's ceiling; the
    genes the ceiling does not reach decode as without it, and a capped rise decoded as reads keeps its mean."""
    from perturbdiff_core.data.output_space import LATTICE_TOLERANCE
    donors, units = lattice_cells(200, 8, seed=3)
    g = torch.Generator().manual_seed(4)
    cells = donors + torch.rand(donors.shape, generator=g) * torch.linspace(0.0, 2.5, 8)  # rises, largest last
    ceiling = torch.full((8,), 10.0, dtype=torch.float64)
    ceiling[-2:] = donors[:, -2:].double().amax(0) + 0.3  # two genes capped just above the donors' highest
    def drawn() -> dict:
        return {"reads": torch.Generator().manual_seed(5)} if reads else {}

    free = decode_cells(cells, donors, **drawn())
    capped = decode_cells(cells, donors, ceiling=ceiling, **drawn())
    limit = torch.log1p(torch.floor(torch.expm1(ceiling) / units[:, None] + LATTICE_TOLERANCE) * units[:, None])
    assert (capped.double() <= limit + 1e-6).all()
    assert (free.double() > limit + 1e-6).any()  # the test can fail: without the ceiling some values go higher
    torch.testing.assert_close(capped[:, :-2], free[:, :-2])
    if reads:  # the cap moves the rise to other cells, as far as their room allows
        assert capped[:, -2:].double().mean(0).sub(cells[:, -2:].double().mean(0)).abs().max() < 0.05


def test_decoded_reads_follow_each_cells_sampled_response() -> None:
    """With ``response``, cells whose sampled change over the rising genes is larger gain more reads of them; the
    rising genes' means are met as without it."""
    donors, _ = lattice_cells(400, 6, seed=5)
    cells = donors + 0.8
    response = torch.zeros(400, 6)
    response[:200] = 1.5  # the first half responds three times as strongly as the second
    response[200:] = 0.5
    plain = decode_cells(cells, donors, reads=torch.Generator().manual_seed(1))
    weighted = decode_cells(cells, donors, reads=torch.Generator().manual_seed(1), response=response)
    gain = (weighted - donors).double()
    assert gain[:200].mean() > 2.0 * gain[200:].mean()
    torch.testing.assert_close(weighted.double().mean(0), plain.double().mean(0), atol=0.01, rtol=0)
