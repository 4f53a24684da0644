"""Training: learns a tiny synthetic problem, reproducibly; whole-membrane validation split."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import zarr

from membrain_dist.model import MemBrainEnsemble
from membrain_dist.training import (
    EpochStats,
    TrainConfig,
    draw_epoch,
    split_validation,
    stratified_subset,
    train,
)

S = 8  # small cubes and a narrow network keep the test to a few seconds on 2 cores


def _synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Cubes with a Gaussian blob at an in-plane offset r (voxels) from the centre; label r."""
    rng = np.random.default_rng(seed)
    r = rng.uniform(0.0, 3.0, n)
    a = rng.uniform(0.0, 2 * np.pi, n)
    off = np.stack([np.zeros(n), r * np.sin(a), r * np.cos(a)], axis=1)
    g = np.arange(S) - (S - 1) / 2
    c = np.stack(np.meshgrid(g, g, g, indexing="ij"))
    d2 = ((c[None] - off[:, :, None, None, None]) ** 2).sum(axis=1)
    cubes = np.exp(-d2 / (2 * 1.2**2)) + 0.1 * rng.normal(size=(n, S, S, S))
    return cubes.astype(np.float32), r.astype(np.float32)


# one thread: tiny convolutions gain nothing from more, and a busy machine makes them slower;
# float32 (no bfloat16 autocast on a CPU that has it): the losses are recomputed exactly below
CFG = TrainConfig(
    lr=3e-3,
    batch_size=64,
    max_epochs=6,
    patience=6,
    channels=8,
    device="cpu",
    seed=0,
    num_threads=1,
    amp=False,
)


def test_training_learns_and_is_reproducible():
    x, y = _synthetic(256, 0)
    xv, yv = _synthetic(96, 1)
    seen: list[EpochStats] = []
    res = train(x, y, xv, yv, CFG, progress=seen.append)
    assert seen == res.history and len(res.history) == CFG.max_epochs + 1
    initial = res.history[0].val_loss
    assert res.best_val_loss < 0.5 * initial
    assert res.best_val_loss == min(h.val_loss for h in res.history)
    assert res.history[res.best_epoch].val_loss == res.best_val_loss
    assert not res.model.training
    # the returned model is the best checkpoint
    with torch.inference_mode():
        pred = res.model(torch.from_numpy(xv))
    per_row = torch.nn.functional.smooth_l1_loss(pred, torch.from_numpy(yv), reduction="none")
    near = torch.from_numpy(yv < yv.max() - 1e-4)
    if CFG.balance > 0 and near.any() and not near.all():
        loss = (CFG.balance * per_row[near].mean() + (1 - CFG.balance) * per_row[~near].mean())
    else:
        loss = per_row.mean()
    assert loss.item() == pytest.approx(res.best_val_loss, rel=1e-4)

    # same seed, same data (zarr this time): identical history and weights
    xz = zarr.create_array(store={}, shape=x.shape, chunks=(50, S, S, S), dtype="float32")
    xz[...] = x
    again = train(xz, y, xv, yv, CFG)
    assert again.history == res.history
    for k, v in res.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k]), k
    other = train(x, y, xv, yv, dataclasses.replace(CFG, seed=1, max_epochs=1))
    assert other.history[1] != res.history[1]


def test_bfloat16_autocast_where_the_cpu_has_it():
    """``amp``: the forward passes under bfloat16 autocast on a CPU with native bfloat16 (and
    only there); training still learns, reproducibly, in other arithmetic than float32."""
    from membrain_dist.inference import native_bfloat16
    from membrain_dist.training import _autocast

    cpu = torch.device("cpu")
    with _autocast(cpu, True):
        assert torch.is_autocast_enabled("cpu") == native_bfloat16(cpu)
    with _autocast(cpu, False):
        assert not torch.is_autocast_enabled("cpu")
    if not native_bfloat16(cpu):
        pytest.skip("this CPU has no native bfloat16 (AVX512-BF16 / AMX): amp is float32")
    x, y = _synthetic(256, 0)
    xv, yv = _synthetic(96, 1)
    amp = dataclasses.replace(CFG, amp=True)
    res = train(x, y, xv, yv, amp)
    assert res.best_val_loss < 0.5 * res.history[0].val_loss
    assert train(x, y, xv, yv, amp).history == res.history
    assert train(x, y, xv, yv, dataclasses.replace(CFG, max_epochs=1)).history[1] != \
        res.history[1]


