"""Cell sets and loaders: the SetBatch contract, where cells come from, seeding, control pairing."""

from __future__ import annotations

import itertools

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from perturbdiff_core.data import (
    ConditionSets,
    Context,
    DataConfig,
    OTPairing,
    PerturbationData,
    make_loader,
    prediction_conditioning,
)
from perturbdiff_core.data.batch import SetBatch
from perturbdiff_core.errors import DataError


@pytest.fixture
def adata(make_adata):
    base = make_adata(n_cells=400, n_genes=30, batches=("b1", "b2"))
    noise = np.random.default_rng(0).uniform(0.001, 0.01, size=base.shape).astype(np.float32)
    return ad.AnnData(sp.csr_matrix(base.X.toarray() + noise), obs=base.obs, var=base.var)  # every row unique


@pytest.fixture
def data(adata):
    return PerturbationData(adata, DataConfig(cell_type_key="cell_type", batch_key="batch", set_size=32)).fit()


def _row_ids(rows: np.ndarray, candidates: np.ndarray) -> list[int]:
    """Index in ``candidates`` of each row of ``rows`` (KeyError when a row is not a candidate)."""
    lookup = {r.tobytes(): i for i, r in enumerate(candidates)}
    return [lookup[r.tobytes()] for r in rows]


def _batches(loader, epochs=1):
    return [b for _ in range(epochs) for b in loader]


def test_batches_follow_the_setbatch_contract(data):
    labels = [c.label for c in data.perturbed_conditions]
    batch = next(iter(make_loader(data, labels, batch_size=3, set_size=16)))
    assert isinstance(batch, SetBatch)
    assert batch.target.shape == batch.cond.control.shape == (3, 16, 30)
    assert batch.target.dtype == batch.cond.control.dtype == torch.float32
    assert batch.cond.cell_type.dtype == batch.cond.batch.dtype == torch.long and batch.cond.cell_type.shape == (3,)
    torch.testing.assert_close(batch.cond.perturbation, data.encode(batch.condition))
    expected = [data.context_indices(data.condition(label).context) for label in batch.condition]
    assert [(int(t), int(b)) for t, b in zip(batch.cond.cell_type, batch.cond.batch)] == expected


@pytest.mark.parametrize("pairing", ["random", "ot"])
def test_targets_and_controls_come_from_their_cells(data, pairing):
    labels = [c.label for c in data.perturbed_conditions]
    for batch in make_loader(data, labels, batch_size=4, pairing=pairing):
        for b, label in enumerate(batch.condition):
            condition = data.condition(label)
            cells, controls = data.cells(condition), data.control_cells(condition.context)
            target_ids = _row_ids(batch.target[b].numpy(), data.read(cells))
            _row_ids(batch.cond.control[b].numpy(), data.read(controls))
            if condition.n_cells >= 32:
                assert len(set(target_ids)) == 32  # without replacement
            else:
                assert len(set(target_ids)) <= condition.n_cells  # with replacement


def test_small_conditions_are_drawn_with_replacement(data):
    label = data.perturbed_conditions[0].label
    n = data.condition(label).n_cells
    item = ConditionSets(data, [label], set_size=3 * n)[0]
    ids = _row_ids(item["target"].numpy(), data.read(data.cells(label)))
    assert len(ids) == 3 * n and len(set(ids)) <= n


def test_same_seed_same_sets_with_any_number_of_workers(data):
    labels = [c.label for c in data.perturbed_conditions]
    one = _batches(make_loader(data, labels, batch_size=4, seed=3, num_workers=0), epochs=2)
    two = _batches(make_loader(data, labels, batch_size=4, seed=3, num_workers=2), epochs=2)
    assert len(one) == len(two) == 2 * 4
    for a, b in zip(one, two):
        assert a.condition == b.condition
        torch.testing.assert_close(a.target, b.target, rtol=0, atol=0)
        torch.testing.assert_close(a.cond.control, b.cond.control, rtol=0, atol=0)
    first, second = torch.cat([b.target for b in one[:4]]), torch.cat([b.target for b in one[4:]])
    assert not torch.equal(first, second)  # a new epoch draws new sets
    other = _batches(make_loader(data, labels, batch_size=4, seed=4), epochs=1)
    assert not torch.equal(first, torch.cat([b.target for b in other]))


