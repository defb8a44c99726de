"""Micro-batches within the plan's token budget (Plan.budget, micro_batch x seq_len), laid out two ways.

- 'padded': micro_batch examples of similar length (sorted by length, then cut into groups), padded to the
  longest of them rounded up to the plan's pad_multiple. Shapes repeat, so Unsloth runs its compiled decoder blocks
  (it compiles them only for padded micro-batches: unsloth/models/_block_compile.py), and the group of the
  longest examples reaches the budget, so the plan's peak is one the run reaches.
- 'packed': whole examples back to back in one row of at most the budget (best-fit decreasing, as TRL's "bfd"),
  position_ids restarting at each example, which Unsloth and transformers read as example boundaries
  (attention within each example), and the first token of each example carries no label, so no loss term
  predicts one example from another's last token. Unsloth runs these uncompiled.

Each dataset row is one micro-batch, made once and deterministically; BlockSampler shuffles them each epoch with the
seed, which `--resume` replays. Imports torch only inside the collators.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

IGNORE = -100  # transformers' ignore_index for labels that carry no loss


def padded_length(longest: int, seq_len: int, multiple: int) -> int:
    """The length a padded micro-batch is padded to: its longest example rounded up to the plan's pad_multiple (as
    TRL's pad_to_multiple_of: fewer distinct shapes for compiled kernels), at most seq_len (every example is cut to
    seq_len first)."""
    return min(seq_len, -(-longest // multiple) * multiple)


def longest_first(lengths: list[int]) -> list[int]:
    """Example indices, longest first; ties by index, so every layout is deterministic."""
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


def group(lengths: list[int], micro_batch: int) -> list[list[int]]:
    """Indices of the examples in each padded micro-batch: longest first, micro_batch at a time, so that each
    micro-batch's examples are of similar length."""
    order = longest_first(lengths)
    return [order[i:i + micro_batch] for i in range(0, len(order), micro_batch)]


def grouped_rows(rows: list[dict[str, list[int]]], micro_batch: int) -> list[dict[str, list[list[int]]]]:
    """One row per padded micro-batch: its examples' input_ids and labels, unpadded (the collator pads)."""
    return [{"input_ids": [rows[i]["input_ids"] for i in g], "labels": [rows[i]["labels"] for i in g]}
            for g in group([len(r["input_ids"]) for r in rows], micro_batch)]


@dataclass
class PaddedCollator:
    """Collates one grouped row (per_device_train_batch_size 1) into [k, L] tensors: input_ids padded on the
    right with pad_token_id, labels with IGNORE, and the attention mask;
    L = padded_length(longest, seq_len, pad_multiple)."""

    pad_token_id: int
    seq_len: int
    pad_multiple: int

    def __call__(self, features: list[dict[str, list[list[int]]]]) -> dict[str, Any]:
        import torch

        ids = [x for f in features for x in f["input_ids"]]
        labels = [x for f in features for x in f["labels"]]
        length = padded_length(max(len(x) for x in ids), self.seq_len, self.pad_multiple)
        return {"input_ids": torch.tensor([x + [self.pad_token_id] * (length - len(x)) for x in ids]),
                "labels": torch.tensor([x + [IGNORE] * (length - len(x)) for x in labels]),
                "attention_mask": torch.tensor([[1] * len(x) + [0] * (length - len(x)) for x in ids])}


