"""The configuration of a run (``perturbdiff train`` / ``run``): small typed dataclasses from YAML.

Resolution order: the defaults below, then the YAML file, then ``--set key=value`` overrides
(values parsed as YAML). Unknown keys list the valid ones; ill-typed values name the key.
The resolved tree is written to the run folder as ``config.yaml``, so a run can be repeated
from that file alone.

A relative ``data.path`` that does not exist is also looked up by its file name in the shared
data folder (``$PERTURBDIFF_DATA`` when set, else ``../shared/data`` beside the source tree),
so the bundled configs (``data.path: ../shared/data/<file>``) run from any folder.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from ..configuration import assign, check_ranges, from_mapping, merge, parse_overrides, read_yaml, to_mapping
from ..constraints import HalfOpenUnit, NonNegative, Positive, Range, UnitInterval
from ..data.anndata_io import DATA_ENV, shared_data_dir
from ..data.config import DataConfig, SplitConfig
from ..errors import ConfigError, DataError, UnknownPluginError, first_line
from ..io import atomic_write_text
from ..names import CONFIG_FILE as CONFIG_FILE
from ..names import PLUGINS_FILE as PLUGINS_FILE
from ..names import RUNS_DIR
from ..registry import PluginSpec
from .anchor import AUTO_ANCHOR, NO_ANCHOR, check_anchor
from .ensemble import check_ensemble
from .folder import RunDir

#: Config keys that name plug-ins (``evaluate.baselines`` a list of them), with their entry-point groups.
PLUGIN_KEYS: dict[str, str] = {
    "model.denoiser": "perturbdiff.denoisers",
    "model.schedule": "perturbdiff.schedules",
    "model.kernel": "perturbdiff.kernels",
    "model.estimator": "perturbdiff.estimators",
    "model.anchor": "perturbdiff.predictors",
    "data.encoder": "perturbdiff.encoders",
    "evaluate.kernel": "perturbdiff.kernels",
    "evaluate.baselines": "perturbdiff.predictors",
}


@dataclass
class ModelConfig:
    """The diffusion model (``model.*``): plug-in names with their parameters, and the loss weights.

    Attributes:
        denoiser: ``perturbdiff.denoisers`` plug-in (``cross_dit``, ``deepsets``, ...).
        denoiser_params: the denoiser's size parameters (``size``: ``tiny``, ``small`` or ``paper``;
            ``hidden``, ``depth``, ``heads``, ...); the data dimensions are filled in from the data.
        schedule: ``perturbdiff.schedules`` plug-in (``cosine``, ``linear``, ``power_cosine``).
        schedule_params: the schedule's keyword arguments.
        kernel: ``perturbdiff.kernels`` plug-in of the MMD term (``energy``, as in the paper, ``rbf``,
            ``matern32``, ...; ``perturbdiff plugins`` lists them).
        kernel_params: the kernel's keyword arguments (e.g. ``lengthscale: median`` or a number).
        estimator: ``perturbdiff.estimators`` plug-in, the statistic (``unbiased``, ``biased``, ...).
        estimator_params: the estimator's keyword arguments; for ``unbiased`` and ``biased``,
            ``backend`` (``auto``, ``dense``, ``chunked``, ``keops``) and ``backend_params``; for
            ``embedding`` (random features), ``embedding`` (``rff``, ``nystrom``), ``unbiased`` and
            the map's own (``num_features``, ``seed``, ...).
        mmd_weight: the paper's lambda: loss = MSE + lambda * MMD^2; 0 trains on the MSE alone.
        prediction: what the denoiser outputs: ``x0`` (the paper's), ``eps``, ``v``, or ``edm`` (x0
            preconditioned by the per-gene data scale).
        self_condition_prob: probability that a training step feeds the network its own x0 estimate
            (self-conditioning); 0 disables it in training and sampling.
        cond_drop_prob: probability that a training set's perturbation encoding is zeroed, so the
            network also learns the null condition of classifier-free guidance (``sample.guidance``).
        ema_decay: decay of the exponential moving average of the weights used for sampling;
            ``null`` keeps no average.
        relative_to_control: the older spelling of ``anchor: control`` (used when ``anchor`` is
            ``none`` or ``auto``).
        anchor: ``none``, a ``perturbdiff.predictors`` plug-in (``control``, ``context_mean``,
            ``context_fold``, ``linear``, ...), or ``auto``: ``context_fold`` where the test holds contexts training
            lacks (a held-out cell type, replicate, donor or patient) whose response the trained
            contexts' carries (leave-one-context-out factor at least 0.5), else ``none`` (see
            :mod:`~perturbdiff_core.runs.anchor`).
            With an anchor the model diffuses each set relative to its control set's mean plus the
            anchor's predicted shift, and adds it back when sampling.
        origin: ``cell`` (each target cell is diffused as a change of the control cell at its place,
            plus the anchor's shift when there is one, so predicted cells keep real cells' zeros
            and counts where nothing changes) or ``set`` (one origin per set: the control mean plus
            the anchor's shift with an anchor, none without).
        control_levels: what the denoiser reads of the control cells and templates: ``centred`` on
            each set's origin (only the variation within the set), ``absolute`` (their expression
            levels, which tell cell types apart), ``hull`` (their levels with the set's mean moved to
            the nearest mixture of the training contexts' control means, so a held-out context reads
            as the trained ones nearest it), or ``auto``: ``hull`` where the test has contexts
            training lacks and the training contexts' means explain at least 25% of each one's
            (a held-out cell type of a tissue), ``centred`` otherwise (measured in docs/defaults.md).
    """

    denoiser: str = "cross_dit"
    denoiser_params: dict[str, Any] = field(default_factory=lambda: {"size": "tiny"})
    schedule: str = "cosine"
    schedule_params: dict[str, Any] = field(default_factory=dict)
    kernel: str = "energy"
    kernel_params: dict[str, Any] = field(default_factory=dict)
    estimator: str = "unbiased"
    estimator_params: dict[str, Any] = field(default_factory=dict)
    mmd_weight: Annotated[float, NonNegative] = 1.0
    prediction: Literal["x0", "eps", "v", "edm"] = "x0"
    self_condition_prob: Annotated[float, UnitInterval] = 0.5
    cond_drop_prob: Annotated[float, UnitInterval] = 0.1
    ema_decay: Annotated[float | None, HalfOpenUnit] = 0.999
    relative_to_control: bool = False
    anchor: str = AUTO_ANCHOR
    origin: Literal["set", "cell"] = "cell"
    control_levels: Literal["auto", "centred", "absolute", "hull"] = "auto"

    @property
    def anchor_name(self) -> str:
        """The anchor asked for: ``anchor``, or ``control`` for ``relative_to_control: true`` with ``anchor``
        ``none`` or ``auto`` (``auto`` is resolved once the data are read: :func:`~.anchor.resolve_anchor`)."""
        return "control" if self.anchor in (NO_ANCHOR, AUTO_ANCHOR) and self.relative_to_control else self.anchor


@dataclass
class TrainConfig:
    """Optimisation (``train.*``): AdamW with linear warm-up then cosine decay to 0, clipped gradients.

    Attributes:
        steps: optimizer steps; ``batch_size`` sets of ``data.set_size`` cells per step.
        batch_size: sets per step (the global batch under torchrun).
        lr: peak learning rate of AdamW.
        weight_decay: AdamW's decoupled weight decay.
        warmup_steps: steps of linear learning-rate warm-up before the cosine decay to 0.
        grad_clip: largest global gradient norm (``None``: no clipping).
        context_drop_prob: probability that a training set's cell type (and, independently, its
            batch) is replaced by ``<unknown>``, the index a held-out cell type or batch gets, so
            the model learns to predict unseen contexts from their control cells. ``auto``: 0.2 when
            a test condition's cell type or batch is not in training, else 0 (see
            :func:`~perturbdiff_core.runs.training.resolve_context_drop`).
        num_workers: DataLoader worker processes (batches are identical for any number); ``auto``:
            none on a CPU, up to 4 per process on a GPU (see :func:`~perturbdiff_core.runs.training.resolve_workers`).
        val_every: steps between validation MMDs on the split's validation conditions (0: never).
        val_sets: fixed sets per validation condition.
        val_sampling_steps: DDIM steps per validation sample.
        checkpoint_every: steps between checkpoints (``checkpoints/last.pt``; also written at the end).
        log_every: steps per row of ``train_log.csv`` (the mean of those steps' losses).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``, ...
        threads: CPU threads torch computes with; ``auto``: ``OMP_NUM_THREADS`` when set, else
            the CPUs this process may use (see :mod:`~perturbdiff_core.threads`). On a machine shared
            with other jobs, 1 is often the fastest for the tiny model.
        objective: ``conditional`` (perturbed sets from their controls) or ``marginal``
            (pre-training on control cells alone, perturbation zeroed; see :mod:`perturbdiff_core.runs.pretraining`).
        init_from: a run folder or checkpoint whose weights start this run (genes and vocabularies
            aligned by name, see :mod:`perturbdiff_core.runs.transfer`); ``steps`` may then be 0 (zero-shot).
        init_genes: ``pad`` (the data's genes; genes new to the checkpoint start fresh) or
            ``intersect`` (only the data's genes the checkpoint also has).
    """

    steps: Annotated[int, NonNegative] = 2000
    batch_size: Annotated[int, Positive] = 8
    lr: Annotated[float, Positive] = 1e-4
    weight_decay: Annotated[float, NonNegative] = 0.0
    warmup_steps: Annotated[int, NonNegative] = 100
    grad_clip: Annotated[float | None, Positive] = 1.0
    context_drop_prob: Annotated[float | Literal["auto"], UnitInterval] = "auto"
    num_workers: Annotated[int | Literal["auto"], NonNegative] = "auto"
    val_every: Annotated[int, NonNegative] = 500
    val_sets: Annotated[int, Positive] = 1
    val_sampling_steps: Annotated[int, Positive] = 20
    checkpoint_every: Annotated[int, Positive] = 500
    log_every: Annotated[int, Positive] = 50
    device: str = "auto"
    threads: Annotated[int | Literal["auto"], Positive] = "auto"
    objective: Literal["conditional", "marginal"] = "conditional"
    init_from: str | None = None
    init_genes: Literal["pad", "intersect"] = "pad"


@dataclass
class SampleConfig:
    """Prediction (``sample.*``): sampler, steps, guidance, and how many cells per condition.

    Attributes:
        sampler: ``ddim`` (deterministic with ``eta`` 0) or ``ddpm`` (ancestral).
        steps: denoising steps per sample.
        eta: DDIM's stochasticity in [0, 1] (ignored by ``ddpm``).
        guidance: classifier-free guidance weight; 1 means none (see
            :meth:`~perturbdiff_core.diffusion.model.RKHSDiffusion.predict_x0`).
        n_cells: cells predicted per condition; ``null``: as many as the real condition has.
        chunk_sets: bounds memory: at most that many sets of ``data.set_size`` cells are denoised at once.
        output_space: where predicted cells are written (see :mod:`~perturbdiff_core.data.output_space`):
            ``counts`` moves each cell to the nearest point of a real cell's count lattice (exact
            zeros, real detection rates), ``continuous`` keeps the sampled values, ``auto`` picks
            ``counts`` when the context's control cells lie on a lattice.
        rounding: onto the lattice: ``nearest`` count, ``stochastic`` (up or down with the
            probabilities that keep each value's mean, independently), or ``systematic`` (the same
            probabilities, drawn per gene so that its count of values rounded up is within one of
            their sum: a gene's mean over the predicted cells carries no rounding noise).
        control_mean: which control mean the predicted cells' mean starts from. Each predicted cell is
            its donor (a control cell drawn at random from the context) plus a change, so the donors'
            mean carries their sampling noise into every gene's predicted mean (as much as a real
            population of their number has). ``context`` first moves the donors so that the kept ones'
            mean is the context's control mean (of at most 2048 of its control cells): a rise as a
            shift, a fall as the same fraction of every donor's own value, so their zeros stay 0 (see
            :func:`~perturbdiff_core.runs.model_predictor.recentred`); ``donors`` keeps them as drawn.
        change_z: genes whose predicted mean change from the control cells the sets were sampled
            from is below ``change_z`` standard errors keep those control cells' values (see
            :func:`~perturbdiff_core.runs.model_predictor.settle_changes`); ``null`` keeps every sampled value.
            With an anchor (``model.anchor``) the test reads the change beyond the anchor's shift, and
            the genes that fail it keep that shift.
        change_spread: how much of its own deviation from the condition's mean change each predicted
            cell keeps, in [0, 1]: a changed gene of cell ``i`` becomes its control cell plus the mean
            change plus ``change_spread`` times cell ``i``'s deviation from it. The sampler's per-cell
            changes vary independently of the control cells they are added to, so at 1 a predicted
            population is more spread than the real one; 0 gives every cell the mean change.
        decrease: how a gene's predicted mean decrease reaches the cells: ``fraction`` takes the same
            fraction of every cell's own value (a cell without the gene keeps 0, until the per-cell
            deviations of ``change_spread`` are added, which can round it up to a count), the fraction of the
            level the denoiser read (``model.control_levels: hull`` reads a held-out context at its
            nearest mixture of the training contexts), so a gene a response switches off falls to 0
            at any level; ``thinning`` (on a count lattice; continuous output takes ``fraction``) reaches
            the mean ``fraction`` gives by keeping each of a donor's reads with one chance per gene, so the
            cells with few reads are the ones that fall to 0, as when fewer molecules are captured;
            ``shift`` subtracts the mean decrease from every cell and clips at 0.
            Genes with negative values (data that are not expression levels) always shift.
        increase: how a gene's predicted mean increase reaches the cells on a count lattice:
            ``reads`` keeps each donor's counts and adds new reads at the cell's own rate (a
            gamma-Poisson posterior, :mod:`~perturbdiff_core.data.reads`) until the mean rises as
            far, so cells at 0 of a gene only some cells express mostly stay there (the per-cell
            deviations of ``change_spread`` are replaced by the reads' own noise); ``shift`` adds
            the increase to every cell and rounds it onto the lattice. Continuous output always shifts.
        read_gain: with ``increase: reads``, how strongly each cell takes a rise: ``even``, at its own
            rate only, gene by gene; ``sampled``, also in proportion to its sampled change over the
            genes that rise (its mean over the population's, at least 0.1), so a cell that responds more
            does so across the response's genes, as real cells do (see :mod:`~perturbdiff_core.data.reads`).
        unseen_context_change: the share of the sampled change kept by a condition whose cell type or
            batch training never saw: each of its cells moves that far from its control cell towards the
            sample (0 predicts the control cells, 1 the sample). ``auto``: where the denoiser reads such a
            context centred (``model.control_levels``), the share measured on the training conditions;
            elsewhere all of it (see :mod:`~perturbdiff_core.runs.unseen`). Trained contexts keep all of it.
        control_shrinkage: the share by which the control mean of a condition whose cell type or batch
            training never saw moves towards the training contexts' average before the change is added:
            the part of its distance from them that is sampling noise of few control cells. ``auto``
            estimates it per context from the training contexts' and the context's own control cells and
            applies it where it is at least half (74-82% for a held-out K562 replicate of 20-32 control
            cells; PBMC cell types and glioma lines, 1-7%, keep their mean; see
            :mod:`~perturbdiff_core.runs.control_noise`); 0 keeps the observed mean.
        ensemble: a ``perturbdiff.predictors`` plug-in whose shift is averaged with the model's mean
            change of each gene where the model extrapolates: a combination never trained whose parts
            were, and a condition whose cell type or batch training never saw (the model still decides
            which cells carry it), or ``none``. ``auto``: ``context_mixture`` (the sum of the parts'
            shifts for a combination; in an unseen context the perturbation's training shifts weighted
            by how alike their contexts' control cells are, only where the run is anchored,
            ``model.anchor``; see :mod:`~perturbdiff_core.runs.ensemble`). Its errors on training
            conditions held out alike also spread the populations after the first wherever the model
            extrapolates, averaged there or not (:mod:`~perturbdiff_core.runs.spread`); with ``none``
            they differ only by their control cells and sampling noise.
        ensemble_weight: the ensemble predictor's weight in that average, in [0, 1] (1: its shift alone).
        ensemble_shrinkage: in a context training lacked, before that average, each gene's ensemble
            shift ``s`` with standard error ``e`` (from the training cells' sampling noise; a plug-in
            without one is not shrunk) is scaled by ``max(0, 1 - (k * e / s)^2)`` with ``k`` this value
            (Breiman's non-negative garrote): a shift the training cells cannot tell from no change counts
            for nothing, a clear one almost fully; 0 leaves the shifts as they are. ``auto``: 1 where the
            median perturbed training condition has fewer than 30 cells, else 0 (with few cells the small
            shifts are mostly noise, with many mostly real; see :mod:`~perturbdiff_core.runs.shrinkage`).
        anchor_shrinkage: in a context training lacked, each gene's anchor shift (``model.anchor``) is
            scaled by ``s^2 / (s^2 + (k * e)^2)`` with ``k`` this value (the posterior mean under a normal
            prior as wide as the shift: never 0, so genes keep their rank) and the sampled cells move with
            it; 0 leaves it as it is. ``auto`` as for ``ensemble_shrinkage``.
        response_fdr: in a context training lacked, where the ensemble applies, a gene keeps the model's
            own change beyond the anchor only if the training data show the perturbation (or a part of a
            combination) changing it: Wilcoxon BH FDR below this in at least one training condition
            against its control cells; the other genes keep the anchor's shift, averaged with the
            ensemble's. It stops the training cell types' identity genes leaking into a new cell type;
            new combinations in trained contexts are not gated (see :mod:`~perturbdiff_core.runs.support`).
            ``null``: every gene the change test passes moves.
        nonnegative: clip continuous predictions at 0 (log1p values are never negative).
        ceiling: ``training`` caps every predicted value of a gene at the highest value any training
            cell (perturbed or control) or control cell of the predicted context has; on a count
            lattice at the cell's highest count under it, with new reads a capped cell cannot take
            going to the others (see :mod:`~perturbdiff_core.runs.ceiling`). ``none``: no cap.
        populations: independent populations drawn per test condition by ``perturbdiff run``: the
            first is ``predictions.h5ad``, all of them give the calibration metrics (where the real
            population falls among the predicted ones; at least 10 for ``population_coverage``).
        population_conditions: how many test conditions at most (drawn with the run's seed) get the
            populations after the first; the rest get one. Calibration needs a sample of conditions,
            not all of them, and each would take ``populations`` times as long to predict (64: a
            150-condition screen predicts 726 populations, not 1,302 with 128; every bundled task has
            at most 33 conditions). ``null``: every condition (``perturbdiff predict
            --populations`` draws them for every condition it is asked for).
    """

    sampler: Literal["ddim", "ddpm"] = "ddim"
    steps: Annotated[int, Positive] = 50
    eta: Annotated[float, UnitInterval] = 0.0
    guidance: Annotated[float, NonNegative] = 1.0
    n_cells: Annotated[int | None, Positive] = None
    chunk_sets: Annotated[int, Positive] = 16
    output_space: Literal["auto", "counts", "continuous"] = "auto"
    rounding: Literal["nearest", "stochastic", "systematic"] = "systematic"
    control_mean: Literal["context", "donors"] = "context"
    change_z: float | None = 4.0
    change_spread: Annotated[float, UnitInterval] = 0.5
    decrease: Literal["thinning", "fraction", "shift"] = "thinning"
    increase: Literal["reads", "shift"] = "reads"
    read_gain: Literal["even", "sampled"] = "even"
    unseen_context_change: Annotated[float | Literal["auto"], UnitInterval] = "auto"
    control_shrinkage: Annotated[float | Literal["auto"], UnitInterval] = "auto"
    ensemble: str = "auto"
    ensemble_weight: Annotated[float, UnitInterval] = 0.5
    ensemble_shrinkage: Annotated[float | Literal["auto"], NonNegative] = "auto"
    anchor_shrinkage: Annotated[float | Literal["auto"], NonNegative] = "auto"
    response_fdr: Annotated[float | None, Range(0, 1, closed_left=False)] = 0.25
    nonnegative: bool = True
    ceiling: Literal["training", "none"] = "training"
    populations: Annotated[int, Positive] = 10
    population_conditions: Annotated[int | None, Positive] = 64


@dataclass
class EvalConfig:
    """Evaluation (``evaluate.*``): which baselines to compare with, and the MMD kernel and cap.

    Attributes:
        baselines: ``perturbdiff.predictors`` plug-ins fitted on the training conditions and
            compared with the model on the test conditions (``control`` predicts no change). The
            defaults include the predictors ``model.anchor`` and ``sample.ensemble`` resolve to by
            default (``context_fold``, ``context_mixture``), so the model is compared with its own parts.
        kernel: ``perturbdiff.kernels`` plug-in of the ``mmd2_<kernel>`` metric.
        max_cells: populations are subsampled to at most this many cells for the MMD metrics.
    """

    baselines: list[str] = field(
        default_factory=lambda: ["control", "context_mean", "context_fold", "context_mixture", "linear", "random_train"]
    )
    kernel: str = "energy"
    max_cells: Annotated[int, Range(2)] = 1000


@dataclass
class RunConfig:
    """Everything a run needs: the sections below, a seed and a name.

    Attributes:
        seed: seed of the model's initialisation, the training stream, sampling and evaluation.
        name: the run's name (default: the YAML file's name): ``runs/<name>`` and the report's title.
    """

    seed: Annotated[int, NonNegative] = 0
    name: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        """A plain nested dict (YAML / JSON ready) that :func:`config_from_dict` turns back into this config."""
        return to_mapping(self)


def config_from_dict(values: Mapping[str, Any]) -> RunConfig:
    """A checked :class:`RunConfig` from a nested mapping (defaults fill what is missing).

    A plug-in named without its parameters gets none: the default parameters belong to the default
    plug-in (``model.denoiser: mlp`` alone must not hand ``mlp`` the default ``{size: tiny}``).
    """
    for name_key, params_key in plugin_params_keys().items():
        name = _lookup(values, name_key)
        if name is not _MISSING and name != _lookup(_defaults(), name_key) and _lookup(values, params_key) is _MISSING:
            values = assign(values, params_key, {})
    config = from_mapping(RunConfig, values)
    check(config)
    return config


_MISSING = object()


def _lookup(tree: Any, key: str) -> Any:
    """The value at the dotted ``key`` of a nested mapping, or ``_MISSING``."""
    for part in key.split("."):
        if not isinstance(tree, Mapping) or part not in tree:
            return _MISSING
        tree = tree[part]
    return tree


def _defaults() -> dict[str, Any]:
    """The default configuration as a nested mapping."""
    return RunConfig().to_dict()


@cache
def plugin_params_keys() -> dict[str, str]:
    """Every config key naming a plug-in that has a parameters key beside it -> that key
    (``model.kernel`` -> ``model.kernel_params``, ``data.encoder`` -> ``data.encoder_params``, ...)."""
    keys = {}
    for section, values in _defaults().items():
        if isinstance(values, Mapping):
            keys |= {f"{section}.{k}": f"{section}.{k}_params" for k in values if f"{k}_params" in values}
    return keys


def plugin_spec(section: Any, key: str) -> PluginSpec:
    """The plug-in a config section names at ``key``, with the parameters of ``<key>_params`` beside it
    (``plugin_spec(config.model, "kernel")``): the YAML keeps the two keys, the code one spec."""
    return PluginSpec(getattr(section, key), dict(getattr(section, f"{key}_params")))


def override(values: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with a layer of ``overrides`` (``--set`` pairs, a suite's or grid's ``set:``) merged in.

    Keys merge as :func:`~perturbdiff_core.configuration.merge` does (an empty mapping clears), except
    that a layer changing a plug-in's name (``model.denoiser``, ``model.kernel``, ``data.encoder``, ...)
    also replaces its parameters: with those the same layer gives, else with none. The old plug-in's
    parameters mean nothing to the new one (the bundled ``{size: tiny}`` breaks a third-party denoiser).
    """
    merged = merge(values, overrides)
    for name_key, params_key in plugin_params_keys().items():
        name = _lookup(overrides, name_key)
        if name is _MISSING:
            continue
        before = _lookup(values, name_key)
        if name == (_lookup(_defaults(), name_key) if before is _MISSING else before):
            continue
        given = _lookup(overrides, params_key)
        merged = assign(merged, params_key, {} if given is _MISSING else given)
    return merged


def check(config: RunConfig) -> None:
    """ConfigError naming the key and the fix for a value out of its annotated range (checked when the
    config loads, and again here for a config changed in Python: ``PerturbDiff.train(steps=...)``), or
    for keys whose values do not go together."""
    check_ranges(config)
    if config.train.steps == 0 and not config.train.init_from:
        raise ConfigError(f"train.steps must be at least 1 (0 only with train.init_from), got {config.train.steps}.")
    check_anchor(config.model.anchor)
    check_ensemble(config.sample.ensemble)
    if config.model.anchor_name not in (NO_ANCHOR, AUTO_ANCHOR, "control") and config.train.objective == "marginal":
        raise ConfigError(
            f"model.anchor = {config.model.anchor_name} needs perturbed training conditions; marginal pre-training "
            f"(train.objective: marginal) has none. Set model.anchor: none for pre-training."
        )
    if config.data.perturbation_key is None and config.train.objective != "marginal":
        raise ConfigError(
            "data.perturbation_key is null (every cell unperturbed), which only marginal pre-training can use; "
            "set train.objective: marginal, or name the obs column of the perturbation."
        )


def load_config(path: str | os.PathLike[str] | None, overrides: Iterable[str] = ()) -> RunConfig:
    """Defaults <- YAML file ``path`` (optional) <- ``key=value`` overrides; ``name`` defaults to the file stem."""
    values: dict[str, Any] = read_yaml(path) if path is not None else {}
    values = override(values, parse_overrides(overrides))
    config = config_from_dict(values)
    if config.name is None and path is not None:
        config = replace(config, name=Path(path).stem)
    return config


def resolve_data_path(path: str | list[str] | None) -> str | list[str] | None:
    """``path`` made absolute; a missing relative path is also looked up by file name in the shared data folder.

    A list (a collection's shards) is resolved entry by entry; a glob is made absolute and expanded
    when the data are read; a URI (``s3://...``, a SOMA experiment) is kept as it is.
    """
    if path is None:
        return None
    if isinstance(path, list):
        return [resolve_data_path(p) for p in path]
    if "://" in path:
        return path
    if set("*?[") & set(path):
        return os.path.abspath(os.path.expanduser(path))
    given = Path(path).expanduser()
    if given.exists() or given.is_absolute():
        return str(given.resolve()) if given.exists() else str(given)
    fallback = shared_data_dir() / given.name
    if fallback.exists():
        return str(fallback.resolve())
    raise DataError(
        f"No such data file: {path} (relative to {Path.cwd()}), nor {fallback}. Run from the folder the "
        f"path is relative to, give an absolute data.path, or set {DATA_ENV} to the folder holding {given.name}."
    )


def fingerprint(config: RunConfig) -> str:
    """The configuration apart from its ``name``, as one comparable string: two runs (suite tasks, grid
    cells) that would train the same model have the same fingerprint."""
    return yaml.safe_dump({**config.to_dict(), "name": None}, sort_keys=True)


def resolved(config: RunConfig) -> RunConfig:
    """``config`` with ``data.path`` resolved (see :func:`resolve_data_path`) and ``train.init_from`` made absolute."""
    init_from = config.train.init_from and str(Path(config.train.init_from).expanduser().resolve())
    return replace(
        config,
        data=replace(config.data, path=resolve_data_path(config.data.path)),
        train=replace(config.train, init_from=init_from),
    )


def run_dir_for(config: RunConfig, out: str | os.PathLike[str] | None) -> Path:
    """``out``, or ``runs/<config name>`` (``runs/run`` for a config without a name)."""
    return Path(out) if out is not None else Path(RUNS_DIR) / (config.name or "run")


def write_config(config: RunConfig, run_dir: str | os.PathLike[str]) -> Path:
    """Write the resolved configuration as ``run_dir/config.yaml`` and where its plug-ins came from as
    ``run_dir/plugins.yaml`` (:func:`plugin_records`), both atomically.

    The records live in a file of their own so that ``config.yaml`` stays a config that
    ``perturbdiff train`` reads back unchanged.
    """
    files = RunDir(run_dir)
    atomic_write_text(files.config, yaml.safe_dump(config.to_dict(), sort_keys=False))
    atomic_write_text(files.plugins, yaml.safe_dump(plugin_records(config), sort_keys=False))
    return files.config


def _config_value(config: RunConfig, key: str) -> Any:
    section, _, name = key.partition(".")
    return getattr(getattr(config, section), name)


def plugin_records(config: RunConfig) -> dict[str, Any]:
    """Config key -> ``{group, name, distribution, version}`` of the plug-in it names (a list of them for
    ``evaluate.baselines``), from metadata alone; names that resolve to nothing (``model.anchor: none``,
    a plug-in not installed) are left out."""
    from ..registry import plugin_info

    def record(group: str, name: Any) -> dict[str, str] | None:
        if not isinstance(name, str):
            return None
        try:
            return plugin_info(group, name).record() | {"name": name}  # the name as the config gives it
        except UnknownPluginError:
            return None

    records: dict[str, Any] = {}
    for key, group in PLUGIN_KEYS.items():
        value = _config_value(config, key)
        if isinstance(value, list):
            found = [r for r in (record(group, v) for v in value) if r is not None]
            if found:
                records[key] = found
        elif (found := record(group, value)) is not None:
            records[key] = found
    return records


def plugin_mismatches(records: Mapping[str, Any]) -> list[str]:
    """How the installed plug-ins differ from ``records`` (:func:`plugin_records` of an earlier run):
    one phrase per plug-in now provided by another distribution or version, or no longer installed."""
    from ..registry import canonical_distribution, plugin_info

    found = []
    for key, value in records.items():
        for rec in value if isinstance(value, list) else [value]:
            if not isinstance(rec, Mapping) or not {"group", "name", "distribution", "version"} <= set(rec):
                continue
            was = f"{rec['distribution']} {rec['version']}"
            try:
                now = plugin_info(str(rec["group"]), str(rec["name"]))
            except UnknownPluginError as err:
                found.append(f"{key} {rec['name']!r} came from {was} and does not resolve now ({first_line(err, 120)})")
                continue
            same = canonical_distribution(now.distribution) == canonical_distribution(str(rec["distribution"]))
            if not same or now.version != str(rec["version"]):
                found.append(f"{key} {rec['name']!r} came from {was}, now from {now.distribution} {now.version}")
    return found


def differences(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested mappings."""
    keys = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            keys += differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            keys.append(prefix + key)
    return keys