def test_evaluation_loader_repeats_the_same_sets(data):
    labels = [c.label for c in data.perturbed_conditions][:5]
    loader = make_loader(data, labels, train=False, batch_size=2)
    a, b = _batches(loader), _batches(loader)
    assert [x.condition for x in a] == [[labels[0], labels[1]], [labels[2], labels[3]], [labels[4]]]
    for x, y in zip(a, b):
        assert torch.equal(x.target, y.target) and torch.equal(x.cond.control, y.cond.control)


def test_ot_pairing_is_the_optimal_assignment_on_a_small_case(data):
    pairing = OTPairing(n_components=5).fit(data)
    condition = data.perturbed_conditions[0]
    context = condition.context
    controls = data.control_cells(context)
    target = data.read(data.cells(condition)[:3])
    rng = np.random.default_rng(0)
    pairing.pool_factor = 2  # pool of 6 controls for 3 targets
    chosen = pairing.pair(data, context, target, 3, rng)
    pool_rng = np.random.default_rng(0)
    pool = controls[pool_rng.choice(len(controls), 6, replace=False)]
    t, c = pairing.pca.transform(target), pairing.pca.transform(data.read(pool))
    cost = ((t[:, None, :] - c[None, :, :]) ** 2).sum(-1).astype(np.float64)
    best = min(sum(cost[i, p[i]] for i in range(3)) for p in itertools.permutations(range(6), 3))
    got = sum(cost[i, list(pool).index(r)] for i, r in enumerate(chosen))
    assert len(set(chosen)) == 3 and got == pytest.approx(best, rel=1e-5)


def test_ot_pairing_brings_controls_closer_to_targets_than_random(data):
    labels = [c.label for c in data.perturbed_conditions]
    ot, rnd = (ConditionSets(data, labels, set_size=16, pairing=p) for p in ("ot", "random"))
    pca = ot.pairing.pca

    def mean_distance(sets):
        return np.mean(
            [
                np.linalg.norm(
                    pca.transform(it["target"].numpy()) - pca.transform(it["control"].numpy()), axis=1
                ).mean()
                for it in (sets[i] for i in range(len(sets)))
            ]
        )

    assert mean_distance(ot) < 0.9 * mean_distance(rnd)


def test_prediction_conditioning_draws_controls_of_the_context(data, make_adata):
    context = Context("t2", "b1")
    cond = prediction_conditioning(data, ["A", "A+B", "B"], context, set_size=8, seed=1)
    assert cond.control.shape == (3, 8, 30) and cond.cell_type.tolist() == [2] * 3 and cond.batch.tolist() == [1] * 3
    torch.testing.assert_close(cond.perturbation, data.encoder.encode(["A", "A+B", "B"]))
    controls = data.read(data.control_cells(context))
    ids = _row_ids(cond.control.reshape(-1, 30).numpy(), controls)
    assert len({r.tobytes() for r in controls}) == len(controls) >= 24  # distinct cells: rows identify them
    assert len(set(ids)) == 24  # the 3 sets take 24 different control cells
    many = prediction_conditioning(data, ["A"] * (len(controls) // 8 + 2), context, set_size=8, seed=2)
    counts = np.bincount(_row_ids(many.control.reshape(-1, 30).numpy(), controls), minlength=len(controls))
    assert counts.min() >= 1 and counts.max() - counts.min() <= 1  # every control once before any twice
    with pytest.raises(DataError, match="never seen in training: 'Q'"):
        prediction_conditioning(data, ["Q"], context)
    with pytest.raises(DataError, match="zero control cells"):
        prediction_conditioning(data, ["A"], Context("t7", "b1"))
