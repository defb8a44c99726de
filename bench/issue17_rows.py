"""The H200 runs of the families issue 17 added (mixture-of-experts, Unsloth's generic path) that check the
estimate: every row of CHECK_DIRS but those a term was fitted on (FIT_NOT_CHECK). Each directory was run against
predictions committed before it (its command.txt; bench/results/README.md names each directory's prediction file,
session by session); each fitted term cites its rows beside it (estimator/, bench/family_terms.py). Those that stand
for a run (checks; compared as probed: the estimate and what a probe without autocast kept beyond a run,
without_autocast_gib) are read by tests/test_issue17_runs.py and by bench/readme_outputs.py's accuracy table; the
probes without autocast that keep more than a run otherwise (without_autocast) by the test only, but for QLoRA's speed
(speed_checks)."""

from __future__ import annotations

import json
from pathlib import Path

from rigplan.calibration.fit import FRESH_PROCESS_ALLOC_GIB
from rigplan.calibration.replica import reduced
from rigplan.estimator.memory import without_autocast_bytes
from rigplan.estimator.plan import Setup
from rigplan.profiles.catalog import resolve_model

RESULTS = Path(__file__).parent / "results"

CHECK_DIRS = ("h200-issue17-heldout2", "h200-issue17-expandable", "h200-gpt-oss", "h200-issue17-heldout3",
              "h200-issue17-heldout4", "h200-issue17-heldout5", "h200-issue17-heldout6", "h200-issue17-heldout7",
              "h200-issue17-depth", "h200-issue17-doublequant", "h200-issue17-heldout8", "h200-issue17-mixtral-long",
              "h200-issue17-heldout9", "h200-issue17-nockpt", "h200-issue17-nockpt-fit", "h200-issue17-nockpt-depth",
              "h200-issue17-nockpt-check", "h200-issue17-nockpt-deep", "h200-issue17-nockpt-qwen2moe",
              "h200-issue17-gemma-full", "h200-issue17-gptoss-nockpt", "h200-issue17-lora-nockpt",
              "h200-issue17-lora-nockpt-deep", "h200-issue17-autocast", "h200-issue17-autocast-next",
              "h200-issue17-phi-autocast", "h200-issue17-autocast-lora",
              "h200-issue17-phi4-autocast", "h200-issue17-phi4-autocast2", "h200-issue17-phi35-lora",
              "h200-issue17-fresh-process", "h200-issue17-own-process-refit", "h200-issue17-gemma-qlora-speed",
              "h200-issue17-qwen3moe-labelled", "h200-issue17-nockpt-autocast",
              "h200-issue17-autocast-slack", "h200-issue17-gptoss-depth-autocast", "h200-issue17-full-depth",
              "h200-issue17-gptoss-long", "h200-issue17-blind-checks", "h200-issue17-ckpt-copies")
