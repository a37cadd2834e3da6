"""What a run is about to do, in a few lines printed before training: data, split, model, budget.

So a user sees at once that the right file, genes and held-out conditions were picked, how big
the model is and how long the run will train, before the first step. Example::

    data   kang18_pbmc_ifnb.h5ad: 1975 cells, 1000 of 6998 genes (highly variable)
    split  holdout_cell_type: 12 training (2 also validation), 1 test condition
           held out: CD14+Mono -> stimulated|CD14+Mono
    model  cross_dit (tiny), 0.52 M parameters; energy kernel, unbiased estimator, lambda 1
    train  1000 steps x 8 sets of 128 cells on cpu, training with 1 thread
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..data.sources import data_path_name
from ..threads import threads_line
from . import control_noise
from . import levels as levels_rule

if TYPE_CHECKING:
    from .training import Trainer

#: Held-out conditions named in the summary before it says "... and N more".
SHOWN = 6


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _names(values: Sequence[str], shown: int = SHOWN) -> str:
    more = f" ... and {len(values) - shown} more" if len(values) > shown else ""
    return ", ".join(values[:shown]) + more


def _context_dropout(trainer: Trainer) -> str:
    """``, context dropout P`` (and the test's unseen contexts that need it) when training drops contexts."""
    if not trainer.context_drop_prob:
        return ""
    unseen = trainer.data.unseen_contexts(trainer.split.test)
    return f", context dropout {trainer.context_drop_prob:g}" + (f" (unseen in training: {_names(unseen)})" if unseen else "")


def _control_levels(trainer: Trainer) -> list[str]:
    """A line on what the denoiser reads of the control cells, unless ``centred`` was simply asked for."""
    levels = trainer.control_levels
    if levels.name == "centred" and not levels.explained:
        return []
    shares = ", ".join(f"{share:.0%} of {label}'s" for label, share in levels.explained.items())
    why = f" (auto: the training contexts' control means explain {shares}; hull needs {levels_rule.AUTO_HULL_MIN_EXPLAINED:.0%})" if shares else ""
    return [f"       control cells read {levels.name}{why}"]


def _unseen_context_change(trainer: Trainer) -> list[str]:
    """A line on the share of the change kept in the test's unseen contexts, when the test has any."""
    unseen = trainer.data.unseen_contexts(trainer.split.test)
    if not unseen:
        return []
    change = trainer.unseen_context_change
    why = f" ({change.why})" if change.why else ""
    return [f"sample predictions for {_names(unseen)} (unseen in training) keep {change.scale:.0%} of the sampled change{why}"]


def _control_shrinkage(trainer: Trainer) -> list[str]:
    """A line on how far the test's unseen contexts' control means move towards the training contexts', when it has any."""
    shrinkage = trainer.control_shrinkage
    if shrinkage is None:
        return []
    data = trainer.data
    contexts = sorted({data.condition(c).context for c in trainer.split.test if data.unseen_contexts([c])}, key=lambda c: c.label)
    shares = []
    for context in contexts:
        share, estimate = shrinkage.context_share(data, context)
        shares.append(f"{context.label} {share:.0%}" + (f" (estimated {estimate:.0%})" if share != estimate else ""))
    why = (f"auto: the share of each one's distance that is noise of its control cells, where at least "
           f"{control_noise.AUTO_MIN_SHARE:.0%}" if shrinkage.setting == control_noise.AUTO_SHRINKAGE else "as set")
    return [f"       control means moved towards the training contexts': {_names(shares)} ({why})"]


def _errors(k: float) -> str:
    """``k`` standard errors, in words."""
    return f"{k:g} standard error{'' if k == 1 else 's'}"


def _shrinkage(trainer: Trainer) -> list[str]:
    """A line on how the anchor's and the ensemble's shifts into the test's unseen contexts are shrunk, when they are."""
    shrinkage = trainer.shrinkage
    if shrinkage is None:
        return []
    shrunk = []
    if trainer.anchor is not None and shrinkage.anchor > 0:
        shrunk.append(f"the anchor {trainer.anchor_choice.name}'s by its posterior mean at {_errors(shrinkage.anchor)}")
    if trainer.ensemble is not None and shrinkage.ensemble > 0:
        shrunk.append(f"the ensemble {trainer.ensemble.choice.name}'s by the garrote at {_errors(shrinkage.ensemble)}")
    if not shrunk:
        return []
    return [f"sample shifts into unseen contexts shrunk gene by gene: {'; '.join(shrunk)} "
            f"({shrinkage.why}; sample.anchor_shrinkage, sample.ensemble_shrinkage)"]


def _ensemble(trainer: Trainer) -> list[str]:
    """Lines on the predictor averaged with the model's mean change where it extrapolates, and on the spread of
    later populations there by its training errors, when the test has such conditions."""
    ensemble, sample, data = trainer.ensemble, trainer.config.sample, trainer.data
    if ensemble is None:
        return []
    lines = []
    averaged = [c for c in trainer.split.test if ensemble.applies(data, data.condition(c))]
    if averaged:
        why = f"; {ensemble.choice.why}" if ensemble.choice.why else ""
        lines.append(f"sample mean changes of {_names(averaged)} averaged with {ensemble.choice.name}'s shift "
                     f"(weight {sample.ensemble_weight:g}{why})")
        if ensemble.support is not None and data.unseen_contexts(averaged):
            lines.append(f"sample the model's own change in unseen contexts only on genes a training condition of the "
                         f"perturbation or its parts changes (Wilcoxon FDR < {ensemble.support.fdr:g}; sample.response_fdr)")
    spread = [c for c in trainer.split.test if ensemble.spreads(data, data.condition(c))]
    if spread and sample.populations > 1:
        lines.append(f"sample populations after the first of {_names(spread)} spread by {ensemble.choice.name}'s "
                     f"errors on {len(ensemble.errors.errors)} training conditions held out alike")
    return lines


def _with_why(name: str, why: str) -> str:
    return f"{name} ({why})" if why else name


def _anchor(trainer: Trainer) -> str:
    """The predictor ``model.anchor`` resolved to, and why."""
    return _with_why(trainer.anchor_choice.name, trainer.anchor_choice.why)


def resolved_predictors(trainer: Trainer) -> dict[str, str]:
    """``{"anchor", "ensemble"}``: the predictors ``model.anchor`` and ``sample.ensemble`` resolved to for this run
    and why, ``none`` included: with ``auto`` the config alone does not say which baseline shapes the prediction."""
    ensemble, data = trainer.ensemble, trainer.data
    if ensemble is None:
        blend = "none (the model's mean change alone)"
    else:
        averaged = [c for c in trainer.split.test if ensemble.applies(data, data.condition(c))]
        blend = _with_why(
            f"{ensemble.choice.name}, weight {trainer.config.sample.ensemble_weight:g}, averaged into the mean change of "
            f"{len(averaged)} of {_plural(len(trainer.split.test), 'test condition')}",
            ensemble.choice.why,
        )
    return {"anchor": _anchor(trainer), "ensemble": blend}


def run_summary(trainer: Trainer, source_name: str | None = None) -> list[str]:
    """The lines printed before ``trainer`` trains (``source_name``: how to call data given in memory)."""
    config, data, split = trainer.config, trainer.data, trainer.split
    where = source_name or data_path_name(config.data.path)
    genes = f"{data.n_genes} genes"
    if config.data.n_genes is not None or config.data.gene_list is not None:
        how = "highly variable" if config.data.n_genes is not None else "from data.gene_list"
        genes = f"{data.n_genes} of {data.total_genes} genes ({how})"
    kind = "reloaded from " + Path(config.split.file).name if config.split.file else config.split.kind
    held = f"held out: {_names([str(h) for h in config.split.holdout])} -> " if config.split.holdout else "test: "
    model = config.model
    size = model.denoiser_params.get("size")
    parameters = sum(p.numel() for p in trainer.model.denoiser.parameters())
    anchor = f", anchor {_anchor(trainer)}"
    start = f" (resuming at step {trainer.step})" if trainer.step else ""
    source = [f"       {data.source_report}"] if data.source_report else []
    return [
        f"data   {where}: {data.matrix.shape[0]} cells, {genes}",
        *source,
        f"split  {kind}: {_plural(len(split.train), 'training condition')} ({len(split.val)} also validation), "
        f"{_plural(len(split.test), 'test condition')}",
        f"       {held}{_names(split.test)}",
        f"model  {model.denoiser}{f' ({size})' if size else ''}, {parameters / 1e6:.2f} M parameters; "
        f"{model.kernel} kernel, {model.estimator} estimator, lambda {model.mmd_weight:g}{anchor}",
        *_control_levels(trainer),
        f"train  {config.train.steps} steps x {config.train.batch_size} sets of {config.data.set_size} cells on "
        f"{trainer.device}{start}, {threads_line(trainer.threads)}{_context_dropout(trainer)}",
        *_unseen_context_change(trainer),
        *_control_shrinkage(trainer),
        *_ensemble(trainer),
        *_shrinkage(trainer),
    ]
