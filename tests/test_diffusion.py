"""RKHSDiffusion: loss terms against independent computations, guidance, self-conditioning, EMA, learning."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from perturbdiff_core.data.batch import Conditioning, SetBatch
from perturbdiff_core.diffusion.hull import nearest_in_hull
from perturbdiff_core.diffusion.model import RKHSDiffusion, null_condition
from perturbdiff_core.diffusion.samplers import DDIMStep, sample, timestep_grid
from perturbdiff_core.errors import ConfigError, InputError
from perturbdiff_core.mmd.functional import mmd2
from perturbdiff_core.mmd.kernels import as_kernel
from perturbdiff_core.registry import load
from perturbdiff_plugins.kernels import RBF

G, P = 5, 3


def denoiser(name: str = "cross_dit", num_genes: int = G, perturbation_dim: int = P, **params):
    return load("perturbdiff.denoisers", name, num_genes=num_genes, perturbation_dim=perturbation_dim,
                num_cell_types=2, num_batches=1, size="tiny", **params)


def randomized(model: RKHSDiffusion, seed: int = 0) -> RKHSDiffusion:
    """Random non-zero denoiser weights, in float64 (the zero-initialised output would hide errors)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.denoiser.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.double()


def make_batch(b: int = 4, s: int = 6, sc: int = 8, seed: int = 0, dtype=torch.float64) -> SetBatch:
    gen = torch.Generator().manual_seed(seed)
    cond = Conditioning(
        control=torch.randn(b, sc, G, generator=gen, dtype=dtype),
        perturbation=torch.randn(b, P, generator=gen, dtype=dtype),
        cell_type=torch.arange(b) % 2,
        batch=torch.zeros(b, dtype=torch.long),
    )
    return SetBatch(torch.randn(b, s, G, generator=gen, dtype=dtype) * 1.5 + 0.5, cond)


