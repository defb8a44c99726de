"""`rigplan run` against its own plan on the H200 (bench/results/h200-runs/, 2026-11-30; provenance in each file):
full-depth Llama-3.1-8B and Gemma-2-9B at 6 layers, 600 long-tailed examples (bench/validation_data.py). The
estimate of each run's own setup on the H200, for the data's lengths, against what the run measured."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from rigplan import store
from rigplan.estimator import planner
from rigplan.estimator.plan import ExampleLengths, Setup
from rigplan.profiles.catalog import ModelSpec, resolve_gpu, resolve_model

RUNS = Path(__file__).parents[1] / "bench" / "results" / "h200-runs"
sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
import validation_data  # noqa: E402
# Padded runs before rigplan run set expandable segments (trainer/engine.py ALLOC_CONF): the allocator's slack
# with changing shapes is not what the estimate (and today's trainer) hold.
BEFORE_EXPANDABLE = {"grouped/4090-qlora.json", "grouped/4090-lora.json", "grouped/h200-lora.json",
                     "grouped/h200-qlora.json"}
# DDP runs before the trainer dealt micro-batches in length blocks (trainer/batching.py BlockSampler): each step
# waited for the GPU with the longer micro-batch, which today's trainer avoids.
BEFORE_BLOCK_ORDER = {"ddp/random-order/ddp-lora.json", "ddp/random-order/ddp-qlora.json"}
# DDP runs before the trainer stopped waiting for the GPU at every step's end (the stop flag's blocking copy,
# bench/results/README.md, the fifth session): 1.49x and 1.60x one GPU where the same plans ran 1.70x after it.
BEFORE_STEP_END_FIX = {"ddp/block-order/ddp-lora.json", "ddp/two-epochs-seed2/ddp-lora.json"}
# Further than 5% from the estimate, as recorded: DDP with Unsloth's checkpointing on two 24 GiB caps, the one run of
# it (predictions/ddp-checkpointing-4090x2.json said 16.25 GiB; 17.17 reserved, 16.64 allocated: +2.8%), on which
# the planner offers DDP with checkpointing (estimator/planner.py SHARDINGS).
RESERVED_BOUND = {"ddp/checkpointing-4090x2/ddp-ckpt-4090x2-lora.json": 0.06}
# Faster than the estimate's band, as recorded: the four-epoch QLoRA pair ran on a machine where one GPU trained the
# same LoRA plan 15% faster than the seven machines before it did (15,269 tok/s against 12,285-13,304 in ddp/*/
# one-lora.json), its compiled rate as much: the machine, not the plan's shapes. Measured / estimate at most this.
SPEED_BOUND = {"ddp/four-epochs/ddp-qlora.json": 1.27, "ddp/four-epochs/one-qlora.json": 1.24}


def _runs() -> list[tuple[str, dict]]:
    return [(str(f.relative_to(RUNS)), json.loads(f.read_text())) for f in sorted(RUNS.rglob("*.json"))
            if "measured" in json.loads(f.read_text()) and "plan" in json.loads(f.read_text())]


def _data_args(command: str) -> tuple[int, int]:
    """The examples and seed bench/validation_data.py made the run's data with (600 and 0 unless the recorded
    command says otherwise)."""
    words = command.split()
    get = lambda flag, default: int(words[words.index(flag) + 1]) if flag in words else default  # noqa: E731
    return get("--examples", 600), get("--seed", 0)


def data_lengths(run: dict) -> ExampleLengths:
    """The run's data lengths as it tokenized them: each example's words (one token each with the replica's
    tokenizer) plus the chat template's tokens, which the plan's counted mean gives."""
    p = run["plan"]
    examples, seed = _data_args(run.get("data_command", ""))
    words = validation_data.word_counts(examples, seed=seed)
    extra = p["example_tokens"] - sum(min(w, p["seq_len"]) for w in words) / len(words)
    return ExampleLengths.of([w + round(extra) for w in words])


def _estimate(name: str, run: dict) -> planner.Estimate:
    model = resolve_model("gemma-2-9b" if "gemma2" in name else "llama-3.1-8b")
    if "gemma2-L6" in name:
        model = dataclasses.replace(model, num_hidden_layers=6)
    return estimate_run(model, run)


def estimate_run(model: ModelSpec, run: dict) -> planner.Estimate:
    """Today's estimate of a recorded run's own plan on the H200, for the lengths of the data it trained on."""
    p = run["plan"]
    lengths = data_lengths(run)
    setup = Setup(p["method"], p["rank"], p["micro_batch"], p["seq_len"], p["grad_accum"], optimizer=p["optimizer"],
                  checkpointing=p["checkpointing"], parallelism=p.get("parallelism", "single"),
                  num_gpus=p.get("num_gpus", 1))
    return planner.estimate(model, setup, resolve_gpu("h200"), store.reference()[0], lengths=lengths,
                            batching=p["batching"], engine=p["engine"])


@pytest.mark.parametrize("name,run", _runs(), ids=[n for n, _ in _runs()])
def test_h200_run_memory_is_within_5_percent_of_its_estimate(name, run) -> None:
    est = _estimate(name, run)
    err = run["measured"]["peak_reserved_gib"] / est.peak_reserved_gib - 1
    if name in BEFORE_EXPANDABLE:
        assert err < 0.16, err  # allocated was within 1%; the slack of changing shapes is what moved
    else:
        assert abs(err) <= RESERVED_BOUND.get(name, 0.05), err


@pytest.mark.parametrize("name,run", _runs(), ids=[n for n, _ in _runs()])
def test_h200_run_speed_is_within_the_estimates_band(name, run) -> None:
    est = _estimate(name, run)
    if run.get("oom_backoffs"):
        pytest.skip("backed off to smaller micro-batches after running out of memory: not the plan's shapes")
    if name in BEFORE_BLOCK_ORDER:
        pytest.skip("DDP before length blocks: not what the trainer does now")
    if name in BEFORE_STEP_END_FIX:
        pytest.skip("DDP waiting for the GPU at every step's end: not what the trainer does now")
    low, high = (est.tokens_per_s_band[0] / est.tokens_per_s, est.tokens_per_s_band[1] / est.tokens_per_s)
    ratio = run["measured"]["tokens_per_s"] / (est.tokens_per_s * est.setup.num_gpus)  # all GPUs' tokens/s
    assert low <= ratio <= SPEED_BOUND.get(name, high), ratio


def test_runs_reach_0_9x_the_bare_loop_once_shapes_are_compiled() -> None:
    """Issue 14's goal on the two-epoch H200 runs of data no run had seen (heldout-seed4-e2/): once every shape is
    compiled (their second epoch, bench/compiled_rate.py), LoRA and QLoRA train at least 0.9x the bare Unsloth
    loop's tokens/s at the LoRA plan's fixed shape (16 x 1,280, no checkpointing), measured in the same call;
    QLoRA is held to the LoRA loop, the faster of the two."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    from compiled_rate import bare_rate, compiled_rate

    folder = RUNS / "heldout-seed4-e2"
    bare = bare_rate(folder / "bare-lora.jsonl")
    for method in ("lora", "qlora"):
        run = json.loads((folder / f"h200-{method}.json").read_text())
        assert run["plan"]["micro_batch"] * run["plan"]["seq_len"] == 16 * 1280 and run["plan"]["epochs"] == 2
        assert compiled_rate(run) / bare >= 0.9, method


