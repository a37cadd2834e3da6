"""The conformance kits over every registered plug-in of every group, and against broken ones."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from perturbdiff_core.data.encoders import PerturbationEncoder
from perturbdiff_core.diffusion.denoisers import Denoiser
from perturbdiff_core.diffusion.schedules import NoiseSchedule
from perturbdiff_core.errors import PluginLoadError
from perturbdiff_core.evaluation.predictors import Predictor
from perturbdiff_core.mmd.estimators import MMDEstimator, QuadraticMMD
from perturbdiff_core.mmd.kernels import Kernel, RadialKernel, squared_distances
from perturbdiff_core.registry import GROUPS, load, names
from perturbdiff_core.testing import (
    check_denoiser,
    check_encoder,
    check_estimator,
    check_kernel,
    check_predictor,
    check_reduction,
    check_schedule,
    checks,
    parametrize_with_checks,
)
from perturbdiff_plugins.baselines import ControlBaseline
from perturbdiff_plugins.encoders import OneHotEncoder
from perturbdiff_plugins.reductions import DenseReduction
from perturbdiff_plugins.schedules import CosineSchedule

#: Constructor parameters for plug-ins that need some; every other plug-in is built with defaults.
KERNEL_PARAMS: dict[str, dict[str, Any]] = {"gpytorch": {"class_name": "RBFKernel", "lengthscale": 1.3}}

#: A lookup table for the ``lookup`` encoder: the kit's perturbations A, B and C (removed at exit).
_TABLES = tempfile.TemporaryDirectory(prefix="perturbdiff-conformance-")
LOOKUP_TABLE = Path(_TABLES.name) / "vectors.csv"
LOOKUP_TABLE.write_text("name,v1,v2,v3\nA,1.0,0.5,0.0\nB,-0.5,2.0,1.0\nC,0.0,0.25,-3.0\n")

#: Sizes of the denoisers under test (the kit runs them a few dozen times).
DENOISER_SIZES = {"num_genes": 6, "perturbation_dim": 3, "num_cell_types": 2, "num_batches": 3, "size": "tiny", "hidden": 16}

ESTIMATOR_CASES = [
    ("biased", {}, "rbf", {}),
    ("biased", {"backend": "chunked"}, "energy", {}),
    ("unbiased", {}, "laplace", {"lengthscale": "median"}),
    ("unbiased", {"backend": "dense"}, "gpytorch", {"class_name": "MaternKernel", "nu": 2.5}),
    ("linear", {}, "matern32", {}),
    ("linear", {}, "energy", {}),
    ("unbiased", {"backend": "chunked", "backend_params": {"block_size": 3}}, "imq", {}),
    ("biased", {"backend": "chunked", "backend_params": {"block_size": 5}}, "mixture", {}),
    ("embedding", {"num_features": 256}, "rbf", {}),
    ("embedding", {"embedding": "nystrom", "num_landmarks": 10}, "matern52", {}),
    ("embedding", {"embedding": "exact"}, "energy", {}),
    ("embedding", {"embedding": "rff", "num_features": 64}, "rbf", {"lengthscale": "median"}),
    ("embedding", {"embedding": "rff", "num_features": 64, "unbiased": True}, "matern32", {}),
]


def load_or_none(group: str, name: str, **params: Any) -> Any:
    """A plug-in, or None when its module file is not in this tree (written in parallel)."""
    try:
        return load(group, name, **params)
    except PluginLoadError as err:
        cause = err.__cause__
        if isinstance(cause, ModuleNotFoundError) and (cause.name or "").startswith("perturbdiff_plugins."):
            return None
        raise


def builtin_plugins() -> dict[str, list[tuple[str, Any]]]:
    """Group -> (name, kit entry) for every built-in plug-in the kits cover (KeOps ones have their own tests)."""
    entries = {
        "perturbdiff.kernels": [(n, load_or_none("perturbdiff.kernels", n, **KERNEL_PARAMS.get(n, {}))) for n in names("perturbdiff.kernels")],
        "perturbdiff.embeddings": [
            ("exact", load_or_none("perturbdiff.embeddings", "exact", kernel="energy")),
            ("rff", load_or_none("perturbdiff.embeddings", "rff", kernel="rbf", num_features=4096)),
            ("nystrom", load_or_none("perturbdiff.embeddings", "nystrom", kernel="matern32")),
        ],
        "perturbdiff.estimators": [
            (name, (load_or_none("perturbdiff.estimators", name, **params), {"kernel": load("perturbdiff.kernels", kernel, **kernel_params)}))
            for name, params, kernel, kernel_params in ESTIMATOR_CASES
        ],
        "perturbdiff.backends": [
            (name, (load_or_none("perturbdiff.backends", name, **params), {"kernel": load("perturbdiff.kernels", kernel, **KERNEL_PARAMS.get(kernel, {}))}))
            for name, params in (("dense", {}), ("chunked", {"block_size": 3}))
            for kernel in ("rbf", "energy", "matern32", "mixture", "gpytorch")
        ],
        "perturbdiff.schedules": [(n, load_or_none("perturbdiff.schedules", n)) for n in names("perturbdiff.schedules")],
        "perturbdiff.denoisers": [(n, load_or_none("perturbdiff.denoisers", n, **DENOISER_SIZES)) for n in names("perturbdiff.denoisers")]
        + [(f"{n}-templates", load_or_none("perturbdiff.denoisers", n, **DENOISER_SIZES, templates=True))
           for n in names("perturbdiff.denoisers")],  # per-cell origins: each target cell reads its control cell
        "perturbdiff.encoders": [
            ("onehot", load_or_none("perturbdiff.encoders", "onehot")),
            ("lookup", load_or_none("perturbdiff.encoders", "lookup", path=str(LOOKUP_TABLE))),
        ],
        "perturbdiff.predictors": [(n, load_or_none("perturbdiff.predictors", n)) for n in names("perturbdiff.predictors")],
    }
    def built(entry):
        return (entry[0] if isinstance(entry, tuple) else entry) is not None

    return {group: [(n, e) for n, e in found if built(e)] for group, found in entries.items()}


BUILTINS = builtin_plugins()


@parametrize_with_checks([entry for found in BUILTINS.values() for _, entry in found])
def test_builtin_plugins_conform(obj: Any, check: Any) -> None:
    check(obj)


def test_every_registered_plugin_is_covered() -> None:
    # KeOps has tests of its own below; the deprecated estimator aliases are checked against the
    # statistics they stand for in test_estimators.py.
    elsewhere = {"perturbdiff.estimators": {"keops", "chunked"}, "perturbdiff.backends": {"keops"}}
    for group in GROUPS:
        covered = {name for name, _ in BUILTINS[group]} | elsewhere.get(group, set())
        assert set(names(group)) <= covered, group


def test_parametrize_with_checks_gives_one_item_per_check() -> None:
    mark = parametrize_with_checks([CosineSchedule(num_steps=50), (load("perturbdiff.estimators", "linear"), {"kernel": "energy"})])
    assert mark.args[0] == ("obj", "check")
    assert [param.id for param in mark.args[1]] == [
        "CosineSchedule-betas_and_alpha_bar_0",
        "CosineSchedule-monotone",
        "CosineSchedule-final_value",
        "CosineSchedule-config_round_trip",
        "LinearMMD-values",  # no cell_order: a linear-time estimator pairs cells by position
        "LinearMMD-batching",
        "LinearMMD-weights",
        "LinearMMD-gradients",
    ]
    labels = [label for label, _ in checks(load("perturbdiff.kernels", "rbf"))]
    assert {"same_path", "definiteness", "lengthscale", "keops_profile", "gradients"} <= set(labels)
    assert "lengthscale" not in [label for label, _ in checks(Gaussian())]  # radial kernels only
    with pytest.raises(TypeError, match="no kit"):
        checks(object())


def test_a_check_whose_optional_dependency_is_absent_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_pykeops(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("pykeops"):
            raise ImportError("No module named 'pykeops'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pykeops)
    check_kernel(TorchOpsProfile(lengthscale=1.2))  # the kit passes over the KeOps smoke test
    mark = parametrize_with_checks([RadialGaussian(lengthscale=1.0)])
    (obj, check) = next(param.values for param in mark.args[1] if param.id.endswith("keops_profile"))
    with pytest.raises(pytest.skip.Exception, match="pykeops does not import"):
        check(obj)


def test_kits_leave_their_object_unchanged() -> None:
    net = PerCell(**SIZES)
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    check_denoiser(net)
    assert net.training and all(torch.equal(weights[k], v) for k, v in net.state_dict().items())
    encoder, predictor, kernel = OneHotEncoder(), load("perturbdiff.predictors", "linear"), load("perturbdiff.kernels", "rbf")
    check_encoder(encoder)
    check_predictor(predictor)
    check_kernel(kernel)
    assert not encoder.fitted and predictor._train is None and kernel.median and kernel.raw_lengthscale.dtype == torch.float64


def test_kernel_kit_runs_in_float32_too() -> None:
    check_kernel(load("perturbdiff.kernels", "matern52", lengthscale=1.7), dtype=torch.float32)


@pytest.mark.keops
@pytest.mark.slow
def test_the_keops_backend_under_an_estimator_conforms() -> None:
    pytest.importorskip("pykeops")
    check_estimator(load("perturbdiff.estimators", "unbiased", backend="keops"), "rbf", lengthscale=1.4)


@pytest.mark.keops
@pytest.mark.slow
def test_keops_backend_agrees_with_the_dense_reference() -> None:
    pytest.importorskip("pykeops")
    check_reduction(load("perturbdiff.backends", "keops"), "rbf")


# ----------------------------------------------------------------- the kit catches broken kernels


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


class SameShortcut(Gaussian):
    """A 'fast path' for y is x that forgets the 1/2: every check before same_path passes."""

    def forward(self, x: Tensor, y: Tensor, *, diag: bool = False, same: bool = False) -> Tensor:
        if same and not diag:
            return (-squared_distances(x, x, same=True)).exp()
        return super().forward(x, y, diag=diag, same=same)


class Triangle(RadialKernel):
    """(1 - ||x - y|| / l)_+: positive definite on a line only; on 12 points in 4 dimensions it looks fine."""

    def profile(self, s: Tensor) -> Tensor:
        return (1.0 - s.sqrt()).relu()


class LengthscaleTwice(RadialKernel):
    """Reads the lengthscale again inside profile: k_l(x, y) = exp(-r^2 / (2 l^3))."""

    def profile(self, s: Tensor) -> Tensor:
        return (-0.5 * s / self.lengthscale).exp()


class TorchOpsProfile(RadialKernel):
    """torch.exp(s) instead of s.exp(): right on tensors, a TypeError on KeOps LazyTensors."""

    def profile(self, s: Tensor) -> Tensor:
        return torch.exp(-0.5 * s)


@pytest.mark.parametrize(
    ("kernel", "match"),
    [
        (Asymmetric(), "symmetry"),
        (NegativeDefinite(), "positive semi-definiteness"),
        (BatchLeak(), "batch"),
        (WrongDiag(), "diag agreement"),
        (SameShortcut(), r"same=True path failed: K\(x, x\) differs from K\(x, x.clone\(\)\)"),
        (Triangle(lengthscale=1.0), "positive semi-definiteness failed on 200 points"),
        (Triangle(), "positive semi-definiteness failed on 200 points"),  # median lengthscale
        (LengthscaleTwice(lengthscale=1.5), r"lengthscale semantics k_l\(x, y\) = k_1\(x / l, y / l\) failed"),
    ],
)
def test_kernel_kit_catches_broken_kernels(kernel: Kernel, match: str) -> None:
    check_kernel(Gaussian())  # the unbroken one passes
    with pytest.raises(AssertionError, match=match):
        check_kernel(kernel)


def test_the_same_path_check_also_sees_the_mmd_of_a_copy() -> None:
    (same_path,) = [check for label, check in checks(SameShortcut()) if label == "same_path"]
    with pytest.raises(AssertionError, match=r"same=True path failed"):
        same_path(SameShortcut())


def test_the_new_kernel_checks_were_needed() -> None:
    """The broken kernels above pass every check the kit had before (symmetry, 12-point definiteness,
    batching, diag, float32, gradients): only the new checks catch them."""
    old = {"shapes_and_symmetry", "batching", "diag", "float32", "gradients"}
    for kernel in (SameShortcut(), Triangle(lengthscale=1.0), LengthscaleTwice(lengthscale=1.5)):
        for label, check in checks(kernel):
            if label in old:
                check(kernel)
    z = torch.randn(2, 12, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert torch.linalg.eigvalsh(Triangle(lengthscale=1.0)(z, z)).min() > 0  # fine on 12 points


def test_kernel_kit_runs_profile_on_keops_lazy_tensors() -> None:
    pytest.importorskip("pykeops.torch", reason="pykeops does not import here")
    check_kernel(RadialGaussian(lengthscale=1.2))
    with pytest.raises(AssertionError, match=r"KeOps LazyTensor smoke test failed: profile\(s\) raised TypeError"):
        check_kernel(TorchOpsProfile(lengthscale=1.2))


class RadialGaussian(RadialKernel):
    """The Gaussian kernel as a radial kernel: s.exp() runs on LazyTensors."""

    def profile(self, s: Tensor) -> Tensor:
        return (-0.5 * s).exp()


# -------------------------------------------------------------- broken estimators and reductions


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
    def weighted_sum(self, kernel, x, y, wx, wy, *, same=False, exclude_diagonal=False):
        return super().weighted_sum(kernel, x, y, wx, wy, same=same, exclude_diagonal=False)


class FrozenWeights(DenseReduction):
    def mmd_terms(self, kernel, x, y, wx, wy, *, exclude_diagonal):
        return super().mmd_terms(kernel, x, y, wx.detach(), wy.detach(), exclude_diagonal=exclude_diagonal)


@pytest.mark.parametrize(
    ("reduction", "match"),
    [(KeepsDiagonal(), "exclude_diagonal=True"), (FrozenWeights(), "gradient wrt input 2")],
)
def test_reduction_kit_catches_broken_reductions(reduction: DenseReduction, match: str) -> None:
    with pytest.raises(AssertionError, match=match):
        check_reduction(reduction, "rbf")


# ------------------------------------------------------------------------------ broken schedules


class Float32Betas(CosineSchedule):
    def betas(self) -> Tensor:
        return super().betas().float()


class ForgetsNumSteps(CosineSchedule):
    def config(self) -> dict[str, Any]:
        return {k: v for k, v in super().config().items() if k != "num_steps"}


class TooLittleNoise(NoiseSchedule):
    """Constant small betas: alpha_bar(T) stays far from 0."""

    def betas(self) -> Tensor:
        return torch.full((self.num_steps,), 1e-4, dtype=torch.float64)

    def config(self) -> dict[str, Any]:
        return {"num_steps": self.num_steps}


@pytest.mark.parametrize(
    ("schedule", "match"),
    [
        (Float32Betas(num_steps=100), "float64 tensor of shape"),
        (ForgetsNumSteps(num_steps=100), "must include num_steps"),
        (TooLittleNoise(num_steps=100), r"alpha_bar\(T\) = 0.99"),
    ],
)
def test_schedule_kit_catches_broken_schedules(schedule: NoiseSchedule, match: str) -> None:
    check_schedule(CosineSchedule(num_steps=100))
    with pytest.raises(AssertionError, match=match):
        check_schedule(schedule)


# ------------------------------------------------------------------------------ broken denoisers


class PerCell(Denoiser):
    """A per-cell network conditioned on the mean control cell: meets the contract."""

    def __init__(self, num_genes: int, perturbation_dim: int, num_cell_types: int = 1, num_batches: int = 1, hidden: int = 8) -> None:
        super().__init__(num_genes, perturbation_dim, num_cell_types, num_batches)
        self.hidden = hidden
        self.inp = nn.Linear(2 * num_genes, hidden)
        self.cond = nn.Linear(num_genes + perturbation_dim, hidden)
        self.types = nn.Embedding(num_cell_types, hidden)
        self.out = nn.Linear(hidden, num_genes)

    def context(self, t: Tensor, cond: Any) -> Tensor:
        c = self.cond(torch.cat([cond.control.mean(1), cond.perturbation], -1))
        return c + self.types(cond.cell_type) + (t.to(c.dtype) / 1000.0).unsqueeze(-1)

    def forward(self, x_t: Tensor, t: Tensor, cond: Any, self_cond: Tensor | None = None) -> Tensor:
        estimate = torch.zeros_like(x_t) if self_cond is None else self_cond
        h = self.inp(torch.cat([x_t, estimate], -1)) + self.context(t, cond).unsqueeze(1)
        return self.out(torch.tanh(h))

    def config(self) -> dict[str, Any]:
        return {**self.data_config(), "hidden": self.hidden}


class Positional(PerCell):
    def forward(self, x_t: Tensor, t: Tensor, cond: Any, self_cond: Tensor | None = None) -> Tensor:
        position = torch.arange(x_t.shape[1], dtype=x_t.dtype).reshape(1, -1, 1)
        return super().forward(x_t + position, t, cond, self_cond)


class FirstControlCell(PerCell):
    def context(self, t: Tensor, cond: Any) -> Tensor:
        return super().context(t, type(cond)(cond.control[:, :1], cond.perturbation, cond.cell_type, cond.batch))


class BatchNormed(PerCell):
    """Normalises over the whole batch of sets: one set's output depends on the others."""

    def forward(self, x_t: Tensor, t: Tensor, cond: Any, self_cond: Tensor | None = None) -> Tensor:
        return super().forward(x_t - x_t.mean((0, 1), keepdim=True), t, cond, self_cond)


