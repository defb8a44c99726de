"""The CLI through click's CliRunner: tables, --json keys, plan files, and one-line errors with exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from rigplan.cli import format_table, main
from rigplan.estimator.plan import Plan


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def test_check_json_has_the_documented_keys() -> None:
    r = invoke("check", "llama-3.1-8b", "--gpu", "rtx-4090", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert {"model", "gpu", "fits", "recommended", "alternatives"} <= d.keys()
    assert {"engine", "method", "rank", "micro_batch", "grad_accum", "token_budget", "seq", "batching",
            "peak_reserved_gib", "total_gib", "tokens_per_s", "tokens_per_s_band"} <= d["recommended"].keys()
    assert d["recommended"]["engine"] == "unsloth"
    assert d["fits"] and d["recommended"]["method"] == "lora"


def test_check_table_names_model_gpu_and_units() -> None:
    r = invoke("check", "llama-3.1-8b", "--gpu", "4090", "--examples", "1000", "--avg-tokens", "500")
    assert r.exit_code == 0
    assert "llama-3.1-8b on GeForce RTX 4090" in r.output and "peak GiB" in r.output and "tok/s" in r.output
    assert "FITS" in r.output


def test_check_time_scales_with_examples_and_epochs() -> None:
    def hours(*extra: str) -> float:
        return json.loads(invoke("check", "qwen2.5-7b", "--gpu", "a100-80gb", "--json", *extra).output)[
            "recommended"]["train_hours"]
    one = hours("--examples", "100000", "--avg-tokens", "500")
    assert hours("--examples", "200000", "--avg-tokens", "500") == pytest.approx(2 * one, rel=0.01)
    assert hours("--examples", "100000", "--avg-tokens", "500", "--epochs", "3") == pytest.approx(3 * one, rel=0.01)


def test_check_without_gpu_lists_the_catalogue() -> None:
    r = invoke("check", "llama-3.1-8b", "--gpu", "auto", "--json")
    d = json.loads(r.output)
    if d["gpu"] is not None:  # a machine with an NVIDIA GPU answers for it instead
        pytest.skip("a local GPU was found")
    assert len(d["gpus"]) >= 25 and d["smallest_fitting"] and d["best_per_dollar"]
    by_id = {g["gpu"]: g for g in d["gpus"]}
    assert by_id["rtx-4090"]["fits"] and by_id["rtx-4090"]["recommended"]["method"] == "lora"


def test_check_data_file_sets_sequence_length(tmp_path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"text": "word " * 1000}) for _ in range(50)))
    d = json.loads(invoke("check", "llama-3.2-1b", "--gpu", "rtx-4090", "--data", str(f), "--json").output)
    assert d["recommended"]["seq"] == 1280 and d["workload"]["examples"] == 50
    assert d["recommended"]["example_tokens"] == round(d["workload"]["avg_tokens"])


def test_check_says_how_data_is_laid_out_only_when_lengths_are_known(tmp_path) -> None:
    """A data file gives each example's length, so the note names the layout the plan timed; --examples with
    --avg-tokens gives only a mean, so padding cannot be counted and the note says so."""
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"text": "word " * (100 + 37 * i)}) for i in range(60)))
    from_data = invoke("check", "llama-3.1-8b", "--gpu", "h100-sxm", "--data", str(f))
    assert from_data.exit_code == 0, from_data.output
    assert json.loads(invoke("check", "llama-3.1-8b", "--gpu", "h100-sxm", "--data", str(f), "--json").output)[
        "workload"]["lengths_from_data"]
    assert "only their mean" not in from_data.output
    assert "packed into micro-batches of at most" in from_data.output or "padded micro-batches" in from_data.output
    mean_only = invoke("check", "llama-3.1-8b", "--gpu", "h100-sxm", "--examples", "1000", "--avg-tokens", "700")
    assert "only their mean length is known" in mean_only.output


def test_examples_without_avg_tokens_are_refused_not_guessed() -> None:
    """--examples alone once timed examples of half --seq without a word: now it needs --avg-tokens, and
    --avg-tokens sets the speed's example length."""
    def rec(*extra: str) -> dict:
        return json.loads(invoke("check", "llama-3.1-8b", "--gpu", "h100-sxm", "--json", *extra).output)["recommended"]
    alone = invoke("check", "llama-3.1-8b", "--gpu", "h100-sxm", "--examples", "1000")
    assert alone.exit_code == 2 and "--examples needs --avg-tokens" in alone.output
    short = rec("--examples", "1000", "--avg-tokens", "200")
    assert short["example_tokens"] == 200 and short["tokens_per_s"] < rec()["tokens_per_s"]