def pack(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices of the examples in each micro-batch, longest first into the fullest micro-batch they fit
    (best-fit decreasing), every micro-batch's lengths adding up to at most budget. An example longer than the
    budget is an error (prepare_data cuts them to seq_len <= budget)."""
    if any(n > budget for n in lengths):
        raise ValueError(f"an example of {max(lengths)} tokens exceeds the token budget {budget}")
    bins: list[list[int]] = []
    rooms: list[tuple[int, int]] = []  # (room left, bin number), sorted: the best fit is the first with room >= n
    for i in longest_first(lengths):
        n = lengths[i]
        at = bisect.bisect_left(rooms, (n, -1))
        if at == len(rooms):
            bins.append([i])
            bisect.insort(rooms, (budget - n, len(bins) - 1))
        else:
            room, b = rooms.pop(at)
            bins[b].append(i)
            bisect.insort(rooms, (room - n, b))
    return bins


def packed_rows(rows: list[dict[str, list[int]]], budget: int) -> list[dict[str, list[int]]]:
    """One row per micro-batch: the examples' input_ids and labels back to back, the first label of every
    example set to IGNORE (its own loss never predicts it either: the loss shifts labels by one), and
    seq_lengths, the examples' lengths (a column TRL keeps, as its own packing writes it:
    trl/trainer/sft_trainer.py; TRL drops dataset columns such as position_ids that it does not know)."""
    out = []
    for group in pack([len(r["input_ids"]) for r in rows], budget):
        ids: list[int] = []
        labels: list[int] = []
        for i in group:
            r = rows[i]
            ids += r["input_ids"]
            labels += [IGNORE] + r["labels"][1:]
        out.append({"input_ids": ids, "labels": labels, "seq_lengths": [len(rows[i]["input_ids"]) for i in group]})
    return out


@dataclass
class PackedCollator:
    """Collates one packed row (per_device_train_batch_size 1) into tensors of shape [1, L]: input_ids, labels,
    position_ids restarting at each example and no attention mask, as TRL's padding-free collator lays out
    examples back to back (trl/trainer/sft_trainer.py, DataCollatorForLanguageModeling with padding_free).
    Unsloth's Llama path reads the restarts as example boundaries when the batch is one row with no mask
    (unsloth/utils/packing.py, models/llama.py); an attention mask, even all ones, would turn that off."""

    pad_token_id: int

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for f in features:  # one row when the Trainer's batch size is 1; several stay apart by their positions
            ids += f["input_ids"]
            labels += [IGNORE] + list(f["labels"][1:])
            positions += [p for n in f["seq_lengths"] for p in range(n)]
        return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
                "position_ids": torch.tensor([positions])}


class BlockSampler:
    """The order of the micro-batches (dataset rows, longest first as laid out above) in an epoch: blocks of `block`
    consecutive rows, one row per process, the full blocks shuffled with the seed and the epoch, a last short block
    kept last. accelerate deals the rows to the processes in turn (accelerate/data_loader.py BatchSamplerShard), so at
    every micro-step the GPUs get micro-batches of about the same length and none waits at the gradient all-reduce
    for another's longer one: with rows in random order two H200s ran 1.38x one (bench/results/h200-runs/ddp/random-order/).
    One process: a seeded shuffle of the rows. The Trainer calls set_epoch (through accelerate) every epoch.
    The first epoch starts with the block of the longest rows (row 0 on, as laid out above): the micro-batch that
    sets the plan's peak memory runs at the first step, so a run that would run out of memory does so before any
    training time is spent, and the peak a run reports is the plan's from its first step (a short --max-steps run
    included: in random order 20 steps of 300 rows need not meet it, h200-issue17-autocast/rigplan-run/)."""

    def __init__(self, rows: int, block: int, seed: int, longest_first: bool = True) -> None:
        self.rows, self.block, self.seed, self.epoch = rows, max(1, block), seed, 0
        self.longest_first = longest_first  # False: the order of the runs recorded before it (bench/ddp_jitter.py)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.rows

    def order(self) -> list[int]:
        import random

        full = self.rows - self.rows % self.block
        blocks = [list(range(i, i + self.block)) for i in range(0, full, self.block)]
        random.Random(f"{self.seed}:{self.epoch}").shuffle(blocks)
        if self.longest_first and self.epoch == 0:
            blocks.sort(key=lambda b: b[0] != 0)  # stable: the longest block first, the others in shuffled order
        return [i for b in blocks for i in b] + list(range(full, self.rows))

    def __iter__(self):  # noqa: ANN204
        return iter(self.order())