class ForgetsHidden(PerCell):
    def config(self) -> dict[str, Any]:
        return self.data_config()


class NamedGenes(PerCell):
    """Takes the gene count as 'genes': training cannot inject it."""

    def __init__(self, genes: int, perturbation_dim: int, num_cell_types: int = 1, num_batches: int = 1) -> None:
        super().__init__(genes, perturbation_dim, num_cell_types, num_batches)


SIZES = {"num_genes": 5, "perturbation_dim": 2, "num_cell_types": 2, "num_batches": 2}


@pytest.mark.parametrize(
    ("denoiser", "match"),
    [
        (Positional(**SIZES), "equivariance over cells"),
        (FirstControlCell(**SIZES), "invariance to the order of control cells"),
        (BatchNormed(**SIZES), "sets independent"),
        (ForgetsHidden(**SIZES, hidden=4), "config round trip"),
        (NamedGenes(5, 2, 2, 2), "lacks num_genes"),
    ],
)
def test_denoiser_kit_catches_broken_denoisers(denoiser: Denoiser, match: str) -> None:
    check_denoiser(PerCell(**SIZES))
    with pytest.raises(AssertionError, match=match):
        check_denoiser(denoiser)


# ---------------------------------------------------------------- broken encoders and predictors


class ZeroForUnknown(OneHotEncoder):
    def _part_vectors(self, parts: list[str]) -> np.ndarray:
        out = np.zeros((len(parts), len(self.vocabulary)))
        for row, part in enumerate(parts):
            if part in self._index:
                out[row, self._index[part]] = 1.0
        return out


