"""The data layer on the two real screens: norman19 (glioma line, K562 combinations) and kang18."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from perturbdiff_core.data import (
    DataConfig,
    SplitConfig,
    make_loader,
    prepare,
)
from perturbdiff_core.data.anndata_io import DATA_ENV
from perturbdiff_core.errors import DataError

GLIOMA = ("A172", "T98G", "U87MG")
SHARED = {"MAP2K3", "MAP2K6", "MAP3K21", "MAP4K3", "MAP4K5", "MAPK1", "PLK4", "SGK1", "TGFBR2"}


def _norman(path, split):
    return prepare(DataConfig(path=str(path), cell_type_key="cell_type", set_size=64), split)


def test_norman_held_out_crispri_glioma_line(norman19_path):
    data, split = _norman(norman19_path, SplitConfig(kind="holdout_cell_type", holdout=["U87MG"]))
    assert data.n_genes == 500 and len(data.contexts) == 4
    test = [data.condition(label) for label in split.test]
    assert {c.perturbation for c in test} == SHARED and {c.cell_type for c in test} == {"U87MG"}
    assert not any(data.condition(label).cell_type == "U87MG" for label in split.train)
    controls = data.control_cells(test[0].context)  # controls of the held-out line stay available
    assert len(controls) == 100
    batch = next(iter(make_loader(data, split.test, train=False, batch_size=4)))
    assert batch.cond.cell_type.tolist() == [0] * 4  # unseen cell type -> unknown index
    control_rows = {r.tobytes() for r in data.read(controls)}
    assert all(r.tobytes() in control_rows for r in batch.cond.control.reshape(-1, 500).numpy())


def test_norman_held_out_k562_combinations(norman19_path):
    combos = ["KLF1+MAP2K6", "MAP2K3+MAP2K6", "MAPK1+TGFBR2"]
    data, split = _norman(norman19_path, SplitConfig(kind="holdout_combination", holdout=combos))
    assert sorted(split.test) == [f"{c}|k562" for c in combos]
    trained = {data.condition(label).perturbation for label in split.train}
    assert {"KLF1", "MAP2K6", "MAP2K3", "MAPK1", "TGFBR2"} <= trained
    encoded = data.encode(split.test)
    parts = data.encode(["KLF1|k562", "MAP2K6|k562"]).sum(0)
    torch.testing.assert_close(encoded[0], parts)  # KLF1+MAP2K6 = KLF1 + MAP2K6
    with pytest.raises(DataError, match=r"'CEBPE\+RUNX1T1' cannot be held out.*CEBPE, RUNX1T1"):
        _norman(norman19_path, SplitConfig(kind="holdout_combination", holdout=["CEBPE+RUNX1T1"]))


def test_kang_held_out_cell_type_in_memory_and_backed(kang18_path):
    split = SplitConfig(kind="holdout_cell_type", holdout=["CD4T"])
    config = dict(
        path=str(kang18_path), perturbation_key="condition", cell_type_key="cell_type", n_genes=2000, set_size=32
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the legacy layout (old uns, no encoding metadata) reads quietly
        data, chosen = prepare(DataConfig(**config), split)
        backed, again = prepare(DataConfig(**config, backed=True), split)
    assert chosen == again and chosen.test == ["stimulated|CD4T"] and len(chosen.train) == 6
    assert data.genes == backed.genes and len(data.genes) == 2000
    assert len(data.control_cells(data.condition("stimulated|CD4T").context)) > 0
    for a, b in zip(make_loader(data, chosen.train, batch_size=3), make_loader(backed, chosen.train, batch_size=3)):
        assert a.condition == b.condition
        np.testing.assert_array_equal(a.target.numpy(), b.target.numpy())
        np.testing.assert_array_equal(a.cond.control.numpy(), b.cond.control.numpy())


def test_the_replicate_script_writes_k562_with_a_replicate_per_pair_of_lanes(norman19_path, tmp_path):
    """scripts/k562_replicates.py: norman19's K562 cells, unchanged, with replicate r1-r4 from 10x lanes 1-2, ..., 7-8;
    without its source file it says which one and how to point at it."""
    out = tmp_path / "replicates.h5ad"
    script = Path(__file__).resolve().parents[1] / "scripts" / "k562_replicates.py"
    env = {**os.environ, DATA_ENV: str(norman19_path.parent)}
    subprocess.run([sys.executable, str(script), "--out", str(out)], check=True, capture_output=True, env=env, timeout=120)
    replicates, source = ad.read_h5ad(out), ad.read_h5ad(norman19_path)
    k562 = source[(source.obs["cell_type"] == "k562").to_numpy()]
    assert list(replicates.obs_names) == list(k562.obs_names)
    np.testing.assert_array_equal(replicates.X.toarray(), k562.X.toarray())
    lanes = [int(name.rsplit("-", 1)[1]) for name in replicates.obs_names]
    assert sorted(set(zip(lanes, replicates.obs["replicate"], strict=True))) == [
        (1, "r1"), (2, "r1"), (3, "r2"), (4, "r2"), (5, "r3"), (6, "r3"), (7, "r4"), (8, "r4")
    ]
    counts = pd.crosstab(replicates.obs["perturbation"], replicates.obs["replicate"])
    assert (counts > 0).all().all() and (counts.loc["control"] >= 20).all()  # every perturbation in every replicate
    missing = subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path / "other.h5ad")], capture_output=True, text=True,
        env={**os.environ, DATA_ENV: str(tmp_path)}, timeout=120,
    )
    assert missing.returncode == 1 and DATA_ENV in missing.stderr and "norman19_mcfaline23.h5ad is missing" in missing.stderr
    assert "Traceback" not in missing.stderr and not (tmp_path / "other.h5ad").exists()