def test_early_stopping_and_internal_split():
    x, y = _synthetic(64, 2)
    groups = np.repeat([3, 5, 9, 11], 16)
    # min_delta larger than any possible gain: no epoch counts as an improvement
    cfg = dataclasses.replace(CFG, min_delta=100.0, max_epochs=50, patience=2, batch_size=16)
    res = train(x, y, cfg=cfg, groups=groups)
    assert res.best_epoch == 0 and [h.epoch for h in res.history] == [0, 1, 2]
    assert res.best_val_loss == res.history[0].val_loss
    with pytest.raises(ValueError):
        train(x, y, x[:4], None, cfg)


def test_split_validation_holds_out_whole_membranes():
    groups = np.repeat(np.arange(10), np.arange(10, 110, 10))  # sizes 10..100
    for seed in range(5):
        mask = split_validation(groups, 0.2, seed)
        for gid in np.unique(groups):  # whole groups only
            assert len(np.unique(mask[groups == gid])) == 1
        assert 0 < mask.sum() < len(groups)
        assert 0.1 < mask.mean() < 0.45
    assert not np.array_equal(split_validation(groups, 0.2, 0), split_validation(groups, 0.2, 1))
    two = split_validation(np.array([1] * 5 + [2] * 95), 0.9, 0)
    assert 0 < two.sum() < 100  # never all groups


def test_split_validation_single_membrane_is_a_spatial_slab():
    rng = np.random.default_rng(0)
    zyx = np.stack(
        [rng.uniform(0, 5, 1000), rng.uniform(0, 100, 1000), rng.uniform(0, 30, 1000)], axis=1
    )
    mask = split_validation(np.zeros(1000, int), 0.2, 0, zyx=zyx)
    assert mask.sum() == 200
    y = zyx[:, 1]  # the longest extent: the slab is at one end of it
    assert y[mask].min() >= y[~mask].max() or y[mask].max() <= y[~mask].min()
    rows = split_validation(np.zeros(50, int), 0.2, 0)
    assert rows.sum() == 10 and rows[-10:].all()


def test_split_validation_two_membranes_hold_out_a_slab_of_each():
    """Holding out one of two membranes would take half the data: a slab of each instead."""
    rng = np.random.default_rng(1)
    zyx = np.concatenate([
        np.stack([rng.uniform(0, 5, 600), rng.uniform(0, 100, 600), rng.uniform(0, 30, 600)], 1),
        np.stack([rng.uniform(50, 55, 400), rng.uniform(0, 20, 400), rng.uniform(0, 80, 400)], 1),
    ])
    groups = np.repeat([7, 9], [600, 400])
    mask = split_validation(groups, 0.2, 0, zyx=zyx)
    assert mask[:600].sum() == 120 and mask[600:].sum() == 80
    for rows, axis in ((slice(0, 600), 1), (slice(600, 1000), 2)):  # each membrane's long axis
        v, m = zyx[rows, axis], mask[rows]
        assert v[m].min() >= v[~m].max() or v[m].max() <= v[~m].min()


def test_full_epochs_draw_the_requested_share_of_near_rows():
    from membrain_dist.training import _epoch_order

    y = torch.full((10_000,), 7.0)
    y[:100] = torch.linspace(0.0, 6.0, 100)  # 1 % near a particle
    gen = torch.Generator().manual_seed(0)
    order = _epoch_order(y, 0.5, gen)
    assert order.shape == (10_000,)
    share = (order < 100).float().mean().item()
    assert share == pytest.approx(0.5, abs=0.03)
    plain = _epoch_order(y, 0.0, gen)
    assert torch.equal(torch.sort(plain).values, torch.arange(10_000))


def _near_mask(n: int, n_near: int, seed: int = 0) -> torch.Tensor:
    near = torch.zeros(n, dtype=torch.bool)
    near[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:n_near]] = True
    return near


