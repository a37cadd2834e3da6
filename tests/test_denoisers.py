"""Denoiser contract for every built-in denoiser: symmetries, set independence, zero init, gradients."""

from __future__ import annotations

import pytest
import torch

from perturbdiff_core.data.batch import Conditioning
from perturbdiff_core.diffusion.denoisers import Denoiser, SelfConditionedInput
from perturbdiff_core.errors import ConfigError, InputError
from perturbdiff_core.registry import load, names

DENOISERS = ["cross_dit", "deepsets"]
G, P, TYPES, BATCHES = 6, 3, 2, 3


def build(name: str, **params) -> Denoiser:
    params = {"num_genes": G, "perturbation_dim": P, "num_cell_types": TYPES, "num_batches": BATCHES, "size": "tiny"} | params
    return load("perturbdiff.denoisers", name, **params)


def randomize(net: Denoiser, seed: int = 0) -> Denoiser:
    """Non-zero random weights everywhere (the zero-initialised layers would hide asymmetries)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    return net.double()


def inputs(b: int = 4, s: int = 5, sc: int = 7, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, s, G, generator=gen, dtype=torch.float64)
    self_cond = torch.randn(b, s, G, generator=gen, dtype=torch.float64)
    cond = Conditioning(
        control=torch.randn(b, sc, G, generator=gen, dtype=torch.float64),
        perturbation=torch.randn(b, P, generator=gen, dtype=torch.float64),
        cell_type=torch.arange(b) % TYPES,
        batch=torch.arange(b) % BATCHES,
    )
    t = torch.randint(1, 1001, (b,), generator=gen)
    return x, t, cond, self_cond


def test_denoisers_are_registered():
    assert set(DENOISERS) <= set(names("perturbdiff.denoisers"))


@pytest.mark.parametrize("name", DENOISERS)
def test_output_shape_with_control_sets_of_another_size(name):
    x, t, cond, sc = inputs(s=5, sc=9)
    net = randomize(build(name))
    assert net(x, t, cond, sc).shape == (4, 5, G)
    assert net(x, t, cond).shape == (4, 5, G)


@pytest.mark.parametrize("name", DENOISERS)
def test_equivariant_to_cell_order(name):
    x, t, cond, sc = inputs()
    net = randomize(build(name))
    perm = torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(2))
    out = net(x, t, cond, sc)
    out_perm = net(x[:, perm], t, cond, sc[:, perm])
    torch.testing.assert_close(out_perm, out[:, perm], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", DENOISERS)
def test_invariant_to_control_cell_order(name):
    x, t, cond, sc = inputs()
    net = randomize(build(name))
    perm = torch.randperm(cond.control.shape[1], generator=torch.Generator().manual_seed(3))
    shuffled = Conditioning(cond.control[:, perm], cond.perturbation, cond.cell_type, cond.batch)
    out = net(x, t, cond, sc)
    torch.testing.assert_close(net(x, t, shuffled, sc), out, rtol=1e-10, atol=1e-10)
    # ...but the control cells themselves matter.
    moved = Conditioning(cond.control + 1.0, cond.perturbation, cond.cell_type, cond.batch)
    assert not torch.allclose(net(x, t, moved, sc), out)


@pytest.mark.parametrize("name", DENOISERS)
def test_sets_of_a_batch_are_independent(name):
    x, t, cond, sc = inputs()
    net = randomize(build(name))
    out = net(x, t, cond, sc)
    x2, sc2, t2 = x.clone(), sc.clone(), t.clone()
    x2[1] += 3.0
    sc2[1] -= 1.0
    t2[1] = 7
    cond2 = Conditioning(cond.control.clone(), cond.perturbation.clone(), cond.cell_type.clone(), cond.batch.clone())
    cond2.control[1] *= 2.0
    cond2.perturbation[1] += 1.0
    cond2.cell_type[1] = 1 - cond2.cell_type[1]
    cond2.batch[1] = (cond2.batch[1] + 1) % BATCHES
    out2 = net(x2, t2, cond2, sc2)
    keep = [0, 2, 3]
    torch.testing.assert_close(out2[keep], out[keep], rtol=1e-10, atol=1e-10)
    assert not torch.allclose(out2[1], out[1])


@pytest.mark.parametrize("name", DENOISERS)
def test_every_input_changes_the_output(name):
    x, t, cond, sc = inputs()
    net = randomize(build(name))
    out = net(x, t, cond, sc)
    variants = {
        "x_t": (x + 0.5, t, cond, sc),
        "t": (x, t // 2 + 1, cond, sc),
        "self_cond": (x, t, cond, sc + 0.5),
        "perturbation": (x, t, Conditioning(cond.control, cond.perturbation + 0.5, cond.cell_type, cond.batch), sc),
        "cell_type": (x, t, Conditioning(cond.control, cond.perturbation, 1 - cond.cell_type, cond.batch), sc),
        "batch": (x, t, Conditioning(cond.control, cond.perturbation, cond.cell_type, (cond.batch + 1) % BATCHES), sc),
    }
    for what, args in variants.items():
        assert not torch.allclose(net(*args), out), f"{what} has no effect"


@pytest.mark.parametrize("name", DENOISERS)
def test_initial_output_is_exactly_zero(name):
    x, t, cond, sc = inputs()
    net = build(name).double()
    assert torch.equal(net(x, t, cond, sc), torch.zeros_like(x))


@pytest.mark.parametrize("name", DENOISERS)
def test_gradients_reach_every_parameter_after_a_few_steps(name):
    # adaLN-Zero / zero output layers block gradients to the inner layers at step 0; a few
    # optimizer steps later every parameter must receive a gradient.
    torch.manual_seed(0)
    net = build(name)
    x, t, cond, sc = inputs(b=6)
    x, sc = x.float(), sc.float()
    cond = Conditioning(cond.control.float(), cond.perturbation.float(), cond.cell_type, cond.batch)
    y = torch.randn_like(x)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(4):
        opt.zero_grad()
        (net(x, t, cond, sc) - y).square().mean().backward()
        opt.step()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reaches {missing}"


@pytest.mark.parametrize("with_estimate", [True, False])
def test_self_conditioned_input_is_a_linear_map_of_the_concatenation(with_estimate):
    """Values and gradients (inputs, weight, bias) equal nn.Linear on [x_t, estimate], the
    missing estimate as zeros; random float64 inputs and weights."""
    gen = torch.Generator().manual_seed(5)
    layer = SelfConditionedInput(G, 4).double()
    reference = torch.nn.Linear(2 * G, 4).double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(4, 2 * G, generator=gen, dtype=torch.float64))
        layer.bias.copy_(torch.randn(4, generator=gen, dtype=torch.float64))
    reference.load_state_dict(layer.state_dict())  # the same parameter names
    x = torch.randn(3, 5, G, generator=gen, dtype=torch.float64, requires_grad=True)
    estimate = torch.randn(3, 5, G, generator=gen, dtype=torch.float64, requires_grad=True)
    out = layer(x, estimate if with_estimate else None)
    expected = reference(torch.cat([x, estimate if with_estimate else torch.zeros_like(x)], dim=-1))
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    inputs = [x, estimate] if with_estimate else [x]
    got = torch.autograd.grad(out, [*inputs, layer.weight, layer.bias], grad)
    want = torch.autograd.grad(expected, [*inputs, reference.weight, reference.bias], grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", DENOISERS)
def test_no_self_condition_estimate_means_a_zero_estimate(name):
    net = randomize(build(name))
    x, t, cond, sc = inputs()
    torch.testing.assert_close(net(x, t, cond), net(x, t, cond, torch.zeros_like(sc)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", DENOISERS)
def test_config_rebuilds_the_network(name):
    net = randomize(build(name, hidden=32))
    rebuilt = load("perturbdiff.denoisers", name, **net.config()).double()
    rebuilt.load_state_dict(net.state_dict())
    x, t, cond, sc = inputs()
    assert rebuilt.config() == net.config()
    torch.testing.assert_close(rebuilt(x, t, cond, sc), net(x, t, cond, sc), rtol=0, atol=0)


def test_size_presets_and_overrides():
    paper = build("cross_dit", size="paper").config()
    assert (paper["hidden"], paper["depth"], paper["heads"]) == (512, 8, 8)
    tiny = build("cross_dit", size="tiny", depth=3).config()
    assert (tiny["hidden"], tiny["depth"], tiny["heads"]) == (64, 3, 4)
    assert len(build("cross_dit", size="tiny", depth=3).blocks) == 3
    assert build("deepsets", size="tiny", hidden=40).config()["hidden"] == 40


@pytest.mark.parametrize("name", DENOISERS)
def test_bad_inputs_raise_input_errors(name):
    net = build(name).double()
    x, t, cond, sc = inputs()
    with pytest.raises(InputError, match=f"{G} genes"):
        net(x[..., :-1], t, cond)
    with pytest.raises(InputError, match="long tensor"):
        net(x, t.double(), cond)
    with pytest.raises(InputError, match="self_cond"):
        net(x, t, cond, sc[:, :-1])
    with pytest.raises(InputError, match="cell_type"):
        net(x, t, Conditioning(cond.control, cond.perturbation, cond.cell_type + TYPES, cond.batch))
    with pytest.raises(InputError, match="perturbation_dim"):
        net(x, t, Conditioning(cond.control, cond.perturbation[:, :-1], cond.cell_type, cond.batch))
    with pytest.raises(InputError, match="control"):
        net(x, t, Conditioning(cond.control[:2], cond.perturbation, cond.cell_type, cond.batch))


def test_bad_sizes_raise_config_errors():
    with pytest.raises(ConfigError, match="size must be one of"):
        build("cross_dit", size="huge")
    with pytest.raises(ConfigError, match="multiple of heads"):
        build("cross_dit", hidden=30, heads=4)
    with pytest.raises(ConfigError, match="num_genes"):
        build("deepsets", num_genes=0)
    with pytest.raises(ConfigError, match="depth"):
        build("deepsets", depth=0)