def test_ddp_after_the_token_count_fix_trains_as_one_gpu_does() -> None:
    """Two H200s against one, the same per-GPU plan, two epochs (ddp/tokencount-seed2/, predictions written before:
    predictions/ddp-tokencount-h200x2.json): the DDP run's first loss is one GPU's (the loss is scaled by the tokens
    of all GPUs, not each GPU's own), the ranks' adapters agree, and both methods run above 1.7x one GPU. Issue 16's
    1.85x is not reached (1.73x LoRA, 1.76x QLoRA over the whole run; bench/results/README.md): this records it."""
    folder = RUNS / "ddp" / "tokencount-seed2"
    for method in ("lora", "qlora"):
        ddp, one = (json.loads((folder / f"{k}-{method}.json").read_text()) for k in ("ddp", "one"))
        assert (ddp["world_size"], ddp["parallelism"], ddp["ranks_agree"]) == (2, "ddp", True)
        assert ddp["first_loss"] == pytest.approx(one["first_loss"], rel=1e-3)
        assert ddp["plan"]["micro_batch"] == one["plan"]["micro_batch"] and one["plan"]["num_gpus"] == 1
        ratio = ddp["measured"]["tokens_per_s"] / one["measured"]["tokens_per_s"]
        assert ratio >= 1.7, (method, ratio)