@pytest.mark.parametrize("balance, n_far", [(0.5, 300), (0.25, 900), (0.75, 100)])
def test_balanced_epoch_holds_every_near_row_and_the_configured_far_count(balance, n_far):
    near = _near_mask(10_000, 300)
    rows = draw_epoch(near, balance, min_cubes=16, gen=torch.Generator().manual_seed(0))
    counts = torch.bincount(rows, minlength=len(near))
    assert torch.equal(counts[near], torch.ones(300, dtype=counts.dtype))  # each near row once
    assert int(counts[~near].sum()) == n_far  # far rows: near * (1 - balance) / balance ...
    assert int(counts[~near].max()) == 1  # ... drawn without replacement
    assert not torch.equal(rows, torch.sort(rows).values)  # shuffled


def test_balanced_epochs_change_between_epochs_and_repeat_with_the_seed():
    near = _near_mask(5_000, 200)
    gen = torch.Generator().manual_seed(7)
    first, second = draw_epoch(near, 0.5, 16, gen), draw_epoch(near, 0.5, 16, gen)
    far_first, far_second = set(first[~near[first]].tolist()), set(second[~near[second]].tolist())
    assert len(far_first) == len(far_second) == 200
    assert far_first != far_second  # a fresh draw of far rows each epoch
    again = torch.Generator().manual_seed(7)
    assert torch.equal(draw_epoch(near, 0.5, 16, again), first)  # reproducible from the seed
    assert torch.equal(draw_epoch(near, 0.5, 16, again), second)


def test_balanced_epoch_repeats_scarce_near_rows_and_caps_far_rows():
    gen = torch.Generator().manual_seed(0)
    near = _near_mask(1_000, 10)
    rows = draw_epoch(near, 0.5, min_cubes=100, gen=gen)  # 10 near rows, 50 wanted
    counts = torch.bincount(rows, minlength=1_000)
    assert torch.equal(counts[near], torch.full((10,), 5, dtype=counts.dtype))
    assert int(counts[~near].sum()) == 50
    few_far = ~_near_mask(1_000, 20)  # 980 near, 20 far: every far row, once
    counts = torch.bincount(draw_epoch(few_far, 0.5, 16, gen), minlength=1_000)
    assert int(counts[~few_far].sum()) == 20 and int(counts[few_far].min()) == 1
    plenty = _near_mask(1_000, 300)  # 300 near rows, at most 100 of them in an epoch of 200
    first, second = (torch.bincount(draw_epoch(plenty, 0.5, 16, gen, max_cubes=200),
                                    minlength=1_000) for _ in range(2))
    for counts in (first, second):
        assert int(counts[plenty].sum()) == 100 and int(counts[plenty].max()) == 1
        assert int(counts[~plenty].sum()) == 100
    assert not torch.equal(first[plenty], second[plenty])  # another subset of near rows
    for degenerate in (torch.zeros(50, dtype=torch.bool), torch.ones(50, dtype=torch.bool)):
        assert torch.equal(torch.sort(draw_epoch(degenerate, 0.5, 16, gen)).values,
                           torch.arange(50))  # nothing to balance: a permutation
    assert torch.equal(torch.sort(draw_epoch(near, 0.0, 16, gen)).values, torch.arange(1_000))


def test_stratified_subset_is_fixed_and_fills_both_strata():
    near = _near_mask(20_000, 1_500).numpy()
    rows = stratified_subset(near, 4_000, 0.5, seed=3)
    assert len(rows) == 4_000 and len(np.unique(rows)) == 4_000
    assert near[rows].sum() == 1_500  # short stratum: all of it, the rest from the other
    assert np.array_equal(rows, stratified_subset(near, 4_000, 0.5, seed=3))
    half = stratified_subset(near, 2_000, 0.5, seed=3)
    assert near[half].sum() == 1_000
    assert np.array_equal(stratified_subset(near, 0, 0.5, 3), np.arange(20_000))
    assert np.array_equal(stratified_subset(near, 30_000, 0.5, 3), np.arange(20_000))
    plain = stratified_subset(near, 2_000, 0.0, seed=3)
    assert len(plain) == 2_000 and near[plain].sum() < 400  # about 7.5 %: no stratification


