"""The trained diffusion model as a :class:`~perturbdiff_core.evaluation.predictors.Predictor`.

For a condition with ``n`` cells to predict, ``ceil(n / S)`` sets are generated, each from its
own random control set of the condition's context (:func:`prediction_conditioning`), and the
first ``n`` cells are kept. Each gene's mean change reads every sampled cell, not only the kept
ones: a condition of 24 cells is settled from the 128 of its set, with a fifth of the sampler's
noise variance in its mean (the change test still asks for a change that shows in ``n`` cells).
The sets are independent draws, which is what population variability metrics need.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ..data import prediction_conditioning
from ..data.batch import Conditioning
from ..data.dataset import Condition, Context, PerturbationData
from ..data.output_space import decode_cells, resolve_output_space
from ..diffusion.model import RKHSDiffusion
from ..errors import InputError
from ..evaluation.predictors import Predictor
from .checkpoint import Checkpoint
from .config import SampleConfig
from .control_noise import ControlShrinkage
from .ensemble import Ensemble
from .levels import CONTEXT_LEVEL_CELLS, mean_of_rows
from .shrinkage import ShiftShrinkage, shrink, wiener

#: Second entry of the seed sequence of :func:`thinning_draws`.
THINNING_STREAM = 1


def _sets(cond: Conditioning, part: slice) -> Conditioning:
    """The sets ``part`` of a conditioning."""
    return cond.map_tensors(lambda t: t[part])


class DiffusionPredictor(Predictor):
    """Samples a condition's cells from a trained :class:`RKHSDiffusion` (the EMA weights when updated).

    Args:
        model: the trained model.
        sample: how to sample and how the sampled changes become cells (the change test and spread,
            decreases and increases, the output space; see :class:`SampleConfig`).
        device: where sampling runs (the model is moved there).
        anchor: the fitted ``model.anchor`` predictor of a model trained with one (see
            :mod:`~perturbdiff_core.runs.anchor`); ``None`` for a model without.
        unseen_context_change: the share of the sampled change kept where the condition's cell type or
            batch was not trained (the run's resolved ``sample.unseen_context_change``, see
            :mod:`~perturbdiff_core.runs.unseen`); trained contexts keep all of it.
        control_shrinkage: the training contexts' control means, towards which the control mean of a
            context training lacked is moved by its estimated share of noise (``sample.control_shrinkage``,
            see :mod:`~perturbdiff_core.runs.control_noise`); ``None`` keeps the observed mean.
        ensemble: the fitted ``sample.ensemble`` predictor whose shift is averaged, with the weight
            ``sample.ensemble_weight``, with the model's mean change where the model extrapolates (see
            :mod:`~perturbdiff_core.runs.ensemble`); ``None`` keeps the model's own.
        shrinkage: the thresholds, in standard errors, at which the anchor's and the ensemble's shifts into
            contexts training lacked are shrunk (the run's resolved ``sample.anchor_shrinkage`` and
            ``sample.ensemble_shrinkage``, see :mod:`~perturbdiff_core.runs.shrinkage`); ``None`` shrinks neither.
        ceiling: ``(G,)`` each gene's highest value in the training cells (``sample.ceiling``, see
            :mod:`~perturbdiff_core.runs.ceiling`), raised to the context's own control cells' where they
            go higher; no predicted value goes above it. ``None``: no cap.

    Build it as a run does (:meth:`~perturbdiff_core.runs.training.Trainer.predictor`) or as ``perturbdiff predict``
    does from a checkpoint (:func:`~perturbdiff_core.runs.prediction.checkpoint_predictor`): both pass every rule
    the run resolved from its training data. :meth:`from_checkpoint` alone passes none of them (the model's own
    samples: on an anchored run, not the run's prediction).

    Example:
        >>> checkpoint = load_checkpoint("runs/kang/checkpoints/last.pt")  # doctest: +SKIP
        >>> predictor = checkpoint_predictor(checkpoint, "cpu", lambda: training_data(checkpoint, data), test, data)  # doctest: +SKIP
        >>> cells = predictor.predict(data, data.condition("stimulated|CD14+Mono"), 300, seed=0)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: RKHSDiffusion,
        sample: SampleConfig | None = None,
        *,
        device: torch.device | str = "cpu",
        anchor: Predictor | None = None,
        unseen_context_change: float = 1.0,
        control_shrinkage: ControlShrinkage | None = None,
        ensemble: Ensemble | None = None,
        shrinkage: ShiftShrinkage | None = None,
        ceiling: Tensor | None = None,
    ) -> None:
        if not 0.0 <= unseen_context_change <= 1.0:
            raise InputError(f"unseen_context_change must be in [0, 1], got {unseen_context_change}.")
        self.sample = SampleConfig() if sample is None else sample
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.anchor = anchor
        self.unseen_context_change = unseen_context_change
        self.control_shrinkage = control_shrinkage
        self.ensemble = ensemble
        self.shrinkage = ShiftShrinkage() if shrinkage is None else shrinkage
        self.ceiling = ceiling
        self._offsets: dict[tuple[PerturbationData, Context], Tensor] = {}  # read each context's controls once
        self._context_means: dict[tuple[PerturbationData, Context], Tensor] = {}

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: Checkpoint,
        sample: SampleConfig | None = None,
        *,
        device: torch.device | str = "cpu",
        anchor: Predictor | None = None,
        control_shrinkage: ControlShrinkage | None = None,
        ensemble: Ensemble | None = None,
        shrinkage: ShiftShrinkage | None = None,
        ceiling: Tensor | None = None,
    ) -> DiffusionPredictor:
        """The predictor of a checkpoint's model, sampling as ``sample`` (default: the run's ``sample`` config;
        its ``unseen_context_change``, when ``auto``, is the value the run resolved from its training data), with
        only the fitted rules passed here (:func:`~perturbdiff_core.runs.prediction.checkpoint_predictor` refits them all)."""
        sample = sample or checkpoint.run_config.sample
        setting = sample.unseen_context_change
        unseen = checkpoint.unseen_context_change if setting == "auto" else float(setting)
        return cls(
            checkpoint.build_model(device), sample, device=device, anchor=anchor, unseen_context_change=unseen,
            control_shrinkage=control_shrinkage, ensemble=ensemble, shrinkage=shrinkage, ceiling=ceiling,
        )

    def predict(self, data: PerturbationData, condition: Condition, n_cells: int, seed: int) -> np.ndarray:
        """``(n_cells, G)`` sampled cells of ``condition``; controls and noise both follow ``seed``."""
        return self.predict_population(data, condition, n_cells, seed, 0)

    @torch.no_grad()
    def predict_population(
        self, data: PerturbationData, condition: Condition, n_cells: int, seed: int, population: int
    ) -> np.ndarray:
        """Population ``population`` of ``condition``: the first is :meth:`predict`'s; where the model
        extrapolates, each later one also moves its genes' mean changes by a draw of the ensemble predictor's
        errors on training conditions held out alike (:mod:`~perturbdiff_core.runs.spread`), the uncertainty
        of the point prediction."""
        size = data.config.set_size
        n_sets = math.ceil(n_cells / size)
        doses = [condition.dose or 0.0] * n_sets if data.config.dose_key is not None else None
        shift = None if self.anchor is None else self.anchor.shift(data, condition)
        cond = prediction_conditioning(
            data, [condition.perturbation] * n_sets, condition.context, set_size=size, doses=doses, seed=seed, shift=shift
        )
        generator = torch.Generator(self.device).manual_seed(seed)
        cfg = self.sample
        space = resolve_output_space(cfg.output_space, cond.control)
        chunks = []
        for start in range(0, n_sets, cfg.chunk_sets):
            part = _sets(cond, slice(start, start + cfg.chunk_sets)).to(self.device)
            sampled = self.model.sample(
                part,
                sampler=cfg.sampler,
                steps=cfg.steps,
                eta=cfg.eta if cfg.sampler == "ddim" else None,
                guidance=cfg.guidance,
                generator=generator,
            )
            chunks.append(sampled.cpu())
        cells, donors = torch.cat(chunks).reshape(-1, data.n_genes), cond.control.reshape(-1, data.n_genes)
        unseen = bool(data.unseen_contexts([condition]))
        kept = self.unseen_context_change if unseen else 1.0
        if kept != 1.0:
            cells = donors + kept * (cells - donors)
        read = self._levels_read(donors) if cfg.decrease in ("fraction", "thinning") else None
        prior = None if shift is None else kept * torch.as_tensor(shift, dtype=cells.dtype)  # the anchor's share kept
        if shift is not None and self.shrinkage.anchor > 0:  # shrunk in an unseen context: the samples move with it
            shrunk = shrink(shift, self.anchor, data, condition, self.shrinkage.anchor, wiener)
            shrunk = kept * torch.as_tensor(shrunk, dtype=cells.dtype)
            cells, prior = cells + shrunk - prior, shrunk
        partner = reach = None
        if self.ensemble is not None and self.ensemble.applies(data, condition):  # the model extrapolates here
            partner = kept * torch.as_tensor(
                self.ensemble.shift(data, condition, self.shrinkage.ensemble), dtype=cells.dtype
            )
            reach = self.ensemble.reach(data, condition)
        lattice = donors  # the control cells as read: the count lattice the cells are decoded onto
        if cfg.control_mean == "context":  # the donors' sampling noise, taken out of every gene
            context_mean = self._context_mean(data, condition.context).to(donors.dtype)
            donors = recentred(donors, context_mean, lattice[:n_cells].mean(0))
            cells = cells + (donors - lattice)
        if unseen and self.control_shrinkage is not None:  # the control mean's noise, taken out of every gene
            offset = self._offset(data, condition.context).to(cells.dtype)
            cells, prior = cells + offset, offset if prior is None else prior + offset
            partner = None if partner is None else partner + offset
        jitter = None
        if population > 0 and self.ensemble is not None and self.ensemble.spreads(data, condition):
            draw = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, population]).generate_state(1)[0]))
            # a stream of its own, not the sampler's; not scaled by ``kept``: it stands for the real change's error
            jitter = self.ensemble.errors.draw(draw).to(cells.dtype)
        # each cell's own change, before it is settled, weighs its new reads (``sample.read_gain: sampled``)
        sampled = cells - donors if cfg.read_gain == "sampled" else None
        cells = settle_changes(
            cells, donors, cfg.change_z, cfg.change_spread, read, prior, partner, cfg.ensemble_weight, jitter,
            test_size=n_cells, reach=reach,
        )
        top = None if self.ceiling is None else torch.maximum(self.ceiling.to(lattice.dtype), lattice.amax(0))
        cells, lattice = cells[:n_cells], lattice[:n_cells]  # settled from every sampled cell, then cut
        if space == "counts":
            rounding = torch.Generator().manual_seed(seed) if cfg.rounding != "nearest" else None
            reads = (rounding or torch.Generator().manual_seed(seed)) if cfg.increase == "reads" else None
            cells = decode_cells(
                cells, lattice, rounding, systematic=cfg.rounding == "systematic", reads=reads, ceiling=top,
                response=None if sampled is None else sampled[:n_cells],
                thinning=thinning_draws(seed) if cfg.decrease == "thinning" else None,
            )
        if space == "continuous" and cfg.nonnegative:
            cells = cells.clamp_min(0.0)
        if space == "continuous" and top is not None:
            cells = torch.minimum(cells, top.to(cells.dtype))
        return cells.numpy().astype(np.float32, copy=False)

    def _context_mean(self, data: PerturbationData, context: Context) -> Tensor:
        """``(G,)`` float64 mean of the context's control cells (at most :data:`CONTEXT_LEVEL_CELLS`), read once."""
        key = (data, context)
        if key not in self._context_means:
            rng = np.random.default_rng(0)
            self._context_means[key] = torch.from_numpy(
                mean_of_rows(data, data.control_cells(context), CONTEXT_LEVEL_CELLS, rng)
            )
        return self._context_means[key]

    def _offset(self, data: PerturbationData, context: Context) -> Tensor:
        """``(G,)``: the :class:`ControlShrinkage` offset of ``context``, computed once per data and context."""
        key = (data, context)
        if key not in self._offsets:
            self._offsets[key] = torch.from_numpy(self.control_shrinkage.offset(data, context))
        return self._offsets[key]

    def _levels_read(self, donors: Tensor) -> Tensor:
        """``(G,)``: the levels the denoiser read of the control cells ``donors`` (their mean, or its hull point)."""
        return self.model.levels_read(donors.mean(0).to(self.device)).cpu()