def test_what_ddp_loses_is_straggling_not_lengths() -> None:
    """bench/ddp_jitter.py on the token-count pair: dealt in length blocks, the two micro-batches of a step differ
    so little that lengths alone would allow 1.95x; one GPU's steps stray from their length's time by tens of
    milliseconds, and a DDP step waits for the slower process: that, with DDP's own 2%, comes within 4% of the
    measured steady DDP time, and the measured ratio is below 1.85x."""
    from ddp_jitter import analyse

    for method in ("lora", "qlora"):
        r = analyse(RUNS / "ddp" / "tokencount-seed2", method, draws=300)
        assert r["ratio_lengths_only"] > 1.95 and r["residual_p90_s"] > 0.03
        assert abs(r["with_jitter_and_ddp_s"] / r["ddp_measured_s"] - 1) <= 0.04, r
        assert r["ratio_measured"] < r["ratio_with_jitter_and_ddp"] < r["ratio_lengths_only"]


def test_aligned_garbage_collection_was_not_what_ddp_lost() -> None:
    """The LoRA pair again with Python's collector run by every process at the same step (trainer/loop.py GcWatch;
    ddp/gc-aligned-seed2/, predictions/ddp-gc-aligned-h200x2.json written before): one GPU spent under 1.1% of its
    run collecting, and DDP over one GPU stayed where it was (1.73x whole run, 1.81x over steady steps): the
    collector was not the straggling, and issue 16's 1.85x is still not reached; the memory and the first loss are
    as planned and as one GPU's."""
    from ddp_jitter import analyse

    folder = RUNS / "ddp" / "gc-aligned-seed2"
    ddp, one = (json.loads((folder / f"{k}-lora.json").read_text()) for k in ("ddp", "one"))
    assert ddp["measured"]["gc"]["aligned"] and ddp["ranks_agree"] and ddp["world_size"] == 2
    assert one["measured"]["gc"]["total_s"] / one["train_runtime_s"] < 0.011
    assert ddp["first_loss"] == pytest.approx(one["first_loss"], rel=1e-3)
    ratio = ddp["measured"]["tokens_per_s"] / one["measured"]["tokens_per_s"]
    steady = analyse(folder, "lora", draws=300)["ratio_measured"]
    assert 1.7 <= ratio < 1.85 and 1.75 <= steady < 1.85, (ratio, steady)
    # every process leaves the group after the last collective (trainer/distributed.py leave): NCCL's warning that
    # it was not done, twice in the seventh session's log, is gone
    assert "destroy_process_group" in (RUNS / "ddp" / "tokencount-seed2" / "runs.log").read_text()
    assert "destroy_process_group" not in (folder / "runs.log").read_text()


def test_out_of_memory_in_one_ddp_process_is_backed_off_by_both() -> None:
    """bench/record_ddp_oom.sh (ddp/oom-backoff/, predictions/ddp-oom-backoff-h200x2.json written before): process
    1 alone capped at 40 GiB under the 52.8 GiB plan ran out at its first step, split its micro-batch, and process 0
    took the split STOP_LAG_STEPS later, said once; the run finished its epoch with the ranks' adapters equal, and
    the fuller GPU (process 0's, before the split) held what the plan said."""
    folder = RUNS / "ddp" / "oom-backoff"
    run = json.loads((folder / "ddp-oom-lora.json").read_text())
    assert (run["status"], run["exit_code"], run["world_size"], run["ranks_agree"]) == ("done", 0, 2, True)
    assert run["oom_backoffs"] == [{"step": 3, "micro_batch": 4, "elsewhere": True}]
    log = (folder / "oom.log").read_text()
    assert log.count("CUDA out of memory on another process at step 3: micro-batch now 4 on every process") == 1
    assert abs(run["measured"]["peak_reserved_gib"] / run["predicted"]["peak_reserved_gib"] - 1) <= 0.05