def test_training_sees_bounded_epochs_and_reports_time_left():
    x, y = _synthetic(600, 4)
    y[:500] = 3.5  # 100 near rows below the clip of 3.5 ...
    y[500:] = np.minimum(y[500:], 3.4)
    cfg = dataclasses.replace(CFG, max_epochs=4, patience=2, min_epoch_cubes=16, val_cubes=64,
                              min_delta=100.0)  # no epoch improves: early stop after 2
    res = train(x, y, x[:200], y[:200], cfg)
    assert [h.cubes for h in res.history[1:]] == [200, 200]  # ... and as many far rows
    first = res.history[1]
    mean = first.seconds
    assert first.eta_seconds == pytest.approx(3 * mean) and first.stop_seconds == pytest.approx(mean)
    assert res.history[-1].eta_seconds == pytest.approx(2 * (first.seconds + res.history[2].seconds) / 2)
    assert res.history[-1].stop_seconds == 0
    assert "left" in first.line() and "if no better epoch" in first.line()
    assert "epoch 2/4" in res.history[-1].line() and "left" not in res.history[-1].line()
    full = train(x, y, x[:200], y[:200], dataclasses.replace(cfg, epoch="full", max_epochs=1))
    assert full.history[1].cubes == 600


def test_members_are_the_seeded_single_runs_on_the_same_held_out_rows():
    x, y = _synthetic(128, 5)
    groups = np.repeat(np.arange(8), 16)  # 8 membranes: seeds 3 and 4 hold out different ones
    cfg = dataclasses.replace(CFG, max_epochs=2, seed=3, members=2)
    seen: list[EpochStats] = []
    res = train(x, y, cfg=cfg, groups=groups, progress=seen.append)
    assert isinstance(res.model, MemBrainEnsemble) and len(res.members) == 2
    assert [(s.member, s.members) for s in seen] == [(0, 2)] * 3 + [(1, 2)] * 3
    assert seen[3].line().startswith("member 2/2 epoch 0/2")
    # time left counts the members still to train: at the first member's last epoch, one
    # more member of the first one's duration; nothing at the very end
    first_total = sum(h.seconds for h in res.members[0].history)
    assert seen[2].eta_seconds == pytest.approx(first_total) and "left" in seen[2].line()
    assert seen[-1].eta_seconds == 0 and seen[-1].stop_seconds == 0
    # member 0 is exactly the single network of seed 3; member 1 (seed 4) holds out the
    # rows seed 3 held out, so the ensemble is validated and calibrated on rows none trained on
    single = train(x, y, cfg=dataclasses.replace(cfg, members=1), groups=groups)
    assert single.history == res.members[0].history
    for name, v in single.model.state_dict().items():
        assert torch.equal(v, res.model.members[0].state_dict()[name]), name
    for member in res.members:
        np.testing.assert_array_equal(member.held_out, single.held_out)
    other = split_validation(groups, cfg.val_fraction, 4)
    assert not np.array_equal(other, single.held_out)  # seed 4's own split differs
    assert res.members[0].history != res.members[1].history
    m = res.metrics()
    assert m["best_val_loss"] == pytest.approx(np.mean([r.best_val_loss for r in res.members]))
    assert [s["best_epoch"] for s in m["members"]] == [r.best_epoch for r in res.members]


def test_an_ensemble_predicts_at_the_cost_of_one_network():
    from membrain_dist.config import PipelineConfig
    from membrain_dist.pipeline import ensemble_rotations

    assert TrainConfig().members == 1
    with pytest.raises(ValueError, match="members"):
        TrainConfig(members=0)
    # the members' own turns replace the input's: four members at 1 pass each = 4 passes
    for members, rotations, want in ((1, 4, 4), (2, 4, 2), (4, 4, 1), (3, 4, 1), (4, 8, 2)):
        cfg = PipelineConfig().with_overrides("train", members=members).with_overrides(
            "inference", rotations=rotations)
        assert ensemble_rotations(cfg).inference.rotations == want


@pytest.mark.parametrize("members", [1, 2])
def test_bad_training_data_is_refused_by_name(members):
    x, y = _synthetic(32, 6)
    cfg = dataclasses.replace(CFG, max_epochs=1, members=members)
    bad = x.copy()
    bad[3, 1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="train_cubes contains non-finite"):
        train(bad, y, x, y, cfg)
    with pytest.raises(ValueError, match="val_cubes must have 4 dimensions"):
        train(x, y, x[:, 0], y, cfg)
    # tensors are taken as they are (the ensemble hands its members the data read once)
    res = train(torch.from_numpy(x), torch.from_numpy(y), x, y, cfg)
    assert np.isfinite(res.best_val_loss)
