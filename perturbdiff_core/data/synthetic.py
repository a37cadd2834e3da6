"""Synthetic perturbation screens with known effects, for tests, benchmarks and examples."""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp


def synthetic_screen(
    n_cells: int = 600,
    n_genes: int = 40,
    *,
    perturbations: Sequence[str] = ("A", "B", "C", "A+B"),
    cell_types: Sequence[str] = ("t1", "t2"),
    batches: Sequence[str] | None = None,
    control_fraction: float = 0.25,
    mean_count: float = 1.2,
    counts: bool = False,
    sparse: bool = True,
    seed: int = 0,
) -> ad.AnnData:
    """An AnnData screen: obs ``perturbation`` (``control`` + ``perturbations``), ``cell_type``,
    ``batch`` (when ``batches``), ``dose``; X log1p-normalised (or raw Poisson counts with ``counts``).

    Counts are Poisson with gamma-distributed baseline rates of mean ``mean_count`` per cell type
    (lower means sparser); each single perturbation multiplies the rate of its own few genes by 3,
    and a combination applies its parts.
    """
    rng = np.random.default_rng(seed)
    contexts = [(t, b) for t in cell_types for b in (batches or [None])]
    labels, types, batch_of = [], [], []
    per_context = n_cells // len(contexts)
    n_control = max(1, round(control_fraction * per_context))
    for t, b in contexts:
        names = ["control"] * n_control + [
            perturbations[i % len(perturbations)] for i in range(per_context - n_control)
        ]
        labels += names
        types += [t] * len(names)
        batch_of += [b] * len(names)
    singles = sorted({p for name in perturbations for p in name.split("+")})
    targets = {p: rng.choice(n_genes, size=max(1, n_genes // 10), replace=False) for p in singles}
    base = {t: rng.gamma(0.6, mean_count / 0.6, size=n_genes) for t in cell_types}
    rate = np.stack([base[t] for t in types])
    label_array = np.asarray(labels)
    for name in perturbations:
        rows = np.flatnonzero(label_array == name)
        for part in name.split("+"):
            rate[np.ix_(rows, targets[part])] *= 3.0
    depth = rng.lognormal(0.0, 0.3, size=(len(labels), 1))
    x = rng.poisson(rate * depth).astype(np.float32)
    if not counts:
        total = np.maximum(x.sum(1, keepdims=True), 1.0)
        x = np.log1p(x / total * 1e4).astype(np.float32)
    obs = pd.DataFrame(
        {
            "perturbation": pd.Categorical(labels),
            "cell_type": pd.Categorical(types),
            "dose": [0.0 if n == "control" else float(1 + (i % 3)) for i, n in enumerate(labels)],
        },
        index=[f"cell{i}" for i in range(len(labels))],
    )
    if batches:
        obs["batch"] = pd.Categorical(batch_of)
    var = pd.DataFrame(index=[f"g{i}" for i in range(n_genes)])
    return ad.AnnData(sp.csr_matrix(x) if sparse else x, obs=obs, var=var)