def thinning_draws(seed: int) -> torch.Generator:
    """The generator of ``sample.decrease: thinning``'s uniforms, a stream of its own: the rounding's is seeded with
    ``seed`` itself, and the next condition's rounding with ``seed + 1``."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, THINNING_STREAM]).generate_state(1)[0]))


def settle_changes(
    cells: Tensor,
    donors: Tensor,
    z: float | None,
    spread: float,
    read_levels: Tensor | None = None,
    prior: Tensor | None = None,
    partner: Tensor | None = None,
    partner_weight: float = 0.0,
    jitter: Tensor | None = None,
    test_size: int | None = None,
    reach: Tensor | None = None,
) -> Tensor:
    r"""``cells`` ``(n, G)`` with each cell's change pulled towards the mean change, and the genes the
    prediction does not change significantly copied from ``donors``.

    Cell ``i`` was sampled from donor ``i`` (the control cell at its place), with change
    :math:`d_{ig} = x_{ig} - c_{ig}` and mean change :math:`\bar d_g`. A gene moves where
    :math:`|\bar d_g| > z\, s_g / \sqrt n` (every gene for ``z = None``); there cell ``i`` becomes
    :math:`c_{ig} + \bar d_g + \text{spread}\,(d_{ig} - \bar d_g)`. Elsewhere it takes the donors'
    values, so a gene the model leaves alone is exactly as real control cells have it (its zeros,
    its counts) instead of carrying the sampler's small errors. The test reads the sampled changes,
    so ``spread`` does not change which genes move. Why pull at all: the sampler's per-cell changes
    vary independently of the donors they are added to, so at ``spread = 1`` the predicted cells
    are more spread than real ones (``sample.change_spread``).

    With ``read_levels`` ``(G,)`` (``sample.decrease: fraction`` or ``thinning``), a gene whose mean change is a
    decrease takes :math:`c_{ig}\,(1 + \max(\bar d_g / r_g, -1))` in place of
    :math:`c_{ig} + \bar d_g`: each cell loses the fraction of its own value that the mean change is
    of the level read, :math:`r_g`. Where the denoiser read the donors' own mean, this keeps the
    mean change and puts it on the cells that express the gene, instead of pushing cells at 0 below
    0 (which clipping then undoes); where it read a hull mixture, the fraction carries to the
    context's own level.

    With ``prior`` ``(G,)``, the anchor's shift the model was sampled around (``model.anchor``), the
    test reads the model's own change beyond it, :math:`|\bar d_g - p_g| > z\, s_g / \sqrt n`, and a
    gene that fails it keeps the anchor's shift, applied as a mean change :math:`p_g` would be (a
    fraction for a decrease), instead of the donors' values: the anchor is a fitted prior, not a
    noisy sample, so the test that guards against sampling noise does not erase it.

    With ``partner`` ``(G,)``, another predictor's shift (``sample.ensemble``), every gene's mean change
    becomes :math:`(1 - w)\,m_g + w\,\text{partner}_g` with :math:`w` = ``partner_weight`` and
    :math:`m_g` what it would have been without (the sampled mean change where the gene moves, else
    the anchor's shift or none); the cells that carry it, and how, stay the model's.

    With ``jitter`` ``(G,)`` (a population drawn after the first, :mod:`~perturbdiff_core.runs.spread`),
    every gene's mean change, as settled so far, moves by it: a gene the test left alone too, as the
    error it stands for may reach any gene.

    With ``test_size``, the test's :math:`n` is that many cells instead of all of ``cells``: the
    predictor settles every sampled cell but keeps fewer, and a change counts where it would show in
    a population of the size it predicts, so sampling more cells sharpens the mean, not the test.

    With ``reach`` ``(G,)`` bool (``sample.response_fdr``, :mod:`~perturbdiff_core.runs.support`), only
    those genes may move; the others are settled as genes that fail the test.
    """
    change = cells - donors
    mean = change.mean(0)
    n = change.shape[0] if test_size is None else test_size
    tested = z is not None and n >= 2
    beyond = mean if prior is None else mean - prior
    moved = beyond.abs() > z * change.std(0) / math.sqrt(n) if tested else torch.ones_like(mean, dtype=torch.bool)
    if reach is not None:
        moved, tested = moved & reach, True
    if partner is not None or jitter is not None:
        target = torch.where(moved, mean, torch.zeros_like(mean) if prior is None else prior)
        if partner is not None:
            target = (1.0 - partner_weight) * target + partner_weight * partner
        if jitter is not None:
            target = target + jitter
        centre = changed_centre(donors, target, read_levels)
        return torch.where(moved, centre + spread * (change - mean), centre)
    if spread == 1.0 and read_levels is None:
        settled = cells
    else:
        settled = changed_centre(donors, mean, read_levels) + spread * (change - mean)
    if not tested:
        return settled
    unmoved = donors if prior is None else changed_centre(donors, prior, read_levels)
    return torch.where(moved, settled, unmoved)


def changed_centre(donors: Tensor, mean: Tensor, read_levels: Tensor | None) -> Tensor:
    """Each donor moved by the mean change ``mean`` ``(G,)``: a shift, or with ``read_levels`` a decrease
    as the fraction ``mean / read_levels`` (at most all) of each donor's own value (:func:`settle_changes`).

    A gene no donor expresses has nothing to lose a fraction of and keeps the shift: its cells go
    below 0, so the per-cell spread added after mostly stays under 0 and is clipped, rather than
    surfacing as expression the donors never had. So does a gene with negative values (data that
    are not non-negative expression, e.g. z-scores), where a fraction of a level means nothing."""
    if read_levels is None:
        return donors + mean
    fraction = (mean / read_levels.clamp_min(torch.finfo(mean.dtype).tiny)).clamp(-1.0, 0.0)
    decrease = (mean < 0) & (donors.amax(0) > 0) & (donors.amin(0) >= 0)
    return torch.where(decrease, donors * (1.0 + fraction), donors + mean)


def recentred(donors: Tensor, target: Tensor, kept_mean: Tensor) -> Tensor:
    """``donors`` moved per gene so that the kept ones' mean ``kept_mean`` becomes ``target``: a rise as a shift, a fall as
    the same fraction of every donor's own value (its zeros stay 0); a gene with negative values always shifts. This is
    :func:`changed_centre` of the difference, with the kept donors' own mean as the level the fraction is of."""
    return changed_centre(donors, target - kept_mean, kept_mean)
