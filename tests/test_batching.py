"""The packed batcher (trainer/batching.py): every micro-batch within the plan's token budget, whole examples,
a deterministic layout, and a resumed run that replays the same micro-batches. The loss test (each example keeps
its own loss in a packed row) is in test_run.py, beside the toy models."""

from __future__ import annotations

import random

import pytest

from rigplan.trainer.batching import IGNORE, PackedCollator, pack, packed_rows


def _lengths(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [min(2048, max(8, int(rng.lognormvariate(6, 0.8)))) for _ in range(n)]


@pytest.mark.parametrize("budget", [2048, 4096, 16_384])
def test_every_micro_batch_is_within_the_budget_and_holds_whole_examples(budget) -> None:
    lengths = _lengths(3000, 1)
    groups = pack(lengths, budget)
    assert all(sum(lengths[i] for i in g) <= budget for g in groups)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))  # each example once, whole
    fill = sum(lengths) / (len(groups) * budget)
    assert fill > 0.95, fill  # best-fit decreasing leaves little room on long-tailed data


def test_packing_is_deterministic() -> None:
    lengths = _lengths(500, 2)
    assert pack(lengths, 4096) == pack(list(lengths), 4096)


def test_an_example_longer_than_the_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="exceeds the token budget"):
        pack([10, 5000], 4096)


def test_packed_rows_restart_positions_and_mask_each_first_label() -> None:
    rows = [{"input_ids": list(range(100, 100 + n)), "labels": list(range(100, 100 + n))} for n in (3, 5, 2)]
    (row,) = packed_rows(rows, 64)
    batch = PackedCollator(pad_token_id=0)([row])
    assert batch["input_ids"].shape == (1, 10) and "attention_mask" not in batch
    positions = batch["position_ids"][0].tolist()
    assert positions == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1]  # longest first: 5, 3, 2
    labels = batch["labels"][0].tolist()
    assert [labels[i] for i, p in enumerate(positions) if p == 0] == [IGNORE] * 3
    assert sorted(row["seq_lengths"]) == [2, 3, 5]


def test_grouped_micro_batches_are_within_the_budget_and_of_similar_length() -> None:
    from rigplan.estimator.speed import PAD_MULTIPLE  # what plans carry (Plan.pad_multiple)
    from rigplan.trainer.batching import PaddedCollator, group, grouped_rows, padded_length

    lengths = _lengths(1000, 3)
    micro, seq = 4, 2048
    groups = group(lengths, micro)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert all(len(g) * padded_length(max(lengths[i] for i in g), seq, PAD_MULTIPLE) <= micro * seq for g in groups)
    padded = sum(len(g) * padded_length(max(lengths[i] for i in g), seq, PAD_MULTIPLE) for g in groups)
    assert sum(lengths) / padded > 0.9  # similar lengths together: little padding
    rows = [{"input_ids": [7] * n, "labels": [7] * n} for n in (5, 70, 3)]
    batch = PaddedCollator(pad_token_id=0, seq_len=seq, pad_multiple=PAD_MULTIPLE)(grouped_rows(rows, 3))
    assert batch["input_ids"].shape == (3, 2 * PAD_MULTIPLE) and batch["attention_mask"].sum() == 78
    assert (batch["labels"] == IGNORE).sum() == 3 * 128 - 78


def test_block_sampler_gives_each_gpu_micro_batches_of_similar_length_at_every_step() -> None:
    """Rows come longest first; under DDP accelerate deals them to the processes in turn, so the sampler keeps each
    block of world-size consecutive rows together: at every micro-step the GPUs' micro-batches are neighbours in
    length order. The order is the seed's and the epoch's alone (what --resume replays), and every row comes once."""
    pytest.importorskip("accelerate")
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    from rigplan.trainer.batching import BlockSampler

    sampler = BlockSampler(101, 4, seed=3)
    first = sampler.order()
    assert sorted(first) == list(range(101)) and first != list(range(101))
    assert first[:4] == [0, 1, 2, 3]  # the longest rows first: the plan's peak at the first step
    assert first == BlockSampler(101, 4, seed=3).order()
    sampler.set_epoch(1)
    assert sampler.order() != first and sorted(sampler.order()) == list(range(101))
    sampler.set_epoch(0)
    shards = [[b[0] for b in BatchSamplerShard(BatchSampler(sampler, 1, False), 4, rank)] for rank in range(4)]
    steps = list(zip(*shards))[:25]  # the 25 full blocks; the last short block is dealt after them
    assert all(max(step) - min(step) == 3 and min(step) % 4 == 0 for step in steps)
    one = BlockSampler(10, 1, seed=0).order()
    assert sorted(one) == list(range(10)) and one != list(range(10))  # one process: a seeded shuffle,
    assert one[0] == 0  # the longest row first
