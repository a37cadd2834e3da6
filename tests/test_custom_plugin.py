"""The third-party example plug-in (examples/custom_kernel_plugin), used by name once installed."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.spatial.distance import cdist
from test_etest import make_screen, numpy_mmd2

from perturbdiff_core import mmd2
from perturbdiff_core.cli import main
from perturbdiff_core.mmd.kernels import as_kernel
from perturbdiff_core.registry import list_plugins

try:
    distribution("perturbdiff-example-kernel")
except PackageNotFoundError:
    pytest.skip(
        "example plug-in not installed; run: pip install -e examples/custom_kernel_plugin",
        allow_module_level=True,
    )


def test_listed_with_its_distribution() -> None:
    info = next(info for info in list_plugins("perturbdiff.kernels") if info.name == "rational_quadratic")
    assert info.distribution == "perturbdiff-example-kernel"
    assert info.describe().startswith("Rational quadratic kernel")


@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
def test_mmd2_by_name(estimator: str) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(30, 5, generator=generator, dtype=torch.float64)
    y = torch.randn(25, 5, generator=generator, dtype=torch.float64) + 0.4
    got = mmd2(x, y, kernel="rational_quadratic", estimator=estimator, alpha=0.7, lengthscale=1.5)
    l2 = as_kernel("rational_quadratic", lengthscale=1.5).lengthscale.square().item()  # float32-stored l

    def kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (1 + cdist(a, b, "sqeuclidean") / (2 * 0.7 * l2)) ** -0.7

    assert got.item() == pytest.approx(numpy_mmd2(x.numpy(), y.numpy(), kernel, estimator == "unbiased"), rel=1e-10)


def test_etest_command_by_name(tmp_path: Path) -> None:
    adata = make_screen(groups=("a",))
    data, out = tmp_path / "screen.h5ad", tmp_path / "results.csv"
    adata.write_h5ad(data)
    args = ["etest", str(data), "--kernel", "rational_quadratic", "--kernel-param", "alpha=0.5", "--permutations", "49", "--out", str(out)]
    assert main(args) == 0
    table = pd.read_csv(out).set_index("perturbation")
    dense = torch.from_numpy(adata.X.toarray())
    labels = adata.obs.perturbation.to_numpy()
    kernel = as_kernel("rational_quadratic", alpha=0.5, lengthscale="median")  # the command's default
    expected = mmd2(dense[labels == "shift"], dense[labels == "control"], kernel=kernel).item()
    assert table.loc["shift", "mmd2"] == pytest.approx(expected, rel=1e-10)
    assert table.loc["shift", "pvalue"] == 0.02