FIT_NOT_CHECK = {("h200-issue17-autocast", "qwen3-30b-a3b-L4", "lora", 1, 8192),
                 ("h200-issue17-autocast-lora", "mixtral-8x7b-L4", "lora", 1, 8192),
                 ("h200-issue17-autocast", "qwen1.5-moe-a2.7b-L8", "lora", 2, 8192),
                 ("h200-issue17-autocast-lora", "gpt-oss-20b-L4", "lora", 4, 2048),
                 ("h200-issue17-full-depth", "gpt-oss-20b", "qlora", 1, 8192),
                 ("h200-issue17-full-depth", "gpt-oss-20b", "qlora", 1, 16384),
                 ("h200-issue17-autocast-slack", "gpt-oss-20b-L4", "qlora", 1, 2048),
                 ("h200-issue17-autocast-slack", "gpt-oss-20b-L4", "qlora", 1, 16384),
                 ("h200-issue17-heldout3", "phi-3.5-mini", "qlora", 2, 4096),
                 ("h200-issue17-heldout3", "phi-3.5-mini", "qlora", 1, 16384),
                 ("h200-issue17-heldout5", "qwen1.5-moe-a2.7b-L4", "qlora", 1, 2048),
                 ("h200-issue17-heldout5", "qwen1.5-moe-a2.7b-L4", "lora", 1, 2048),
                 ("h200-issue17-heldout2", "qwen3-30b-a3b-L4", "qlora", 1, 16384),
                 ("h200-issue17-heldout3", "gpt-oss-20b-L4", "qlora", 2, 4096),
                 ("h200-issue17-heldout3", "gpt-oss-20b-L4", "qlora", 1, 16384),
                 ("h200-issue17-heldout3", "gpt-oss-20b-L8", "qlora", 4, 2048),
                 ("h200-issue17-heldout8", "qwen1.5-moe-a2.7b", "qlora", 1, 8192),
                 ("h200-issue17-doublequant", "mixtral-8x7b-L8", "qlora", 1, 16384),
                 ("h200-issue17-mixtral-long", "mixtral-8x7b-L8", "qlora", 1, 32768),
                 ("h200-issue17-heldout9", "qwen1.5-moe-a2.7b-L8", "qlora", 2, 8192),
                 ("h200-issue17-heldout9", "qwen1.5-moe-a2.7b-L8", "qlora", 4, 8192),
                 *(("h200-issue17-nockpt-fit", "mixtral-8x7b-L4", "qlora", 1, n) for n in (2048, 16384, 32768)),
                 ("h200-issue17-nockpt", "qwen3-30b-a3b-L4", "qlora", 1, 8192),
                 ("h200-issue17-nockpt-check", "qwen3-30b-a3b-L8", "qlora", 1, 8192),
                 ("h200-issue17-nockpt-deep", "qwen1.5-moe-a2.7b-L8", "qlora", 1, 8192),
                 ("h200-issue17-nockpt-qwen2moe", "qwen1.5-moe-a2.7b-L4", "qlora", 1, 8192),
                 *(("h200-issue17-gptoss-nockpt", "gpt-oss-20b-L4", m, 1, 2048) for m in ("lora", "qlora")),
                 ("h200-issue17-autocast", "qwen1.5-moe-a2.7b-L8", "lora", 1, 8192),
                 *(("h200-issue17-autocast-next", "phi-3.5-mini", "lora", b, s) for b, s in ((4, 2048), (1, 8192))),
                 ("h200-issue17-autocast-next", "gemma-3-12b-L8", "lora", 4, 2048),
                 ("h200-issue17-phi4-autocast", "phi-4-L8", "lora", 4, 2048),
                 # the rows from a process of their own that stand in for fit rows whose job ran after another
                 # (bench/family_terms.py)
                 *(("h200-issue17-expandable", "qwen3-30b-a3b-L4", "qlora", b, s) for b, s in ((1, 2048), (4, 2048),
                                                                                              (1, 8192))),
                 *(("h200-issue17-expandable", "gemma-3-12b-L8", "qlora", b, s) for b, s in ((4, 2048), (1, 8192))),
                 ("h200-issue17-fresh-process", "gemma-3-12b-L8", "qlora", 1, 2048),
                 *(("h200-issue17-fresh-process", "phi-3.5-mini", "qlora", b, 2048) for b in (1, 4)),
                 ("h200-issue17-heldout8", "qwen3-30b-a3b-L4", "qlora", 1, 16384)}


def probe_rows(pattern: str) -> list[tuple[str, dict]]:
    """(its directory's name, the row) for every probe row in the bench/results files pattern names."""
    return [(f.parent.name, json.loads(line)) for f in sorted(RESULTS.glob(pattern))
            for line in f.read_text().splitlines() if line]


def unfitted() -> list[tuple[str, dict]]:
    """(its directory's name, the row) for every row of CHECK_DIRS no term was fitted on."""
    found = [row for d in CHECK_DIRS for row in probe_rows(f"{d}/probe-*.jsonl")]
    return [(d, r) for d, r in found if (d, r["model"], r["method"], r["batch"], r["seq"]) not in FIT_NOT_CHECK]