def test_ddp_with_unslothss_checkpointing_trains_and_is_planned() -> None:
    """DDP with Unsloth's gradient checkpointing, 8B 16-bit LoRA r16 at 2 x 1,280 per GPU, each process capped at 24
    GiB for two RTX 4090s (ddp/checkpointing-4090x2/, predictions/ddp-checkpointing-4090x2.json written before: 16.25
    GiB if checkpointing works under DDP, about 25 if not): it trained its epoch with no out-of-memory error, the
    ranks' adapters equal, 17.17 GiB reserved (+5.6%). So the planner offers it (SHARDINGS): for two RTX 4090s it
    now plans DDP on Unsloth with checkpointing, where it planned FSDP on transformers + PEFT."""
    run = json.loads((RUNS / "ddp" / "checkpointing-4090x2" / "ddp-ckpt-4090x2-lora.json").read_text())
    p = run["plan"]
    assert (p["parallelism"], p["engine"], p["checkpointing"], p["num_gpus"]) == ("ddp", "unsloth", "unsloth", 2)
    assert run["status"] == "done" and run["ranks_agree"] and not run["oom_backoffs"]
    assert abs(run["measured"]["peak_allocated_gib"] / run["predicted"]["peak_allocated_gib"] - 1) <= 0.03
    assert run["measured"]["peak_reserved_gib"] < 20  # not the 25 GiB of DDP without checkpointing
    best = planner.plan(resolve_model("llama-3.1-8b"), resolve_gpu("rtx-4090"), store.reference()[0], num_gpus=2,
                        methods=("lora",)).best
    assert (best.parallelism, best.engine, best.checkpointing) == ("ddp", "unsloth", "unsloth")


DDP_PAIRS = [("nosync-seed2", "lora"), ("tokencount-seed2", "lora"), ("tokencount-seed2", "qlora"),
             ("gc-aligned-seed2", "lora"), ("four-epochs", "lora"), ("four-epochs", "qlora")]


@pytest.mark.parametrize("folder,method", DDP_PAIRS)
def test_ddp_against_one_gpu_is_what_the_straggler_model_says(folder: str, method: str) -> None:
    """estimator/speed.py parallel_step_s, its jitter fitted on the one-GPU runs alone (STEP_JITTER_S, refitted by
    bench/ddp_jitter.py --fit within 1%): the estimated DDP / one-GPU ratio against the ratio the DDP run beside
    each measured once its shapes were compiled (the estimate's rate), within 6% (QLoRA's 1.75x is estimated 1.85x,
    the LoRA runs' 1.76x and 1.81x 1.83x; a constant 0.83 per GPU, fitted on the first LoRA run, said 1.66x)."""
    from ddp_jitter import JITTER_RUNS, step_jitter_s

    from rigplan.estimator import speed

    assert step_jitter_s([(RUNS / "ddp" / f, m) for f, m in JITTER_RUNS]) == pytest.approx(speed.STEP_JITTER_S,
                                                                                          rel=0.01)
    runs = {k: json.loads((RUNS / "ddp" / folder / f"{k}-{method}.json").read_text()) for k in ("ddp", "one")}
    est = {k: _estimate(f"ddp/{folder}/{k}-{method}.json", r).tokens_per_s * r["plan"]["num_gpus"]
           for k, r in runs.items()}
    measured = runs["ddp"]["measured"]["tokens_per_s_compiled"] / runs["one"]["measured"]["tokens_per_s_compiled"]
    assert abs(measured / (est["ddp"] / est["one"]) - 1) <= 0.06, (measured, est["ddp"] / est["one"])


