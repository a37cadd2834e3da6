"""DataConfig / SplitConfig: built from config dicts with unknown keys and wrong types rejected."""

from __future__ import annotations

import pytest

from perturbdiff_core.data import SPLIT_KINDS, DataConfig, SplitConfig
from perturbdiff_core.errors import ConfigError


def test_split_kinds_are_the_documented_names():
    assert SPLIT_KINDS == (
        "holdout_cell_type",
        "holdout_batch",
        "holdout_perturbation",
        "holdout_combination",
        "few_shot",
        "random",
    )


def test_round_trip_through_dicts():
    data = DataConfig.from_dict(
        {
            "path": "x.h5ad",
            "cell_type_key": "cell_type",
            "n_genes": 2000,
            "covariate_keys": ["time"],
            "encoder_params": {"path": "emb.csv"},
        }
    )
    assert data.n_genes == 2000 and data.covariate_keys == ["time"] and data.batch_key is None
    assert DataConfig.from_dict(data.to_dict()) == data
    assert DataConfig.from_dict({"gene_list": "genes.txt"}).gene_list == "genes.txt"
    assert DataConfig.from_dict({"gene_list": ["g1", "g2"]}).gene_list == ["g1", "g2"]
    split = SplitConfig.from_dict({"kind": "holdout_cell_type", "holdout": ["CD4T"], "train_fraction": 1})
    assert isinstance(split.train_fraction, float)
    assert SplitConfig.from_dict(split.to_dict()) == split


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(
        ConfigError, match=r"data\.pertubation_key.*valid keys here: data\.path, data\.perturbation_key"
    ):
        DataConfig.from_dict({"pertubation_key": "perturbation"})
    with pytest.raises(ConfigError, match=r"split\.holdouts.*split\.holdout"):
        SplitConfig.from_dict({"holdouts": ["a"]})


@pytest.mark.parametrize(
    "cls, values, message",
    [
        (DataConfig, {"n_genes": "2000"}, "data.n_genes"),
        (DataConfig, {"set_size": 2.5}, "data.set_size must be int"),
        (DataConfig, {"normalize": "yes"}, "data.normalize must be bool"),
        (DataConfig, {"control_pairing": "nearest"}, r"choose one of \['random', 'ot'\]"),
        (SplitConfig, {"kind": "holdout_celltype"}, "holdout_cell_type"),
        (SplitConfig, {"holdout": "CD4T"}, "split.holdout must be a list"),
        (SplitConfig, {"seed": True}, "split.seed must be int"),
        (DataConfig, {"control_label": 0}, r"data.control_label must be str, got 0 \(int\) \(quote it in YAML: control_label: '0'\)"),
    ],
)
def test_wrong_types_are_named(cls, values, message):
    with pytest.raises(ConfigError, match=message):
        cls.from_dict(values)
