"""The KeOps reduction against the dense kernel matrix (``Kernel.forward`` and explicit weights).

KeOps compiles each new formula (kernel, gene count, dtype, differentiated variable) once,
~5-10 s, and caches it on disk; the cases share one gene count and mostly float64 to keep the
first run to a few minutes. Tests that need compilation skip, with the reason, only when
KeOps cannot compile here.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from torch import Tensor

from perturbdiff_core import mmd2
from perturbdiff_core.errors import ConfigError, PluginLoadError
from perturbdiff_core.mmd.estimators import QuadraticMMD
from perturbdiff_core.mmd.kernels import Kernel, as_kernel
from perturbdiff_core.registry import list_plugins, load
from perturbdiff_plugins import keops as keops_module
from perturbdiff_plugins.keops import KeOpsReduction

pytestmark = pytest.mark.keops

G = 3  # one gene count for every case: one compiled binary per formula
F64 = dict(rtol=1e-10, atol=1e-12)

# (id, registry name, parameters, tolerances).
KERNELS = [
    ("rbf", "rbf", {"lengthscale": 1.3}, F64),
    ("rbf-median", "rbf", {"lengthscale": "median"}, F64),
    ("laplace", "laplace", {"lengthscale": 0.8}, F64),
    ("matern32", "matern32", {"lengthscale": 1.1}, F64),
    ("matern52", "matern52", {"lengthscale": 1.7}, F64),
    ("imq", "imq", {"lengthscale": 0.9}, F64),
    ("energy-1", "energy", {}, F64),
    ("energy-1.5", "energy", {"beta": 1.5}, F64),
    ("energy-2", "energy", {"beta": 2.0}, F64),
    ("mixture", "mixture", {}, F64),
]


@pytest.fixture(scope="module")
def keops() -> KeOpsReduction:
    """The KeOps reduction once it has compiled a probe formula; skips when it cannot compile."""
    reduction = KeOpsReduction()
    x = torch.randn(1, 4, G, dtype=torch.float64)
    w = torch.full((1, 4), 0.25, dtype=torch.float64)
    try:
        reduction.weighted_sum(as_kernel("rbf", lengthscale=1.0), x, x, w, w, same=True)
    except PluginLoadError as err:
        pytest.skip(f"KeOps cannot compile on this machine: {err}")
    return reduction


def cells(*shape: int, seed: int, shift: float = 0.0, dtype: torch.dtype = torch.float64) -> Tensor:
    """Non-trivial cells: anisotropic scales and an offset."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.5, 1.5, shape[-1], dtype=torch.float64)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)


def weights(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(*shape, generator=g, dtype=torch.float64) + 0.1
    return (w / w.sum(-1, keepdim=True)).to(dtype)


def dense_sum(kernel: Kernel, x: Tensor, y: Tensor, wx: Tensor, wy: Tensor, *, same: bool, exclude_diagonal: bool) -> Tensor:
    """``wx^T K wy`` from the dense kernel matrix, optionally without its diagonal."""
    k = kernel.forward(x, y, same=same)
    if exclude_diagonal:
        k = k - torch.diag_embed(torch.diagonal(k, dim1=-2, dim2=-1))
    return torch.einsum("...i,...ij,...j->...", wx, k, wy)


def values_and_grads(fn, inputs: list[Tensor], seed: int) -> tuple[Tensor, tuple[Tensor, ...]]:
    """``fn()`` and the gradients of ``<fn(), c>`` for a random cotangent ``c``."""
    out = fn()
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype).to(out.device)
    return out.detach(), torch.autograd.grad((out * cotangent).sum(), inputs)


