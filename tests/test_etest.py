"""Permutation two-sample test, BH correction and the ``perturbdiff etest`` command.

References: float64 NumPy/SciPy formulas for MMD^2, statsmodels for Benjamini-Hochberg, and
scperturb's E-distance on a synthetic screen (always) and on the real data (when present).
"""

from __future__ import annotations

import errno
import functools
import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from scipy.spatial.distance import cdist
from scipy.stats import kstest
from statsmodels.stats.multitest import multipletests

from perturbdiff_core.cli import main
from perturbdiff_core.configuration import parse_overrides
from perturbdiff_core.data.anndata_io import shared_data_dir
from perturbdiff_core.errors import ConfigError, DataError, InputError
from perturbdiff_core.mmd import two_sample
from perturbdiff_core.mmd.estimators import MMDEstimator, as_estimator
from perturbdiff_core.mmd.etest import COLUMNS, build_kernel, etest
from perturbdiff_core.mmd.two_sample import fdr_bh, null_distribution, permutation_test

REAL_DATA = shared_data_dir() / "norman19_mcfaline23.h5ad"


def make_screen(seed: int = 0, cells: int = 24, genes: int = 8, groups: tuple[str, ...] = ("a", "b")) -> ad.AnnData:
    """A small sparse log1p-count screen: per group, control, a null perturbation and a shifted one."""
    rng = np.random.default_rng(seed)
    blocks, obs = [], []
    for group in groups:
        for perturbation, lam in (("control", 1.0), ("none", 1.0), ("shift", 3.0)):
            rate = np.full(genes, 1.0)
            rate[: genes // 2] = lam
            blocks.append(np.log1p(rng.poisson(rate, size=(cells, genes))))
            obs += [(perturbation, group)] * cells
    frame = pd.DataFrame(obs, columns=["perturbation", "cell_type"], index=[f"c{i}" for i in range(len(obs))])
    return ad.AnnData(sp.csr_matrix(np.vstack(blocks)), obs=frame)


def numpy_mmd2(x: np.ndarray, y: np.ndarray, kernel, unbiased: bool) -> float:
    """MMD^2 from full kernel matrices in float64: the textbook V- or U-statistic."""
    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    if not unbiased:
        return kxx.mean() + kyy.mean() - 2 * kxy.mean()
    n, m = len(x), len(y)
    return (kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()


def energy(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return -cdist(x, y)


def sets(seed: int, n: int = 20, m: int = 25, genes: int = 4, shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, genes, generator=generator, dtype=torch.float64)
    y = torch.randn(m, genes, generator=generator, dtype=torch.float64) + shift
    return x, y


class Opaque(MMDEstimator):
    """Delegates to another estimator, hiding it from the permutation fast path."""

    def __init__(self, inner: MMDEstimator) -> None:
        self.inner = inner

    def estimate(self, x, y, kernel, wx, wy):
        return self.inner.estimate(x, y, kernel, wx, wy)


# --- permutation test -----------------------------------------------------------------------


def test_pvalues_uniform_under_null() -> None:
    pvalues = np.array([permutation_test(*sets(seed, n=12, m=15, genes=3), "energy", "unbiased", permutations=99, seed=seed)[1] for seed in range(200)])
    assert set(np.round(pvalues * 100, 9)) <= set(range(1, 101))  # (1 + k) / (1 + 99)
    assert kstest(pvalues, "uniform").pvalue > 1e-3
    assert 0.01 <= (pvalues <= 0.05).mean() <= 0.11
    assert abs(pvalues.mean() - 0.5) < 0.07


@pytest.mark.parametrize("kernel", ["energy", "rbf"])
def test_pvalue_small_under_shift(kernel: str) -> None:
    x, y = sets(1, shift=1.0)
    statistic, pvalue = permutation_test(x, y, kernel, "unbiased", permutations=199, seed=3)
    assert statistic > 0
    assert pvalue == 1 / 200


@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
@pytest.mark.parametrize("kernel", ["energy", "rbf", "laplace"])
def test_fast_path_equals_estimator(kernel: str, estimator: str, monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = sets(2, shift=0.3)
    if kernel == "rbf":
        kernel = build_kernel("rbf", {})  # median heuristic: adapted once, held fixed
    fast = null_distribution(x, y, kernel, estimator, permutations=64, seed=5)
    slow = null_distribution(x, y, kernel, Opaque(as_estimator(estimator)), permutations=64, seed=5)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)
    monkeypatch.setattr(two_sample, "DENSE_MAX_CELLS", 0)  # too many cells for the fast path
    torch.testing.assert_close(null_distribution(x, y, kernel, estimator, permutations=64, seed=5), fast, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("unbiased", [False, True])
def test_statistic_and_null_match_numpy(unbiased: bool) -> None:
    x, y = sets(3, n=9, m=7, shift=0.5)
    estimator = "unbiased" if unbiased else "biased"
    statistic, _ = permutation_test(x, y, "energy", estimator, permutations=10)
    assert statistic == pytest.approx(numpy_mmd2(x.numpy(), y.numpy(), energy, unbiased), rel=1e-12)
    perms = two_sample._random_permutations(16, 5, seed=4, device=torch.device("cpu")).numpy()
    z = torch.cat([x, y]).numpy()
    expected = [numpy_mmd2(z[p[:9]], z[p[9:]], energy, unbiased) for p in perms]
    np.testing.assert_allclose(null_distribution(x, y, "energy", estimator, permutations=5, seed=4).numpy(), expected, rtol=1e-10)


def recorded_chunks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of permutations in each chunk the null is computed on (both paths)."""
    sizes: list[int] = []
    for name in ("_quadratic_statistics", "_estimator_statistics"):
        original = getattr(two_sample, name)

        def spy(*args, original=original, **kwargs):
            sizes.append(args[2].shape[0])
            return original(*args, **kwargs)

        monkeypatch.setattr(two_sample, name, spy)
    return sizes


@pytest.mark.parametrize("estimator", ["unbiased", "linear"])  # the fast (Gram) path and the estimator path
def test_permutations_are_streamed_in_chunks_with_the_unchunked_result(estimator: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """--permutations 1e9 tried to build all permutations at once (1.6 TB); chunks give the same answer."""
    x, y = sets(4, n=9, m=7, shift=0.4)
    whole = permutation_test(x, y, "energy", estimator, permutations=301, seed=6)
    whole_null = null_distribution(x, y, "energy", estimator, permutations=301, seed=6)
    sizes = recorded_chunks(monkeypatch)
    monkeypatch.setattr(two_sample, "_BATCH_ELEMENTS", 16 * 5 * (4 if estimator == "linear" else 1))  # 5 per chunk
    assert permutation_test(x, y, "energy", estimator, permutations=301, seed=6) == whole
    assert max(sizes) == 5 and sum(sizes) == 301 + (estimator == "unbiased")  # + the observed labelling
    chunked = null_distribution(x, y, "energy", estimator, permutations=301, seed=6)
    torch.testing.assert_close(chunked, whole_null, rtol=1e-12, atol=1e-14)  # GEMMs of another batch size round differently


def test_a_million_permutations_run_in_bounded_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = sets(5, n=6, m=4, shift=3.0)
    sizes = recorded_chunks(monkeypatch)
    statistic, pvalue = permutation_test(x, y, "energy", "unbiased", permutations=1_000_000, seed=1)
    assert sum(sizes) == 1_000_001 and max(sizes) <= two_sample._BATCH_ELEMENTS // 10  # rows of 10 pooled cells
    assert pvalue == pytest.approx(1 / 210, rel=0.05)  # the observed split is the most extreme of C(10, 4) = 210


def test_ties_count_as_at_least_observed() -> None:
    # Same multiset of cells in both sets: the observed biased MMD^2 is the smallest possible.
    base = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = base[[0, 0, 1, 2, 2, 2]]
    _, pvalue = permutation_test(x, x.flip(0), build_kernel("rbf", {"lengthscale": 1.3}), "biased", permutations=50)
    assert pvalue == 1.0


def test_bad_arguments() -> None:
    x, y = sets(0)
    with pytest.raises(InputError, match="permutations must be a positive integer"):
        permutation_test(x, y, "energy", "unbiased", permutations=0)
    with pytest.raises(InputError, match="one set each"):
        permutation_test(x[None], y[None], "energy", "unbiased")
    with pytest.raises(InputError, match="at least 2 cells"):
        permutation_test(x[:1], y, "energy", "unbiased")


def test_fdr_bh_matches_statsmodels() -> None:
    p = np.random.default_rng(0).uniform(size=40) ** 2
    np.testing.assert_allclose(fdr_bh(p), multipletests(p, method="fdr_bh")[1], rtol=1e-12)
    assert fdr_bh([]).shape == (0,)


# --- etest on AnnData -----------------------------------------------------------------------


def test_etest_on_synthetic_screen() -> None:
    adata = make_screen()
    table, skipped = etest(adata, group_by="cell_type", kernel="energy", permutations=99)
    assert skipped == []
    assert list(table.columns) == COLUMNS
    assert sorted(zip(table.group, table.perturbation)) == [(g, p) for g in "ab" for p in ("none", "shift")]
    assert (table.n_cells == 24).all() and (table.n_control == 24).all()
    dense, obs = adata.X.toarray(), adata.obs
    for row in table.itertuples():
        cells = dense[((obs.cell_type == row.group) & (obs.perturbation == row.perturbation)).to_numpy()]
        control = dense[((obs.cell_type == row.group) & (obs.perturbation == "control")).to_numpy()]
        # GEMM-form squared distances (|x|^2 + |y|^2 - 2 x.y) lose a few digits against cdist.
        assert row.mmd2 == pytest.approx(numpy_mmd2(cells, control, energy, True), rel=1e-9)
    assert (table.loc[table.perturbation == "shift", "pvalue"] == 0.01).all()
    assert (table.loc[table.perturbation == "none", "pvalue"] > 0.01).all()
    np.testing.assert_allclose(table.pvalue_adj, fdr_bh(table.pvalue))


def test_etest_without_group_by_uses_all() -> None:
    table, _ = etest(make_screen(groups=("a",)), kernel="energy", permutations=9)
    assert set(table.group) == {"all"} and set(table.perturbation) == {"none", "shift"}


def test_etest_is_reproducible_and_subsamples() -> None:
    adata = make_screen()
    first, _ = etest(adata, group_by="cell_type", kernel="energy", permutations=19, seed=7, max_cells=10)
    again, _ = etest(adata, group_by="cell_type", kernel="energy", permutations=19, seed=7, max_cells=10)
    pd.testing.assert_frame_equal(first, again)
    assert (first.n_cells == 10).all() and (first.n_control == 10).all()


def test_group_without_controls_is_skipped_with_warning() -> None:
    adata = make_screen()
    no_control_in_b = ~((adata.obs.cell_type == "b") & (adata.obs.perturbation == "control")).to_numpy()
    table, skipped = etest(adata[no_control_in_b].copy(), group_by="cell_type", kernel="energy", permutations=9)
    assert set(table.group) == {"a"}
    assert len(skipped) == 1 and "group 'b'" in skipped[0] and "0 control cells" in skipped[0]
    only_b = (adata.obs.cell_type == "b").to_numpy() & no_control_in_b
    only_b[0] = True  # one control cell in group a keeps the control label present
    with pytest.raises(DataError, match="Nothing to test"):
        etest(adata[only_b].copy(), group_by="cell_type", kernel="energy", permutations=9)


def test_kernel_defaults_and_params() -> None:
    assert build_kernel("rbf", {}).median
    assert not build_kernel("rbf", {"lengthscale": 2.0}).median
    assert build_kernel("energy", parse_overrides(["beta=2"], flag="--kernel-param")).beta == 2.0
    assert parse_overrides(["lengthscales=[1, 2.5]", "base=rbf"], flag="--x") == {"lengthscales": [1, 2.5], "base": "rbf"}
    with pytest.raises(ConfigError, match="--kernel-param expects key=value"):
        parse_overrides(["beta"], flag="--kernel-param")


# --- the command ----------------------------------------------------------------------------


@pytest.fixture
def screen_file(tmp_path: Path) -> Path:
    path = tmp_path / "screen.h5ad"
    make_screen().write_h5ad(path)
    return path


def test_command_writes_csv_atomically(screen_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out" / "results.csv"
    code = main(["etest", str(screen_file), "--group-by", "cell_type", "--kernel", "energy", "--permutations", "49", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0
    table = pd.read_csv(out, keep_default_na=False)
    assert list(table.columns) == COLUMNS and len(table) == 4
    assert os.listdir(out.parent) == ["results.csv"]  # no temporary file left beside it
    stdout = captured.out
    assert stdout.index("shift") < stdout.index("none")  # sorted by MMD^2, largest first


def test_command_leaves_no_file_when_writing_fails(
    screen_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken_to_csv(self, path, **kwargs):
        Path(path).write_text("perturbation,gro")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", broken_to_csv)
    out = tmp_path / "out" / "results.csv"
    code = main(["etest", str(screen_file), "--kernel", "energy", "--permutations", "9", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    progress = [line.rsplit(" ", 2)[0] for line in err[:-1]]  # without the seconds
    assert progress == ["E-test: 1/2 tests (50%)", "E-test: 2/2 tests (100%)"]  # progress, then the error
    assert code == 2 and err[-1] == (
        f"perturbdiff: error: Cannot write {out}: No space left on device; free space on that disk (or write elsewhere) and run again."
    )
    assert os.listdir(out.parent) == []


def test_command_warns_on_skipped_group(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adata = make_screen()
    adata = adata[~((adata.obs.cell_type == "b") & (adata.obs.perturbation == "control")).to_numpy()].copy()
    path = tmp_path / "partial.h5ad"
    adata.write_h5ad(path)
    assert main(["etest", str(path), "--group-by", "cell_type", "--kernel", "energy", "--permutations", "9"]) == 0
    err = capsys.readouterr().err
    assert "perturbdiff: warning:" in err and "group 'b'" in err


# --- agreement with scperturb ---------------------------------------------------------------


@functools.cache
def _real_subset() -> ad.AnnData:
    """A172 cells of the real screen: control and four perturbations (scperturb compares all pairs)."""
    if not REAL_DATA.exists():
        pytest.skip(f"real data not found at {REAL_DATA} (set PERTURBDIFF_DATA to its folder)")
    adata = ad.read_h5ad(REAL_DATA)
    adata = adata[adata.obs.cell_type == "A172"]
    kept = ["control", *sorted(set(adata.obs.perturbation) - {"control"})[:4]]
    return adata[adata.obs.perturbation.isin(kept)].copy()


@pytest.mark.parametrize(
    ("dist", "sample_correct", "beta", "estimator"),
    [("euclidean", True, 1, "unbiased"), ("sqeuclidean", True, 2, "unbiased"), ("sqeuclidean", False, 2, "biased")],
)
@pytest.mark.parametrize("source", ["synthetic", "real"])
def test_energy_agrees_with_scperturb(source: str, dist: str, sample_correct: bool, beta: int, estimator: str) -> None:
    scperturb = pytest.importorskip("scperturb")
    adata = make_screen(groups=("a",)) if source == "synthetic" else _real_subset().copy()
    adata.obsm["X_dense"] = adata.X.toarray()
    reference = scperturb.edist(
        adata, obs_key="perturbation", obsm_key="X_dense", dist=dist, sample_correct=sample_correct, n_jobs=1, verbose=False
    )["control"]
    table, _ = etest(adata, kernel=build_kernel("energy", {"beta": beta}), estimator=estimator, permutations=1)
    got = table.set_index("perturbation")["mmd2"]
    assert len(got) >= 2
    # atol: scperturb's sklearn distances between two copies of a set are not exactly 0 on the
    # diagonal (sqrt of rounding, ~1e-7), which moves its E-distance by ~1e-9 on the real data.
    np.testing.assert_allclose(got.to_numpy(), reference.loc[got.index].to_numpy(), rtol=1e-9, atol=1e-7)
    if not sample_correct:  # the biased beta=2 energy distance is exactly 2 ||mean_x - mean_y||^2
        dense, labels = adata.obsm["X_dense"], adata.obs.perturbation.to_numpy()
        control = dense[labels == "control"].mean(0)
        expected = [2 * np.sum((dense[labels == name].mean(0) - control) ** 2) for name in got.index]
        np.testing.assert_allclose(got.to_numpy(), expected, rtol=1e-9)
