"""Built-in perturbation encoders: one-hot over training perturbations, and a lookup table of vectors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from perturbdiff_core.data.encoders import PerturbationEncoder
from perturbdiff_core.errors import DataError


def _shown(names: list[str], limit: int = 10) -> str:
    text = ", ".join(repr(n) for n in names[:limit])
    return text + (f", ... ({len(names)} in all)" if len(names) > limit else "")


class OneHotEncoder(PerturbationEncoder):
    """One indicator per single perturbation seen in training; a combination is the sum of its parts.

    An unseen single perturbation cannot be encoded (DataError): use ``lookup`` for those.
    """

    def _fit_parts(self, parts: list[str]) -> None:
        self.vocabulary = list(parts)
        self._index = {p: i for i, p in enumerate(self.vocabulary)}

    @property
    def part_dim(self) -> int:
        return len(self.vocabulary)

    def _part_vectors(self, parts: list[str]) -> np.ndarray:
        unknown = [p for p in parts if p not in self._index]
        if unknown:
            raise DataError(
                f"One-hot cannot encode perturbation(s) never seen in training: {_shown(unknown)} "
                f"(training saw {len(self.vocabulary)}: {_shown(self.vocabulary, 5)}). Use "
                f"data.encoder: lookup with a vector per perturbation (e.g. gene embeddings) to predict them. If "
                f"the data has cells of them, their training conditions may have been left out for having fewer than "
                f"data.min_cells_per_condition cells (a warning says which): lower it to train on them."
            )
        eye = np.zeros((len(parts), len(self.vocabulary)))
        eye[np.arange(len(parts)), [self._index[p] for p in parts]] = 1.0
        return eye

    def _state(self) -> dict[str, Any]:
        return {"vocabulary": self.vocabulary}

    def _load_state(self, state: dict[str, Any]) -> None:
        self._fit_parts(list(state["vocabulary"]))


class LookupEncoder(PerturbationEncoder):
    """Vectors read from a table (gene or compound embeddings): predicts unseen perturbations with a vector.

    Args:
        path: a CSV file (header row; first column the perturbation name, the others the vector),
            a Parquet file (same layout, or names as a string index), or an NPZ file with arrays
            ``names`` (n,) and ``vectors`` (n, d).

    A perturbation without a row in the table raises DataError naming it (never a silent zero).
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def _fit_parts(self, parts: list[str]) -> None:
        self._part_vectors(parts)  # every training perturbation must have a vector

    @property
    def part_dim(self) -> int:
        return self._table()[1].shape[1]

    def _part_vectors(self, parts: list[str]) -> np.ndarray:
        index, vectors = self._table()
        missing = [p for p in parts if p not in index]
        if missing:
            raise DataError(
                f"No vector for perturbation(s) {_shown(missing)} in the lookup table {self.path} "
                f"({len(index)} entries); add a row for each, or leave those conditions out."
            )
        return vectors[[index[p] for p in parts]]

    def _state(self) -> dict[str, Any]:
        return {"path": str(self.path)}

    def _load_state(self, state: dict[str, Any]) -> None:
        self.path = state["path"]
        self._cache = None

    def _table(self) -> tuple[dict[str, int], np.ndarray]:
        """``name -> row`` and the ``(n, d)`` float64 vectors, read once."""
        if getattr(self, "_cache", None) is None:
            names, vectors = read_lookup_table(self.path)
            self._cache = ({n: i for i, n in enumerate(names)}, vectors)
        return self._cache


def read_lookup_table(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Names and ``(n, d)`` float64 vectors of a CSV, Parquet or NPZ lookup table, checked."""
    path = Path(path)
    if not path.exists():
        raise DataError(
            f"No such lookup table file: {path}. Give data.encoder_params.path of a CSV, Parquet or NPZ file."
        )
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                if "names" not in npz or "vectors" not in npz:
                    raise DataError(f"{path} must hold arrays 'names' and 'vectors'; it holds {sorted(npz.files)}.")
                names, vectors = [str(n) for n in npz["names"]], np.asarray(npz["vectors"])
        elif suffix in (".csv", ".parquet", ".pq"):
            frame = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
            if suffix != ".csv" and not isinstance(frame.index, pd.RangeIndex):
                frame = frame.reset_index()
            names, vectors = frame.iloc[:, 0].astype(str).tolist(), frame.iloc[:, 1:].to_numpy()
        else:
            raise DataError(f"Lookup table {path} has an unknown extension; use .csv, .parquet or .npz.")
    except DataError:
        raise
    except (OSError, ValueError) as err:
        raise DataError(f"Cannot read lookup table {path}: {err}. Check the file format.") from None
    try:
        vectors = np.asarray(vectors, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(
            f"Lookup table {path} has non-numeric vector entries; every column after the name must be a number."
        ) from None
    if vectors.ndim != 2 or vectors.shape[0] != len(names) or vectors.shape[1] == 0:
        raise DataError(
            f"Lookup table {path} must give one non-empty vector per name; got vectors of shape "
            f"{vectors.shape} for {len(names)} names."
        )
    if not np.isfinite(vectors).all():
        raise DataError(f"Lookup table {path} contains NaN or Inf; fill or drop those rows.")
    duplicated = pd.Index(names)[pd.Index(names).duplicated()].unique().tolist()
    if duplicated:
        raise DataError(f"Lookup table {path} names some perturbations twice: {_shown(duplicated)}; keep one row each.")
    return names, vectors