def test_run_with_overrides_reads_the_data_once(tmp_path, monkeypatch) -> None:
    """Without a tokenizer on disk, `rigplan run --rank 32` estimates lengths for the plan and again for the
    override: one read of the file serves both, and an edited file is read afresh."""
    from rigplan import planning as check
    from rigplan import data

    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"text": "word " * (50 + i)}) for i in range(40)))
    reads = []
    real = data.validate
    monkeypatch.setattr(data, "validate", lambda path, *a, **k: reads.append(path) or real(path, *a, **k))
    p = check.plan_for_run("llama-3.2-1b", "h100-sxm", f, {"rank": 32})
    assert p.rank == 32 and len(reads) == 1
    f.write_text("\n".join(json.dumps({"text": "word " * (80 + i)}) for i in range(41)))
    assert check.plan_for_run("llama-3.2-1b", "h100-sxm", f, {"rank": 32}).rank == 32 and len(reads) == 2


def test_run_with_method_plans_that_method(tmp_path) -> None:
    """`rigplan run --method qlora` gets the planner's best QLoRA plan, not LoRA's settings re-estimated."""
    from rigplan import planning as check
    from rigplan.estimator import planner
    from rigplan import store
    from rigplan.profiles.catalog import resolve_gpu, resolve_model

    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"text": "word " * 300}) for _ in range(50)))
    p = check.plan_for_run("llama-3.1-8b", "h100-sxm", f, {"method": "qlora"})
    load, seq = check.workload(f, None, None, 1.0, None, family=check.token_family("llama-3.1-8b"))
    want = planner.plan(resolve_model("llama-3.1-8b"), resolve_gpu("h100-sxm"), store.for_gpu("h100-sxm")[0],
                        seq_len=seq, methods=("qlora",), lengths=load.lengths).best
    assert (p.method, p.micro_batch, p.checkpointing, p.tokens_per_s) == \
        ("qlora", want.micro_batch, want.checkpointing, want.tokens_per_s)


def test_estimate_json_components_add_to_total() -> None:
    r = invoke("estimate", "llama-3.1-8b", "--method", "qlora", "--micro-batch", "4", "--seq", "2048", "--rank", "16",
               "--gpu", "h100-sxm", "--json")
    d = json.loads(r.output)
    for key in ("peak_allocated_gib", "peak_reserved_gib", "total_gib", "tokens_per_s", "step_s", "components"):
        assert key in d
    assert sum(d["components"].values()) == pytest.approx(d["total_gib"], abs=0.02)


def test_plan_out_writes_a_plan_run_can_read(tmp_path) -> None:
    out = tmp_path / "plan.json"
    r = invoke("plan", "mistral-7b", "--gpu", "l4", "--epochs", "2", "--out", str(out))
    assert r.exit_code == 0, r.output
    p = Plan.from_json(out.read_text())
    assert p.model == "mistral-7b" and p.gpu == "l4" and p.epochs == 2.0 and p.model_path == "mistralai/Mistral-7B-v0.3"


@pytest.mark.parametrize("args,message", [
    (["check", "lama-3.1-8b", "--gpu", "4090"], "did you mean 'llama-3.1-8b'"),
    (["check", "llama-3.1-8b", "--gpu", "rtx-9999"], "unknown GPU 'rtx-9999'"),
    (["check", "llama-3.1-8b", "--gpu", "4090", "--seq", "200000"], "exceeds llama-3.1-8b's context (131072)"),
    (["estimate", "llama-3.1-8b", "--micro-batch", "0", "--gpu", "4090"], "--micro-batch 0: pass a whole number >= 1"),
    (["estimate", "llama-3.1-8b", "--rank", "0", "--gpu", "4090"], "--rank 0: pass a whole number >= 1"),
    (["check", "./no/such/config.json", "--gpu", "4090"], "unknown model"),
    (["plan", "llama-3.1-70b", "--gpu", "rtx-4090"], "does not fit"),
])
def test_bad_input_is_one_line_and_exit_2(args, message) -> None:
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2
    assert message in r.output and r.output.startswith("rigplan: ") and r.output.count("\n") == 1
    assert "Traceback" not in r.output


