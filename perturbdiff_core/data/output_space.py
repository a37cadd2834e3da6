r"""The space predicted cells are written in: the input's count lattice, or plain continuous values.

Log-normalised single-cell data are :math:`x_{cg} = \log(1 + k_{cg} u_c)` with :math:`k_{cg}` an
integer count and :math:`u_c` the cell's size factor (``target_sum / library size``), so every
cell lies on a lattice of its own whose first step, :math:`\log(1 + u_c)`, is its smallest
non-zero value. A diffusion model samples continuous values: without a decoder its cells carry
small positive values where real cells have zeros, detect several times too many genes and make
every gene look differentially expressed. :func:`decode_cells` maps each sampled cell to the
nearest point of a real cell's lattice (:math:`k = \mathrm{round}(\mathrm{expm1}(x) / u)`): the
values a cell of that depth could have had. The lattice step of each predicted cell is taken from
a *donor*, the control cell at the same place of the control set it was sampled from, so only
the target context's control cells inform it, never the real perturbed cells.

Raw counts are the lattice with :math:`u = 1` once ``log1p`` is applied; data that are not on a
lattice (scaled, imputed, integrated) keep their continuous values (see :data:`OUTPUT_SPACES`).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from ..errors import ConfigError, DataError
from .reads import gain_reads, lose_reads, response_weights

OutputSpace = Literal["auto", "counts", "continuous"]
#: ``auto``: ``counts`` when the control cells lie on a count lattice, else ``continuous``;
#: ``counts``: decode onto the donors' lattices; ``continuous``: the sampled values as they are.
OUTPUT_SPACES: tuple[str, ...] = get_args(OutputSpace)

#: Largest distance of ``expm1(x) / u`` from an integer for a value to count as on the lattice
#: (float32 storage of ``log1p`` values of counts up to a few thousand stays well within it).
LATTICE_TOLERANCE = 0.02
#: Share of a context's non-zero control values that must lie on their cells' lattices.
LATTICE_SHARE = 0.98


def cell_units(cells: Tensor) -> Tensor:
    r"""Each cell's lattice step :math:`u_c = \mathrm{expm1}(\min_{g: x_{cg} > 0} x_{cg})`, ``(..., S)``; NaN for a cell without a non-zero value."""
    smallest = torch.where(cells > 0, cells, torch.full_like(cells, float("inf"))).amin(dim=-1)
    return torch.where(torch.isinf(smallest), torch.full_like(smallest, float("nan")), torch.expm1(smallest.double()))


def on_lattice(cells: Tensor) -> bool:
    """Whether at least :data:`LATTICE_SHARE` of the non-zero values of ``cells`` ``(..., S, G)`` are
    ``log1p(k u)`` for an integer ``k`` and their cell's step ``u``."""
    units = cell_units(cells).unsqueeze(-1)
    positive = cells > 0
    if not bool(positive.any()):
        return False
    counts = torch.expm1(cells.double()) / units
    close = (counts - counts.round()).abs() <= LATTICE_TOLERANCE
    return float(close[positive].double().mean()) >= LATTICE_SHARE


def resolve_output_space(space: str, control: Tensor) -> Literal["counts", "continuous"]:
    """``counts`` or ``continuous`` for ``space`` given the control cells ``(..., S, G)`` of the context."""
    if space not in OUTPUT_SPACES:
        raise ConfigError(f"sample.output_space must be one of {', '.join(OUTPUT_SPACES)}, got {space!r}.")
    if space == "continuous":
        return "continuous"
    lattice = on_lattice(control)
    if space == "counts" and not lattice:
        raise DataError(
            "sample.output_space is 'counts' but the control cells do not lie on a count lattice "
            "(log1p of counts times a size factor per cell); use output_space auto or continuous."
        )
    return "counts" if lattice else "continuous"


def systematic_ups(up: Tensor, generator: torch.Generator) -> Tensor:
    r"""Which values go up, ``(..., S, G)`` booleans, each with its probability in ``up`` ``(..., S, G)``,
    drawn per gene by systematic sampling over the ``S`` cells taken in a random order.

    The cells of a gene are shuffled, their probabilities laid end to end, and a value goes up where
    the comb :math:`U + \mathbb{Z}` (one uniform :math:`U` per gene) falls in its stretch: each value
    still goes up with its own probability, but a gene has :math:`\lfloor \sum_i p_i \rfloor` or
    :math:`\lceil \sum_i p_i \rceil` values up, where independent draws scatter around that by
    :math:`\sqrt{\sum_i p_i (1 - p_i)}`. The shuffle, one per gene, puts the (negative) dependence between
    a gene's values on random pairs of cells, not on the same neighbours in every gene.
    """
    order = torch.rand(up.shape, generator=generator, dtype=up.dtype, device=up.device).argsort(dim=-2)
    shuffled = up.gather(-2, order)
    comb = torch.rand(up.shape[:-2] + (1, up.shape[-1]), generator=generator, dtype=up.dtype, device=up.device)
    reach = shuffled.cumsum(-2) + comb
    ups = torch.empty(up.shape, dtype=torch.bool, device=up.device)
    return ups.scatter_(-2, order, torch.floor(reach) > torch.floor(reach - shuffled))


