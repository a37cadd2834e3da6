"""Starting a run from another run's weights (``train.init_from``): pre-train, then fine-tune.

The denoiser (and its EMA) of the checkpoint is copied into the new model tensor by tensor.
Axes that depend on the data are aligned *by name*: genes (``num_genes``, possibly in blocks,
e.g. ``[x_t, self_cond]`` inputs of width ``2G``), cell types and batches (vocabulary entries;
``<unknown>`` is entry 0 in both). A gene, cell type or batch present in both runs gets its
trained row or column; a new one keeps the new model's fresh initialisation; one only in the
checkpoint is dropped. Perturbation axes are copied only when both runs encode perturbations
identically (same encoder, same fitted state); otherwise they keep the fresh initialisation.
Which axes depend on what is found by building the denoiser again on the meta device with one
more gene (cell type, ...) and looking which axes grow, so any denoiser plug-in works unchanged.
Everything else must have the same shape and is copied exactly; the loss plug-ins (schedule,
kernel, estimator) come from the new run's configuration.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import anndata as ad
import torch

from ..data.config import DataConfig
from ..data.dataset import PerturbationData
from ..diffusion.model import RKHSDiffusion
from ..errors import ConfigError, DataError
from ..io import atomic_write_text
from ..names import TRANSFER_FILE as TRANSFER_FILE
from ..registry import load
from .checkpoint import Checkpoint, CheckpointError, checkpoint_path, has_checkpoint, load_checkpoint, load_run_checkpoint
from .folder import RunDir

#: How the fine-tune genes relate to the checkpoint's: keep the data's genes (new ones freshly
#: initialised) or keep only the data's genes that the checkpoint also has.
GeneMode = Literal["pad", "intersect"]

#: Data-dependent denoiser arguments and the vocabulary each is aligned on.
_AXES = {"num_genes": "genes", "num_cell_types": "cell_type", "num_batches": "batch", "perturbation_dim": "perturbation"}

#: Prefixes of the transferred weights in a model's state dict: the denoiser and its EMA copy.
_NETWORKS = ("denoiser.", "ema.module.")


def resolve_checkpoint(init_from: str | os.PathLike[str]) -> Path:
    """``init_from`` as a checkpoint file: a run folder means its ``checkpoints/last.pt``."""
    path = Path(init_from).expanduser()
    return checkpoint_path(path) if path.is_dir() else path


def load_init(init_from: str | os.PathLike[str]) -> Checkpoint:
    """The checkpoint to start from (CheckpointError naming the path for a missing or invalid one); a run
    folder's ``previous.pt`` (with a note) when its ``last.pt`` is damaged."""
    path = resolve_checkpoint(init_from)
    if Path(init_from).expanduser().is_dir() and has_checkpoint(Path(init_from).expanduser()):
        return load_run_checkpoint(Path(init_from).expanduser())
    if not path.is_file():
        raise CheckpointError(
            f"train.init_from = {init_from}: no checkpoint at {path}. Give a run folder of a finished "
            f"pre-training (perturbdiff train ... --out RUN_DIR) or its checkpoints/last.pt."
        )
    return load_checkpoint(path)


def gene_config(
    data_config: DataConfig,
    genes: Sequence[str],
    mode: GeneMode,
    source: ad.AnnData | str | os.PathLike[str] | None = None,
) -> DataConfig:
    """The data config of a fine-tune on the checkpoint's ``genes``: unchanged for ``pad``; for
    ``intersect``, the data's selected genes (``n_genes`` / ``gene_list`` as configured) that ``genes`` also has."""
    if mode == "pad":
        return data_config
    if mode != "intersect":
        raise ConfigError(f"train.init_genes = {mode!r}; choose pad or intersect.")
    known = set(genes)
    shared = [g for g in PerturbationData(source, data_config).genes if g in known]
    if not shared:
        raise DataError(
            "train.init_genes = intersect, but the data's genes and the checkpoint's genes share no name; "
            "check the gene naming (symbols vs IDs) of both data sets."
        )
    return replace(data_config, n_genes=None, gene_list=shared)


