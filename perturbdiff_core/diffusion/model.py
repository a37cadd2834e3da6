r"""The RKHS diffusion model: a set denoiser trained with a squared error plus an MMD between populations.

For a batch of sets :math:`x_0` (``SetBatch.target``, ``(B, S, G)``) the training loss is

.. math::
    \mathcal L = \frac1B \sum_b \Big[\frac{1}{SG}\|f_\theta(x_t, t, c) - y\|^2
        + \lambda\, \mathrm{MMD}_k^2\big(\hat x_0^{(b)}, x_0^{(b)}\big)\Big],

with :math:`t \sim U\{1..T\}`, :math:`x_t = \sqrt{\bar\alpha_t} x_0 + \sqrt{1-\bar\alpha_t}\epsilon`,
:math:`y` the target of the prediction parameterisation (``x0``, ``eps`` or ``v``) and
:math:`\hat x_0` the clean-set estimate derived from the prediction (Yuan et al. 2026: ``x0``
prediction, energy kernel, :math:`\lambda = 1`). Training also uses self-conditioning (Chen et
al. 2022, "Analog bits", section 3) and condition dropout for classifier-free guidance (Ho &
Salimans 2022). The schedule, the denoiser, the kernel and the estimator are plug-ins, each one
configuration line away.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import fields, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..constraints import HalfOpenUnit, NonNegative, UnitInterval
from ..data.batch import Conditioning, SetBatch
from ..errors import ConfigError, InputError
from ..registry import PluginSpec, resolve
from ..validation import check_sets
from .denoisers import Denoiser
from .hull import nearest_in_hull
from .parameterization import DataScale, Parameterization, check_parameterization, target, to_x0
from .samplers import DDIMStep, DDPMStep, SamplerStep, sample, timestep_grid
from .schedules import NoiseSchedule

#: A plug-in given by name, by ``{"name": ..., **params}`` (as in a YAML config), as a PluginSpec or as an instance.
Spec = Any


def _build(group: str, spec: Spec) -> Any:
    """The plug-in instance for ``spec``; one built here, or by :func:`~perturbdiff_core.registry.load`,
    carries its :class:`~perturbdiff_core.registry.PluginSpec` as ``plugin_spec``."""
    if isinstance(spec, (str, Mapping, PluginSpec)):
        return PluginSpec.from_any(spec, where=f"the {group} entry").build(group)
    return resolve(group, spec)


#: What a relative model's denoiser reads of the control cells: centred on the set, their own levels, or
#: their levels with the set's mean moved to the nearest mixture of the training contexts' means.
CONTROL_LEVELS = ("centred", "absolute", "hull")


def _cat_conditions(a: Conditioning, b: Conditioning) -> Conditioning:
    """Two conditionings stacked along the set dimension (fields that are ``None`` in both stay ``None``)."""
    pairs = {f.name: (getattr(a, f.name), getattr(b, f.name)) for f in fields(Conditioning)}
    return Conditioning(**{k: None if x is None and y is None else torch.cat([x, y]) for k, (x, y) in pairs.items()})


def null_condition(cond: Conditioning, drop: Tensor | None = None) -> Conditioning:
    """``cond`` with the perturbation encoding zeroed (the null condition of guidance) where ``drop`` ``(B,)`` is true (everywhere if ``None``)."""
    p = cond.perturbation
    zeroed = torch.zeros_like(p) if drop is None else p.masked_fill(drop.unsqueeze(-1), 0.0)
    return replace(cond, perturbation=zeroed)


class RKHSDiffusion(nn.Module):
    r"""Set diffusion with an MSE + :math:`\lambda`-weighted MMD^2 loss, guidance, self-conditioning and EMA.

    Args:
        denoiser: a :class:`Denoiser`, or ``{"name": "cross_dit", "num_genes": ..., ...}``.
        schedule: noise schedule name (``"cosine"``, ``"linear"``, ``"power_cosine"``), mapping or instance.
        kernel: kernel for the MMD term (name, mapping such as ``{"name": "rbf", "lengthscale":
            "median"}``, or instance); ``"energy"`` by default, as in the paper.
        estimator: MMD estimator (``"unbiased"`` by default; ``"biased"``, ...).
        mmd_weight: :math:`\lambda`; 0 trains on the squared error alone (and skips the MMD).
        prediction: what the denoiser outputs: ``"x0"`` (paper), ``"eps"``, ``"v"`` or ``"edm"`` (x0
            preconditioned by the per-gene data scale, see :mod:`~perturbdiff_core.diffusion.parameterization`;
            set the scale with :meth:`fit_data_scale` before training).
        self_condition_prob: probability that a training step feeds the network its own
            (detached) x0 estimate (Chen et al. 2022 use 0.5, drawn once per batch); 0 disables
            self-conditioning, in training and sampling.
        cond_drop_prob: probability that a set's perturbation encoding is zeroed in training, so
            the same network also learns the null condition used by classifier-free guidance.
        relative_to_control: diffuse each set relative to an origin, the mean of its control set
            plus the anchor shift the conditioning carries (``cond.shift``, ``model.anchor``; none
            means 0): the target and the control set are shifted by that origin before noising and
            the samples shifted back, so the model learns what the anchor misses rather than the
            expression level of a context (a held-out cell line, say). Radial kernels and the
            MSE are translation invariant, so the loss terms keep their values.
        origin: with ``relative_to_control``, ``"set"`` (one origin per set, as above) or ``"cell"``:
            each target cell's origin is the control cell at the same place of the control set plus
            the anchor shift, so a sampled cell is a real control cell plus a learned change and
            keeps that cell's gene-level detail (its zeros and counts) wherever the change is small.
            Needs target and control sets of the same size.
        control_levels: with ``relative_to_control``, what the denoiser reads of the control cells
            (and the templates): ``"centred"`` on each set's origin (the centre), so it sees only
            how cells vary within the set, ``"absolute"``, the cells plus the anchor shift, so it
            sees the expression levels that tell one cell type from another, or ``"hull"``, the
            absolute cells with their set's mean moved to the nearest mixture of the training
            contexts' control means (:meth:`fit_context_levels`), so a context training never saw
            is read at the nearest levels it did see.
        ema_decay: decay of the exponential moving average of the denoiser weights
            (``torch.optim.swa_utils``); ``None`` keeps no average.

    Training mode draws ``t``, the noise, the condition dropout and the self-conditioning coin;
    evaluation mode (``model.eval()``) drops no condition and never self-conditions, so a
    validation loss with fixed ``t`` and ``noise`` is deterministic.
    """

    def __init__(
        self,
        denoiser: Denoiser | Mapping[str, Any],
        schedule: Spec = "cosine",
        *,
        kernel: Spec = "energy",
        estimator: Spec = "unbiased",
        mmd_weight: float = 1.0,
        prediction: Parameterization = "x0",
        self_condition_prob: float = 0.5,
        cond_drop_prob: float = 0.1,
        ema_decay: float | None = 0.999,
        relative_to_control: bool = False,
        origin: str = "set",
        control_levels: str = "centred",
    ) -> None:
        super().__init__()
        # The ranges of the config fields these come from (ModelConfig), for callers building the model in Python.
        UnitInterval.check(self_condition_prob, "self_condition_prob")
        UnitInterval.check(cond_drop_prob, "cond_drop_prob")
        NonNegative.check(mmd_weight, "mmd_weight")
        if ema_decay is not None:
            HalfOpenUnit.check(ema_decay, "ema_decay", alternatives=("None",))
        self.denoiser = _build("perturbdiff.denoisers", denoiser)
        self.schedule = _build("perturbdiff.schedules", schedule)
        self.kernel = _build("perturbdiff.kernels", kernel)
        self.estimator = _build("perturbdiff.estimators", estimator)
        _ = self.schedule.alpha_bars  # validate the schedule now rather than at the first step
        self.mmd_weight = float(mmd_weight)
        self.prediction = check_parameterization(prediction)
        self.self_condition_prob = float(self_condition_prob)
        self.cond_drop_prob = float(cond_drop_prob)
        self.ema_decay = ema_decay
        self.relative_to_control = bool(relative_to_control)
        if origin not in ("set", "cell"):
            raise ConfigError(f"origin must be 'set' or 'cell', got {origin!r}.")
        self.origin = origin
        if control_levels not in CONTROL_LEVELS:
            raise ConfigError(f"control_levels must be one of {', '.join(CONTROL_LEVELS)}, got {control_levels!r}.")
        self.control_levels = control_levels
        genes = self.denoiser.num_genes
        self.register_buffer("data_mean", torch.zeros(genes))  # the edm preconditioning's per-gene mean and scale
        self.register_buffer("data_scale", torch.ones(genes))
        self.register_buffer("context_levels", torch.zeros(0, genes))  # control_levels="hull": (contexts, genes)
        self.ema: AveragedModel | None = None
        if ema_decay is not None:
            self.ema = AveragedModel(self.denoiser, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
            self.ema.requires_grad_(False)  # never trained: optimizers skip it even given model.parameters()

    # ----------------------------------------------------------------- configuration
    def config(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this model with :meth:`from_config` (YAML/JSON-serialisable).

        Each plug-in is ``{"name": ..., **params}``: the name it was loaded under, and the denoiser's and
        the schedule's every constructor argument (their ``config()``), the kernel's and the estimator's
        parameters as given.
        """
        specs = {}
        for key, obj in (("denoiser", self.denoiser), ("schedule", self.schedule), ("kernel", self.kernel), ("estimator", self.estimator)):
            spec = getattr(obj, "plugin_spec", None)
            if spec is None:
                raise ConfigError(
                    f"the {key} was given as a {type(obj).__name__} built directly, so the plug-in name and parameters "
                    f"that rebuild it are unknown; give it by name, e.g. {key}={{'name': ..., **params}}, or build it "
                    f"with perturbdiff_core.registry.load(group, name, **params)."
                )
            params = obj.config() if isinstance(obj, (Denoiser, NoiseSchedule)) else spec.params  # these describe themselves
            specs[key] = PluginSpec(spec.name, params).to_dict()
        return {
            **specs,
            "mmd_weight": self.mmd_weight,
            "prediction": self.prediction,
            "self_condition_prob": self.self_condition_prob,
            "cond_drop_prob": self.cond_drop_prob,
            "ema_decay": self.ema_decay,
            "relative_to_control": self.relative_to_control,
            "origin": self.origin,
            # only when not the default, so checkpoints from before the option describe themselves unchanged
            **({"control_levels": self.control_levels} if self.control_levels != CONTROL_LEVELS[0] else {}),
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> RKHSDiffusion:
        """A fresh (untrained) model from :meth:`config`'s output; load a ``state_dict`` for the weights."""
        known = set(inspect.signature(cls).parameters)
        unknown = sorted(set(config) - known)
        if unknown:
            raise ConfigError(f"unknown model configuration keys {unknown}; the known keys are {sorted(known)}.")
        return cls(**config)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters an optimizer should update (the denoiser's, and any trainable kernel's)."""
        return [p for p in self.parameters() if p.requires_grad]

    # ----------------------------------------------------------------- training
    def loss(
        self,
        batch: SetBatch,
        generator: torch.Generator | None = None,
        *,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        shard: tuple[int, int] = (0, 1),
    ) -> dict[str, Tensor]:
        """Loss terms on one batch: ``loss`` (differentiable), ``mse`` and ``mmd`` (detached, averaged over sets).

        ``t`` ``(B,)`` and ``noise`` ``(B, S, G)`` fix the random draws (e.g. for a validation
        loss); otherwise they are drawn from ``generator``, which must live on the batch's device.
        ``shard = (k, n)`` says the batch is part ``k`` of ``n`` equal consecutive parts of a global
        batch (data-parallel training): ``t``, the noise and the condition dropout are drawn for the
        global batch and sliced, and the self-conditioning coin is shared, so the mean of the parts'
        gradients is the global batch's.
        """
        x0, cond = batch.target, batch.cond
        self._check_batch(x0, cond)
        x0 = x0.to(next(self.denoiser.parameters()).dtype)
        if self.relative_to_control:
            cond, origin = self._relative(cond)
            x0 = x0 - origin
        b, device = x0.shape[0], x0.device
        k, n = shard
        total, part = b * n, slice(k * b, (k + 1) * b)  # the global batch, and this batch's positions in it
        if t is None:
            t = torch.randint(1, self.schedule.num_steps + 1, (total,), generator=generator, device=device)[part]
        elif t.shape != (b,) or t.dtype != torch.long or (t < 1).any() or (t > self.schedule.num_steps).any():
            raise InputError(f"t must be a long tensor of shape ({b},) with values in [1, {self.schedule.num_steps}].")
        if noise is None:
            noise = torch.randn((total, *x0.shape[1:]), generator=generator, device=device, dtype=x0.dtype)[part]
        ab = self.schedule.alpha_bar(t)
        x_t = self.schedule.q_sample(x0, t, noise)
        self_cond = None
        if self.training:
            if self.cond_drop_prob > 0:
                cond = null_condition(cond, torch.rand(total, generator=generator, device=device)[part] < self.cond_drop_prob)
            if self.self_condition_prob > 0 and torch.rand((), generator=generator, device=device) < self.self_condition_prob:
                with torch.no_grad():
                    self_cond = self._to_x0(self.denoiser(x_t, t, cond), x_t, ab)
        pred = self.denoiser(x_t, t, cond, self_cond)
        cell_origin = origin if self.relative_to_control and self.origin == "cell" else None
        mse, mmd = self.denoising_loss(pred, x0, noise, x_t, ab, cell_origin)
        per_set = mse if mmd is None else mse + self.mmd_weight * mmd
        terms = {"mse": mse.mean().detach(), "loss": per_set.mean()}
        if mmd is not None:
            terms["mmd"] = mmd.mean().detach()
        return terms

    def denoising_loss(
        self, pred: Tensor, x0: Tensor, noise: Tensor, x_t: Tensor, alpha_bar: Tensor, cell_origin: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Per-set squared error of the denoiser's output ``pred`` and MMD^2 of the clean sets it
        implies against ``x0`` (None when ``mmd_weight`` is 0), each ``(B,)``. With per-cell origins
        ``cell_origin`` ``(B, S, G)`` (``origin="cell"``) the MMD compares the populations with their
        origins added back: a population is not moved by one vector there, so the MMD of the residuals would differ."""
        # One fused kernel forward and backward (a difference and a square would each write a set-sized tensor).
        goal = target(self.prediction, x0, noise, alpha_bar, self._data())
        mse = F.mse_loss(pred, goal, reduction="none").mean(dim=(1, 2))
        if self.mmd_weight == 0:
            return mse, None
        estimate = self._to_x0(pred, x_t, alpha_bar)
        if cell_origin is not None:
            estimate, x0 = estimate + cell_origin, x0 + cell_origin
        return mse, self.estimator(estimate, x0, self.kernel)

    @torch.no_grad()
    def fit_data_scale(self, x0: Tensor, floor: float = 1e-2) -> None:
        """Set the ``edm`` preconditioning's per-gene mean and scale from clean sets ``(B, S, G)``
        (in the frame the model diffuses: pass sets through :meth:`frame`); scales below ``floor`` are raised to it."""
        cells = x0.reshape(-1, x0.shape[-1]).to(self.data_mean.dtype)
        self.data_mean.copy_(cells.mean(0))
        self.data_scale.copy_(cells.std(0).clamp_min(floor))

    @torch.no_grad()
    def fit_context_levels(self, levels: Tensor) -> None:
        """Set the training contexts' control means ``(contexts, genes)``, the vertices of the hull that
        ``control_levels="hull"`` moves each set's mean into (the trainer sets them from the training split)."""
        if levels.dim() != 2 or levels.shape[1] != self.data_mean.shape[0] or levels.shape[0] == 0:
            raise InputError(
                f"context levels must be (contexts, {self.data_mean.shape[0]} genes) with at least one context; "
                f"got {tuple(levels.shape)}."
            )
        self.context_levels = levels.to(self.data_mean)

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        """As nn.Module's, with ``context_levels`` first resized to the saved number of contexts (none in
        checkpoints written before ``control_levels="hull"`` existed, whose models read no hull)."""
        key = prefix + "context_levels"
        if key not in state_dict and self.control_levels != "hull":
            state_dict[key] = self.context_levels.new_zeros(0, self.context_levels.shape[1])
        saved = state_dict.get(key)
        if saved is not None and saved.dim() == 2 and saved.shape[1] == self.context_levels.shape[1]:
            self.context_levels = self.context_levels.new_zeros(saved.shape)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def frame(self, x0: Tensor, cond: Conditioning) -> Tensor:
        """Clean sets ``x0`` as the model diffuses them: minus each set's origin when ``relative_to_control``."""
        return x0 - self._relative(cond)[1] if self.relative_to_control else x0

    def _data(self) -> DataScale | None:
        return DataScale(self.data_mean, self.data_scale) if self.prediction == "edm" else None

    def _to_x0(self, pred: Tensor, x_t: Tensor, alpha_bar: Tensor) -> Tensor:
        return to_x0(pred, self.prediction, x_t, alpha_bar, self._data())

    def update_ema(self) -> None:
        r"""Move the averaged weights towards the current ones: :math:`\bar w \leftarrow d\,\bar w + (1 - d)\,w` (call after each optimizer step)."""
        if self.ema is None:
            raise ConfigError("this model keeps no EMA (ema_decay=None); build it with an ema_decay to average weights.")
        self.ema.update_parameters(self.denoiser)

    # ----------------------------------------------------------------- prediction
    def predict_x0(
        self,
        x_t: Tensor,
        t: Tensor,
        cond: Conditioning,
        self_cond: Tensor | None = None,
        *,
        guidance: float = 1.0,
        denoiser: Denoiser | None = None,
    ) -> Tensor:
        r"""Clean-set estimate with classifier-free guidance :math:`\hat x_0 = u + w (c - u)`.

        ``c`` is the conditional and ``u`` the null-condition (zero perturbation) estimate.
        Convention: ``w = 1`` is no guidance (the conditional model alone, one network call),
        ``w = 0`` the unconditional model, ``w > 1`` amplifies the perturbation effect. (Ho &
        Salimans 2022 write :math:`(1 + w')c - w'u`, i.e. :math:`w' = w - 1`.) Guidance is linear,
        so combining x0 estimates equals combining predictions in any parameterisation.
        """
        net = self.denoiser if denoiser is None else denoiser
        ab = self.schedule.alpha_bar(t)
        if guidance == 1.0:
            return self._to_x0(net(x_t, t, cond, self_cond), x_t, ab)
        both = net(
            torch.cat([x_t, x_t]),
            torch.cat([t, t]),
            _cat_conditions(cond, null_condition(cond)),
            None if self_cond is None else torch.cat([self_cond, self_cond]),
        )
        x0_cond, x0_uncond = self._to_x0(both, torch.cat([x_t, x_t]), torch.cat([ab, ab])).chunk(2)
        return x0_uncond + guidance * (x0_cond - x0_uncond)

    def sampling_denoiser(self, use_ema: bool | None = None) -> Denoiser:
        """The EMA weights (``True``), the raw weights (``False``), or the EMA once it has been updated (``None``)."""
        has_ema = self.ema is not None and int(self.ema.n_averaged) > 0
        if use_ema is None:
            use_ema = has_ema
        if use_ema and not has_ema:
            raise ConfigError(
                "use_ema=True but the EMA has never been updated (or ema_decay=None); call update_ema() "
                "after optimizer steps, or sample with use_ema=False."
            )
        return self.ema.module if use_ema else self.denoiser

    @torch.no_grad()
    def sample(
        self,
        cond: Conditioning,
        num_cells: int | None = None,
        *,
        sampler: str = "ddim",
        steps: int = 50,
        eta: float | None = None,
        guidance: float = 1.0,
        generator: torch.Generator | None = None,
        use_ema: bool | None = None,
        progress: bool = False,
    ) -> Tensor:
        """Generate ``(B, num_cells, G)`` perturbed sets for ``cond``, starting from pure noise at ``t = T``.

        Args:
            cond: conditioning of each set to generate (its control sets give ``B``).
            num_cells: cells per generated set; the control set size by default.
            sampler: ``"ddim"`` (Song et al. 2021) or ``"ddpm"`` (ancestral, Ho et al. 2020).
            steps: number of network evaluations (respaced grid from ``t = T``); doubled
                internally in batch size when ``guidance != 1``.
            eta: DDIM stochasticity in [0, 1] (0 by default); not used by ``"ddpm"``.
            guidance: classifier-free guidance weight, ``1`` means none (see :meth:`predict_x0`).
                With self-conditioning both branches see the previous step's guided estimate.
            generator: random source for the initial noise and stochastic steps.
            use_ema: see :meth:`sampling_denoiser`.
        """
        step = self._make_step(sampler, eta)
        origin = 0.0
        if self.relative_to_control:
            cond, origin = self._relative(cond)
        if guidance != 1.0 and self.cond_drop_prob == 0:
            raise ConfigError(
                f"guidance={guidance} needs the unconditional model, but this model was built with "
                f"cond_drop_prob=0 and never learned it; sample with guidance=1 or train with cond_drop_prob > 0."
            )
        NonNegative.check(guidance, "guidance")
        net = self.sampling_denoiser(use_ema)
        b, num_control = cond.control.shape[:2]
        num_cells = num_control if num_cells is None else num_cells
        if not isinstance(num_cells, int) or num_cells < 1:
            raise InputError(f"num_cells must be a positive integer, got {num_cells!r}.")
        if self.relative_to_control and self.origin == "cell" and num_cells != num_control:
            raise InputError(
                f"a model with per-cell origins samples one cell per control cell ({num_control}), not {num_cells}; "
                f"pass control sets of the size wanted."
            )
        use_self_cond = self.self_condition_prob > 0

        def model_fn(x_t: Tensor, t: Tensor, prev_x0: Tensor | None) -> Tensor:
            return self.predict_x0(x_t, t, cond, prev_x0 if use_self_cond else None, guidance=guidance, denoiser=net)

        param = next(net.parameters())
        return origin + sample(
            model_fn,
            (b, num_cells, net.num_genes),
            self.schedule,
            timestep_grid(self.schedule.num_steps, steps),
            step,
            generator=generator,
            device=param.device,
            dtype=param.dtype,
            progress=progress,
        )

    # ----------------------------------------------------------------- helpers
    def _relative(self, cond: Conditioning) -> tuple[Conditioning, Tensor]:
        """``cond`` with its control sets as the denoiser reads them (see ``control_levels``), and the
        origin of every target cell: the set's centre ``(B, 1, G)``, the control mean plus the anchor
        shift (when ``cond.shift`` is given), or with ``origin="cell"`` each control cell plus the
        shift, ``(B, S, G)``."""
        shift = 0.0 if cond.shift is None else cond.shift.unsqueeze(-2).to(cond.control.dtype)
        mean = cond.control.mean(dim=-2, keepdim=True)
        centre = mean + shift
        moved = cond.control + shift
        if self.control_levels == "centred":
            control = cond.control - centre
        elif self.control_levels == "absolute":
            control = moved
        else:
            control = moved - mean + self._in_hull(mean)
        if self.origin == "cell":
            return replace(cond, control=control, template=control), moved
        return replace(cond, control=control), centre

    def levels_read(self, means: Tensor) -> Tensor:
        """The levels the denoiser reads of control cells whose mean is ``means`` ``(..., G)``: their
        nearest mixture of the training contexts' means with ``control_levels="hull"``, else ``means``
        (their own levels, or none at all when centred, where the model's change is its training contexts')."""
        return self._in_hull(means) if self.relative_to_control and self.control_levels == "hull" else means

    def _in_hull(self, means: Tensor) -> Tensor:
        """``means`` moved to the nearest mixtures of the training contexts' control means."""
        if self.context_levels.shape[0] == 0:
            raise ConfigError(
                "control_levels='hull' needs the training contexts' control means: call "
                "model.fit_context_levels(levels) before training (perturbdiff train does)."
            )
        return nearest_in_hull(means, self.context_levels)

    @staticmethod
    def _make_step(sampler: str, eta: float | None) -> SamplerStep:
        if sampler == "ddim":
            return DDIMStep(0.0 if eta is None else eta)
        if sampler == "ddpm":
            if eta is not None:
                raise ConfigError("eta only applies to sampler='ddim' (DDPM is DDIM with eta=1); drop it.")
            return DDPMStep()
        raise ConfigError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}.")

    @staticmethod
    def _check_batch(x0: Tensor, cond: Conditioning) -> None:
        check_sets(x0, cond.control, name_x="batch.target", name_y="batch.cond.control")
        if x0.dim() != 3 or cond.control.dim() != 3 or cond.control.shape[0] != x0.shape[0]:
            raise InputError(
                f"batch.target must be (sets, cells, genes) and batch.cond.control must have as many sets; got "
                f"{tuple(x0.shape)} and {tuple(cond.control.shape)}."
            )

    def extra_repr(self) -> str:
        return (
            f"prediction={self.prediction!r}, mmd_weight={self.mmd_weight}, schedule={self.schedule!r}, "
            f"estimator={self.estimator!r}, self_condition_prob={self.self_condition_prob}, "
            f"cond_drop_prob={self.cond_drop_prob}, ema_decay={self.ema_decay}"
        )