def test_ddp_lora_with_torch_adamw_runs_nearer_2x() -> None:
    """Two H200s against one, the same per-GPU plan and data, one call each pair (predictions/
    ddp-omp-threads-h200x2.json and ddp-torch-adamw-h200x2.json, written before): with 8-bit AdamW (omp-threads/,
    each process given half the host's cores) DDP ran 1.63x one GPU; with torch's AdamW (torch-adamw/) 1.79x, one GPU
    alone at the same speed. The jitter model of the DDP step (bench/ddp_jitter.py: lengths, one GPU's strays, DDP's
    2%) then comes within 2% of the measured DDP time, where the 8-bit run took 9% longer than it. Over two epochs
    this was short of issue 16's 1.85x (four epochs reach it: test_ddp_over_four_epochs_reaches_1_85x). QLoRA's
    plan with torch's AdamW ran 1.75x, the speed of its 8-bit run (tokencount-seed2/), so QLoRA keeps the 8-bit
    state (estimator/planner.py optimizer_for)."""
    from ddp_jitter import analyse

    folder = RUNS / "ddp"
    pairs = {k: [json.loads((folder / f"{k}/{w}-lora.json").read_text()) for w in ("ddp", "one")]
             for k in ("omp-threads", "torch-adamw")}
    for k, optimizer in (("omp-threads", "adamw_8bit"), ("torch-adamw", "adamw_torch")):
        ddp, one = pairs[k]
        assert ddp["plan"]["optimizer"] == one["plan"]["optimizer"] == optimizer and ddp["ranks_agree"]
        assert ddp["plan"]["micro_batch"] == one["plan"]["micro_batch"] and ddp["plan"]["epochs"] == 2
    ratio = {k: d["measured"]["tokens_per_s"] / o["measured"]["tokens_per_s"] for k, (d, o) in pairs.items()}
    assert ratio["omp-threads"] < 1.7 and 1.75 <= ratio["torch-adamw"] < 1.85, ratio
    ones = [o["measured"]["tokens_per_s"] for _, o in pairs.values()]
    assert abs(ones[1] / ones[0] - 1) <= 0.02
    model = {k: analyse(folder / k, "lora", draws=300) for k in pairs}
    assert abs(model["torch-adamw"]["with_jitter_and_ddp_s"] / model["torch-adamw"]["ddp_measured_s"] - 1) <= 0.02
    assert model["omp-threads"]["ddp_measured_s"] / model["omp-threads"]["with_jitter_and_ddp_s"] > 1.08
    qlora = [json.loads((folder / f"torch-adamw/{w}-qlora.json").read_text()) for w in ("ddp", "one")]
    before = json.loads((folder / "tokencount-seed2/ddp-qlora.json").read_text())
    assert qlora[0]["measured"]["tokens_per_s"] / before["measured"]["tokens_per_s"] < 1.0  # no gain for QLoRA
    assert qlora[0]["measured"]["tokens_per_s"] / qlora[1]["measured"]["tokens_per_s"] >= 1.7


