"""Unsloth probes of the mixture-of-experts and generic-path families on the H200 (bench/results/h200-issue17/,
2026-11-30; provenance in every row): Qwen3-30B-A3B and Mixtral-8x7B at 4 layers, Gemma-3-12B at 8, full-depth
Phi-3.5-mini; LoRA and QLoRA at 1 x 2048, 4 x 2048 and 1 x 8192 (Phi: one shape before the call's time ran out).
Each row against today's estimate of its shape on the H200. The predictions written before the runs are in
bench/results/predictions/issue17-h200.json; the terms the runs led to (experts in 4-bit under Unsloth's QLoRA,
their dequantized stack, the routed copies, Gemma 3's and Phi-4's whole logits, Qwen3-MoE's slower experts, Gemma
3's slower LoRA) are in estimator/memory.py and speed.py, each with what it was checked on."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from rigplan import store
from rigplan.calibration.fit import FRESH_PROCESS_ALLOC_GIB
from rigplan.calibration.replica import reduced
from rigplan.estimator import planner
from rigplan.estimator.plan import Setup
from rigplan.profiles.catalog import resolve_gpu, resolve_model

RUNS = Path(__file__).parents[1] / "bench" / "results" / "h200-issue17"
sys.path.insert(0, str(RUNS.parents[1]))
import issue17_rows  # noqa: E402  (bench/issue17_rows.py: the rows that check the estimate)
from family_terms import kept_by_the_extra_layers_gib  # noqa: E402  (bench/family_terms.py)


def recorded(pattern: str) -> list[tuple[str, dict]]:
    """(its run directory's name, the row) for every probe row in the bench/results files pattern names that
    trained as the H200 does: a probe standing for a GPU without bf16 (`gpu_emulated`, h200-no-bf16/) is not."""
    return [(d, r) for d, r in issue17_rows.probe_rows(pattern) if r.get("gpu_emulated", "as-is") == "as-is"]


ROWS = [r for _, r in recorded("h200-issue17/probe-*.jsonl")]
IDS = [f"{r['model']}-{r['method']}-{r['batch']}x{r['seq']}" for r in ROWS]
# Reserved memory further from the estimate than 5%, as recorded (the estimate holds their allocated memory): Gemma
# 3's QLoRA at 1 x 2048 held less slack than its family's term (memory.QLORA_SLACK_GIB_BY_TYPE, fitted on these
# three QLoRA rows).
RESERVED_BOUND = {"gemma-3-12b-L8-qlora-1x2048": 0.06}
# GPU-bound speed further than 15%: none since Gemma 3's LoRA got its own factor (speed.GPU_TIME_BY_TYPE_AND_METHOD,
# fitted on its LoRA 4 x 2048 row; the 1 x 8192 row checks it).
SPEED_BOUND: dict[str, float] = {}
# What a probe process holds allocated before it loads a model (start_alloc_gib) when no job ran before it in the
# same process: more is the leftovers of that job (issue17_rows.in_a_process_of_its_own).
FRESH_START_ALLOC_GIB = FRESH_PROCESS_ALLOC_GIB


def _estimate(row: dict) -> planner.Estimate:
    model = reduced(resolve_model(row["model"].split("-L")[0]), row["layers"])
    setup = Setup(row["method"], row["rank"], row["batch"], row["seq"], checkpointing=row["checkpointing"])
    return planner.estimate(model, setup, resolve_gpu("h200"), store.reference()[0])


def _as_probed(row: dict) -> tuple[float, float]:
    """The estimate's allocated and reserved GiB as the probe trained: a run's, and what a probe without autocast keeps
    beyond it (issue17_rows.without_autocast_gib: the mixture-of-experts layers' input copies)."""
    est, beyond = _estimate(row), issue17_rows.without_autocast_gib(row)
    return est.peak_allocated_gib + beyond, est.peak_reserved_gib + beyond


def _assert_speed(row: dict, est: planner.Estimate, bound: float = 0.15) -> None:
    """A probe's speed against the estimate: inside its band where the host sets the pace (the estimate stands behind
    its band only), within bound where the GPU does."""
    if est.host_bound:
        low, high = est.tokens_per_s_band
        assert low <= row["tok_per_s"] <= high
    else:
        assert abs(row["tok_per_s"] / est.tokens_per_s - 1) <= bound


def test_every_family_was_measured() -> None:
    assert {r["model"] for r in ROWS} == {"qwen3-30b-a3b-L4", "mixtral-8x7b-L4", "gemma-3-12b-L8", "phi-3.5-mini"}
    assert all(r["provenance"]["gpu"] == "NVIDIA H200" and not r["err"] for r in ROWS)


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_allocated_memory_is_within_5_percent(row: dict) -> None:
    est = _estimate(row)
    assert abs(row["peak_alloc_gib"] / est.peak_allocated_gib - 1) <= 0.05


@pytest.mark.parametrize("row,name", list(zip(ROWS, IDS)), ids=IDS)
def test_reserved_memory_is_within_its_bound(row: dict, name: str) -> None:
    """The rows from a process of their own: the QLoRA jobs here ran after their family's LoRA job, whose leftovers
    they started with (issue17_rows.in_a_process_of_its_own); those shapes, each probed again in a process of its own
    (h200-issue17-expandable/, -fresh-process/), are what the QLoRA slack terms are fitted on."""
    if not issue17_rows.in_a_process_of_its_own(row):
        pytest.skip("ran after another job in its process")
    est = _estimate(row)
    assert abs(row["peak_reserved_gib"] / est.peak_reserved_gib - 1) <= RESERVED_BOUND.get(name, 0.05)


@pytest.mark.parametrize("row,name", list(zip(ROWS, IDS)), ids=IDS)
def test_speed_is_within_its_bound(row: dict, name: str) -> None:
    _assert_speed(row, _estimate(row), SPEED_BOUND.get(name, 0.15))


def test_unsloth_qlora_holds_experts_in_4_bit_with_double_quantization() -> None:
    """The after-load memory of every mixture-of-experts QLoRA replica recorded, at 4 to 24 layers, less what
    its process held before loading (a job run after another in the same process starts with its leftovers:
    start_alloc_gib beyond FRESH_START_ALLOC_GIB), within 0.5% of the estimate: experts in NF4 with
    double quantization (memory.expert_nf4_bytes). Flat absmax, counted before the 16-layer runs, was 9% over a
    layer's bytes; bf16 experts would be 3.5x."""
    from rigplan.estimator import memory

    qlora = [(d, r) for d, r in recorded("h200-*/probe-*.jsonl")
             if r["method"] == "qlora" and not r["err"] and d != "h200-issue17-qwen2moe"
             and resolve_model(r["arch"]).experts]  # qwen2moe/: adapters other than those planned (heldout5/ has them)
    assert {r["model"] for _, r in qlora} >= {"qwen3-30b-a3b-L16", "gpt-oss-20b-L16", "mixtral-8x7b-L8",
                                              "mixtral-8x7b-L4", "qwen1.5-moe-a2.7b-L4", "qwen1.5-moe-a2.7b"}
    for d, r in qlora:
        est = _estimate(r).components_bytes
        loaded = (est["base_weights"] + est["lora_weights"] + est["loaded_overhead"]) / 2**30
        leftovers = r["start_alloc_gib"] - FRESH_START_ALLOC_GIB
        assert abs((r["after_load_gib"] - leftovers) / loaded - 1) <= 0.005, (d, r["model"])
    # a stack of 2**31 elements or more is quantized in slices with flat absmax (none of the profiles' stacks is)
    big = dataclasses.replace(resolve_model("qwen3-235b-a22b"), num_experts=256)
    gate_up = 2 * 256 * big.expert_intermediate * big.hidden_size
    assert gate_up >= memory.BNB_MAX_QUANTIZE_NUMEL > gate_up // 2
    assert memory.expert_nf4_bytes(big) == pytest.approx(big.main_layers * gate_up * (
        memory.NF4_FLAT_BYTES_PER_PARAM + memory.NF4_BYTES_PER_PARAM / 2), rel=1e-6)


CHECKS = issue17_rows.checks()
CHECK_IDS = [f"{d}/{r['model']}-{r['method']}-{r['batch']}x{r['seq']}" for d, r in CHECKS]
# Further from the estimate than 5% (memory) or 15% (GPU-bound speed), as recorded: the allocator's scatter around
# the families' slack terms (fitted on rows from a process of their own, bench/family_terms.py). Qwen3-MoE's QLoRA
# held 0.45-0.77 GiB beyond its allocated peak from 2,048 to 8,192 tokens and at 32,768, but 0.13-0.25 on its single
# sequences from 12,288 to 24,576 (0.60 at 18,432), at 4, 8 and 16 layers: the estimate's allocated peak within 0.2%,
# its reserved above (test_qwen3_moe_qlora_allocates_as_estimated_to_32k_tokens). In processes of their own, the same
# shape reserved 12.13 and 12.83 GiB (Gemma 3 L8 QLoRA 2 x 4096, allocated the same): scatter no estimate follows.
CHECK_RESERVED_BOUND = {
    **{f"h200-issue17-{d}/qwen3-30b-a3b-L{n}-qlora-1x16384": 0.065 for d, n in (("heldout6", 4), ("heldout7", 8))},
    **{f"h200-issue17-heldout8/qwen3-30b-a3b-L4-qlora-1x{n}": b for n, b in ((12288, 0.08), (14336, 0.085),
                                                                           (20480, 0.07))},
    # Gemma 3's QLoRA at 1 x 2048: 0.27 GiB beyond its allocated peak, its constant fitted on this shape (in
    # fresh-process/) and on 4 x 2048 and 1 x 8192, which held 1.7 and 1.0; at 2 x 2048, 0.41
    "h200-issue17-doublequant/gemma-3-12b-L8-qlora-1x2048": 0.06,
    "h200-issue17-own-process-refit/gemma-3-12b-L8-qlora-2x2048": 0.055,
    # at 4 x 1024: 0.41 GiB beyond its allocated peak, its estimate 0.69 (the constant and the reference's share of
    # the step); the prediction before the run, with the constant before its refit on the first three shapes, 7.76
    # GiB (predictions/gemma-qlora-speed-h200.json), today's estimate 7.82, measured 7.42
    "h200-issue17-gemma-qlora-speed/gemma-3-12b-L8-qlora-4x1024": 0.055,
    # gpt-oss's QLoRA at 4 layers and 8,192 tokens a micro-batch: 0.10 GiB beyond its allocated peak in a process of
    # its own at 4 x 2048 and 1 x 8192 (fresh-process/), 0.64 at 2 x 4096 (heldout3/, which its constant is fitted on)
    **{f"h200-issue17-fresh-process/gpt-oss-20b-L4-qlora-{shape}": 0.065 for shape in ("4x2048", "1x8192")},
    # Qwen3-MoE's checkpointed QLoRA in one sequence of 12,288 and 14,336 tokens under autocast: 0.11-0.12 GiB beyond
    # its allocated peak, as its rows without autocast at those lengths (0.13-0.17, heldout8/), its constant 0.57
    **{f"h200-issue17-autocast-slack/qwen3-30b-a3b-L4-qlora-1x{n}": 0.095 for n in (12288, 14336)},
    # and at 8 layers and 1 x 16384 under autocast, 0.13 (ckpt-copies/; without autocast 0.14, heldout7/)
    "h200-issue17-ckpt-copies/qwen3-30b-a3b-L8-qlora-1x16384": 0.07,
    # Qwen1.5-MoE's checkpointed QLoRA at 8 layers and 4 x 4096 under autocast: 0.09 GiB beyond its allocated peak,
    # its constant 0.45 (fitted on its 1 x 2048 row; 0.20-0.59 on its other rows), allocated within 0.1%
    "h200-issue17-ckpt-copies/qwen1.5-moe-a2.7b-L8-qlora-4x4096": 0.055,
}


def test_every_shape_probed_after_another_job_is_checked_from_a_process_of_its_own() -> None:
    """A probe row whose job ran after another in the same process does not stand for a run
    (issue17_rows.in_a_process_of_its_own); each such shape was probed again in a process of its own
    (predictions/fresh-process-h200.json), and that row checks the estimate or a term is fitted on it."""
    def shape(r: dict) -> tuple:
        return r["model"], r["method"], r["batch"], r["seq"], r["checkpointing"]

    after = [r for _, r in issue17_rows.unfitted() if not issue17_rows.in_a_process_of_its_own(r)]
    checked = {shape(r) for _, r in recorded("h200-issue17-*/probe-*.jsonl") if issue17_rows.stands_for_a_run(r)}
    assert len(after) >= 9 and all(r["start_alloc_gib"] > FRESH_START_ALLOC_GIB for r in after)
    assert [shape(r) for r in after if shape(r) not in checked] == []


def test_the_checks_cover_every_family_and_gpt_oss_trains() -> None:
    """gpt-oss-20b trains under Unsloth 2026.10.9 and transformers 5.17 (LoRA and QLoRA, three shapes each), and
    every family has shapes that no term was written from."""
    assert all(r["provenance"]["gpu"] == "NVIDIA H200" and not r["err"] for _, r in CHECKS)
    assert {r["model"] for _, r in CHECKS} == {"qwen3-30b-a3b-L4", "mixtral-8x7b-L4", "gemma-3-12b-L8",
                                               "phi-3.5-mini", "gpt-oss-20b-L4", "gpt-oss-20b-L8", "qwen3-30b-a3b-L8",
                                               "qwen1.5-moe-a2.7b-L4", "phi-4-L8", "qwen3-30b-a3b-L16",
                                               "gpt-oss-20b-L16", "mixtral-8x7b-L8", "qwen1.5-moe-a2.7b-L8",
                                               "qwen1.5-moe-a2.7b-L16", "qwen1.5-moe-a2.7b",
                                               "qwen3-30b-a3b-L32", "gemma-3-12b", "phi-4", "gemma-3-12b-L16",
                                               "gpt-oss-20b", "qwen3-30b-a3b"}
    # Mixtral at 12 layers: QLoRA without checkpointing, probed without autocast (QLORA_WITHOUT_AUTOCAST)
    assert "mixtral-8x7b-L12" in {r["model"] for _, r in QLORA_WITHOUT_AUTOCAST}
    # what the issue asks: every family, LoRA and QLoRA, three shapes each that stand for a run and no term saw
    shapes: dict[tuple[str, str], set] = {}
    for _, r in CHECKS:
        shapes.setdefault((r["arch"], r["method"]), set()).add((r["layers"], r["batch"], r["seq"], r["checkpointing"]))
    families = ("qwen3-30b-a3b", "mixtral-8x7b", "phi-3.5-mini", "gemma-3-12b", "gpt-oss-20b", "phi-4",
                "qwen1.5-moe-a2.7b")
    # Qwen1.5-MoE's 16-bit LoRA: two, its third shape under autocast fitted memory.MOE_LORA_BACKWARD_BY_TYPE
    # (predictions/moe-lora-autocast-h200.json holds two more, for the next GPU session)
    assert all(len(shapes[a, m]) >= (2 if (a, m) == ("qwen1.5-moe-a2.7b", "lora") else 3)
               for a in families for m in ("lora", "qlora")), {k: len(v) for k, v in shapes.items()}
    oss = [r for d, r in issue17_rows.unfitted() if d == "h200-gpt-oss"]
    assert sorted((r["method"], r["batch"], r["seq"]) for r in oss) == sorted(
        (m, b, s) for m in ("lora", "qlora") for b, s in ((1, 2048), (4, 2048), (1, 8192)))
    # LoRA trains the attention projections only, as the estimate counts
    assert all(r["trainable_params"] == _estimate_params(r) for r in oss)


def _estimate_params(row: dict) -> int:
    from rigplan.estimator.memory import lora_params

    return lora_params(reduced(resolve_model(row["model"].split("-L")[0]), row["layers"]), row["rank"])


@pytest.mark.parametrize("name,row", [(n, r) for n, (_, r) in zip(CHECK_IDS, CHECKS)], ids=CHECK_IDS)
def test_runs_no_term_was_written_from(name: str, row: dict) -> None:
    allocated, reserved = _as_probed(row)
    assert abs(row["peak_alloc_gib"] / allocated - 1) <= 0.05
    assert abs(row["peak_reserved_gib"] / reserved - 1) <= CHECK_RESERVED_BOUND.get(name, 0.05)
    _assert_speed(row, _estimate(row))


def test_the_family_terms_are_what_their_runs_give() -> None:
    """Each constant fitted on one or two recorded runs (bench/family_terms.py recomputes it from them) agrees with
    the estimator's value within 1%: a change elsewhere that moves a fit shows here."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("family_terms", RUNS.parents[1] / "family_terms.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, (fit, code) in module.fitted().items():
        assert abs(fit / code - 1) <= 0.01, name


MAX_SEQ = Path(__file__).parents[1] / "bench" / "results" / "max-seq-h200"


def _max_seq_rows() -> list[tuple[str, str, dict, dict]]:
    """(card, method, the check JSON the record script trained from, the probe's row) for each trained answer."""
    rows = []
    for check in sorted(MAX_SEQ.glob("check-*.json")):
        card = check.stem.removeprefix("check-")
        for method in ("lora", "qlora"):
            probe = MAX_SEQ / f"maxseq-{card}-{method}.jsonl"
            if probe.exists():
                rows.append((card, method, json.loads(check.read_text()),
                             json.loads(probe.read_text().splitlines()[-1])))
    return rows


def test_max_seq_answers_train_within_5_percent_of_their_plan() -> None:
    """`rigplan check llama-3.1-8b --max-seq --rank 32` for a 24 GB and a 48 GB card, trained at that length on
    the H200 with the process capped to the card's memory (bench/record_max_seq.sh): each trained, and its peak
    reserved memory is within 5% of today's estimate of that shape on that card, which fits."""
    rows = _max_seq_rows()
    assert {(c, m) for c, m, _, _ in rows} == {(c, m) for c in ("rtx-4090", "rtx-a6000") for m in ("lora", "qlora")}
    for card, method, check, row in rows:
        assert row["err"] is None and row["provenance"]["gpu"] == "NVIDIA H200"
        assert (row["batch"], row["seq"], row["rank"]) == (1, check["max_seq"][method], 32)
        setup = Setup(method, 32, 1, row["seq"], checkpointing=row["checkpointing"])
        est = planner.estimate(resolve_model("llama-3.1-8b"), setup, resolve_gpu(card), store.reference()[0])
        assert est.fits, (card, method)
        assert abs(row["peak_reserved_gib"] / est.peak_reserved_gib - 1) <= 0.05, (card, method)


PREQUANTIZED = Path(__file__).parents[1] / "bench" / "results" / "prequantized-h200"


def test_a_pre_quantized_checkpoint_trains_as_quantizing_on_load_does() -> None:
    """QLoRA from a bitsandbytes 4-bit copy of the 8B replica (as Unsloth's `-bnb-4bit` ones are saved) and from the
    16-bit folder, the same plan, one after the other on one H200 (bench/record_prequantized.sh; predictions
    written before: predictions/prequantized-h200.json). The estimate counts the two alike: each peak is within 5%
    of it, the two within 1% of each other, and, once shapes are compiled, their speeds within 5%."""
    from .test_h200_runs import data_lengths

    pre, fly = (json.loads((PREQUANTIZED / f"{n}.json").read_text()) for n in ("prequantized", "quantized-on-load"))
    assert pre["plan"]["model_path"].endswith("-bnb-4bit") and not fly["plan"]["model_path"].endswith("-bnb-4bit")
    for run in (pre, fly):
        assert run["status"] == "done" and run["provenance"]["gpu"] == "NVIDIA H200"
        p = run["plan"]
        setup = Setup(p["method"], p["rank"], p["micro_batch"], p["seq_len"], p["grad_accum"],
                      checkpointing=p["checkpointing"])
        est = planner.estimate(resolve_model("llama-3.1-8b"), setup, resolve_gpu("h200"), store.reference()[0],
                               lengths=data_lengths(run), batching=p["batching"], engine=p["engine"])
        assert abs(run["measured"]["peak_reserved_gib"] / est.peak_reserved_gib - 1) <= 0.05
    a, b = pre["measured"], fly["measured"]
    assert abs(a["peak_reserved_gib"] / b["peak_reserved_gib"] - 1) <= 0.01
    assert abs(a["tokens_per_s_compiled"] / b["tokens_per_s_compiled"] - 1) <= 0.05


def test_phi_4s_terms_are_not_phi_3_5s(monkeypatch) -> None:
    """Phi-3.5-mini (heads of 96) and Phi-4 (heads of 128) share model type "phi3"; Phi-3.5's fitted terms (its
    attention mask and time, recompute, slack, GPU factors) applied to Phi-4 leave its QLoRA rows up to 13% over the
    estimate's reserved memory and up to 68% faster than its speed. Phi-4 is its own family (memory.family), with the
    reference's terms: its rows that stand for a run (issue17_rows.checks) within 5% in reserved memory and 15% in
    GPU-bound speed, and outside both with Phi-3.5's terms."""
    from rigplan.estimator import memory

    phi35, phi4 = resolve_model("phi-3.5-mini"), resolve_model("phi-4")
    assert (memory.family(phi35), memory.family(phi4)) == ("phi3", "phi3-128")
    rows = [(d, r) for d, r in issue17_rows.checks() if r["model"] == "phi-4-L8"]
    assert {"h200-issue17-heldout5", "h200-issue17-heldout6", "h200-issue17-heldout7"} <= {d for d, _ in rows}
    assert len(rows) >= 7
    worst = {}
    for key in ("phi3-128", "phi3"):
        monkeypatch.setitem(memory.FAMILY_BY_TYPE_AND_HEAD_DIM, ("phi3", 128), key)
        ests = [(r, _estimate(r)) for _, r in rows]
        assert all((e.components_bytes["attention_mask"] == 0) == (key == "phi3-128") for _, e in ests)
        worst[key] = (max(abs(r["peak_reserved_gib"] / e.peak_reserved_gib - 1) for r, e in ests),
                      max(abs(r["tok_per_s"] / e.tokens_per_s - 1) for r, e in ests if not e.host_bound))
    assert worst["phi3-128"][0] < 0.05 < worst["phi3"][0] and worst["phi3-128"][1] < 0.15 < worst["phi3"][1]


def test_qwen3_moe_qlora_allocates_as_estimated_to_32k_tokens() -> None:
    """Every recorded Qwen3-30B-A3B row, GPU-bound, within 11% of the estimate's speed, its grouped experts' slowness
    on its matmuls alone (it was 19% at 32,768 tokens when on the whole step), fitted on 16-bit LoRA under autocast
    (fitted without it, the 20,480-token rows in several sequences without checkpointing ran 13-18% faster than the
    estimate; now 6-10%). Its QLoRA at 4, 8 and 16 layers,
    2,048 to 32,768 tokens, every recorded row (memory.MOE_QLORA_BACKWARD_BY_TYPE fitted through 1 x 16384 and
    1 x 32768) and at 32 from 12,288 to 20,480: allocated peak within 2.5% of the estimate; reserved within 6% (the
    allocator's scatter: CHECK_RESERVED_BOUND) but for single sequences from 12,288 to 24,576 tokens, where the
    allocator mostly held a third of its slack at the other lengths (fifteen runs on six machines): there the
    estimate is above, by at most 0.55 GiB at every depth (0.33-0.36 at 32 layers, 2.4-2.5% of the plan), the side
    that does not run out of memory; at the full 48 layers by 0.38 and 0.17 GiB, 2.1% and 0.9%
    (h200-issue17-full-depth/; 1.5-3% expected before the runs), and in several sequences, 16 x 1280 and 4 x 5120,
    1.7% (-blind-checks/; within 3% expected). Rows under expandable segments, as `rigplan run` trains, with Unsloth's
    checkpointing (without it: test_moe_without_checkpointing_keeps_what_the_estimate_counts); those without autocast
    compared as probed, with the recomputed layer's input copies (_as_probed)."""
    found = [r for _, r in recorded("h200-issue17*/probe-qwen3moe*.jsonl")]
    for r in found:  # speed.MATMUL_TIME_BY_TYPE, fitted on the LoRA 1 x 8192 row, on every GPU-bound row to 32,768
        est = _estimate(r)
        assert est.host_bound or abs(r["tok_per_s"] / est.tokens_per_s - 1) <= 0.11, (r["method"], r["seq"])
    qlora = [r for r in found if r["method"] == "qlora" and r.get("alloc_conf") == "expandable_segments:True"
             and r["checkpointing"] == "unsloth" and issue17_rows.in_a_process_of_its_own(r)]
    assert {r["seq"] * r["batch"] for r in qlora} >= {2048, 8192, 12288, 16384, 20480, 32768} and len(qlora) >= 15
    short_of_slack = []
    for r in qlora:
        allocated, reserved = _as_probed(r)
        assert abs(r["peak_alloc_gib"] / allocated - 1) <= 0.025, (r["batch"], r["seq"])
        err = r["peak_reserved_gib"] / reserved - 1
        if r["batch"] == 1 and 12288 <= r["seq"] <= 24576:
            assert -0.095 <= err <= 0.06 and reserved - r["peak_reserved_gib"] <= 0.55, (r["seq"], err)
            short_of_slack.append(r["seq"])
        else:
            assert abs(err) <= 0.06, (r["batch"], r["seq"], err)
    assert len(short_of_slack) >= 15 and {r["layers"] for r in qlora} == {4, 8, 16, 32, 48}
    full = [r for r in qlora if r["layers"] == 48]
    assert sorted((r["batch"], r["seq"]) for r in full) == [(1, 12288), (1, 16384), (4, 5120), (16, 1280)]
    assert all(0 < 1 - r["peak_reserved_gib"] / _as_probed(r)[1] <= 0.03 for r in full)


def test_qwen3_moe_qlora_slack_is_a_large_transient_just_short_of_a_hole() -> None:
    """Where Qwen3-MoE's QLoRA reserved memory beyond its allocated peak comes from (memory.QLORA_SLACK_GIB_BY_TYPE),
    in the memory snapshots of two 4-layer probes (h200-qwen3moe-slack-snapshot/, recorded from the process's start):
    in the epoch of the timed steps, the large pool last grew for one of the step's largest transients, at 1 x 8192 a
    layer's gate_up expert stack dequantized to bf16 (memory.gate_up_stack_bytes), at 1 x 18432 the routed tokens'
    buffer (tokens x experts per token x hidden, bf16), each within 5% of the largest free hole it did not fit in.
    Those sizes move with the tokens, which is why the slack jumps between 0.13 and 0.77 GiB with no trend."""
    import gzip
    import pickle

    from snapshot_peak import epochs, reserved_growth  # bench/

    from rigplan.estimator.memory import gate_up_stack_bytes, routed_copy_bytes

    model = reduced(resolve_model("qwen3-30b-a3b"), 4)
    folder = RUNS.parent / "h200-qwen3moe-slack-snapshot"
    routed = routed_copy_bytes(model, Setup("qlora", 16, 1, 18432))  # 576 MiB
    for seq, size, frame in ((8192, gate_up_stack_bytes(model), "_gate_up_provider"),
                             (18432, routed, "_grouped_mm_eager")):
        with gzip.open(folder / f"snapshot-{seq}.pickle.gz", "rb") as f:
            trace = pickle.load(f)["device_traces"][0]
        grown = reserved_growth(trace, *epochs(trace)[-1])
        assert grown["request"]["size"] == size, seq
        assert any(fr["name"] == frame for fr in grown["request"]["frames"]), seq
        largest = max(h["size"] for h in grown["holes"])
        assert 0.95 * size <= largest < size, (seq, largest)


def test_qwen3_moe_probes_without_autocast_keep_two_copies_of_a_layers_input() -> None:
    """memory.NO_AUTOCAST_COPIES_BY_TYPE["qwen3_moe"]: Qwen3-MoE's 4-layer QLoRA with checkpointing at 1 x 8192,
    1 x 16384 and 1 x 18432, probed under autocast (h200-qwen3moe-slack-snapshot/) and without it (h200-issue17-
    expandable/, -fit6/, -heldout8/): the same forward peak, and a backward peak, which holds one layer's recompute,
    two hidden-wide bf16 copies a token more without autocast (8,192 bytes, within 0.1%)."""
    from rigplan.estimator.memory import without_autocast_bytes

    one_layer = reduced(resolve_model("qwen3-30b-a3b"), 1)
    copies = without_autocast_bytes(one_layer, Setup("qlora", 16, 1, 1, checkpointing="off"))  # a token's, a layer's
    assert copies == 8192
    under = [r for _, r in issue17_rows.probe_rows("h200-qwen3moe-slack-snapshot/rows-under-memory-history*.jsonl")]
    without = [r for _, r in recorded("h200-issue17-*/probe-qwen3moe*.jsonl") if r.get("autocast") in (None, "off")
               and (r["layers"], r["method"], r["checkpointing"], r["batch"]) == (4, "qlora", "unsloth", 1)
               and issue17_rows.in_a_process_of_its_own(r)]
    assert {r["seq"] for r in under} == {8192, 16384, 18432} and all(r["autocast"] == "bf16" for r in under)
    for r in under:
        pairs = [w["phase_peak_alloc_gib"] for w in without if w["seq"] == r["seq"]]
        per_token = [(w["backward"] - r["phase_peak_alloc_gib"]["backward"]) * 2**30 / r["seq"] for w in pairs]
        best = min(per_token, key=lambda b: abs(b - copies))
        assert abs(best / copies - 1) <= 0.001, (r["seq"], per_token)
        assert any(w["forward"] == r["phase_peak_alloc_gib"]["forward"] for w in pairs), r["seq"]


def test_checkpointed_runs_under_autocast_hold_none_of_the_recomputed_layers_input_copies() -> None:
    """With checkpointing, the terms fitted on probes without autocast count the recomputed layer's input copies, which
    a run under autocast does not hold; the estimate takes them out (memory.without_autocast_bytes). Blind, on three
    checkpointed QLoRA shapes under autocast (h200-issue17-ckpt-copies/, predictions/ckpt-copies-h200.json written
    before): Qwen3-MoE at 8 layers 1 x 16384, Qwen1.5-MoE at 8 layers 4 x 4096, Mixtral at 4 layers 1 x 24576, each
    allocated within 0.5% of the estimate, where with the copies the estimate is 1.1-2.1% over. The first and the last
    shape probed without autocast allocated the copies more (heldout7/, mixtral-long/), within 0.2% of them."""
    from rigplan.estimator.memory import without_autocast_bytes

    rows = [r for _, r in recorded("h200-issue17-ckpt-copies/probe-*.jsonl")]
    assert sorted(r["arch"] for r in rows) == ["mixtral-8x7b", "qwen1.5-moe-a2.7b", "qwen3-30b-a3b"]
    earlier = {(r["arch"], r["layers"], r["batch"], r["seq"]): r for _, r in recorded("h200-issue17-*/probe-*.jsonl")
               if r.get("autocast") is None and r["checkpointing"] == "unsloth" and r["method"] == "qlora"}
    for r in rows:
        assert r["autocast"] == "bf16" and r["checkpointing"] == "unsloth" and issue17_rows.in_a_process_of_its_own(r)
        est = _estimate(r).peak_allocated_gib
        copies = without_autocast_bytes(reduced(resolve_model(r["arch"]), r["layers"]),
                                        Setup("qlora", 16, r["batch"], r["seq"])) / 2**30
        assert abs(r["peak_alloc_gib"] / est - 1) <= 0.005, r["arch"]
        assert (est + copies) / r["peak_alloc_gib"] - 1 >= 0.009, r["arch"]
        without = earlier.get((r["arch"], r["layers"], r["batch"], r["seq"]))
        if without:
            assert abs((without["peak_alloc_gib"] - r["peak_alloc_gib"]) / copies - 1) <= 0.01, r["arch"]
    assert sum((r["arch"], r["layers"], r["batch"], r["seq"]) in earlier for r in rows) == 2


def test_mixture_of_experts_qlora_allocates_as_estimated_at_every_depth() -> None:
    """Qwen3-30B-A3B at 4, 8 and 16 layers, gpt-oss-20b at 4, 8 and 16, Mixtral-8x7B at 4 and 8 (predictions/
    moe-depth-h200.json for the deepest, written before): the QLoRA allocated peak within 2% of the estimate at every
    depth, micro-batches of 2,048 to 8,192 tokens, in a process of its own; within 3% where a job ran before in the
    same process, with its leftovers or without them (freed during the step or not). gpt-oss at 4 layers allocated
    0.09 GiB more at 2 x 4096 than at 4 x 2048 and 1 x 8192, each in a process of its own (heldout3/, fresh-process/).
    Before the experts were counted double-quantized the estimate drifted over by 0.03-0.06 GiB a layer (4% at 16
    layers). Mixtral: at these lengths its peak is the experts' dequantizing phase (memory.expert_dequant_phase_bytes),
    0.14 GiB over at 4 and at 8 layers alike, since its backward holds less of the recompute
    (memory.MOE_QLORA_BACKWARD_BY_TYPE)."""
    found = [r for _, r in recorded("h200-*/probe-*.jsonl")]
    qlora = [r for r in found if r["method"] == "qlora" and not r["err"] and r["batch"] * r["seq"] <= 8192
             and r["arch"] in ("qwen3-30b-a3b", "gpt-oss-20b", "mixtral-8x7b") and r["checkpointing"] == "unsloth"]
    depths = {}
    for r in qlora:
        depths.setdefault(r["arch"], set()).add(r["layers"])
        est, left = _as_probed(r)[0], r["start_alloc_gib"] - FRESH_START_ALLOC_GIB
        bound = 0.02 if left <= 0 else 0.03
        err = min(abs(r["peak_alloc_gib"] / est - 1), abs((r["peak_alloc_gib"] - left) / est - 1))
        assert err <= bound, (r["model"], r["seq"])
    assert depths == {"qwen3-30b-a3b": {4, 8, 16}, "gpt-oss-20b": {4, 8, 16}, "mixtral-8x7b": {4, 8}}


def test_mixtral_and_qwen1_5_moe_qlora_hold_a_share_of_the_recompute() -> None:
    """Mixtral-8x7B at 4 and 8 layers and Qwen1.5-MoE at 4 to 24, QLoRA from 2,048 to 32,768 tokens a micro-batch,
    with Unsloth's checkpointing, every row from a process of its own: allocated within 2% and reserved within 5% of
    the estimate (5.5% for Qwen1.5-MoE at 8 layers and 4 x 4096: CHECK_RESERVED_BOUND). Before their backward's
    share (memory.MOE_QLORA_BACKWARD_BY_TYPE, two rows each) the estimate's allocated peak was 7.7-12.5%
    over Mixtral's beyond 8,192 tokens and 13.1% over Qwen1.5-MoE's at 32,768; Mixtral's reserved stays where it was,
    since its allocator keeps the whole transient (memory.WHOLE_TRANSIENT_RESERVED)."""
    found = [r for d, r in recorded("h200-issue17-*/probe-*.jsonl") if d != "h200-issue17-qwen2moe"]
    rows = [r for r in found if r["method"] == "qlora" and r["arch"] in ("mixtral-8x7b", "qwen1.5-moe-a2.7b")
            and issue17_rows.in_a_process_of_its_own(r) and r["checkpointing"] == "unsloth"]
    longest = {}
    for r in rows:
        allocated, reserved = _as_probed(r)
        assert abs(r["peak_alloc_gib"] / allocated - 1) <= 0.02, (r["model"], r["batch"], r["seq"])
        bound = 0.055 if (r["model"], r["batch"], r["seq"]) == ("qwen1.5-moe-a2.7b-L8", 4, 4096) else 0.05
        assert abs(r["peak_reserved_gib"] / reserved - 1) <= bound, (r["model"], r["batch"], r["seq"])
        longest[r["arch"]] = max(longest.get(r["arch"], 0), r["batch"] * r["seq"])
    assert longest == {"mixtral-8x7b": 32768, "qwen1.5-moe-a2.7b": 32768} and len(rows) >= 20


def test_mixtral_and_qwen1_5_moe_16bit_lora_hold_a_share_of_the_recompute_under_autocast(monkeypatch) -> None:
    """Their 16-bit LoRA with checkpointing under autocast, as runs train (h200-issue17-autocast-lora/, -autocast-next/,
    -autocast/): the backward holds 0.84-0.85 of the recompute transient the reference counts (memory.
    MOE_LORA_BACKWARD_BY_TYPE, one row each), and Mixtral's allocator keeps the whole transient reserved, as its
    QLoRA's does (memory.WHOLE_TRANSIENT_RESERVED). Every such row within 0.5% allocated and 1.5% reserved; without
    the share, the rows of 8,192 tokens and more were 2.5% over or further."""
    from rigplan.estimator import memory

    patterns = ("h200-issue17-autocast-lora/probe-mixtral.jsonl", "h200-issue17-autocast*/probe-qwen2moe.jsonl")
    rows = [r for pattern in patterns for _, r in recorded(pattern)
            if r["method"] == "lora" and r["checkpointing"] == "unsloth"]
    assert all(r["autocast"] == "bf16" for r in rows) and len(rows) == 6
    assert {r["arch"] for r in rows} == {"mixtral-8x7b", "qwen1.5-moe-a2.7b"}
    for r in rows:
        est = _estimate(r)
        assert abs(r["peak_alloc_gib"] / est.peak_allocated_gib - 1) <= 0.005, (r["model"], r["batch"], r["seq"])
        assert abs(r["peak_reserved_gib"] / est.peak_reserved_gib - 1) <= 0.015, (r["model"], r["batch"], r["seq"])
    for t in ("mixtral", "qwen2_moe"):
        monkeypatch.delitem(memory.MOE_LORA_BACKWARD_BY_TYPE, t)
    for r in rows:
        if r["batch"] * r["seq"] >= 8192:
            assert r["peak_alloc_gib"] / _estimate(r).peak_allocated_gib - 1 <= -0.025, (r["model"], r["seq"])


def test_moe_without_checkpointing_keeps_what_the_estimate_counts() -> None:
    """Mixtral-8x7B, Qwen3-30B-A3B and Qwen1.5-MoE-A2.7B QLoRA without checkpointing (`check` picks it where the card
    has room), 4 to 16 layers, 2,048 to 32,768 tokens: what a layer keeps, the 8- less the 4-layer allocated peaks at
    the same tokens with the layers' weights (as measured after loading) taken out, is within 2% of the estimate's
    kept activations per layer at every token count measured (memory.NOCKPT_ROUTED_SHARE_BY_TYPE was fitted at 8,192
    only); every row's allocated peak is within 4%, and its reserved peak within 3% on the side that runs out of memory
    (Qwen3-MoE's 8-layer 1 x 2048 row held 0.65 GiB beyond its allocated peak, its family's constant 0.57) and 6% on
    the other (Qwen3-MoE's 4-layer 1 x 2048 row held 0.31). Before, the estimate counted 8% (Mixtral) to 30%
    (Qwen1.5-MoE) less than a layer keeps, the dense terms alone. These probes ran without autocast: the estimate is
    compared as such a probe keeps (a run's and memory.without_autocast_bytes, the layers' input copies)."""
    probed = issue17_rows.without_autocast_gib
    found = [r for d, r in recorded("h200-issue17-nockpt*/probe-*.jsonl") if r["checkpointing"] == "off"
             and r.get("autocast") in (None, "off")]
    by_shape = {(r["arch"], r["layers"], r["batch"] * r["seq"]): r for r in found}
    pairs = 0
    for (arch, layers, tokens), deep in by_shape.items():
        short = by_shape.get((arch, 4, tokens))
        if layers != 8 or short is None:
            continue
        kept = [_estimate(r).components_bytes["activations_kept"] / 2**30 + probed(r) for r in (short, deep)]
        measured = kept_by_the_extra_layers_gib(short, deep)
        assert abs(measured / (kept[1] - kept[0]) - 1) <= 0.02, (arch, tokens)
        pairs += 1
    assert pairs >= 8
    for r in found:
        est = _estimate(r)
        assert abs(r["peak_alloc_gib"] / (est.peak_allocated_gib + probed(r)) - 1) <= 0.04, (r["model"], r["seq"])
        err = r["peak_reserved_gib"] / (est.peak_reserved_gib + probed(r)) - 1
        assert -0.06 <= err <= 0.03, (r["model"], r["batch"], r["seq"], err)
    assert {r["arch"] for r in found} == {"mixtral-8x7b", "qwen3-30b-a3b", "qwen1.5-moe-a2.7b"}
    assert max(r["layers"] for r in found) >= 12 and max(r["batch"] * r["seq"] for r in found) == 32768


def _saved_per_token_layer(model) -> int:
    """The bytes one mixture-of-experts layer saves for its backward per token without checkpointing under Unsloth's
    compiled QLoRA, counted tensor by tensor from the source (docs/moe-saved-tensors.md, section 3): attention's
    inputs, q/k/v, output and its contiguous copy, the residual; Qwen3-MoE's q/k norm copies; the routed experts'
    gate_up output (4 bytes x k x expert width: their activation is recomputed); the routing's bookkeeping; a shared
    expert's normed input, gate/up, activation and gated output."""
    h, nh, nkv, hd = model.hidden_size, model.num_attention_heads, model.num_key_value_heads, model.head_dim
    qw, kvw, k, width = nh * hd, nkv * hd, model.num_experts_per_tok, model.expert_intermediate
    saved = 2 * h + 2 * h + 2 * qw + 4 * kvw + 2 * qw + 4 * nh + 2 * qw + 2 * h
    if model.model_type == "qwen3_moe":
        saved += 2 * (qw + kvw) + 4 * (nh + nkv)
    saved += 4 * k * width + 4 * model.num_experts + 8 * k * 3 + 4 * k + 4 + 4 * k
    shared = model.shared_expert_intermediate_size
    return saved + (2 * h + 6 * shared + 2 * h if shared else 0)


@pytest.mark.parametrize("name", ["mixtral-8x7b", "qwen3-30b-a3b", "qwen1.5-moe-a2.7b", "qwen3-235b-a22b"])
def test_moe_kept_bytes_agree_with_the_tensors_the_source_saves(name: str) -> None:
    """The estimate's kept activations per token and layer without checkpointing (the dense terms and the family's
    multiple of the routed copy, fitted on two runs), as a probe without autocast keeps them (a run's and
    memory.without_autocast_bytes), within 3% of the tensor count read from the source for such a probe, which
    reproduces the three measured families within 0.3% and extends to Qwen3-235B-A22B, not measured (there the
    estimate is 2.6% above it, the side that does not run out of memory)."""
    from rigplan.estimator import memory

    model = resolve_model(name)
    setup = Setup("qlora", 16, 1, 8192, checkpointing="off")
    probed = memory.checkpoint_bytes(model, setup, store.reference()[0]) + memory.without_autocast_bytes(model, setup)
    counted = probed / setup.tokens / model.num_hidden_layers
    assert abs(counted / _saved_per_token_layer(model) - 1) <= 0.03


# What docs/moe-saved-tensors.md counted from the source, before the runs, for one layer without checkpointing and
# without autocast: bytes per token (its tables "16-bit" and gpt-oss-20b).
COUNTED_BEFORE = {("mixtral-8x7b", "lora"): 184_800, ("qwen3-30b-a3b", "lora"): 86_300,
                  ("qwen1.5-moe-a2.7b", "lora"): 138_100, ("gpt-oss-20b", "lora"): 151_000,
                  ("gpt-oss-20b", "qlora"): 125_400}


def test_gpt_oss_at_32k_tokens_meets_its_prediction(monkeypatch: pytest.MonkeyPatch) -> None:
    """gpt-oss at 32,768 tokens (h200-issue17-gptoss-long/, 8-layer QLoRA without checkpointing and 4-layer 16-bit
    LoRA with it, under autocast; both predictions committed before the runs). Its attention runs through flex
    attention at about the matmuls' rate (speed.ATTENTION_TIME_BY_TYPE, fitted on the full-depth 1 x 8192 and
    1 x 16384 rows): the estimate within 5% of both speeds, where at its heads' softmax bound it was 20% or more slow.
    The 16-bit LoRA's fp32 expert activation fitted under autocast, as runs train (memory.FP32_SWIGLU_BYTES): allocated
    within 1%, where the value fitted on the same shape probed without autocast (11.9 bytes, as probed) put it over 4%
    high."""
    from rigplan.estimator import memory, speed

    rows = [r for _, r in recorded("h200-issue17-gptoss-long/probe-*.jsonl")]
    assert sorted((r["layers"], r["method"], r["seq"], r["autocast"]) for r in rows) == [
        (4, "lora", 32768, "bf16"), (8, "qlora", 32768, "bf16")]
    for r in rows:
        assert abs(r["tok_per_s"] / _estimate(r).tokens_per_s - 1) <= 0.05, r["method"]
        with monkeypatch.context() as m:
            m.delitem(speed.ATTENTION_TIME_BY_TYPE, "gpt_oss")
            assert r["tok_per_s"] / _estimate(r).tokens_per_s - 1 >= 0.20, r["method"]
    (lora,) = [r for r in rows if r["method"] == "lora"]
    assert abs(lora["peak_alloc_gib"] / _estimate(lora).peak_allocated_gib - 1) <= 0.01
    monkeypatch.setitem(memory.FP32_SWIGLU_BYTES, "lora", 11.9)
    assert lora["peak_alloc_gib"] / _estimate(lora).peak_allocated_gib - 1 < -0.04


def test_16bit_lora_and_gpt_oss_keep_what_the_source_count_said() -> None:
    """Each family's 16-bit LoRA and gpt-oss's QLoRA without checkpointing, probed without autocast at 4 and 8 layers:
    what a layer keeps (the 8- less the 4-layer allocated peaks at the same tokens, the layers' weights taken out) is
    within 1.5% of the count written before the runs at 2,048 tokens, 0.3% at 8,192. gpt-oss's QLoRA is estimated at
    its count (memory.NOCKPT_ROUTED_SHARE_BY_TYPE); a run's 16-bit LoRA, under autocast, keeps less than these probes
    (test below), and the estimate counts what the runs under autocast kept."""
    found = [r for pattern in ("h200-issue17-gptoss-nockpt", "h200-issue17-lora-nockpt*")
             for _, r in recorded(f"{pattern}/probe-*.jsonl")]
    by_shape = {(r["arch"], r["method"], r["layers"], r["seq"]): r for r in found}
    for (arch, method), count in COUNTED_BEFORE.items():
        for seq in (2048, 8192):
            short, deep = by_shape[arch, method, 4, seq], by_shape[arch, method, 8, seq]
            measured = kept_by_the_extra_layers_gib(short, deep)
            assert abs(measured * 2**30 / 4 / seq / count - 1) <= (0.015 if seq == 2048 else 0.003), (arch, method, seq)
        if (arch, method) == ("gpt-oss-20b", "qlora"):
            # as probed: with the layers' input copies a run does not keep (memory.without_autocast_bytes)
            probed = issue17_rows.without_autocast_gib
            kept = [_estimate(r).components_bytes["activations_kept"] + probed(r) * 2**30 for r in (short, deep)]
            assert abs((kept[1] - kept[0]) / 4 / seq / count - 1) <= 0.002
            assert all(abs(r["peak_alloc_gib"] / (_estimate(r).peak_allocated_gib + probed(r)) - 1) <= 0.035
                       for r in (short, deep))


def test_autocast_changes_what_16bit_lora_keeps_and_its_speed() -> None:
    """`rigplan run` trains under bf16 autocast (TRL bf16=True, every family on a bf16 GPU); the probes before
    2026-12-01 ran without it. Every shape probed both ways: under QLoRA the same peaks within 1.5% once the
    mixture-of-experts layers' input copies are taken out (without checkpointing every layer's,
    issue17_rows.without_autocast_gib; with it one layer's, where its recompute is the peak: Qwen3-MoE at 4 layers
    and 1 x 12288, to 1 MiB), and where the GPU bounds it the same speed within 2% (Mixtral, Qwen1.5-MoE, Qwen3-MoE),
    gpt-oss's 2% slower to 8.5% faster under autocast (8% at 4 layers and 1 x 8192 without checkpointing, its
    checkpointed pairs in fresh-process/ 2-3%). Where the host bounds it, the speed is another machine's host on
    another day (Qwen3-MoE 7% and gpt-oss 16% slower at 4 layers and 1 x 2048). Under 16-bit LoRA, where Unsloth's
    rewritten adapters compute in fp32 without autocast, autocast allocates no more (every MoE family, Phi-3.5, Phi-4
    and Gemma 3, whose peak is the same: its whole logits, not the adapters' inputs) and runs faster, by more than 5%
    on half the shapes."""
    shape = ("arch", "layers", "method", "batch", "seq", "checkpointing")
    off = {tuple(r[k] for k in shape): r for _, r in recorded("h200-issue17*/probe-*.jsonl")
           if r.get("autocast", "off") == "off" and not r["err"]}
    # QLoRA: the pairs the autocast runs made; fresh-process/ ran its QLoRA under autocast to check the estimate, days
    # after the rows without it (Gemma 3 L8 1 x 2048, host-bound, 27% faster)
    pairs = [(r, off[tuple(r[k] for k in shape)]) for d, r in recorded("h200-issue17*/probe-*.jsonl")
             if r.get("autocast") == "bf16" and tuple(r[k] for k in shape) in off
             and (r["method"] == "lora" or d != "h200-issue17-fresh-process")]
    assert {r["arch"] for r, _ in pairs} == {"mixtral-8x7b", "qwen3-30b-a3b", "qwen1.5-moe-a2.7b", "gpt-oss-20b",
                                             "phi-3.5-mini", "phi-4", "gemma-3-12b"}
    for on, without in pairs:
        if on["method"] == "qlora":
            copies = issue17_rows.without_autocast_gib(without)
            if without["checkpointing"] != "off":  # one layer's copies, in its recompute, where that is the peak
                one_layer = issue17_rows.without_autocast_gib({**without, "layers": 1, "checkpointing": "off"})
                if abs(without["peak_alloc_gib"] - on["peak_alloc_gib"] - one_layer) <= 0.002:
                    copies = one_layer
            assert abs(on["peak_alloc_gib"] / (without["peak_alloc_gib"] - copies) - 1) <= 0.015
            if _estimate(on).host_bound:  # the host's speed, another machine's on another day
                continue
            low, high = (0.98, 1.085) if on["arch"] == "gpt-oss-20b" else (0.98, 1.02)
            assert low <= on["tok_per_s"] / without["tok_per_s"] <= high, (on["model"], on["batch"], on["seq"])
        else:
            assert on["peak_alloc_gib"] <= without["peak_alloc_gib"], (on["model"], on["batch"], on["seq"])
            # Qwen3-MoE L4 4 x 2048 ran 5% slower under autocast (probed on different days); no other pair slower
            assert on["tok_per_s"] >= 0.94 * without["tok_per_s"], (on["model"], on["batch"], on["seq"])
    speedup = sorted(on["tok_per_s"] / without["tok_per_s"] for on, without in pairs if on["method"] == "lora")
    assert len(speedup) >= 20 and speedup[len(speedup) // 2] > 1.05


def test_16bit_lora_probed_without_autocast_keeps_at_least_what_a_run_is_estimated_to() -> None:
    """The 16-bit LoRA rows probed without autocast (issue17_rows.without_autocast) do not stand for a run, but they
    bound one: their fp32 adapter inputs come on top of what a run keeps, and their fp32 adapters run slower. So
    each allocates and reserves no less than 5% under the run's estimate, and runs at most 15% faster than it where
    the GPU bounds it (within the band where the host does)."""
    rows = [(d, r) for d, r in issue17_rows.without_autocast() if r["method"] == "lora"]
    assert len(rows) >= 30 and all(r.get("autocast") in (None, "off") for _, r in rows)
    for d, r in rows:
        est = _estimate(r)
        assert r["peak_alloc_gib"] >= 0.95 * est.peak_allocated_gib, (d, r["model"], r["batch"], r["seq"])
        assert r["peak_reserved_gib"] >= 0.95 * est.peak_reserved_gib, (d, r["model"], r["batch"], r["seq"])
        if est.host_bound:
            assert est.tokens_per_s_band[0] <= r["tok_per_s"] <= est.tokens_per_s_band[1]
        else:
            assert r["tok_per_s"] <= 1.15 * est.tokens_per_s, (d, r["model"], r["batch"], r["seq"])


QLORA_WITHOUT_AUTOCAST = [(d, r) for d, r in issue17_rows.without_autocast() if r["method"] == "qlora"]
QLORA_WITHOUT_AUTOCAST_IDS = [f"{d}/{r['model']}-{r['batch']}x{r['seq']}" for d, r in QLORA_WITHOUT_AUTOCAST]
# gpt-oss's QLoRA at 8 layers and 1 x 8192 without autocast held 1.18 and 1.43 GiB beyond its allocated peak (on two
# days), under autocast 0.52 (gptoss-depth-autocast/), its line through the 4-layer rows under autocast
# (memory.NOCKPT_SLACK_BY_TYPE) 0.59
QLORA_WITHOUT_AUTOCAST_RESERVED_BOUND = {f"h200-issue17-{d}/gpt-oss-20b-L8-1x8192": b
                                         for d, b in (("gptoss-nockpt", 0.075), ("autocast-next", 0.06))}


@pytest.mark.parametrize("name,row", list(zip(QLORA_WITHOUT_AUTOCAST_IDS, (r for _, r in QLORA_WITHOUT_AUTOCAST))),
                         ids=QLORA_WITHOUT_AUTOCAST_IDS)
def test_qlora_probed_without_autocast_is_a_run_with_its_layers_input_copies(name: str, row: dict) -> None:
    """The mixture-of-experts families' QLoRA rows without checkpointing probed without autocast keep bf16 copies of
    their layers' input that a run does not (memory.without_autocast_bytes); with those the estimate is what such a
    probe holds, allocated within 5% and reserved within its bound, and its speed a run's within 15%
    (issue17_rows.speed_checks)."""
    est, copies = _estimate(row), issue17_rows.without_autocast_gib(row)
    assert copies > 0 and row["checkpointing"] == "off"
    assert abs(row["peak_alloc_gib"] / (est.peak_allocated_gib + copies) - 1) <= 0.05
    bound = QLORA_WITHOUT_AUTOCAST_RESERVED_BOUND.get(name, 0.05)
    assert abs(row["peak_reserved_gib"] / (est.peak_reserved_gib + copies) - 1) <= bound
    _assert_speed(row, est)


def test_moe_layers_without_autocast_keep_copies_of_their_input() -> None:
    """memory.NO_AUTOCAST_COPIES_BY_TYPE: the same QLoRA shape without checkpointing, probed under bf16 autocast
    (h200-issue17-nockpt-autocast/, 2026-12-01) and without it, each in a process of its own: the forward and
    backward peaks differ by the family's copies of a layer's input (hidden-wide, bf16) a token, every layer, within
    0.1%: two for Qwen3-MoE (4 layers at 2,048 and 16,384 tokens, 16 at 8,192) and gpt-oss, one for Mixtral and
    Qwen1.5-MoE. The optimizer phase, after the step's activations are freed, is the same."""
    from rigplan.estimator.memory import NO_AUTOCAST_COPIES_BY_TYPE

    under = [r for _, r in recorded("h200-issue17-nockpt-autocast/probe-*.jsonl")]
    without = [r for d, r in recorded("h200-*/probe-*.jsonl") if r.get("autocast") in (None, "off")
               and r["checkpointing"] == "off" and r["method"] == "qlora" and issue17_rows.in_a_process_of_its_own(r)]
    assert len(under) == 6 and all(r["autocast"] == "bf16" for r in under)
    copies = {}
    for r in under:
        (w,) = [w for w in without if (w["arch"], w["layers"], w["batch"], w["seq"])
                == (r["arch"], r["layers"], r["batch"], r["seq"])]
        model = reduced(resolve_model(r["arch"]), r["layers"])
        one_copy = r["seq"] * r["layers"] * model.hidden_size * 2 / 2**30
        for phase in ("forward", "backward"):
            n = (w["phase_peak_alloc_gib"][phase] - r["phase_peak_alloc_gib"][phase]) / one_copy
            assert abs(n - round(n)) <= 0.001 * round(n), (r["model"], r["seq"], phase, n)
            copies.setdefault(model.model_type, set()).add(round(n))
        assert w["phase_peak_alloc_gib"]["optimizer"] == r["phase_peak_alloc_gib"]["optimizer"]
        assert issue17_rows.without_autocast_gib(w) == pytest.approx(w["peak_alloc_gib"] - r["peak_alloc_gib"],
                                                                     abs=0.001)
    assert copies == {t: {n} for t, n in NO_AUTOCAST_COPIES_BY_TYPE.items()}


def test_the_llama_fast_path_is_the_same_under_autocast() -> None:
    """Full-depth Llama-3.1-8B, 16-bit LoRA 1 x 8192, probed with and without bf16 autocast, each in a process of its
    own (bench/results/h200-llama-autocast/, 2026-12-01): Unsloth's fused LoRA kernels cast the adapters to the
    activations' dtype either way, so the peaks are the same and the speed within 1%. The reference calibration's
    probes, without autocast, stand for runs."""
    (without,), (on,) = ([r for _, r in recorded(f"h200-llama-autocast/probe-{name}.jsonl")]
                         for name in ("llama", "llama-bf16"))
    assert (without["autocast"], on["autocast"], without["arch"], on["layers"]) == ("off", "bf16", "llama-3.1-8b", 32)
    assert on["peak_alloc_gib"] == pytest.approx(without["peak_alloc_gib"], abs=0.01)
    assert on["peak_reserved_gib"] == pytest.approx(without["peak_reserved_gib"], abs=0.01)
    assert on["tok_per_s"] == pytest.approx(without["tok_per_s"], rel=0.01)


def test_rigplan_run_on_a_moe_replica_meets_its_plan() -> None:
    """`rigplan run` on an 8-layer Qwen1.5-MoE replica, the plan rigplan made for the data on the H200 (16 x 1280
    without checkpointing, predictions/qwen2moe-run-h200.json written before), the longest micro-batch first
    (bench/results/h200-issue17-run/, 2026-12-01). Today's estimate of each run's setup for the data's lengths: peak
    reserved within 5% (16-bit LoRA's share without checkpointing was solved on a probe, not on this run), and the
    run's rate once its shapes were compiled inside the estimate's band (its 38 steps include 30 s of compiling)."""
    sys.path.insert(0, str(RUNS.parents[1].parent / "tests"))
    from test_h200_runs import estimate_run

    for method in ("lora", "qlora"):
        run = json.loads((RUNS.parent / "h200-issue17-run" / f"h200-{method}.json").read_text())
        p, measured = run["plan"], run["measured"]
        assert (p["micro_batch"], p["seq_len"], p["checkpointing"], run["status"]) == (16, 1280, "off", "done")
        est = estimate_run(reduced(resolve_model("qwen1.5-moe-a2.7b"), 8), run)
        assert abs(measured["peak_reserved_gib"] / est.peak_reserved_gib - 1) <= 0.05, method
        assert est.tokens_per_s_band[0] <= measured["tokens_per_s_compiled"] <= est.tokens_per_s_band[1], method
    # Qwen3-30B-A3B at 8 layers, QLoRA (h200-issue17-qwen3moe-run/, predictions/qwen3moe-run-h200.json before): the
    # H200's plan and the RTX 4090's, the same 16 x 1280 without checkpointing, the latter capped at 24 GiB for 10
    # steps. Planned 17.25 GiB, 8.4% over both; today's estimate, a run's layers without the input copies of the
    # probes its kept bytes were fitted on (memory.NO_AUTOCAST_COPIES_BY_TYPE), within 1.5%.
    for case in ("h200-qlora", "4090-qlora"):
        run = json.loads((RUNS.parent / "h200-issue17-qwen3moe-run" / f"{case}.json").read_text())
        p, measured = run["plan"], run["measured"]
        assert (p["micro_batch"], p["seq_len"], p["checkpointing"], run["status"]) == (16, 1280, "off", "done")
        est = estimate_run(reduced(resolve_model("qwen3-30b-a3b"), 8), run)
        assert measured["peak_reserved_gib"] / run["predicted"]["peak_reserved_gib"] - 1 < -0.08, case
        assert abs(measured["peak_reserved_gib"] / est.peak_reserved_gib - 1) <= 0.015, case
        assert abs(measured["peak_allocated_gib"] / est.peak_allocated_gib - 1) <= 0.025, case
    h200 = json.loads((RUNS.parent / "h200-issue17-qwen3moe-run" / "h200-qlora.json").read_text())
    # its rate once compiled: 4.0% under its plan, 7.3% under today's estimate, whose matmul factor was refitted on
    # the 16-bit LoRA probe under autocast (speed.MATMUL_TIME_BY_TYPE), where the probes of this shape ran 18% faster
    est = estimate_run(reduced(resolve_model("qwen3-30b-a3b"), 8), h200)
    assert -0.08 <= h200["measured"]["tokens_per_s_compiled"] / est.tokens_per_s - 1 <= -0.03
    # Mixtral-8x7B (QLoRA, 16-bit LoRA) and gpt-oss-20b (QLoRA) at 4 layers, the H200's plans, 16 x 1280 without
    # checkpointing (h200-issue17-moe-runs/; predictions/moe-runs-h200.json and gptoss-run-h200.json before, with the
    # copies out): allocated within 1% of the plan; reserved within 5.5% of it (gpt-oss's, +5.4%, from its slack line
    # fitted on probes without autocast) and within 3% of today's estimate (the line refitted on two 4-layer probes
    # under autocast, h200-issue17-autocast-slack/, not on the run); tokens/s once compiled within 7%
    for case, arch in (("h200-qlora", "mixtral-8x7b"), ("h200-lora", "mixtral-8x7b"),
                       ("gptoss-h200-qlora", "gpt-oss-20b")):
        run = json.loads((RUNS.parent / "h200-issue17-moe-runs" / f"{case}.json").read_text())
        p, measured, planned = run["plan"], run["measured"], run["predicted"]
        assert (p["micro_batch"], p["seq_len"], p["checkpointing"], run["status"]) == (16, 1280, "off", "done")
        est = estimate_run(reduced(resolve_model(arch), 4), run)
        assert abs(measured["peak_allocated_gib"] / planned["peak_allocated_gib"] - 1) <= 0.01, case
        assert abs(measured["peak_reserved_gib"] / planned["peak_reserved_gib"] - 1) <= 0.055, case
        assert abs(measured["peak_reserved_gib"] / est.peak_reserved_gib - 1) <= 0.03, case
        assert abs(measured["tokens_per_s_compiled"] / est.tokens_per_s - 1) <= 0.07, case


def test_the_hosts_cost_per_layer_follows_the_modules_lora_adapts(monkeypatch) -> None:
    """A layer's host cost is in proportion to the linear modules LoRA adapts (speed.REFERENCE_LORA_MODULES): Phi-3.5's
    fused projections make four of the reference's seven. Its host-bound 1 x 2048 rows at full depth on the H200
    (QLoRA probed without autocast, 16-bit LoRA under it) within 20% of the estimate, which fits no constant to them;
    counted at the reference's seven modules a layer, 39-51% under."""
    from rigplan.estimator import speed

    rows = [r for pattern in ("h200-issue17-heldout2/probe-phi.jsonl", "h200-issue17-phi-autocast/probe-phi.jsonl")
            for _, r in recorded(pattern) if (r["batch"], r["seq"]) == (1, 2048)]
    assert sorted(r["method"] for r in rows) == ["lora", "qlora"]
    for modules, bound in ((speed.REFERENCE_LORA_MODULES, 0.20), (4, 1.0)):
        monkeypatch.setattr(speed, "REFERENCE_LORA_MODULES", modules)
        ests = [_estimate(r) for r in rows]
        errors = [e.tokens_per_s / r["tok_per_s"] - 1 for e, r in zip(ests, rows)]
        assert all(e.host_bound for e in ests)
        assert all(abs(e) <= bound for e in errors) and (modules == 7 or all(e < -0.35 for e in errors)), errors


def test_the_float32_regime_of_gpus_without_bf16_is_as_check_warns() -> None:
    """The probes standing for a GPU without bf16 (gpu=no-bf16: Unsloth's loader asked for float16, no autocast, as on
    a T4 or V100; bench/results/h200-no-bf16/, against the bf16 plans in predictions/no-bf16-h200.json) bear out the
    warning `check` prints there (profiles/known_issues.json): Gemma 3 reserves no more than its bf16 estimate,
    Qwen3-MoE more, its estimate 5-15% under (estimate / measured - 1), every GPU-bound row runs at a third of the
    estimate's speed or less, and Unsloth refuses gpt-oss's QLoRA from fused experts. The estimate is the H200's were
    it without bf16: the run trains without autocast there, and the plan counts the input copies that keeps
    (memory.without_autocast_bytes)."""
    from rigplan.profiles.catalog import known_issues

    folder = RUNS.parent / "h200-no-bf16"
    rows = [r for _, r in issue17_rows.probe_rows("h200-no-bf16/probe-*.jsonl")]
    assert {(r["arch"], r["seq"]) for r in rows} == {(a, n) for a in ("gemma-3-12b", "qwen3-30b-a3b")
                                                     for n in (2048, 8192)}
    assert all((r["gpu_emulated"], r["autocast"], r["method"]) == ("no-bf16", "off", "qlora") for r in rows)
    assert not recorded("h200-no-bf16/probe-*.jsonl")  # no accuracy check reads them
    without_bf16 = dataclasses.replace(resolve_gpu("h200"), bf16=False)
    for r in rows:
        est = _estimate(r)
        model = reduced(resolve_model(r["arch"]), r["layers"])
        setup = Setup(r["method"], r["rank"], r["batch"], r["seq"], checkpointing=r["checkpointing"])
        planned = planner.estimate(model, setup, without_bf16, store.reference()[0]).peak_reserved_gib
        assert planned == pytest.approx(est.peak_reserved_gib + issue17_rows.without_autocast_gib(r), abs=1e-6)
        err = planned / r["peak_reserved_gib"] - 1
        assert (err >= -0.01) if r["arch"] == "gemma-3-12b" else (-0.15 <= err <= -0.05), (r["arch"], r["seq"])
        assert est.host_bound or r["tok_per_s"] <= est.tokens_per_s / 3, (r["arch"], r["seq"])
    assert "its fused 4-bit experts would overflow" in (folder / "failed-gptoss.txt").read_text()
    # Qwen3-MoE at 8 layers (h200-no-bf16-depth/, predictions/no-bf16-depth-h200.json): the same extra allocated over
    # the bf16 estimate as at 4, within 0.15 GiB as the source reading predicted before the run (the loss's float32
    # hidden states, not the layers'), where a per-layer extra would have doubled it
    extra = {(r["layers"], r["seq"]): r["peak_alloc_gib"] - _estimate(r).peak_allocated_gib
             for _, r in issue17_rows.probe_rows("h200-no-bf16*/probe-qwen3moe.jsonl")}
    assert sorted(extra) == [(4, 2048), (4, 8192), (8, 2048), (8, 8192)]
    assert all(extra[4, n] > 0.7 and abs(extra[8, n] - extra[4, n]) <= 0.15 for n in (2048, 8192)), extra
    summary = next(i["summary"] for i in known_issues() if i.get("when") == "gpu_without_bf16")
    assert all(s in summary for s in ("Gemma 3's memory as planned", "Qwen3-MoE's plan 8-15% under", "gpt-oss QLoRA"))