def test_unreadable_config_exit_2(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{broken")
    r = invoke("check", str(tmp_path), "--gpu", "4090")
    assert r.exit_code == 2 and "unreadable config" in r.output


def test_catalogue_commands() -> None:
    assert "rtx-4090" in invoke("gpus").output and "llama-3.1-8b" in invoke("models").output
    assert len(json.loads(invoke("models", "--json").output)["models"]) >= 25


def test_format_table_aligns_numbers_right() -> None:
    t = format_table("T", ["name", "GiB"], [["a", 1.5], ["bbb", 12.25]], {"GiB": 2})
    lines = t.splitlines()
    assert lines[0] == "T" and lines[4].endswith(" 1.50") and lines[5].endswith("12.25")


def test_check_does_not_import_torch() -> None:
    code = ("import sys; from click.testing import CliRunner; from rigplan.cli import main; "
            "r = CliRunner().invoke(main, ['check', 'llama-3.1-8b', '--gpu', 'rtx-4090']); "
            "assert r.exit_code == 0, r.output; "
            "heavy = [m for m in ('torch', 'transformers', 'numpy', 'pandas') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_host_bound_speed_is_flagged_and_gpu_bound_is_not() -> None:
    # The H100's 8B micro-batch of 1 x 2048 sits on the host's floor (0.23-0.45 s measured on five machines);
    # 4 x 2048 is GPU work. Only the first says its tok/s is rough.
    args = ("estimate", "llama-3.1-8b", "--method", "lora", "--seq", "2048", "--rank", "16", "--gpu", "h100-sxm")
    small, big = invoke(*args, "--micro-batch", "1"), invoke(*args, "--micro-batch", "4")
    assert "speed: host-bound" in small.output and "host-bound" not in big.output
    assert json.loads(invoke(*args, "--micro-batch", "1", "--json").output)["host_bound"] is True
    assert json.loads(invoke(*args, "--micro-batch", "4", "--json").output)["host_bound"] is False


def test_phi4_on_rtx3060_says_it_fits_only_at_a_shorter_sequence() -> None:
    """It printed DOES NOT FIT and then a recommended plan: the verdict now says the plan is for a shorter
    sequence, and at which one."""
    r = invoke("check", "phi-4", "--gpu", "rtx-3060")
    assert r.exit_code == 0, r.output
    verdict = r.output.splitlines()[1]
    assert verdict.startswith("verdict: FITS ONLY AT A SHORTER SEQUENCE: at seq 2048 nothing fits; at seq ")
    assert "DOES NOT FIT" not in r.output and "recommended" in r.output


def test_a_known_issue_is_one_line_in_the_table_and_whole_in_the_json() -> None:
    """Phi-3's note (its terms, runs and sources) filled the terminal under every table: the table now prints each
    known issue's summary, and --json carries the whole note beside it."""
    r = invoke("check", "phi-3.5-mini", "--gpu", "rtx-4090")
    lines = [line for line in r.output.splitlines() if line.startswith("warning: ")]
    assert r.exit_code == 0 and len(lines) == 1 and len(lines[0]) < 300 and "--json" in lines[0]
    d = json.loads(invoke("check", "phi-3.5-mini", "--gpu", "rtx-4090", "--json").output)
    assert len(d["warnings"]) == len(d["warnings_short"]) == 1 and "h200-issue17-heldout2" in d["warnings"][0]


def test_a_qlora_verdict_states_the_memory_kept_free() -> None:
    """"16-bit LoRA needs at least 134.8 GiB of 140.4 GiB" read as a contradiction: the 10% kept free is said."""
    reason = json.loads(invoke("check", "llama-3.1-70b", "--gpu", "h200", "--json").output)["reason"]
    assert "16-bit LoRA needs at least" in reason and "GiB usable (10% of 140.4 GiB kept free)" in reason


def test_lora_chosen_over_a_faster_qlora_says_why() -> None:
    reason = json.loads(invoke("check", "llama-3.1-8b", "--gpu", "rtx-4090", "--json").output)["reason"]
    assert "QLoRA would be faster here, but 16-bit LoRA is preferred (no quantization error" in reason


def test_data_longer_than_the_context_plans_at_the_context(tmp_path) -> None:
    """The data's sequence length (its 95th percentile) is capped at the model's context: a file of very long
    records once made check refuse a --seq nobody had passed."""
    f = tmp_path / "long.jsonl"
    f.write_text("\n".join(json.dumps({"text": "w" * 200_000}) for _ in range(5)) + "\n")  # ~50k tokens each
    r = invoke("check", "qwen2.5-0.5b", "--gpu", "h100-sxm", "--data", str(f), "--json")
    assert json.loads(r.stdout)["recommended"]["seq"] == 32_768
    assert r.stderr.splitlines() == [f"rigplan: 100% of {f}'s examples are longer than the model's context "
                                     "(32,768 tokens); they train cut to it (rigplan run --overlong drop leaves "
                                     "them out)"]


def test_a_seq_far_beyond_the_data_is_said(tmp_path) -> None:
    """--seq 8192 on examples of at most ~1,500 tokens: the plan is for 8,192-token sequences, which the data's
    micro-batches never reach (a run measured half its plan's peak, bench/results/h200-issue17-autocast/); check
    says so in one line, and says nothing where --seq is near the data's longest."""
    f = tmp_path / "short.jsonl"
    f.write_text("\n".join(json.dumps({"text": "word " * n}) for n in (100, 800, 1200)) + "\n")
    r = invoke("check", "qwen2.5-0.5b", "--gpu", "h100-sxm", "--data", str(f), "--seq", "8192", "--json")
    assert json.loads(r.stdout)["recommended"]["seq"] == 8192
    (line,) = r.stderr.splitlines()
    assert line.startswith(f"rigplan: --seq 8,192 is more than twice {f}'s longest example (")
    assert line.endswith("the plan is for 8,192-token sequences: leave --seq out to plan for the data")
    assert invoke("check", "qwen2.5-0.5b", "--gpu", "h100-sxm", "--data", str(f), "--seq", "2048").stderr == ""


def test_max_seq_answers_per_method_in_json() -> None:
    d = json.loads(invoke("check", "llama-3.1-8b", "--gpu", "rtx-4090", "--max-seq", "--rank", "32", "--json").output)
    assert set(d["max_seq"]) == {"lora", "qlora"} and d["max_seq"]["qlora"] > d["max_seq"]["lora"] > 0
    assert d["plans"]["qlora"]["seq"] == d["max_seq"]["qlora"] and d["plans"]["qlora"]["micro_batch"] == 1
    none = json.loads(invoke("check", "llama-3.1-70b", "--gpu", "rtx-3060", "--max-seq", "--json").output)
    assert none["max_seq"] == {"lora": None, "qlora": None} and d["why_not"] == {}
    # each method that fits nothing says how far its shortest sequence is from fitting, and what holds the memory
    assert set(none["why_not"]) == {"lora", "qlora"} and "base_weights" in none["why_not"]["qlora"]
    text = invoke("check", "llama-3.1-70b", "--gpu", "rtx-3060", "--max-seq").output
    assert "qlora: not even 256 tokens fit: needs" in text
    # where a lower rank fits, as `check` would pick, it says so
    low = json.loads(invoke("check", "llama-3.1-8b", "--gpu", "rtx-4060", "--max-seq", "--json").output)
    assert low["max_seq"]["qlora"] is None and low["why_not"]["qlora"].endswith("256 tokens fit (pass --rank 8)")
    zero = invoke("check", "llama-3.1-8b", "--gpu", "rtx-4060", "--max-seq", "--rank", "0")
    assert zero.exit_code == 2 and zero.output.strip() == "rigplan: --rank 0: pass a whole number >= 1"
    several = invoke("check", "llama-3.1-8b", "--gpu", "rtx-4090", "--gpus", "2", "--max-seq")
    assert several.exit_code == 2 and "one GPU" in several.output  # the search is one GPU's


def test_the_catalogue_plans_for_the_gpus_asked_for() -> None:
    """With no GPU named, `--gpus 2` plans two of each catalogue card (it once planned one of each and showed it
    under --gpus 2), and `--method` holds there too."""
    d = json.loads(invoke("check", "llama-3.1-70b", "--gpus", "2", "--json").output)
    rows = {r["gpu"]: r for r in d["gpus"]}
    assert d["num_gpus"] == 2 and rows["rtx-4090"]["recommended"]["load_on_cpu"]  # from the pre-quantized copy
    pair = rows["rtx-5090"]["recommended"]
    assert pair["num_gpus"] == 2 and pair["parallelism"] == "fsdp"
    assert rows["rtx-5090"]["tokens_per_s_per_kusd"] == pytest.approx(
        pair["tokens_per_s"] / (2 * rows["rtx-5090"]["price_usd"]) * 1000, abs=0.1)
    assert rows["rtx-a6000"]["recommended"]["parallelism"] == "ddp"  # each of the two holds it in 4-bit
    one = json.loads(invoke("check", "llama-3.1-70b", "--method", "qlora", "--json").output)
    assert all(r["recommended"]["method"] == "qlora" for r in one["gpus"] if r["fits"])
    assert {r["gpu"] for r in one["gpus"] if r["fits"]} >= {"rtx-a6000", "h100-sxm"}
    assert "x 2 of each" in invoke("check", "llama-3.1-70b", "--gpus", "2").output


def test_70b_on_two_cards_is_sharded_with_cpu_memory_said() -> None:
    """Two 32 GB cards: 16-bit LoRA would fit only with its frozen weights offloaded, so sharded QLoRA from the
    profile's pre-quantized copy goes first (a quarter of the CPU memory), the CPU memory said: the copy mapped by
    each process, the offloaded shards and each process's runtime (bench/results/h200x2-fsdp/full-depth/). Two 48 GB
    cards: DDP, each holding it in 4-bit with Unsloth's checkpointing. From the 16-bit checkpoint every process
    would first load the whole 4-bit model onto its GPU."""
    d = json.loads(invoke("check", "llama-3.1-70b", "--gpu", "rtx-5090", "--gpus", "2", "--json").output)
    r = d["recommended"]
    assert d["fits"] and r["parallelism"] == "fsdp" and r["num_gpus"] == 2 and r["cpu_offload"]
    assert r["method"] == "qlora" and r["load_on_cpu"] and r["total_gib"] < 28.7
    assert r["cpu_memory_gib"] == pytest.approx(3 * 36.8 + 2 * 4.97, abs=0.2)  # 2 x mapped + shards + runtimes
    assert r["cpu_memory_terms_gib"] == {"checkpoint_read": 73.6, "offloaded_weights": 36.8, "process_runtime": 9.9}
    text = invoke("check", "llama-3.1-70b", "--gpu", "rtx-5090", "--gpus", "2").output
    assert "fsdp over 2" in text and "CPU memory, all processes: " in text
    assert "Meta-Llama-3.1-70B-bnb-4bit, the same weights stored in 4-bit" in text
    two = json.loads(invoke("check", "llama-3.1-70b", "--gpu", "rtx-a6000", "--gpus", "2", "--json").output)
    assert two["fits"] and two["recommended"]["method"] == "qlora"  # each card holds it in 4-bit, checkpointed
    assert two["recommended"]["parallelism"] == "ddp" and two["recommended"]["checkpointing"] == "unsloth"
    small = json.loads(invoke("check", "llama-3.1-70b", "--gpu", "rtx-4090", "--gpus", "2", "--json").output)
    r = small["recommended"]
    assert small["fits"] and (r["method"], r["parallelism"], r["num_gpus"]) == ("qlora", "fsdp", 2)
    assert r["cpu_offload"] and r["load_on_cpu"] and r["model_path"] == "unsloth/Meta-Llama-3.1-70B-bnb-4bit"
    assert 115 < r["cpu_memory_gib"] < 125 and r["total_gib"] < 21.5  # measured 120.3 GiB (full-depth/)
    assert r["components_gib"].get("quantized_load", 0) == 0
    assert "whole 4-bit model, 36.8 GiB, onto its GPU" in small["reason"]
    text = invoke("check", "meta-llama/Llama-3.1-70B-Instruct", "--gpu", "rtx-4090", "--gpus", "2").output
    assert "FITS" in text and "weights: unsloth/Meta-Llama-3.1-70B-Instruct-bnb-4bit, loaded into CPU memory" in text


def test_models_says_how_far_each_family_is_measured() -> None:
    """Which estimates stand on GPU runs: the reference fit's families, those with their own runs (Qwen1.5-MoE's
    since its runs trained the adapters planned), and Gemma 2, which Unsloth fails on."""
    rows = {m["id"]: m["measured"] for m in json.loads(invoke("models", "--json").output)["models"]}
    assert (rows["llama-3.1-8b"], rows["qwen2.5-7b"], rows["gpt-oss-20b"], rows["gemma-3-12b"]) == (
        "fitted", "fitted", "measured", "measured")
    assert (rows["qwen1.5-moe-a2.7b"], rows["gemma-2-9b"]) == ("measured", "transformers")
    table = invoke("models").output
    assert "measured" in table.splitlines()[2] and "unmeasured = no GPU run yet" in table


def test_a_run_on_data_shorter_than_its_plan_says_so() -> None:
    """The closing lines of a recorded run whose data never filled the plan's micro-batches (bench/results/
    h200-issue17-autocast/rigplan-run/h200-lora.json: plan 23.62 GiB for 16,384-token micro-batches, longest 3,072)
    say why the peak is far below the plan."""
    from rigplan import cli

    run = json.loads((Path(__file__).parents[1] / "bench" / "results" / "h200-issue17-autocast" / "rigplan-run"
                      / "h200-lora.json").read_text())
    lines = cli._closing_lines(run, Path("out")).splitlines()
    assert lines[1] == ("peak reserved 12.27 GiB (plan 23.62, -48.0%); the plan is for micro-batches of 16,384 "
                        "tokens, this data's longest is 3,072")
    run["data"]["micro_batch_tokens_max"] = 16384
    assert cli._closing_lines(run, Path("out")).splitlines()[1] == "peak reserved 12.27 GiB (plan 23.62, -48.0%)"