def test_ddp_over_four_epochs_reaches_1_85x() -> None:
    """Issue 16's goal: `rigplan run --gpus 2` on two H200s against the same per-GPU plan on one GPU, measured in
    the same call, four epochs of 900 examples (ddp/four-epochs/, bench/record_ddp.sh; predictions/
    ddp-four-epochs-h200x2.json, written before, said LoRA 1.80-1.88 and QLoRA about 1.75): both at least 1.85x
    over the whole run after the warm-up steps, each process's peak reserved within 5% of the plan's per-GPU
    figure, the ranks' adapters equal, and the plans' optimizers what estimator/planner.py optimizer_for picks.
    One GPU ran 15% faster on this machine than on those before (SPEED_BOUND): the ratio is the pair's."""
    folder = RUNS / "ddp" / "four-epochs"
    for method, optimizer in (("lora", "adamw_torch"), ("qlora", "adamw_8bit")):
        ddp, one = (json.loads((folder / f"{k}-{method}.json").read_text()) for k in ("ddp", "one"))
        assert (ddp["world_size"], ddp["parallelism"], ddp["ranks_agree"]) == (2, "ddp", True)
        assert ddp["provenance"]["boot_id"] == one["provenance"]["boot_id"]  # the same machine, one call
        for key in ("micro_batch", "grad_accum", "seq_len", "checkpointing", "epochs"):
            assert ddp["plan"][key] == one["plan"][key], key
        assert ddp["plan"]["optimizer"] == one["plan"]["optimizer"] == optimizer and ddp["plan"]["epochs"] == 4
        assert planner.optimizer_for("ddp", method) == optimizer
        assert ddp["measured"]["tokens_per_s"] / one["measured"]["tokens_per_s"] >= 1.85, method
        assert abs(ddp["measured"]["peak_reserved_gib"] / ddp["plan"]["peak_reserved_gib"] - 1) <= 0.05, method
        assert ddp["first_loss"] == pytest.approx(one["first_loss"], rel=2e-3)
    # The LoRA pair again on another machine (ddp/four-epochs-2/, next session, the same command): one GPU 10% slower
    # there, DDP 5% slower, the ratio 1.97. The straggler model's ratio (test_ddp_against_one_gpu_is_what_the_
    # straggler_model_says: 1.83) stays under both machines' compiled ratios: a plan that promises less than it gets.
    again = {k: json.loads((RUNS / "ddp" / "four-epochs-2" / f"{k}-lora.json").read_text()) for k in ("ddp", "one")}
    assert again["ddp"]["provenance"]["boot_id"] != ddp["provenance"]["boot_id"]
    assert again["ddp"]["provenance"]["boot_id"] == again["one"]["provenance"]["boot_id"]
    assert again["ddp"]["measured"]["tokens_per_s"] / again["one"]["measured"]["tokens_per_s"] >= 1.85
    for folder in ("four-epochs", "four-epochs-2"):
        pair = {k: json.loads((RUNS / "ddp" / folder / f"{k}-lora.json").read_text()) for k in ("ddp", "one")}
        est = {k: _estimate(f"ddp/{folder}/{k}-lora.json", r).tokens_per_s * r["plan"]["num_gpus"]
               for k, r in pair.items()}
        measured = pair["ddp"]["measured"]["tokens_per_s_compiled"] / pair["one"]["measured"]["tokens_per_s_compiled"]
        assert est["ddp"] / est["one"] < measured, folder


def test_under_ddp_the_slower_process_launches_8_bit_adamw_after_the_all_reduce() -> None:
    """torch's profiler on both DDP processes, 8 steps of one micro-batch each (ddp/profile/, bench/
    record_ddp_profile.sh; bench/trace_steps.py --collectives): the 8-bit optimizer updates each of the 448 LoRA
    tensors with its own launch, and between the gradients' all-reduce and the next collective the process that
    arrived last spent tens of milliseconds launching them for about 3 ms of GPU work, while the other, which
    queued them as it waited, waited again. Process 0 waited inside NCCL's kernels 5x as long as process 1."""
    folder = RUNS / "ddp" / "profile"
    ops = (folder / "ddp-ops-rank0.txt").read_text()
    calls = next(int(line.split()[-1]) for line in ops.splitlines() if "optimizer_update_8bit_blockwise" in line)
    assert calls == 448 * 8
    rows = [json.loads(line) for line in (folder / "collectives.jsonl").read_text().splitlines()]
    waits = {}
    for rank in (0, 1):
        mine = [r for r in rows if r["trace"] == f"ddp-trace-rank{rank}.json.gz"]
        waits[rank] = sum(r["ms"] for r in mine)
        phases = [b for a, b in zip(mine, mine[1:]) if a["kind"].startswith("AllReduce_Sum_f32")]
        assert len(phases) == 9 and all(p["gpu_busy_since_ms"] < 4 for p in phases)
        host_bound = [p for p in phases if p["since_previous_ms"] > 25]
        assert len(host_bound) >= (2 if rank == 0 else 6), (rank, phases)
    assert waits[0] > 4 * waits[1] > 0
