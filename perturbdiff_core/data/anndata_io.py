"""Reading AnnData and the checks every command runs first, each with one clear error."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

from ..errors import DataError

#: Environment variable that overrides the folder holding the shared example data.
DATA_ENV = "PERTURBDIFF_DATA"


def shared_data_dir() -> Path:
    """The folder of the bundled real data: ``$PERTURBDIFF_DATA`` or ``../shared/data``."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def read_anndata(source: str | os.PathLike[str] | ad.AnnData, *, backed: bool = False) -> ad.AnnData:
    """An AnnData from a path to ``.h5ad`` (optionally backed, not loaded) or an AnnData itself."""
    if isinstance(source, ad.AnnData):
        return source
    path = Path(source)
    if not path.exists():
        raise DataError(f"No such file: {path}. Give the path to an .h5ad file.")
    try:
        with warnings.catch_warnings():  # legacy files (old uns layout) warn on every read
            warnings.simplefilter("ignore", FutureWarning)
            return ad.read_h5ad(path, backed="r" if backed else None)
    except OSError as err:
        raise DataError(f"Cannot read {path} as AnnData (.h5ad): {err}. Check the file is a valid .h5ad.") from None


def require_obs_key(adata: ad.AnnData, key: str, what: str = "key") -> None:
    """Fail unless ``adata.obs`` has column ``key``; ``what`` names its role in the message."""
    if key not in adata.obs.columns:
        cols = ", ".join(map(str, adata.obs.columns)) or "none"
        raise DataError(
            f"obs has no column {key!r} (the {what}); the columns are: {cols}. "
            f"Pass the right column name."
        )


def require_label(adata: ad.AnnData, key: str, label: str) -> None:
    """Fail unless ``label`` occurs in ``adata.obs[key]``; list the values found."""
    values = adata.obs[key].astype(str)
    if label not in set(values):
        found = sorted(values.unique())
        shown = ", ".join(found[:20]) + (f", ... ({len(found)} in all)" if len(found) > 20 else "")
        raise DataError(f"Control label {label!r} not found in obs[{key!r}]; values found: {shown}.")


def require_finite(matrix: np.ndarray | sp.spmatrix, where: str = "X") -> None:
    """Fail if ``matrix`` (dense or sparse) holds NaN or Inf."""
    data = matrix.data if sp.issparse(matrix) else np.asarray(matrix)
    if not np.isfinite(data).all():
        raise DataError(f"{where} contains NaN or Inf values; remove or impute them first.")
