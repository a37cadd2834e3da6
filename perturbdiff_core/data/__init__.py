"""From AnnData perturbation screens to validated cell sets, splits and loaders.

Typical use::

    data, split = prepare(DataConfig(path="screen.h5ad", cell_type_key="cell_type"),
                          SplitConfig(kind="holdout_cell_type", holdout=["CD4T"]), out_dir="run")
    loader = make_loader(data, split.train, batch_size=8, num_workers=2)   # SetBatch per step
    test = make_loader(data, split.test, train=False)
"""

from .config import SPLIT_KINDS, DataConfig, SplitConfig
from .dataset import UNKNOWN, Condition, Context, PerturbationData
from .loader import EpochSampler, make_loader
from .pairing import PAIRINGS, ControlPairing, OTPairing, RandomPairing, make_pairing
from .prepare import SPLIT_FILE, STATE_FILE, load_prepared, prepare, save_prepared
from .sets import ConditionSets, collate_sets, prediction_conditioning
from .splits import Split, make_split

__all__ = [
    "PAIRINGS",
    "SPLIT_FILE",
    "SPLIT_KINDS",
    "STATE_FILE",
    "UNKNOWN",
    "Condition",
    "ConditionSets",
    "Context",
    "ControlPairing",
    "DataConfig",
    "EpochSampler",
    "OTPairing",
    "PerturbationData",
    "RandomPairing",
    "Split",
    "SplitConfig",
    "collate_sets",
    "load_prepared",
    "make_loader",
    "make_pairing",
    "make_split",
    "prediction_conditioning",
    "prepare",
    "save_prepared",
]