def lattice_counts(levels: Tensor, units: Tensor) -> Tensor:
    """The largest count ``k`` with ``log1p(k u) <= level`` for each of ``levels`` ``(..., G)`` and cell steps ``units``
    ``(..., S, 1)``: ``(..., S, G)`` (a level read from float32 storage counts as the lattice point it rounds from)."""
    return torch.floor(torch.expm1(levels.unsqueeze(-2)) / units + LATTICE_TOLERANCE).clamp_min(0.0)


def decode_cells(
    cells: Tensor,
    donors: Tensor,
    generator: torch.Generator | None = None,
    *,
    systematic: bool = False,
    reads: torch.Generator | None = None,
    ceiling: Tensor | None = None,
    response: Tensor | None = None,
    thinning: torch.Generator | None = None,
) -> Tensor:
    r"""Each cell of ``cells`` ``(..., S, G)`` moved to a point of its donor's count lattice.

    ``donors`` ``(..., S, G)`` are real cells of the same shape (the control set a sampled set
    came from); cell ``i`` takes the step :math:`u` of donor ``i`` (the median step of its set when
    the donor has no non-zero value). Without ``generator`` each value goes to the nearest count
    (values below :math:`\log(1 + u/2)`, negative ones included, become exactly 0). With one, a
    value between the lattice points :math:`L_k = \log(1 + k u)` and :math:`L_{k+1}` goes up with
    probability :math:`(x - L_k) / (L_{k+1} - L_k)`: the decoded value is :math:`x` on average, so
    means over cells (pseudobulk) are kept, small changes included. With ``systematic`` too, the
    values that go up are drawn per gene by :func:`systematic_ups`: the same chance for each value,
    but the count of a gene's values that go up is within one of its expectation, so a gene's mean
    over cells carries next to no rounding noise.

    With ``reads`` (cells ``(n, G)`` only), a gene whose mean over ``cells`` is above its donors'
    is instead decoded as the donors' counts plus new reads that raise its mean as far
    (:func:`~perturbdiff_core.data.reads.gain_reads`, drawn from ``reads``): each cell gains at its
    own rate, so cells at 0 of a gene only some cells express mostly stay there.

    With ``ceiling`` ``(G,)`` (log1p levels), no value goes above the highest point of its cell's lattice
    at or under it; new reads that would then fall short go to the other cells. With ``response``
    ``(n, G)``, each cell's sampled change, the new reads of a cell scale with its mean change over the rising
    genes (:func:`~perturbdiff_core.data.reads.response_weights`).

    With ``thinning`` (cells ``(n, G)`` only), a gene whose mean over ``cells`` (at least 0 each) is below its
    donors' is decoded as the donors' counts thinned until its mean falls as far
    (:func:`~perturbdiff_core.data.reads.lose_reads`).
    """
    if cells.shape != donors.shape:
        raise DataError(f"decode_cells needs one donor per cell: cells {tuple(cells.shape)}, donors {tuple(donors.shape)}.")
    units = cell_units(donors)
    fallback = units.nanmedian(dim=-1, keepdim=True).values.expand_as(units)
    units = torch.where(torch.isnan(units), fallback, units).unsqueeze(-1)
    if bool(torch.isnan(units).any()):
        raise DataError("Cannot decode onto a count lattice: a control set has no non-zero value at all.")
    values = cells.double().clamp_min(0.0)
    if generator is None:
        counts = torch.floor(torch.expm1(values) / units + 0.5)
    else:
        below = torch.floor(torch.expm1(values) / units)
        low, high = torch.log1p(below * units), torch.log1p((below + 1) * units)
        up = ((values - low) / (high - low)).clamp(0.0, 1.0)
        if systematic:
            ups = systematic_ups(up, generator)
        else:
            ups = torch.rand(up.shape, generator=generator, dtype=up.dtype, device=up.device) < up
        counts = below + ups
    caps = None if ceiling is None else lattice_counts(ceiling.double(), units)
    if caps is not None:
        counts = torch.minimum(counts, caps)
    decoded = torch.log1p(counts * units)
    if reads is None and thinning is None:
        return decoded.to(cells.dtype)
    if cells.dim() != 2:
        raise DataError(f"decode_cells with reads or thinning needs (cells, genes); got {tuple(cells.shape)}.")
    donor_counts = torch.round(torch.expm1(donors.double()) / units)
    donor_mean = donors.double().mean(0)
    rising = cells.double().mean(0) > donor_mean
    if reads is not None and bool(rising.any()):
        limit = None if caps is None else caps[:, rising]
        weights = None if response is None else response_weights(response[:, rising])
        decoded[:, rising] = gain_reads(
            donor_counts[:, rising], units, cells.double().mean(0)[rising], reads, limit, weights
        )
    falling = values.mean(0) < donor_mean  # as decoded: a fall below 0 is no fall
    if thinning is not None and bool(falling.any()):
        decoded[:, falling] = lose_reads(donor_counts[:, falling], units, values.mean(0)[falling], thinning)
    return decoded.to(cells.dtype)
