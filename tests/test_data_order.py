"""The sampler and augmentation are pure functions of (seed, epoch, index, resume point)."""

from __future__ import annotations

import torch

from ddptrain.config import DataConfig
from ddptrain.data import ResumableSampler, ShardSampler, build_datasets, make_loader


def global_order(num_samples, global_batch, world, seed, epoch, start=0):
    """The global sequence of indices (rank 0's slice, rank 1's, ... of each batch)."""
    per_rank = [list(ResumableSampler(num_samples, global_batch, r, world, seed, epoch,
                                      start)) for r in range(world)]
    local = global_batch // world
    steps = len(per_rank[0]) // local
    return [key[1] for s in range(steps) for r in range(world)
            for key in per_rank[r][s * local:(s + 1) * local]]


def test_every_sample_at_most_once_per_epoch_and_partial_batch_dropped():
    order = global_order(103, 10, 2, seed=1, epoch=0)
    assert len(order) == 100 == len(set(order))
    assert set(order) <= set(range(103))


def test_order_depends_on_seed_and_epoch_but_not_on_world_size():
    base = global_order(96, 12, 1, seed=5, epoch=3)
    assert global_order(96, 12, 2, seed=5, epoch=3) == base
    assert global_order(96, 12, 4, seed=5, epoch=3) == base
    assert global_order(96, 12, 2, seed=5, epoch=4) != base
    assert global_order(96, 12, 2, seed=6, epoch=3) != base


def test_resume_offset_continues_at_the_exact_next_sample():
    full = global_order(96, 12, 2, seed=0, epoch=2)
    assert global_order(96, 12, 2, seed=0, epoch=2, start=36) == full[36:]


def test_sampler_keys_carry_the_epoch():
    keys = list(ResumableSampler(20, 4, 1, 2, seed=0, epoch=7))
    assert {epoch for epoch, _ in keys} == {7} and len(keys) == 10


def test_validation_shards_cover_every_sample_exactly_once():
    shards = [[i for _, i in ShardSampler(11, r, 3)] for r in range(3)]
    assert sorted(i for shard in shards for i in shard) == list(range(11))


def test_augmentation_is_seeded_per_sample_and_leaves_global_rng_alone():
    data = build_datasets(DataConfig(), seed=3, channels=None).train
    before = torch.get_rng_state()
    first = data[(4, 17)][0]
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(data[(4, 17)][0], first)
    assert not all(torch.equal(data[(e, 17)][0], first) for e in range(5, 9))


def test_dataloader_workers_give_the_same_batches_as_none():
    data = build_datasets(DataConfig(), seed=0, channels=None).train

    def batches(workers):
        sampler = ResumableSampler(len(data), 32, 1, 2, seed=0, epoch=1, start_sample=64)
        return [b for b in make_loader(data, sampler, 8, workers, pin_memory=False)]

    without, with_workers = batches(0), batches(2)
    assert len(without) == len(with_workers) > 0
    for (x0, y0, i0), (x1, y1, i1) in zip(without, with_workers):
        assert torch.equal(x0, x1) and torch.equal(y0, y1) and torch.equal(i0, i1)
