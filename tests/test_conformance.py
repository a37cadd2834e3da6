"""The conformance kit over every registered kernel, estimator and backend, and against broken ones."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from perturbdiff_core.errors import PluginLoadError
from perturbdiff_core.estimators import MMDEstimator, QuadraticMMD
from perturbdiff_core.kernels import Kernel, squared_distances
from perturbdiff_core.registry import load, names
from perturbdiff_core.testing import check_estimator, check_kernel, check_reduction
from perturbdiff_plugins.reductions import DenseReduction

#: Constructor parameters for plug-ins that need some; every other plug-in is built with defaults.
KERNEL_PARAMS: dict[str, dict[str, Any]] = {"gpytorch": {"class_name": "RBFKernel", "lengthscale": 1.3}}


def load_or_skip(group: str, name: str, **params: Any) -> Any:
    """Load a plug-in; skip only when its module file is not in this tree (written in parallel)."""
    try:
        return load(group, name, **params)
    except PluginLoadError as err:
        cause = err.__cause__
        if isinstance(cause, ModuleNotFoundError) and (cause.name or "").startswith("perturbdiff_plugins."):
            pytest.skip(f"plug-in module {cause.name} is absent from this tree")
        raise


@pytest.mark.parametrize("name", names("perturbdiff.kernels"))
def test_every_registered_kernel_conforms(name: str) -> None:
    check_kernel(load_or_skip("perturbdiff.kernels", name, **KERNEL_PARAMS.get(name, {})))


def test_kernel_kit_runs_in_float32_too() -> None:
    check_kernel(load("perturbdiff.kernels", "matern52", lengthscale=1.7), dtype=torch.float32)


ESTIMATOR_CASES = [
    ("biased", {}, "rbf", {}),
    ("biased", {"backend": "chunked"}, "energy", {}),
    ("unbiased", {}, "laplace", {"lengthscale": "median"}),
    ("unbiased", {"backend": "dense"}, "gpytorch", {"class_name": "MaternKernel", "nu": 2.5}),
    ("linear", {}, "matern32", {}),
    ("linear", {}, "energy", {}),
    ("chunked", {"block_size": 3}, "imq", {}),
    ("chunked", {"block_size": 5, "unbiased": False}, "mixture", {}),
    ("embedding", {"num_features": 256}, "rbf", {}),
    ("embedding", {"embedding": "nystrom", "num_landmarks": 10}, "matern52", {}),
    ("embedding", {"embedding": "exact"}, "energy", {}),
    ("embedding", {"embedding": "rff", "num_features": 64}, "rbf", {"lengthscale": "median"}),
    ("embedding", {"embedding": "rff", "num_features": 64, "unbiased": True}, "matern32", {}),
]


@pytest.mark.parametrize(("estimator", "params", "kernel", "kernel_params"), ESTIMATOR_CASES)
def test_estimators_conform(estimator: str, params: dict, kernel: str, kernel_params: dict) -> None:
    est = load_or_skip("perturbdiff.estimators", estimator, **params)
    check_estimator(est, load_or_skip("perturbdiff.kernels", kernel, **kernel_params))


def test_every_registered_estimator_is_covered() -> None:
    covered = {case[0] for case in ESTIMATOR_CASES} | {"keops"}
    assert set(names("perturbdiff.estimators")) <= covered


@pytest.mark.keops
@pytest.mark.slow
def test_keops_estimator_conforms() -> None:
    pytest.importorskip("pykeops")
    check_estimator(load_or_skip("perturbdiff.estimators", "keops"), "rbf", lengthscale=1.4)


@pytest.mark.parametrize("kernel", ["rbf", "energy", "matern32", "mixture", "gpytorch"])
@pytest.mark.parametrize(("backend", "params"), [("dense", {}), ("chunked", {"block_size": 3})])
def test_backends_agree_with_the_dense_reference(backend: str, params: dict, kernel: str) -> None:
    reduction = load("perturbdiff.backends", backend, **params)
    check_reduction(reduction, load_or_skip("perturbdiff.kernels", kernel, **KERNEL_PARAMS.get(kernel, {})))


@pytest.mark.keops
@pytest.mark.slow
def test_keops_backend_agrees_with_the_dense_reference() -> None:
    pytest.importorskip("pykeops")
    check_reduction(load_or_skip("perturbdiff.backends", "keops"), "rbf")


# ----------------------------------------------------------------- the kit catches broken components


class Gaussian(Kernel):
    """exp(-||x - y||^2 / 2) with a hook to break it."""

    def forward(self, x: Tensor, y: Tensor, *, diag: bool = False, same: bool = False) -> Tensor:
        d2 = (x - y).square().sum(-1) if diag else squared_distances(x, y, same=same)
        return (-0.5 * d2).exp()


class Asymmetric(Gaussian):
    def forward(self, x: Tensor, y: Tensor, *, diag: bool = False, same: bool = False) -> Tensor:
        k = super().forward(x, y, diag=diag, same=same)
        return k if diag else k * (1.0 + 0.1 * x[..., :1].tanh())  # rows scaled by a feature of x


class NegativeDefinite(Gaussian):
    def forward(self, x: Tensor, y: Tensor, *, diag: bool = False, same: bool = False) -> Tensor:
        return -super().forward(x, y, diag=diag, same=same)


class BatchLeak(Gaussian):
    """The bandwidth depends on the leading dimension, so a batch differs from a loop over sets."""

    def forward(self, x: Tensor, y: Tensor, *, diag: bool = False, same: bool = False) -> Tensor:
        return super().forward(x / (1.0 + x.shape[0]) ** 0.5, y / (1.0 + x.shape[0]) ** 0.5, diag=diag, same=same)


class WrongDiag(Gaussian):
    def forward(self, x: Tensor, y: Tensor, *, diag: bool = False, same: bool = False) -> Tensor:
        k = super().forward(x, y, diag=diag, same=same)
        return 0.5 * k if diag else k


@pytest.mark.parametrize(
    ("kernel", "match"),
    [
        (Asymmetric(), "symmetry"),
        (NegativeDefinite(), "positive semi-definiteness"),
        (BatchLeak(), "batch"),
        (WrongDiag(), "diag agreement"),
    ],
)
def test_kernel_kit_catches_broken_kernels(kernel: Kernel, match: str) -> None:
    check_kernel(Gaussian())  # the unbroken one passes
    with pytest.raises(AssertionError, match=match):
        check_kernel(kernel)


class IgnoresWeights(MMDEstimator):
    """A biased estimator that silently drops the weights."""

    def estimate(self, x: Tensor, y: Tensor, kernel: Kernel, wx: Tensor, wy: Tensor) -> Tensor:
        return QuadraticMMD(DenseReduction(), unbiased=False).estimate(
            x, y, kernel, torch.full_like(wx, 1 / wx.shape[-1]), torch.full_like(wy, 1 / wy.shape[-1])
        )


class ForgetsDiagonal(QuadraticMMD):
    """Claims to be a U-statistic but keeps the i == j terms (then rescales as if it had not)."""

    def __init__(self) -> None:
        super().__init__(DenseReduction(), unbiased=True)

    def estimate(self, x: Tensor, y: Tensor, kernel: Kernel, wx: Tensor, wy: Tensor) -> Tensor:
        kxx, kyy, kxy = self.reduction.mmd_terms(kernel, x, y, wx, wy, exclude_diagonal=False)
        return kxx / (1 - wx.square().sum(-1)) + kyy / (1 - wy.square().sum(-1)) - 2 * kxy


class DetachedY(QuadraticMMD):
    """Right value, but no gradient flows to y."""

    def __init__(self) -> None:
        super().__init__(DenseReduction(), unbiased=False)

    def estimate(self, x: Tensor, y: Tensor, kernel: Kernel, wx: Tensor, wy: Tensor) -> Tensor:
        return super().estimate(x, y.detach(), kernel, wx, wy)


@pytest.mark.parametrize(
    ("estimator", "match"),
    [(IgnoresWeights(), "integer weights = repeated cells"), (ForgetsDiagonal(), r"MMD\(x, x\) <= 0"), (DetachedY(), "gradient wrt y")],
)
def test_estimator_kit_catches_broken_estimators(estimator: MMDEstimator, match: str) -> None:
    with pytest.raises(AssertionError, match=match):
        check_estimator(estimator, "rbf")


class KeepsDiagonal(DenseReduction):
    def weighted_sum(self, kernel, x, y, wx, wy, *, same=False, exclude_diagonal=False):  # noqa: ANN001, ANN201
        return super().weighted_sum(kernel, x, y, wx, wy, same=same, exclude_diagonal=False)


class FrozenWeights(DenseReduction):
    def mmd_terms(self, kernel, x, y, wx, wy, *, exclude_diagonal):  # noqa: ANN001, ANN201
        return super().mmd_terms(kernel, x, y, wx.detach(), wy.detach(), exclude_diagonal=exclude_diagonal)


@pytest.mark.parametrize(
    ("reduction", "match"),
    [(KeepsDiagonal(), "exclude_diagonal=True"), (FrozenWeights(), "gradient wrt input 2")],
)
def test_reduction_kit_catches_broken_reductions(reduction: DenseReduction, match: str) -> None:
    with pytest.raises(AssertionError, match=match):
        check_reduction(reduction, "rbf")