@dataclass
class Alignment:
    """How the entries of one vocabulary (genes, cell types, ...) of the new run map to the checkpoint's."""

    source: list[int]  # checkpoint position of each new entry, -1 for a new one
    shared: int
    added: list[str]
    dropped: list[str]

    @classmethod
    def by_name(cls, new: Sequence[str], old: Sequence[str]) -> Alignment:
        """Entries matched by name."""
        position = {name: i for i, name in enumerate(old)}
        source = [position.get(name, -1) for name in new]
        kept = set(new)
        return cls(source, sum(s >= 0 for s in source), [n for n, s in zip(new, source) if s < 0],
                   [o for o in old if o not in kept])

    @classmethod
    def none(cls, new_size: int) -> Alignment:
        """No entry matched (every new entry keeps its fresh initialisation)."""
        return cls([-1] * new_size, 0, [], [])


@dataclass
class TransferReport:
    """What :func:`transfer_weights` did: the checkpoint, gene / vocabulary counts, fresh tensors."""

    checkpoint: str
    genes_shared: int
    genes_added: list[str]
    genes_dropped: list[str]
    cell_types_shared: int
    batches_shared: int
    perturbation: Literal["copied", "fresh"]
    copied: int
    aligned: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)

    def line(self) -> str:
        """One line for the terminal."""
        fresh = f"; freshly initialised: {', '.join(self.fresh)}" if self.fresh else ""
        return (
            f"init from {self.checkpoint}: genes {self.genes_shared} shared, {len(self.genes_added)} added "
            f"(fresh), {len(self.genes_dropped)} dropped; cell types {self.cell_types_shared} shared, batches "
            f"{self.batches_shared} shared; perturbation weights {self.perturbation}; {self.copied} tensors "
            f"copied, {len(self.aligned)} aligned by name{fresh}"
        )

    def write(self, run_dir: str | os.PathLike[str]) -> Path:
        """Write the report as ``run_dir/transfer.json`` (atomically)."""
        path = RunDir(run_dir).transfer
        atomic_write_text(path, json.dumps(asdict(self), indent=1) + "\n")
        return path


def _encoder_signature(state: dict[str, Any]) -> str:
    encoder = state["encoder"]
    return json.dumps([encoder["name"], encoder["params"], encoder["state"]], sort_keys=True, default=str)


def _alignments(data: PerturbationData, checkpoint: Checkpoint, perturbation_dim: int) -> dict[str, Alignment]:
    old = checkpoint.data_state
    same_encoder = _encoder_signature(old) == _encoder_signature(data.to_state())
    return {
        "genes": Alignment.by_name(data.genes, old["genes"]),
        "cell_type": Alignment.by_name(data.vocabularies["cell_type"], old["vocabularies"]["cell_type"]),
        "batch": Alignment.by_name(data.vocabularies["batch"], old["vocabularies"]["batch"]),
        "perturbation": Alignment(list(range(perturbation_dim)), perturbation_dim, [], [])
        if same_encoder
        else Alignment.none(perturbation_dim),
    }


def data_axes(denoiser_config: dict[str, Any], name: str) -> dict[str, dict[int, tuple[str, int]]]:
    """Per denoiser tensor, ``{axis: (vocabulary, blocks)}`` for every axis whose length is ``blocks``
    times a data dimension (found by rebuilding the denoiser on the meta device with that dimension + 1)."""
    with torch.device("meta"):
        base = load("perturbdiff.denoisers", name, **denoiser_config).state_dict()
        axes: dict[str, dict[int, tuple[str, int]]] = {key: {} for key in base}
        for argument, vocabulary in _AXES.items():
            grown = load("perturbdiff.denoisers", name, **{**denoiser_config, argument: denoiser_config[argument] + 1})
            for key, tensor in grown.state_dict().items():
                for axis, (a, b) in enumerate(zip(base[key].shape, tensor.shape)):
                    if b != a:
                        axes[key][axis] = (vocabulary, b - a)
    return axes


def _fits(alignment: Alignment, blocks: int, new_length: int, old_length: int) -> bool:
    """Whether an axis of ``blocks`` blocks can be aligned: some entries shared, lengths consistent."""
    return (
        alignment.shared > 0
        and len(alignment.source) * blocks == new_length
        and old_length % blocks == 0
        and max(alignment.source) < old_length // blocks
    )