class NumpyState(OneHotEncoder):
    def _state(self) -> dict[str, Any]:
        return {"vocabulary": np.array(self.vocabulary)}


class ReversedState(OneHotEncoder):
    """Restores its vocabulary in the wrong order: a loaded checkpoint would encode other columns."""

    def _load_state(self, state: dict[str, Any]) -> None:
        self._fit_parts(list(reversed(state["vocabulary"])))


@pytest.mark.parametrize(
    ("encoder", "match"),
    [(ZeroForUnknown(), "encoded as zeros"), (NumpyState(), "not JSON-serialisable"), (ReversedState(), "state_dict round trip failed")],
)
def test_encoder_kit_catches_broken_encoders(encoder: PerturbationEncoder, match: str) -> None:
    check_encoder(OneHotEncoder())
    with pytest.raises(AssertionError, match=match):
        check_encoder(encoder)


class Cheat(ControlBaseline):
    """Returns the real cells of the condition it predicts."""

    def predict(self, data, condition, n_cells, seed):
        rows = data.cells(condition)
        return data.read(np.resize(rows, n_cells))


class Unseeded(ControlBaseline):
    def predict(self, data, condition, n_cells, seed):
        return super().predict(data, condition, n_cells, seed) + np.random.default_rng().normal(size=(n_cells, data.n_genes))


class WrongShift(ControlBaseline):
    def shift(self, data, condition):
        return np.zeros(data.n_genes + 1)


class NegativeError(ControlBaseline):
    def shift_standard_error(self, data, condition):
        return np.full(data.n_genes, -1.0)


class PeekingError(ControlBaseline):
    """Reads the held-out condition's cells for its shift's standard error."""

    def shift_standard_error(self, data, condition):
        return data.read(data.cells(condition)).std(0)


@pytest.mark.parametrize(
    ("predictor", "match"),
    [
        (Cheat(), r"read the real cells of the held-out condition A\|t2: .* during predict"),
        (Unseeded(), "not deterministic for a given seed"),
        (WrongShift(), "shift has shape"),
        (NegativeError(), "shift_standard_error has NaN, Inf or < 0"),
        (PeekingError(), r"A\|t2: .* during shift_standard_error"),
    ],
)
def test_predictor_kit_catches_broken_predictors(predictor: Predictor, match: str) -> None:
    check_predictor(ControlBaseline())
    with pytest.raises(AssertionError, match=match):
        check_predictor(predictor)