@pytest.mark.parametrize("case", ["cross", "within-V", "within-U"])
@pytest.mark.parametrize("kid, name, params, tol", KERNELS, ids=[k[0] for k in KERNELS])
def test_weighted_sum_matches_dense(keops, kid, name, params, tol, case):
    x = cells(2, 7, G, seed=1).requires_grad_(True)
    y = cells(2, 9, G, seed=2, shift=0.4).requires_grad_(True)
    kernel = as_kernel(name, **params).adapt(x, y)  # median: a batched (2, 1, 1) lengthscale
    same, exclude = case != "cross", case == "within-U"
    wx = weights(2, 7, seed=3)
    other, wy, inputs = (x, wx, [x]) if same else (y, weights(2, 9, seed=4), [x, y])
    ours, ours_grad = values_and_grads(
        lambda: keops.weighted_sum(kernel, x, other, wx, wy, same=same, exclude_diagonal=exclude), inputs, 5
    )
    ref, ref_grad = values_and_grads(
        lambda: dense_sum(kernel, x, other, wx, wy, same=same, exclude_diagonal=exclude), inputs, 5
    )
    assert ours.shape == (2,)
    torch.testing.assert_close(ours, ref, **tol)
    for a, b in zip(ours_grad, ref_grad):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, **tol)


def reference_mmd2(kernel: Kernel, x: Tensor, y: Tensor, wx: Tensor, wy: Tensor, unbiased: bool) -> Tensor:
    """V- or U-statistic MMD^2 from the three dense kernel matrices."""
    wx, wy = wx / wx.sum(-1, keepdim=True), wy / wy.sum(-1, keepdim=True)
    kxx = dense_sum(kernel, x, x, wx, wx, same=True, exclude_diagonal=unbiased)
    kyy = dense_sum(kernel, y, y, wy, wy, same=True, exclude_diagonal=unbiased)
    kxy = dense_sum(kernel, x, y, wx, wy, same=False, exclude_diagonal=False)
    if unbiased:
        kxx = kxx / (1 - wx.square().sum(-1))
        kyy = kyy / (1 - wy.square().sum(-1))
    return kxx + kyy - 2 * kxy


@pytest.mark.parametrize("unbiased", [True, False], ids=["U", "V"])
def test_mmd2_through_public_api(keops, unbiased):
    x = cells(3, 8, G, seed=10).requires_grad_(True)
    y = cells(3, 6, G, seed=11, shift=0.5).requires_grad_(True)
    wx, wy = weights(3, 8, seed=12) * 4.0, weights(3, 6, seed=13)  # unnormalised on purpose
    estimator = QuadraticMMD(load("perturbdiff.backends", "keops"), unbiased=unbiased)
    kernel = as_kernel("rbf", lengthscale="median")
    ours, ours_grad = values_and_grads(
        lambda: mmd2(x, y, kernel=kernel, estimator=estimator, x_weights=wx, y_weights=wy), [x, y], 14
    )
    ref, ref_grad = values_and_grads(lambda: reference_mmd2(kernel.adapt(x, y), x, y, wx, wy, unbiased), [x, y], 14)
    torch.testing.assert_close(ours, ref, **F64)
    for a, b in zip(ours_grad, ref_grad):
        torch.testing.assert_close(a, b, **F64)


@pytest.mark.parametrize(
    "shape_x, shape_y",
    [((7, G), (9, G)), ((2, 1, 7, G), (1, 3, 9, G)), ((2, 7, G), (9, G))],
    ids=["unbatched", "broadcast-2x3", "y-shared"],
)
def test_batch_shapes(keops, shape_x, shape_y):
    x, y = cells(*shape_x, seed=20), cells(*shape_y, seed=21, shift=0.3)
    wx, wy = weights(*shape_x[:-1], seed=22), weights(*shape_y[:-1], seed=23)
    kernel = as_kernel("rbf", lengthscale=1.3)
    ours = keops.weighted_sum(kernel, x, y, wx, wy)
    batch = torch.broadcast_shapes(shape_x[:-2], shape_y[:-2])
    ref = dense_sum(
        kernel, x.expand(*batch, *shape_x[-2:]), y.expand(*batch, *shape_y[-2:]), wx, wy, same=False, exclude_diagonal=False
    )
    assert ours.shape == batch
    torch.testing.assert_close(ours, ref, **F64)