def fixed_draws(batch: SetBatch, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    t = torch.randint(1, 1001, (batch.target.shape[0],), generator=gen)
    return t, torch.randn(batch.target.shape, generator=gen, dtype=batch.target.dtype)



@pytest.mark.parametrize("prediction", ["x0", "eps", "v"])
def test_loss_terms_match_an_independent_computation(prediction):
    model = randomized(RKHSDiffusion(denoiser(), prediction=prediction)).eval()
    batch = make_batch()
    t, noise = fixed_draws(batch)
    terms = model.loss(batch, t=t, noise=noise)

    ab = model.schedule.alpha_bars.numpy()[t.numpy()][:, None, None]
    x0, eps = batch.target.numpy(), noise.numpy()
    x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps
    with torch.no_grad():
        pred = model.denoiser(torch.from_numpy(x_t), t, batch.cond).numpy()
    goal = {"x0": x0, "eps": eps, "v": np.sqrt(ab) * eps - np.sqrt(1 - ab) * x0}[prediction]
    x0_hat = {
        "x0": pred,
        "eps": (x_t - np.sqrt(1 - ab) * pred) / np.sqrt(ab),
        "v": np.sqrt(ab) * x_t - np.sqrt(1 - ab) * pred,
    }[prediction]
    mse = ((pred - goal) ** 2).mean()
    mmd = mmd2(torch.from_numpy(x0_hat), batch.target, kernel="energy", estimator="unbiased").mean().item()
    np.testing.assert_allclose(terms["mse"].item(), mse, rtol=1e-9)
    np.testing.assert_allclose(terms["mmd"].item(), mmd, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(terms["loss"].item(), mse + mmd, rtol=1e-7)


def test_mmd_weight_scales_the_mmd_and_zero_gives_the_mse():
    batch = make_batch()
    base = randomized(RKHSDiffusion(denoiser(), mmd_weight=1.0))
    for weight in (0.0, 2.5):
        other = RKHSDiffusion(denoiser(), mmd_weight=weight).double()
        other.load_state_dict(base.state_dict())
        # Training mode: the same generator seed gives the same t, noise, dropout and self-conditioning.
        a = base.loss(batch, torch.Generator().manual_seed(3))
        b = other.loss(batch, torch.Generator().manual_seed(3))
        assert torch.equal(a["mse"], b["mse"])
        if weight == 0.0:
            assert "mmd" not in b and torch.equal(b["loss"], a["mse"])
        else:
            torch.testing.assert_close(b["loss"], a["mse"] + weight * a["mmd"], rtol=1e-12, atol=1e-12)


def test_loss_is_finite_and_decreases_with_training(one_thread):
    torch.manual_seed(0)
    model = RKHSDiffusion(denoiser(), ema_decay=None)
    batch = make_batch(b=8, s=16, dtype=torch.float32)
    t, noise = fixed_draws(batch)
    opt = torch.optim.Adam(model.trainable_parameters(), lr=3e-3)

    def held_out() -> float:
        model.eval()
        with torch.no_grad():
            value = model.loss(batch, t=t, noise=noise)["loss"].item()
        model.train()
        return value

    before = held_out()
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        terms = model.loss(batch, gen)
        assert all(torch.isfinite(v) for v in terms.values())
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
    assert held_out() < 0.7 * before


def test_condition_dropout_zeroes_the_perturbation_encoding():
    batch = make_batch()
    t, noise = fixed_draws(batch)
    dropped = randomized(RKHSDiffusion(denoiser(), cond_drop_prob=1.0, self_condition_prob=0.0))
    kept = RKHSDiffusion(denoiser(), cond_drop_prob=0.0, self_condition_prob=0.0).double()
    kept.load_state_dict(dropped.state_dict())
    null_batch = SetBatch(batch.target, null_condition(batch.cond))
    assert torch.equal(null_batch.cond.perturbation, torch.zeros_like(batch.cond.perturbation))
    train_drop = dropped.loss(batch, t=t, noise=noise)["loss"]
    train_keep = kept.loss(batch, t=t, noise=noise)["loss"]
    dropped.eval()
    torch.testing.assert_close(train_drop, dropped.loss(null_batch, t=t, noise=noise)["loss"], rtol=0, atol=0)
    torch.testing.assert_close(train_keep, dropped.loss(batch, t=t, noise=noise)["loss"], rtol=0, atol=0)
    assert not torch.allclose(train_drop, train_keep)


def _record_calls(net):
    calls = []
    handle = net.register_forward_hook(lambda module, args, out: calls.append((args, out)))
    return calls, handle


def test_self_conditioning_feeds_the_detached_first_estimate():
    model = randomized(RKHSDiffusion(denoiser(), self_condition_prob=1.0, cond_drop_prob=0.0, prediction="v"))
    batch = make_batch()
    t, noise = fixed_draws(batch)
    calls, handle = _record_calls(model.denoiser)
    loss = model.loss(batch, t=t, noise=noise)["loss"]
    handle.remove()
    assert len(calls) == 2
    (x_t, t1, _, first_sc), first_out = calls[0]
    (_, _, _, second_sc), _ = calls[1]
    assert first_sc is None
    ab = model.schedule.alpha_bar(t)[:, None, None]
    expected = ab.sqrt() * x_t - (1 - ab).sqrt() * first_out  # the v prediction turned into x0
    torch.testing.assert_close(second_sc, expected, rtol=1e-12, atol=1e-12)
    assert not second_sc.requires_grad
    loss.backward()
    assert all(p.grad is not None for p in model.denoiser.parameters())

    never = RKHSDiffusion(denoiser(), self_condition_prob=0.0).double()
    calls, handle = _record_calls(never.denoiser)
    never.loss(batch, t=t, noise=noise)
    handle.remove()
    assert len(calls) == 1 and calls[0][0][3] is None


def test_guidance_weight_one_is_the_conditional_model_and_others_extrapolate():
    model = randomized(RKHSDiffusion(denoiser(), cond_drop_prob=0.1)).eval()
    batch = make_batch()
    t, noise = fixed_draws(batch)
    x_t = model.schedule.q_sample(batch.target, t, noise)
    sc = torch.randn_like(x_t)
    with torch.no_grad():
        cond = model.denoiser(x_t, t, batch.cond, sc)
        uncond = model.denoiser(x_t, t, null_condition(batch.cond), sc)
        assert torch.equal(model.predict_x0(x_t, t, batch.cond, sc, guidance=1.0), cond)
        torch.testing.assert_close(model.predict_x0(x_t, t, batch.cond, sc, guidance=0.0), uncond, rtol=1e-10, atol=1e-10)
        guided = model.predict_x0(x_t, t, batch.cond, sc, guidance=3.0)
        torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(cond, uncond)


def test_sampling_without_guidance_is_the_plain_conditional_sampler():
    model = randomized(RKHSDiffusion(denoiser(), self_condition_prob=0.5, ema_decay=None))
    cond = make_batch().cond

    def conditional(x, t, prev):
        return model.denoiser(x, t, cond, prev)  # x0 prediction, self-conditioned on the previous estimate

    with torch.no_grad():
        expected = sample(conditional, (4, 8, G), model.schedule, timestep_grid(1000, 12), DDIMStep(0.3),
                          generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    got = model.sample(cond, steps=12, eta=0.3, guidance=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(got, expected)
    guided = model.sample(cond, steps=12, eta=0.3, guidance=2.0, generator=torch.Generator().manual_seed(5))
    assert not torch.allclose(guided, expected)


def _shifted(batch: SetBatch, shift: torch.Tensor) -> SetBatch:
    """``batch`` with its target and control cells moved by ``shift`` ``(G,)``."""
    cond = Conditioning(batch.cond.control + shift, batch.cond.perturbation, batch.cond.cell_type, batch.cond.batch)
    return SetBatch(batch.target + shift, cond)


@pytest.mark.parametrize("relative", [True, False])
def test_relative_to_control_makes_loss_and_samples_translation_equivariant(relative: bool):
    """Moving a context's cells (control and target) by a vector c leaves the loss unchanged and moves
    the samples by c when the model works relative to the control set; an absolute model sees the move."""
    model = randomized(RKHSDiffusion(denoiser(), kernel="energy", self_condition_prob=0.0, ema_decay=None,
                                     relative_to_control=relative)).eval()
    batch = make_batch()
    shift = torch.randn(G, generator=torch.Generator().manual_seed(9), dtype=torch.float64) * 3.0
    moved = _shifted(batch, shift)
    t, noise = fixed_draws(batch)
    loss, loss_moved = model.loss(batch, t=t, noise=noise)["loss"], model.loss(moved, t=t, noise=noise)["loss"]
    draw = [model.sample(b.cond, steps=6, generator=torch.Generator().manual_seed(3)) for b in (batch, moved)]
    if relative:
        torch.testing.assert_close(loss_moved, loss, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(draw[1], draw[0] + shift, rtol=1e-9, atol=1e-9)
        # samples live around the control mean, not around the origin
        origin = batch.cond.control.mean(dim=1, keepdim=True)
        plain = randomized(RKHSDiffusion(denoiser(), self_condition_prob=0.0, ema_decay=None)).eval()
        centred = plain.sample(SetBatch(batch.target, model._relative(batch.cond)[0]).cond, steps=6,
                               generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(draw[0], centred + origin, rtol=1e-9, atol=1e-9)
    else:
        assert not torch.allclose(loss_moved, loss)
        assert not torch.allclose(draw[1], draw[0] + shift)


def test_sample_shapes_options_and_errors():
    model = randomized(RKHSDiffusion(denoiser(), ema_decay=None))
    cond = make_batch(b=3, sc=7).cond
    assert model.sample(cond, steps=4).shape == (3, 7, G)
    assert model.sample(cond, 11, sampler="ddpm", steps=4).shape == (3, 11, G)
    a = model.sample(cond, sampler="ddpm", steps=4, generator=torch.Generator().manual_seed(0))
    b = model.sample(cond, sampler="ddpm", steps=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and torch.isfinite(a).all()
    with pytest.raises(ConfigError, match="eta only applies"):
        model.sample(cond, sampler="ddpm", eta=0.5)
    with pytest.raises(ConfigError, match="'ddim' or 'ddpm'"):
        model.sample(cond, sampler="euler")
    with pytest.raises(ConfigError, match="at most 1000"):
        model.sample(cond, steps=2000)
    with pytest.raises(InputError, match="num_cells"):
        model.sample(cond, 0)
    no_null = RKHSDiffusion(denoiser(), cond_drop_prob=0.0)
    with pytest.raises(ConfigError, match="cond_drop_prob=0"):
        no_null.sample(make_batch(dtype=torch.float32).cond, guidance=2.0)


def test_ema_follows_the_weights_with_the_given_decay():
    torch.manual_seed(0)
    model = RKHSDiffusion(denoiser(), ema_decay=0.9)
    batch = make_batch(dtype=torch.float32)
    assert model.sampling_denoiser() is model.denoiser  # never updated: raw weights
    with pytest.raises(ConfigError, match="never been updated"):
        model.sampling_denoiser(use_ema=True)
    ema_ids = {id(p) for p in model.ema.parameters()}
    assert not ema_ids & {id(p) for p in model.trainable_parameters()}
    assert not any(p.requires_grad for p in model.ema.parameters())

    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.5)
    for step in range(3):
        old = [p.detach().clone() for p in model.ema.module.parameters()]
        model.loss(batch, torch.Generator().manual_seed(step))["loss"].backward()
        opt.step()
        opt.zero_grad()
        model.update_ema()
        pairs = list(zip(old, model.ema.module.parameters(), model.denoiser.parameters()))
        if step == 0:  # the first update copies the weights
            assert all(torch.equal(e, w) for _, e, w in pairs)
            continue
        for o, e, w in pairs:
            torch.testing.assert_close(e, 0.9 * o + 0.1 * w, rtol=1e-6, atol=1e-7)
        moved = sum((o - w).abs().sum() for o, _, w in pairs)
        remaining = sum((e - w).abs().sum() for _, e, w in pairs)
        assert remaining < moved
    assert model.sampling_denoiser() is model.ema.module
    assert model.sampling_denoiser(use_ema=False) is model.denoiser


def test_config_round_trip_rebuilds_the_same_model():
    model = RKHSDiffusion(
        denoiser("deepsets", hidden=24),
        {"name": "power_cosine", "num_steps": 300, "power": 1.5},
        kernel={"name": "rbf", "lengthscale": "median"},
        estimator="biased",
        mmd_weight=0.5,
        prediction="v",
        self_condition_prob=0.25,
        cond_drop_prob=0.2,
        ema_decay=0.99,
    ).double()
    config = model.config()
    assert config["denoiser"]["name"] == "deepsets" and config["denoiser"]["hidden"] == 24
    assert config["kernel"] == {"name": "rbf", "lengthscale": "median"}
    rebuilt = RKHSDiffusion.from_config(config).double()
    assert rebuilt.config() == config
    rebuilt.load_state_dict(model.state_dict())
    batch = make_batch()
    t, noise = fixed_draws(batch)
    t = t % 300 + 1
    model.eval(), rebuilt.eval()
    torch.testing.assert_close(rebuilt.loss(batch, t=t, noise=noise)["loss"], model.loss(batch, t=t, noise=noise)["loss"], rtol=0, atol=0)


def test_configuration_errors_are_clear():
    with pytest.raises(ConfigError, match="unknown model configuration keys \\['lambda'\\]"):
        RKHSDiffusion.from_config({"denoiser": {"name": "deepsets", "num_genes": 3, "perturbation_dim": 1}, "lambda": 1.0})
    with pytest.raises(ConfigError, match="'name' key"):
        RKHSDiffusion(denoiser(), kernel={"lengthscale": 2.0})
    with pytest.raises(ConfigError, match="prediction must be one of"):
        RKHSDiffusion(denoiser(), prediction="score")
    with pytest.raises(ConfigError, match="cond_drop_prob"):
        RKHSDiffusion(denoiser(), cond_drop_prob=1.5)
    loaded_kernel = RKHSDiffusion(denoiser(), kernel=as_kernel("rbf", lengthscale=2.0))  # carries the name it was loaded under
    assert loaded_kernel.config()["kernel"] == {"name": "rbf", "lengthscale": 2.0}
    built_kernel = RKHSDiffusion(denoiser(), kernel=RBF(lengthscale=2.0))
    with pytest.raises(ConfigError, match="built directly.*give it by name"):
        built_kernel.config()


def test_bad_batches_raise_input_errors():
    model = RKHSDiffusion(denoiser()).double()
    batch = make_batch()
    with pytest.raises(InputError, match="genes"):
        model.loss(SetBatch(batch.target[..., :-1], batch.cond))
    bad = batch.target.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        model.loss(SetBatch(bad, batch.cond))
    with pytest.raises(InputError, match="values in \\[1, 1000\\]"):
        model.loss(batch, t=torch.zeros(4, dtype=torch.long))


# --------------------------------------------------------------------------- learning
SHIFT_A = 2.0  # condition A: genes 0-3 shifted by +2
SHIFT_B, STD_B = -1.0, 3.0  # condition B: genes 4-7 shifted by -1 and their std tripled


def synthetic(condition: torch.Tensor, cells: int, gen: torch.Generator) -> SetBatch:
    """Control ~ N(0, I_8); A moves the mean of genes 0-3; B moves genes 4-7 and inflates their variance."""
    b = len(condition)
    control = torch.randn(b, cells, 8, generator=gen)
    z = torch.randn(b, cells, 8, generator=gen)
    a = condition.view(-1, 1, 1) == 0
    shift_a = torch.tensor([SHIFT_A] * 4 + [0.0] * 4)
    scale_b = torch.tensor([1.0] * 4 + [STD_B] * 4)
    shift_b = torch.tensor([0.0] * 4 + [SHIFT_B] * 4)
    target = torch.where(a, z + shift_a, z * scale_b + shift_b)
    zeros = torch.zeros(b, dtype=torch.long)
    cond = Conditioning(control, torch.nn.functional.one_hot(condition, 2).float(), zeros, zeros)
    return SetBatch(target, cond)


@pytest.mark.slow
def test_tiny_model_learns_a_two_condition_problem(one_thread):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    net = load("perturbdiff.denoisers", "cross_dit", num_genes=8, perturbation_dim=2, size="tiny")
    model = RKHSDiffusion(net, ema_decay=None)  # paper defaults: x0 prediction, energy MMD, lambda = 1
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3)
    for _ in range(300):
        batch = synthetic(torch.randint(0, 2, (32,), generator=gen), 32, gen)
        terms = model.loss(batch, gen)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
    model.eval()

    def energy(x: torch.Tensor, y: torch.Tensor) -> float:
        return mmd2(x, y, kernel="energy", estimator="unbiased").mean().item()

    scores = {}
    for c in (0, 1):
        ev = synthetic(torch.full((8,), c), 64, gen)
        reference = synthetic(torch.full((8,), c), 64, gen).target  # fresh cells of the same condition
        generated = model.sample(ev.cond, steps=50, generator=gen)
        # The mean-shift prediction: control cells moved by the true population mean effect.
        shift = torch.tensor([SHIFT_A] * 4 + [0.0] * 4) if c == 0 else torch.tensor([0.0] * 4 + [SHIFT_B] * 4)
        scores[c] = {
            "model": energy(generated, reference),
            "control": energy(ev.cond.control, reference),
            "mean_shift": energy(ev.cond.control + shift, reference),
        }
    a, b = scores[0], scores[1]
    assert a["model"] < 0.2 * a["control"], scores
    # Condition B changes the variance too, which a mean shift cannot express.
    assert b["model"] < 0.6 * b["mean_shift"], scores
    assert b["model"] < 0.4 * b["control"], scores
    assert math.isfinite(a["model"]) and math.isfinite(b["model"])


def test_an_anchor_shift_moves_the_origin_of_a_relative_model():
    """With ``cond.shift`` the origin is the control mean plus the shift: the relative model is the plain
    model on target and control cells moved by minus the origin, and its samples are moved back."""
    relative = randomized(RKHSDiffusion(denoiser(), self_condition_prob=0.0, ema_decay=None, relative_to_control=True)).eval()
    plain = randomized(RKHSDiffusion(denoiser(), self_condition_prob=0.0, ema_decay=None)).eval()
    batch = make_batch()
    shift = torch.randn(batch.target.shape[0], G, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    anchored = SetBatch(batch.target, Conditioning(**{**vars(batch.cond), "shift": shift}))
    origin = batch.cond.control.mean(dim=1, keepdim=True) + shift.unsqueeze(1)
    moved = SetBatch(batch.target - origin, Conditioning(**{**vars(batch.cond), "control": batch.cond.control - origin}))
    t, noise = fixed_draws(batch)
    torch.testing.assert_close(relative.loss(anchored, t=t, noise=noise)["loss"], plain.loss(moved, t=t, noise=noise)["loss"],
                               rtol=1e-9, atol=1e-12)
    draw = relative.sample(anchored.cond, steps=5, generator=torch.Generator().manual_seed(2))
    expected = plain.sample(moved.cond, steps=5, generator=torch.Generator().manual_seed(2)) + origin
    torch.testing.assert_close(draw, expected, rtol=1e-9, atol=1e-9)
    assert relative.sample(anchored.cond, steps=5, guidance=2.0).shape == draw.shape  # guidance keeps the shift


@pytest.mark.parametrize("origin", ["cell", "set"])
def test_absolute_control_levels_show_the_denoiser_the_cells_own_levels(origin):
    """control_levels="absolute": the denoiser reads each control cell plus the anchor shift (and, with
    per-cell origins, that as the template) where "centred" reads it minus the set's centre; the
    origins, and so the frame the model diffuses, stay the same."""
    kwargs = dict(kernel="energy", self_condition_prob=0.0, ema_decay=None, relative_to_control=True, origin=origin)
    absolute = randomized(RKHSDiffusion(denoiser(templates=origin == "cell"), control_levels="absolute", **kwargs)).eval()
    centred = randomized(RKHSDiffusion(denoiser(templates=origin == "cell"), **kwargs)).eval()
    batch = make_batch(s=8, sc=8)
    shift = torch.randn(4, G, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    batch = SetBatch(batch.target, Conditioning(**{**vars(batch.cond), "shift": shift}))
    seen, seen_origin = absolute._relative(batch.cond)
    _, centred_origin = centred._relative(batch.cond)
    torch.testing.assert_close(seen.control, batch.cond.control + shift.unsqueeze(1))
    torch.testing.assert_close(seen_origin, centred_origin)
    assert (seen.template is seen.control) if origin == "cell" else seen.template is None
    t, noise = fixed_draws(batch)
    frame = batch.target - seen_origin
    x_t = absolute.schedule.q_sample(frame, t, noise)
    mse = ((absolute.denoiser(x_t, t, seen) - frame) ** 2).mean(dim=(1, 2))
    torch.testing.assert_close(absolute.loss(batch, t=t, noise=noise)["mse"], mse.mean())
    # the same weights (same seed) reading centred cells give another loss: the option reaches the denoiser
    assert not torch.allclose(absolute.loss(batch, t=t, noise=noise)["loss"], centred.loss(batch, t=t, noise=noise)["loss"])


@pytest.mark.parametrize("origin", ["cell", "set"])
def test_hull_control_levels_move_each_sets_mean_into_the_training_contexts_hull(origin):
    """control_levels="hull": the denoiser reads the absolute cells with their set's mean replaced by the
    nearest mixture of the fitted context means; a set whose mean is one of them reads as "absolute"."""
    kwargs = dict(kernel="energy", self_condition_prob=0.0, ema_decay=None, relative_to_control=True, origin=origin)
    hull = randomized(RKHSDiffusion(denoiser(templates=origin == "cell"), control_levels="hull", **kwargs)).eval()
    absolute = randomized(RKHSDiffusion(denoiser(templates=origin == "cell"), control_levels="absolute", **kwargs)).eval()
    batch = make_batch(s=8, sc=8)
    with pytest.raises(ConfigError, match="fit_context_levels"):
        hull._relative(batch.cond)
    means = batch.cond.control.mean(dim=1)  # (4, G)
    levels = torch.randn(3, G, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    hull.fit_context_levels(torch.cat([levels, means[:1]]))
    seen, seen_origin = hull._relative(batch.cond)
    expected = batch.cond.control - means.unsqueeze(1) + nearest_in_hull(means, hull.context_levels).unsqueeze(1)
    torch.testing.assert_close(seen.control, expected)
    torch.testing.assert_close(seen.control[:1], absolute._relative(batch.cond)[0].control[:1])  # its mean is a vertex
    assert not torch.allclose(seen.control[1:], batch.cond.control[1:])  # the others' means lie outside the hull
    torch.testing.assert_close(seen_origin, absolute._relative(batch.cond)[1])
    assert (seen.template is seen.control) if origin == "cell" else seen.template is None
    with pytest.raises(InputError, match=r"\(contexts, 5 genes\)"):
        hull.fit_context_levels(torch.zeros(3, G + 1))


def test_levels_read_are_the_hull_point_for_a_hull_model_and_the_means_otherwise():
    """What ``sample.decrease: fraction`` scales a decrease by: the levels the denoiser reads."""
    means = torch.rand(2, G, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 3
    levels = torch.rand(3, G, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    hull = RKHSDiffusion(denoiser(), relative_to_control=True, control_levels="hull")
    hull.fit_context_levels(levels)
    read = hull.levels_read(means)
    torch.testing.assert_close(read, nearest_in_hull(means, hull.context_levels))
    assert not torch.allclose(read, means)  # these means lie outside the hull
    for other in ("centred", "absolute"):
        model = RKHSDiffusion(denoiser(), relative_to_control=True, control_levels=other)
        assert model.levels_read(means) is means


def test_hull_context_levels_survive_a_checkpoint_round_trip():
    model = RKHSDiffusion(denoiser(), relative_to_control=True, control_levels="hull")
    model.fit_context_levels(torch.randn(5, G))
    rebuilt = RKHSDiffusion.from_config(model.config())
    assert rebuilt.context_levels.shape == (0, G)
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(rebuilt.context_levels, model.context_levels)
    plain = RKHSDiffusion(denoiser(), relative_to_control=True)  # other models save and load an empty buffer
    plain_rebuilt = RKHSDiffusion.from_config(plain.config())
    plain_rebuilt.load_state_dict(plain.state_dict())
    assert plain_rebuilt.context_levels.shape == (0, G)
    older = {k: v for k, v in plain.state_dict().items() if k != "context_levels"}  # written before the buffer
    RKHSDiffusion.from_config(plain.config()).load_state_dict(older)
    with pytest.raises(RuntimeError, match="context_levels"):  # a hull model needs its vertices
        RKHSDiffusion.from_config(model.config()).load_state_dict(older)


def test_control_levels_are_checked_and_survive_a_config_round_trip():
    with pytest.raises(ConfigError, match="centred, absolute, hull"):
        RKHSDiffusion(denoiser(), control_levels="raw")
    model = RKHSDiffusion(denoiser(), relative_to_control=True, control_levels="absolute")
    assert RKHSDiffusion.from_config(model.config()).control_levels == "absolute"
    older = {k: v for k, v in model.config().items() if k != "control_levels"}  # a checkpoint from before the option
    assert RKHSDiffusion.from_config(older).control_levels == "centred"


def test_per_cell_origins_pair_each_target_cell_with_its_control_cell():
    """origin="cell": target cell i is diffused relative to control cell i plus the anchor shift, the
    denoiser reads control cell i as its template, and the MMD compares the populations themselves."""
    model = randomized(RKHSDiffusion(denoiser(templates=True), kernel="energy", self_condition_prob=0.0, ema_decay=None,
                                     relative_to_control=True, origin="cell")).eval()
    batch = make_batch(s=8, sc=8)
    shift = torch.randn(4, G, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    batch = SetBatch(batch.target, Conditioning(**{**vars(batch.cond), "shift": shift}))
    t, noise = fixed_draws(batch)
    centred, origin = model._relative(batch.cond)
    torch.testing.assert_close(origin, batch.cond.control + shift.unsqueeze(1))
    centre = batch.cond.control.mean(1, keepdim=True) + shift.unsqueeze(1)
    torch.testing.assert_close(centred.control, batch.cond.control - centre)
    assert centred.template is centred.control
    frame = batch.target - origin
    x_t = model.schedule.q_sample(frame, t, noise)
    pred = model.denoiser(x_t, t, centred)
    mse = ((pred - frame) ** 2).mean(dim=(1, 2))
    mmd = mmd2(pred + origin, batch.target, kernel="energy", estimator="unbiased")
    terms = model.loss(batch, t=t, noise=noise)
    torch.testing.assert_close(terms["loss"], (mse + mmd).mean(), rtol=1e-9, atol=1e-12)
    with pytest.raises(InputError, match="one cell per control cell"):
        model.sample(batch.cond, 5, steps=2)
    with pytest.raises(InputError, match="template"):
        model.denoiser(x_t, t, batch.cond)  # a template-reading denoiser refuses a conditioning without templates