def _aligned_copy(new: torch.Tensor, old: torch.Tensor, axes: dict[int, tuple[str, int]],
                  alignments: dict[str, Alignment]) -> torch.Tensor:
    """``new`` with every entry whose aligned indices all exist in ``old`` replaced by that entry of ``old``."""
    out = new.clone()
    index_new, index_old = [], []
    for axis in range(new.dim()):
        if axis not in axes:
            index_new.append(torch.arange(new.shape[axis]))
            index_old.append(torch.arange(old.shape[axis]))
            continue
        vocabulary, blocks = axes[axis]
        source = torch.tensor(alignments[vocabulary].source, dtype=torch.long)
        size_new, size_old = new.shape[axis] // blocks, old.shape[axis] // blocks
        keep = torch.nonzero(source >= 0).flatten()
        index_new.append(torch.cat([b * size_new + keep for b in range(blocks)]))
        index_old.append(torch.cat([b * size_old + source[keep] for b in range(blocks)]))

    def grid(indices: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        n = len(indices)
        return tuple(ix.reshape([-1 if d == k else 1 for d in range(n)]) for k, ix in enumerate(indices))

    out[grid(index_new)] = old[grid(index_old)].to(out.dtype)
    return out


def _check_architecture(model: RKHSDiffusion, checkpoint: Checkpoint) -> tuple[str, dict[str, Any]]:
    """The denoiser name and config; ConfigError when its architecture differs from the checkpoint's."""
    new, old = model.config()["denoiser"], checkpoint.model_config["denoiser"]
    sizes = {k: v for k, v in new.items() if k not in _AXES}
    old_sizes = {k: v for k, v in old.items() if k not in _AXES}
    if sizes != old_sizes:
        raise ConfigError(
            f"The checkpoint's denoiser is {old_sizes}, this run's is {sizes}; fine-tuning needs the same "
            f"architecture. Set model.denoiser and model.denoiser_params as in the pre-training run."
        )
    name = new.pop("name")
    return name, new


def transfer_weights(model: RKHSDiffusion, checkpoint: Checkpoint, data: PerturbationData, *,
                     source: str = "") -> TransferReport:
    """Copy the checkpoint's denoiser and EMA weights into ``model`` (built for ``data``), aligned as the module docstring says."""
    name, denoiser_config = _check_architecture(model, checkpoint)
    axes = data_axes(denoiser_config, name)
    alignments = _alignments(data, checkpoint, denoiser_config["perturbation_dim"])
    state, old_state = model.state_dict(), checkpoint.model_state
    copied, aligned, fresh = 0, [], []
    for key, tensor in state.items():
        prefix = next((p for p in _NETWORKS if key.startswith(p)), None)
        if prefix is None and key != "ema.n_averaged":
            continue  # schedule, kernel, estimator: this run's own
        old = old_state.get(key)
        tensor_axes = axes.get(key[len(prefix):], {}) if prefix else {}
        same_other_axes = old is not None and old.dim() == tensor.dim() and all(
            a == b for axis, (a, b) in enumerate(zip(tensor.shape, old.shape)) if axis not in tensor_axes
        )
        if not same_other_axes:
            fresh.append(key)
        elif not tensor_axes:
            state[key] = old.clone()
            copied += 1
        elif all(_fits(alignments[v], k, tensor.shape[a], old.shape[a]) for a, (v, k) in tensor_axes.items()):
            state[key] = _aligned_copy(tensor, old, tensor_axes, alignments)
            aligned.append(key)
        else:
            fresh.append(key)
    model.load_state_dict(state)
    genes = alignments["genes"]
    return TransferReport(
        checkpoint=source,
        genes_shared=genes.shared,
        genes_added=genes.added,
        genes_dropped=genes.dropped,
        cell_types_shared=alignments["cell_type"].shared,
        batches_shared=alignments["batch"].shared,
        perturbation="copied" if alignments["perturbation"].shared else "fresh",
        copied=copied,
        aligned=[k for k in aligned if k.startswith(_NETWORKS[0])],
        fresh=[k for k in fresh if not k.startswith(_NETWORKS[1])],
    )