def test_float32_agrees_with_float64_dense(keops):
    x64, y64 = cells(2, 60, G, seed=30).requires_grad_(True), cells(2, 50, G, seed=31, shift=0.2)
    wx, wy = weights(2, 60, seed=32), weights(2, 50, seed=33)
    x = x64.detach().float().requires_grad_(True)
    kernel = as_kernel("rbf", lengthscale=1.3)
    ours, (ours_grad,) = values_and_grads(
        lambda: keops.weighted_sum(kernel, x, y64.float(), wx.float(), wy.float()), [x], 34
    )
    ref, (ref_grad,) = values_and_grads(
        lambda: dense_sum(kernel, x64, y64, wx, wy, same=False, exclude_diagonal=False), [x64], 34
    )
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (KeOps' main target)")
@pytest.mark.parametrize(("name", "params"), [("rbf", {"lengthscale": 1.3}), ("energy", {})])
def test_gpu_float32_agrees_with_float64_dense(keops, name, params):
    x64, y64 = cells(2, 300, G, seed=40).requires_grad_(True), cells(2, 250, G, seed=41, shift=0.2)
    wx, wy = weights(2, 300, seed=42), weights(2, 250, seed=43)
    x = x64.detach().float().cuda().requires_grad_(True)
    kernel = as_kernel(name, **params)
    ours, (ours_grad,) = values_and_grads(
        lambda: keops.weighted_sum(kernel.cuda(), x, y64.float().cuda(), wx.float().cuda(), wy.float().cuda()), [x], 44
    )
    ref, (ref_grad,) = values_and_grads(
        lambda: dense_sum(kernel.cpu(), x64, y64, wx, wy, same=False, exclude_diagonal=False), [x64], 44
    )
    assert ours.is_cuda and ours_grad.is_cuda
    torch.testing.assert_close(ours.double().cpu(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_grad.double().cpu(), ref_grad, rtol=1e-4, atol=1e-6)


def test_gradients_reach_weights_and_trainable_lengthscale(keops):
    x, y = cells(2, 7, G, seed=40), cells(2, 9, G, seed=41, shift=0.4)
    wx, wy = weights(2, 7, seed=42).requires_grad_(True), weights(2, 9, seed=43).requires_grad_(True)
    kernel = as_kernel("rbf", lengthscale=1.3, trainable=True)
    inputs = [wx, wy, kernel.raw_lengthscale]
    ours, ours_grad = values_and_grads(lambda: keops.weighted_sum(kernel, x, y, wx, wy), inputs, 44)
    ref, ref_grad = values_and_grads(lambda: dense_sum(kernel, x, y, wx, wy, same=False, exclude_diagonal=False), inputs, 44)
    torch.testing.assert_close(ours, ref, **F64)
    for a, b in zip(ours_grad, ref_grad):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, **F64)


def test_sums_and_multiples_of_radial_kernels(keops):
    x, y = cells(2, 7, G, seed=50), cells(2, 9, G, seed=51, shift=0.4)
    wx, wy = weights(2, 7, seed=52), weights(2, 9, seed=53)
    kernel = as_kernel("rbf", lengthscale=1.5) + 2.0 * as_kernel("laplace", lengthscale=0.7)
    assert keops.supports(kernel, "cpu")
    for same, exclude in [(False, False), (True, True)]:
        other, w_other = (x, wx) if same else (y, wy)
        ours = keops.weighted_sum(kernel, x, other, wx, w_other, same=same, exclude_diagonal=exclude)
        ref = dense_sum(kernel, x, other, wx, w_other, same=same, exclude_diagonal=exclude)
        torch.testing.assert_close(ours, ref, **F64)


class _Linear(Kernel):
    """``k(x, y) = <x, y>``: not radial, so KeOps cannot stream it here."""

    def forward(self, x: Tensor, y: Tensor, *, diag: bool = False, same: bool = False) -> Tensor:
        return (x * y).sum(-1) if diag else x @ y.transpose(-1, -2)


@pytest.mark.parametrize("kernel", [_Linear(), _Linear() + as_kernel("rbf", lengthscale=1.0)], ids=["linear", "linear+rbf"])
def test_non_radial_kernel_is_refused_clearly(kernel):
    reduction = KeOpsReduction()
    assert not reduction.supports(kernel, "cpu")
    x = cells(1, 4, G, seed=60)
    w = weights(1, 4, seed=61)
    with pytest.raises(ConfigError, match="radial.*backend='chunked'"):
        reduction.weighted_sum(kernel, x, x, w, w, same=True)


@pytest.fixture
def fresh_probe():
    """Re-run the cached availability check around a test that fakes a broken installation."""
    keops_module._keops_problem.cache_clear()
    yield
    keops_module._keops_problem.cache_clear()


def test_missing_pykeops_says_what_to_install(monkeypatch, fresh_probe):
    for module in ("pykeops", "pykeops.config", "pykeops.torch"):
        monkeypatch.setitem(sys.modules, module, None)  # import now raises ImportError
    reduction = load("perturbdiff.backends", "keops")  # building it needs no pykeops
    assert not reduction.supports(as_kernel("rbf", lengthscale=1.0), "cpu")
    x, w = cells(1, 4, G, seed=70), weights(1, 4, seed=71)
    with pytest.raises(PluginLoadError, match="pykeops is not importable.*pip install pykeops"):
        reduction.weighted_sum(as_kernel("rbf", lengthscale=1.0), x, x, w, w, same=True)


def test_missing_compiler_says_what_to_install(monkeypatch, fresh_probe):
    config = pytest.importorskip("pykeops.config")
    monkeypatch.setattr(config.pykeops_base, "cxx_compiler", None)
    reduction = KeOpsReduction()
    assert not reduction.supports(as_kernel("rbf", lengthscale=1.0), "cpu")
    x, w = cells(1, 4, G, seed=72), weights(1, 4, seed=73)
    with pytest.raises(PluginLoadError, match="no C\\+\\+ compiler.*g\\+\\+"):
        reduction.weighted_sum(as_kernel("rbf", lengthscale=1.0), x, x, w, w, same=True)


@pytest.mark.parametrize(
    ("probe", "reason"),
    [
        ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", r"crashed \(SIGSEGV\)"),
        ("import sys; sys.exit(3)", "gave a wrong result"),
        ("raise RuntimeError('nvrtc: no such architecture')", r"failed \(RuntimeError: nvrtc: no such architecture\)"),
    ],
    ids=["segfault", "wrong-result", "error"],
)
def test_probe_reports_how_keops_failed_in_its_child_process(monkeypatch, probe, reason):
    monkeypatch.setattr(keops_module, "_PROBE", probe)
    assert re.fullmatch(f"pykeops {reason} on a probe formula on cpu", keops_module._probe_failure("cpu") or "")


def test_probe_passes_where_keops_works(keops):
    assert keops_module._probe_failure("cpu") is None


def test_a_crashing_keops_is_unsupported_with_a_clear_error(monkeypatch, fresh_probe):
    config = pytest.importorskip("pykeops.config")
    if not config.pykeops_base.get_cxx_compiler():
        pytest.skip("pykeops found no C++ compiler here; the probe only runs after that check")
    monkeypatch.setattr(keops_module, "_PROBE", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    reduction = KeOpsReduction()
    assert not reduction.supports(as_kernel("rbf", lengthscale=1.0), "cpu")
    x, w = cells(1, 4, G, seed=74), weights(1, 4, seed=75)
    with pytest.raises(PluginLoadError, match=r"crashed \(SIGSEGV\).*backend='chunked'"):
        reduction.weighted_sum(as_kernel("rbf", lengthscale=1.0), x, x, w, w, same=True)


def test_listed_and_importable_without_pykeops():
    assert "keops" in [info.name for info in list_plugins("perturbdiff.backends")]
    code = "import sys, perturbdiff_plugins.keops; print('pykeops' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