def in_a_process_of_its_own(row: dict) -> bool:
    """Whether no job ran before the probe's in its process, as none runs before a user's. One that did starts with
    that job's leftovers (start_alloc_gib 0.15-0.31 GiB, h200-issue17-heldout2/, h200-gpt-oss/); the same shapes in
    processes of their own (h200-issue17-fresh-process/, -heldout6/) reserved from 1.15 GiB less (Mixtral L4 QLoRA
    1 x 16384) to 0.12 more."""
    return (row.get("start_alloc_gib") or 0.0) <= FRESH_PROCESS_ALLOC_GIB


def under_autocast_or_qlora(row: dict) -> bool:
    """Whether the probe trained in the precision `rigplan run` does, bf16 autocast (TRL bf16=True on every GPU with
    bf16), or as a run of its shape with what it kept beyond one known (without_autocast_gib). QLoRA with autocast or
    without: its speed was the same (within 2%, h200-issue17-autocast/) and its peaks but for the mixture-of-experts
    families' copies of their layers' input without autocast (memory.NO_AUTOCAST_COPIES_BY_TYPE): with checkpointing,
    the recomputed layer's, compared as probed; without it, every layer's (Qwen3-MoE, 9% more at 8 layers and
    20,480 tokens), checked apart (without_autocast). 16-bit LoRA only under it: without autocast Unsloth computes a
    plain nn.Linear's adapter in fp32 and keeps fp32 copies of its input (unsloth_zoo compiler.py), which allocated up
    to 13% more and ran up to 22% slower on the same shapes (h200-issue17-autocast/, -autocast-next/;
    tests/test_issue17_runs.py)."""
    return row.get("autocast") == "bf16" or (row["method"] == "qlora" and (
        row["checkpointing"] != "off" or without_autocast_gib(row) == 0))


def without_autocast_gib(row: dict) -> float:
    """What the probe kept beyond a run of its shape where it ran without autocast (memory.without_autocast_bytes:
    mixture-of-experts layers' input copies, every layer's without checkpointing, the recomputed one's with it), GiB;
    0 under autocast. The estimate plus this is what the probe is compared with."""
    if row.get("autocast") == "bf16":
        return 0.0
    setup = Setup(row["method"], row["rank"], row["batch"], row["seq"], checkpointing=row["checkpointing"])
    return without_autocast_bytes(reduced(resolve_model(row["arch"]), row["layers"]), setup) / 2**30


def stands_for_a_run(row: dict) -> bool:
    """Whether the probe trained as `rigplan run` does: in a process of its own, in a run's precision."""
    return in_a_process_of_its_own(row) and under_autocast_or_qlora(row)


def checks() -> list[tuple[str, dict]]:
    """The unfitted rows that stand for a run: what the estimate, which plans runs, is checked on."""
    return [(d, r) for d, r in unfitted() if stands_for_a_run(r)]


def speed_checks() -> list[tuple[str, dict]]:
    """The unfitted rows whose speed stands for a run's: the checks, and the QLoRA probes without autocast that keep
    more memory than a run (without_autocast), since QLoRA ran at the same speed with autocast or without (within 2%,
    h200-issue17-autocast/, -nockpt-autocast/; gpt-oss 2-8% slower without it: tests/test_issue17_runs.py)."""
    return checks() + [(d, r) for d, r in without_autocast() if r["method"] == "qlora"]


def without_autocast() -> list[tuple[str, dict]]:
    """The unfitted rows probed without autocast that keep more than a run of the shape and are not checks (16-bit
    LoRA: and run slower; QLoRA without checkpointing: every layer's input copies; under_autocast_or_qlora)."""
    return [(d, r) for d, r in unfitted() if in_a_process_of_its_own(r) and not under_autocast_or_qlora(r)]
