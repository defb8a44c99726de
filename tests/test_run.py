"""rigplan run on CPU: tiny random-weight Llama and Qwen2 replicas (profile facts, shrunk) with a tokenizer
made in code learn a synthetic task; Ctrl-C saves a loadable adapter; resume equals an uninterrupted run;
bad data fails with line numbers before any model loads; output directories are never overwritten."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

from click.testing import CliRunner  # noqa: E402

from rigplan.calibration.replica import build_replica, toy  # noqa: E402
from rigplan.cli import main  # noqa: E402
from rigplan.errors import ConfigError, DataError  # noqa: E402
from rigplan.estimator.plan import Plan  # noqa: E402
from rigplan.profiles.catalog import resolve_model  # noqa: E402
from rigplan.trainer import run as runlib  # noqa: E402
from rigplan.trainer.run import RunOptions, train  # noqa: E402

# At hidden 64 the default 0.02 init caps logits near 1 (lm_head rows of norm 0.16): nothing could learn.
TOY_INIT_STD = 0.2


@pytest.fixture(scope="module", params=["llama-3.2-1b", "qwen2.5-0.5b"])
def model_dir(request, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp(request.param)
    build_replica(toy(resolve_model(request.param)), d, dtype="float32", init_std=TOY_INIT_STD)
    return d


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    """Alpaca records whose answer continues a counting pattern: learnable, deterministic."""
    rng = random.Random(0)
    f = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = []
    for _ in range(96):
        a = rng.randrange(40)
        rows.append({"instruction": f"w{a} w{a + 1}", "output": " ".join(f"w{a + k}" for k in range(2, 10))})
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return f


def plan_for(model_dir: Path, **kw) -> Plan:
    base = dict(model=model_dir.name, model_path=str(model_dir), gpu="cpu", method="lora", rank=16, micro_batch=8,
                grad_accum=1, seq_len=64, target_modules=resolve_model(str(model_dir)).target_modules,
                optimizer="adamw_torch", learning_rate=1e-2, epochs=4.0, engine="transformers", batching="padded")
    return Plan(**{**base, **kw})


def test_learns_the_synthetic_task(model_dir, data_file, tmp_path) -> None:
    s = train(plan_for(model_dir), RunOptions(data=data_file, out_dir=tmp_path / "out"))
    assert s["status"] == "done" and s["global_step"] == 48
    assert s["final_loss"] < 0.6 * s["first_loss"], (s["first_loss"], s["final_loss"])
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").exists()
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) >= 48 and json.loads(lines[0])["tokens_per_s"] > 0
    etas = [r["eta_s"] for r in map(json.loads, lines) if "eta_s" in r]  # the run's own pace after warm-up
    assert len(etas) > 40 and etas[-1] == 0.0 and etas[0] > etas[-1]
    m = s["measured"]  # the rate of compiled shapes leaves out steps that met a new one, at least the first
    assert m["compile_steps"] >= 1 and m["tokens_per_s_compiled"] > 0
    assert 0.2 < m["cpu_peak_rss_gib"] < 64  # the process's peak resident memory (torch alone holds some 0.3 GiB)
    # by kind (Linux): its own memory, and mapped files' pages (the safetensors weights, torch's libraries)
    assert 0.1 < m["cpu_peak_anon_gib"] < m["cpu_peak_rss_gib"] and 0 < m["cpu_peak_file_gib"] < m["cpu_peak_rss_gib"]


def _interrupt_at(monkeypatch, step: int) -> None:
    """Deliver a real SIGINT to this process at the end of optimizer step `step`."""
    original = runlib._Guard.callback

    def callback(self):
        cb = original(self)
        on_step_end = cb.on_step_end

        def wrapped(args, state, control, **kwargs):
            if state.global_step == step:
                os.kill(os.getpid(), signal.SIGINT)
            return on_step_end(args, state, control, **kwargs)

        cb.on_step_end = wrapped
        return cb

    monkeypatch.setattr(runlib._Guard, "callback", callback)


def test_sigint_saves_a_loadable_adapter_and_resume_matches(model_dir, data_file, tmp_path, monkeypatch) -> None:
    plan = plan_for(model_dir, epochs=2.0)
    whole = train(plan, RunOptions(data=data_file, out_dir=tmp_path / "whole", save_steps=5))

    _interrupt_at(monkeypatch, 7)
    cut = train(plan, RunOptions(data=data_file, out_dir=tmp_path / "cut", save_steps=5))
    assert cut["status"] == "interrupted" and cut["exit_code"] == 130 and cut["global_step"] == 7
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "cut" / "adapter"))
    assert loaded(input_ids=torch.tensor([[5, 6, 7]])).logits.isfinite().all()

    monkeypatch.undo()
    # A checkpoint a crash cut short (no completion mark) must not be resumed from.
    (tmp_path / "cut" / "checkpoints" / "checkpoint-99").mkdir()
    resumed = train(plan, RunOptions(data=data_file, out_dir=tmp_path / "cut", save_steps=5, resume=True))
    assert resumed["status"] == "done" and resumed["global_step"] == whole["global_step"]
    assert resumed["final_loss"] == pytest.approx(whole["final_loss"], rel=1e-4)


def test_modelfile_points_at_base_and_adapter(model_dir, data_file, tmp_path) -> None:
    train(plan_for(model_dir), RunOptions(data=data_file, out_dir=tmp_path / "o", max_steps=2))
    text = (tmp_path / "o" / "Modelfile").read_text().splitlines()
    assert text == [f"FROM {model_dir.resolve()}", "ADAPTER ./adapter"]
    config = json.loads((tmp_path / "o" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 16 and set(config["target_modules"]) == set(resolve_model(str(model_dir)).target_modules)
    report = json.loads((tmp_path / "o" / "data_report.json").read_text())
    readme = (tmp_path / "o" / "README.md").read_text()
    assert f"Tokens per example: {report['tokens'] / report['examples']:,.0f} tokenized" in readme


def test_bad_data_fails_with_line_numbers_before_loading(model_dir, tmp_path, monkeypatch) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "w1 w2"}\n{oops\n{"text": ""}\n{"text": "w3"}\n')

    def no_load(*_a, **_k):
        raise AssertionError("the model must not load when the data is bad")

    monkeypatch.setattr("rigplan.trainer.engine.load", no_load)
    with pytest.raises(DataError, match=r"line 2: invalid JSON.*line 3: empty \"text\".*--skip-bad"):
        train(plan_for(model_dir), RunOptions(data=f, out_dir=tmp_path / "o"))
    r = CliRunner().invoke(main, ["run", str(model_dir), "--data", str(f), "--out", str(tmp_path / "o2"), "--gpu", "auto"])
    assert r.exit_code == 2 and "line 2: invalid JSON" in r.output


def test_output_directory_is_never_overwritten(model_dir, data_file, tmp_path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(ConfigError, match="not empty; pass --resume"):
        train(plan_for(model_dir), RunOptions(data=data_file, out_dir=out))
    assert (out / "keep.txt").read_text() == "precious"


def test_dry_run_prints_plan_and_data_report(model_dir, data_file, tmp_path) -> None:
    r = CliRunner().invoke(main, ["run", str(model_dir), "--data", str(data_file), "--out", str(tmp_path / "o"),
                                  "--dry-run", "--seq", "32"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output[r.output.index("{"):])["data_report"]
    assert report["examples"] == 96 and report["seq_len"] == 32 and report["format"] == "alpaca"
    assert not (tmp_path / "o" / "adapter").exists()
    r = CliRunner().invoke(main, ["run", str(model_dir), "--data", str(data_file), "--out", str(tmp_path / "p"),
                                  "--dry-run", "--seq", "32", "--checkpointing", "off"])
    assert r.exit_code == 0 and json.loads(r.output[r.output.index("{"):])["plan"]["checkpointing"] == "off"


def test_run_json_prints_the_summary_alone_on_stdout(model_dir, data_file, tmp_path) -> None:
    """`rigplan run --json`: stdout is the run summary and nothing else (the plan line, the Trainer's progress and
    the closing lines go to stderr), so scripts can read it; without --json the closing lines say what ran."""
    _one_architecture(model_dir)
    import subprocess
    import sys

    base = [sys.executable, "-m", "rigplan", "run", str(model_dir), "--data", str(data_file), "--max-steps", "2",
            "--seq", "32"]
    r = subprocess.run([*base, "--out", str(tmp_path / "j"), "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout)
    assert summary == json.loads((tmp_path / "j" / "run_summary.json").read_text())
    assert summary["status"] == "done" and summary["global_step"] == 2
    assert "plan: " in r.stderr and "done after 2 steps" in r.stderr
    r = subprocess.run([*base, "--out", str(tmp_path / "t")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "done after 2 steps in" in r.stdout and "step_seconds" not in r.stdout
    assert "step 2/2 | loss " in r.stdout and "{'loss'" not in r.stdout  # progress lines, not the logs' dicts
    assert f"every measurement: {tmp_path / 't' / 'run_summary.json'}" in r.stdout


def test_progress_lines_say_the_step_loss_speed_and_time_left() -> None:
    from rigplan.trainer.loop import duration, progress_line

    line = progress_line({"loss": 1.23456, "grad_norm": 0.5, "learning_rate": 2e-4, "tokens_per_s": 22517.3,
                          "eta_s": 754.0, "epoch": 0.5}, 20, 114)
    assert line == "step 20/114 | loss 1.2346 | grad norm 0.5 | lr 2.00e-04 | 22,517 tok/s | ETA 12 min 34 s"
    assert progress_line({"eval_loss": 0.9}, 50, 114) == "step 50/114 | eval loss 0.9000"
    assert progress_line({"train_runtime": 12.0, "train_loss": 1.0}, 114, 114) is None  # the closing lines say it
    assert (duration(42), duration(3600 * 3 + 1250)) == ("42 s", "3 h 20 min")


def test_gradient_accumulation_keeps_the_loss_scale(model_dir, data_file, tmp_path) -> None:
    """8 sequences as 1 x 8 or as 4 x 2 with accumulation: the same first step, the same loss (a per-micro-
    batch mean summed over accumulation once logged 4 x the true loss on CPU)."""
    eight = tmp_path / "eight.jsonl"  # one step holds them all, however they are grouped into micro-batches
    eight.write_text("\n".join(data_file.read_text().splitlines()[:8]) + "\n")
    one = train(plan_for(model_dir), RunOptions(data=eight, out_dir=tmp_path / "a", max_steps=1))
    acc = train(plan_for(model_dir, micro_batch=2, grad_accum=4), RunOptions(data=eight, out_dir=tmp_path / "b",
                                                                            max_steps=1))
    assert acc["first_loss"] == pytest.approx(one["first_loss"], rel=1e-3)


def test_eval_split_and_best_adapter(model_dir, tmp_path) -> None:
    rng = random.Random(1)
    f = tmp_path / "big.jsonl"
    f.write_text("\n".join(json.dumps({"text": " ".join(f"w{rng.randrange(60)}" for _ in range(12))})
                           for _ in range(240)) + "\n")
    s = train(plan_for(model_dir), RunOptions(data=f, out_dir=tmp_path / "o", max_steps=10, save_steps=5))
    report = json.loads((tmp_path / "o" / "data_report.json").read_text())
    assert report["eval_examples"] == 12 and report["train_examples"] == 228  # 5% held out from 200 on
    assert s["best_eval_loss"] is not None and math.isfinite(s["best_eval_loss"])


def test_nan_loss_stops_without_saving(tmp_path) -> None:
    """The guard's callback on a logged NaN: stop, save nothing, remember the step (a real NaN could not be
    provoked on CPU: gradient clipping and Adam keep even lr=1e6 finite)."""
    from transformers import TrainerControl, TrainerState

    guard = runlib._Guard(tmp_path)
    cb = guard.callback()
    state, control = TrainerState(), TrainerControl()
    state.global_step = 7
    control.should_save = True
    cb.on_log(None, state, control, logs={"loss": float("nan")})
    assert control.should_training_stop and not control.should_save and guard.nan_step == 7
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["step"] == 7


def test_merge_writes_weights_equal_to_base_plus_adapter(model_dir, data_file, tmp_path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    train(plan_for(model_dir), RunOptions(data=data_file, out_dir=tmp_path / "o", max_steps=12, merge=True))
    ids = torch.tensor([[5, 6, 7, 8]])
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "o" / "merged"), dtype=torch.float32)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir)), str(tmp_path / "o" / "adapter"))
    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    # Merged weights are bf16 ("16-bit"): compare at bf16's precision, and check the adapter moved the
    # logits by more than that, so an unmerged base would fail.
    tuned, merged_logits = peft(input_ids=ids).logits, merged(input_ids=ids).logits
    torch.testing.assert_close(merged_logits, tuned, rtol=0.02, atol=0.2)
    assert (base(input_ids=ids).logits - tuned).abs().max() > 1.0


def _one_architecture(model_dir: Path) -> None:
    if "qwen" in model_dir.name:
        pytest.skip("one architecture is enough: this is the trainer's behaviour, not the model's")


def test_merge_writes_the_tokenizer_into_the_merged_folder(model_dir, data_file, tmp_path) -> None:
    """AutoTokenizer on a merged folder without tokenizer files loaded a one-token tokenizer."""
    _one_architecture(model_dir)
    from transformers import AutoTokenizer

    train(plan_for(model_dir), RunOptions(data=data_file, out_dir=tmp_path / "o", max_steps=1, merge=True))
    merged, base = (AutoTokenizer.from_pretrained(d) for d in (tmp_path / "o" / "merged", model_dir))
    assert len(merged) == len(base) > 1 and merged("w1 w2")["input_ids"] == base("w1 w2")["input_ids"]


def test_resume_after_a_kill_does_not_repeat_metrics(model_dir, data_file, tmp_path, monkeypatch) -> None:
    """A kill -9 after step 7 leaves checkpoint-5 whole and checkpoint-7 half-written: --resume takes 5, and
    metrics.jsonl keeps each step once (the rows of steps 6 and 7 were logged twice)."""
    _one_architecture(model_dir)
    plan = plan_for(model_dir, epochs=1.0)
    _interrupt_at(monkeypatch, 7)
    train(plan, RunOptions(data=data_file, out_dir=tmp_path / "o", save_steps=5))
    monkeypatch.undo()
    (tmp_path / "o" / "checkpoints" / "checkpoint-7" / runlib.CHECKPOINT_COMPLETE).unlink()  # as a kill leaves it
    assert runlib.resume_point(tmp_path / "o") == (str(tmp_path / "o" / "checkpoints" / "checkpoint-5"),
                                                   [str(tmp_path / "o" / "checkpoints" / "checkpoint-7")])
    done = train(plan, RunOptions(data=data_file, out_dir=tmp_path / "o", save_steps=5, resume=True))
    steps = [r["step"] for r in map(json.loads, (tmp_path / "o" / "metrics.jsonl").read_text().splitlines())
             if "loss" in r]
    assert steps == list(range(1, done["global_step"] + 1))


def test_examples_whose_answer_truncation_removes_are_counted_and_warned(model_dir, tmp_path) -> None:
    """An Alpaca record whose prompt fills the sequence has no answer token left: it is left out with a
    warning naming its line, and the data report counts it (3 of 3,000 once vanished without a word)."""
    _one_architecture(model_dir)
    from transformers import AutoTokenizer

    f = tmp_path / "long-prompts.jsonl"
    rows = [{"instruction": "w1 w2", "output": "w3 w4"}] * 8 + [{"instruction": "w5 " * 200, "output": "w6"}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.warns(UserWarning, match=r"1 example\(s\) lost their whole answer to truncation at seq 64 .*line"
                                         r"\(s\) 9\); pass a longer --seq"):
        report = runlib.prepare_data(plan_for(model_dir), AutoTokenizer.from_pretrained(model_dir),
                                     RunOptions(data=f, out_dir=tmp_path / "o")).report
    assert report["answer_truncated_away"] == 1 and report["examples"] == 8


def _load_with_small_gpu(monkeypatch, too_big) -> None:
    """Models that raise CUDA's out-of-memory error on a forward whose inputs are too_big(kwargs)."""
    from rigplan.trainer import engine

    real_load = engine.load

    def small_gpu_load(p):
        model, tok = real_load(p)
        inner = model.forward

        def forward(*args, **kwargs):
            if too_big(kwargs):
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return inner(*args, **kwargs)

        model.forward = forward
        return model, tok

    monkeypatch.setattr(engine, "load", small_gpu_load)


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_result(model_dir, data_file, tmp_path, monkeypatch) -> None:
    """Any micro-batch above 2 sequences raises CUDA's out-of-memory error: the trainer splits 8 into 4, then
    2, at step 0, logs it, and ends where the run that never ran out of memory ends."""
    plan = plan_for(model_dir, epochs=1.0)
    plain = train(plan, RunOptions(data=data_file, out_dir=tmp_path / "plain"))
    _load_with_small_gpu(monkeypatch, lambda kwargs: kwargs["input_ids"].shape[0] > 2)
    tight = train(plan, RunOptions(data=data_file, out_dir=tmp_path / "tight"))
    assert tight["status"] == "done" and tight["global_step"] == plain["global_step"]
    assert tight["oom_backoffs"] == [{"step": 0, "micro_batch": 4}, {"step": 0, "micro_batch": 2}]
    assert tight["final_loss"] == pytest.approx(plain["final_loss"], rel=1e-3)
    events = [json.loads(x) for x in (tmp_path / "tight" / "metrics.jsonl").read_text().splitlines()]
    assert sum(e.get("event") == "oom_backoff" for e in events) == 2


def test_home_relative_model_paths_load_offline(model_dir, monkeypatch) -> None:
    """`~/...` is a local directory for every loader, never a hub id."""
    from rigplan.trainer.engine import model_source

    monkeypatch.setenv("HOME", str(model_dir.parent))
    assert model_source(f"~/{model_dir.name}") == (str(model_dir), True)
    assert model_source("meta-llama/Llama-3.1-8B") == ("meta-llama/Llama-3.1-8B", False)


@pytest.fixture(scope="module")
def varied_file(tmp_path_factory) -> Path:
    """Text records of 3 to 10 words, one in five of 60 to 80: padded micro-batches of 8 would be mostly padding."""
    rng = random.Random(2)
    f = tmp_path_factory.mktemp("varied") / "varied.jsonl"
    words = [rng.randint(60, 80) if rng.random() < 0.2 else rng.randint(3, 10) for _ in range(64)]
    f.write_text("\n".join(json.dumps({"text": " ".join(f"w{rng.randrange(60)}" for _ in range(n))}) for n in words) + "\n")
    return f


def test_packed_micro_batches_train_as_padding_would(model_dir, varied_file, tmp_path) -> None:
    """Packed micro-batches (examples back to back within the token budget) learn what padded ones of the same
    examples learn: examples in one row do not attend to each other, and each keeps the loss it has alone.
    One optimizer step holding every example makes the two runs' steps the same; tokens count real tokens."""
    padded_plan = plan_for(model_dir, epochs=2.0, seq_len=256, micro_batch=64)
    packed_plan = dataclasses.replace(padded_plan, batching="packed", micro_batch=1, token_budget=64 * 256)
    padded = train(padded_plan, RunOptions(data=varied_file, out_dir=tmp_path / "padded"))
    packed = train(packed_plan, RunOptions(data=varied_file, out_dir=tmp_path / "packed"))
    report = json.loads((tmp_path / "packed" / "data_report.json").read_text())
    assert report["batching"] == "packed" and report["micro_batches"] == 1 and report["overlong"] == 0
    assert packed["global_step"] == padded["global_step"] == 2
    assert packed["first_loss"] == pytest.approx(padded["first_loss"], rel=1e-4)
    assert packed["final_loss"] == pytest.approx(padded["final_loss"], rel=1e-3)
    assert packed["measured"]["tokens"] == padded["measured"]["tokens"] == 2 * report["tokens"]
    steps = packed["measured"]["step_seconds"]  # one per optimizer step, from training's start
    assert len(steps) == 2 and all(0 < t < packed["train_runtime_s"] for t in steps)


def test_packed_micro_batch_gives_each_example_its_own_loss(model_dir) -> None:
    """The batcher's promise, on the model itself: one packed row's summed loss equals the sum of each
    example's loss computed alone (no attention, and no loss term, across examples)."""
    from transformers import AutoModelForCausalLM

    from rigplan.trainer.batching import PackedCollator, packed_rows

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rng = random.Random(5)
    rows = [{"input_ids": ids, "labels": list(ids)} for ids in
            ([rng.randrange(10, 4000) for _ in range(rng.randint(3, 40))] for _ in range(6))]
    packed = packed_rows(rows, 4096)
    assert len(packed) == 1
    batch = PackedCollator(pad_token_id=0)(packed)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        together = torch.nn.functional.cross_entropy(logits[0, :-1], batch["labels"][0, 1:], reduction="sum")
        alone = sum(torch.nn.functional.cross_entropy(
            model(input_ids=torch.tensor([r["input_ids"]])).logits[0, :-1], torch.tensor(r["labels"][1:]),
            reduction="sum") for r in rows)
    assert together.item() == pytest.approx(alone.item(), rel=1e-4)


def test_out_of_memory_cuts_a_packed_row_at_examples(model_dir, varied_file, tmp_path, monkeypatch) -> None:
    """A packed micro-batch is one row: the backoff cuts it where an example starts, and the run ends where
    the one that never ran out of memory ends."""
    plan = plan_for(model_dir, epochs=1.0, seq_len=128, batching="packed", micro_batch=4, token_budget=512)
    plain = train(plan, RunOptions(data=varied_file, out_dir=tmp_path / "plain"))
    # more than two examples in the row
    _load_with_small_gpu(monkeypatch, lambda kwargs: int((kwargs["position_ids"] == 0).sum()) > 2)
    tight = train(plan, RunOptions(data=varied_file, out_dir=tmp_path / "tight"))
    assert tight["oom_backoffs"] and tight["oom_backoffs"][0]["step"] == 0
    assert tight["final_loss"] == pytest.approx(plain["final_loss"], rel=1e-3)
    assert tight["measured"]["tokens"] == plain["measured"]["tokens"]


def test_split_keeps_whole_examples_and_their_positions() -> None:
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    examples = [{"input_ids": list(range(10, 10 + n))} for n in (3, 5, 2, 4, 6)]
    row = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
    row["packed_seq_lengths"] = torch.tensor([3, 5, 2, 4, 6], dtype=torch.int32)  # as Unsloth adds it
    parts = runlib.split_micro_batch(row, 2)
    assert [p["packed_seq_lengths"].tolist() for p in parts] == [[3, 5, 2], [4, 6]]
    assert all(p["position_ids"][0, 0] == 0 for p in parts)
    for key in ("input_ids", "labels", "position_ids"):
        assert torch.equal(torch.cat([p[key] for p in parts], dim=1), row[key])
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(examples)
    assert [p["input_ids"].shape[0] for p in runlib.split_micro_batch(padded, 2)] == [3, 2]


def test_logging_interval_is_a_divisor_of_the_checkpoint_interval() -> None:
    """About LOG_EVERY_S between logs on CUDA, and a log right before every checkpoint (its NaN check)."""
    assert runlib.logging_steps(0.39, 50) == 10
    assert runlib.logging_steps(3.3, 50) == 2 and runlib.logging_steps(6.0, 50) == 1
    assert runlib.logging_steps(0.0, 50) == 1
    assert runlib.logging_steps(0.01, 50) == 50
    assert runlib.logging_steps(0.3, 7) == 7


def test_unsloth_trains_on_the_models_own_loss_hf_on_cuda_on_trls_head(tmp_path, monkeypatch) -> None:
    """The loss is the model's own on Unsloth (its fused cross-entropy, no per-micro-batch metric reads) and
    where TRL's chunked LM head cannot run; TRL's head where it can and the model is plain transformers."""
    from trl.trainer import utils as trl_utils

    guard = runlib._Guard(tmp_path)
    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", object(), raising=False)  # as on a CUDA machine
    assert runlib._trainer_class(guard, "unsloth").own_loss
    assert not runlib._trainer_class(guard, "transformers").own_loss
    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", None)  # no Triton (CPU builds of torch)
    assert runlib._trainer_class(guard, "transformers").own_loss


def test_a_finished_run_is_logged_for_calibration(model_dir, data_file, tmp_path) -> None:
    """The caller of the trainer (rigplan run) appends one whole JSON line per run (plan, measured, predicted,
    the data's shape, provenance) to the user's runs.jsonl, for calibration to learn from."""
    from rigplan import store

    plan = plan_for(model_dir, epochs=1.0)
    summary = train(plan, RunOptions(data=data_file, out_dir=tmp_path / "run", max_steps=2))
    log = tmp_path / "home" / store.RUNS_LOG
    store.record_run(log, summary, plan.to_json())
    store.record_run(log, summary, plan.to_json(), ([30, 10, 20], 3000))  # the counted lengths: a sample, how many
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(rows) == 2 and Plan.from_json(json.dumps(rows[0]["plan"])) == plan
    assert "lengths" not in rows[0] and rows[1]["lengths"] == {"quantiles": [10, 20, 30], "count": 3000}
    assert rows[0]["measured"]["tokens"] == summary["measured"]["tokens"] > 0
    assert rows[0]["data"]["examples"] == 96 and rows[0]["provenance"]["packages"]["torch"]


def test_a_run_plan_counts_tokens_with_the_models_tokenizer(model_dir, varied_file) -> None:
    """`rigplan run` on a local model plans speed for the data as its tokenizer counts it (template and EOS
    included) with padding counted, where `check` can only estimate from characters; bad data still stops
    the plan with its line number."""
    from rigplan import planning as check
    from rigplan.trainer.run import prepare_data
    from transformers import AutoTokenizer

    from rigplan.trainer.engine import count_tokens

    p = check.plan_for_run(str(model_dir), "h100-sxm", varied_file, {},
                           counted=count_tokens(str(model_dir), varied_file))
    counted = prepare_data(p, AutoTokenizer.from_pretrained(str(model_dir)),
                           RunOptions(data=varied_file, out_dir=model_dir / "unused", eval_fraction=0.0)).report
    assert p.example_tokens == pytest.approx(counted["tokens"] / counted["examples"], abs=0.1)
    assert p.batching in ("padded", "packed") and 0 < p.fill <= 1 and p.token_budget == p.micro_batch * p.seq_len
    assert counted["micro_batch_tokens_max"] <= p.token_budget
    with pytest.raises(DataError, match="line 2"):
        bad = model_dir / "bad.jsonl"
        bad.write_text('{"text": "w1 w2"}\n{"txt": 1}\n')
        check.plan_for_run(str(model_dir), "h100-sxm", bad, {})


def test_early_stopping_keeps_the_best_adapter(model_dir, tmp_path) -> None:
    """Eval loss falls, then rises as the toy model memorises its 192 training examples: the run stops after
    --patience evaluations without improvement, and the adapter it leaves scores the best eval loss, not
    the last one (re-scored here from the saved files, on the same held-out rows)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if "qwen" in model_dir.name:
        pytest.skip("one architecture is enough: early stopping is the trainer's, not the model's")
    rng = random.Random(1)
    f = tmp_path / "memorise.jsonl"
    f.write_text("\n".join(json.dumps({"text": " ".join(f"w{rng.randrange(60)}" for _ in range(12))})
                           for _ in range(200)) + "\n")
    plan, opts = plan_for(model_dir, epochs=10.0), RunOptions(data=f, out_dir=tmp_path / "o", eval_fraction=0.04,
                                                             save_steps=3, patience=2)
    s = train(plan, opts)
    evals = [(r["step"], r["eval_loss"]) for r in map(json.loads, (tmp_path / "o" / "metrics.jsonl").open())
             if "eval_loss" in r]
    best_step, best = min(evals, key=lambda e: e[1])
    assert s["status"] == "early_stopped" and s["global_step"] < 240 and s["best_eval_loss"] == best
    assert [step for step, _ in evals if step > best_step] == [best_step + 3, best_step + 6]  # patience 2
    assert evals[-1][1] > best and evals[0][1] - best > 1.0  # it learned, then got worse

    rows = runlib.prepare_data(plan, AutoTokenizer.from_pretrained(tmp_path / "o" / "adapter"), opts).eval
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                      tmp_path / "o" / "adapter").eval()
    ids = [x for r in rows for x in r["input_ids"]]  # padded micro-batches of equal-length examples
    labels = [x for r in rows for x in r["labels"]]
    with torch.no_grad():
        loss = model(input_ids=torch.tensor(ids), labels=torch.tensor(labels)).loss.item()
    assert loss == pytest.approx(best, rel=1e-5)


def test_skip_bad_reaches_the_plan(model_dir, tmp_path) -> None:
    """`rigplan run --skip-bad` plans on the good records (it was refused at planning, told to pass the flag it
    had passed); without it the plan stops on the bad line, the tokenizer on disk or not."""
    from rigplan import planning as check

    f = tmp_path / "some-bad.jsonl"
    f.write_text('{"text": "w1 w2 w3"}\n{"txt": 1}\n{"text": "w4 w5"}\n')
    from rigplan.trainer.engine import count_tokens

    with pytest.raises(DataError, match="line 2"):
        count_tokens(str(model_dir), f)
    with pytest.raises(DataError, match="line 2"):
        check.plan_for_run("llama-3.2-1b", "h100-sxm", f, {})  # no tokenizer here: lengths from characters
    counted = count_tokens(str(model_dir), f, skip_bad=True)
    assert counted[1] == 2
    for model, c in ((str(model_dir), counted), ("llama-3.2-1b", None)):
        assert check.plan_for_run(model, "h100-sxm", f, {}, skip_bad=True, counted=c).example_tokens > 0
    r = CliRunner().invoke(main, ["run", str(model_dir), "--data", str(f), "--skip-bad", "--dry-run",
                                  "--out", str(tmp_path / "o")])
    assert r.exit_code == 0 and '"skipped_bad": 1' in r.output, r.output


@pytest.mark.parametrize("model_id", ["qwen3-30b-a3b", "mixtral-8x7b", "llama-3.2-1b"])
def test_the_estimate_counts_exactly_the_adapters_that_train(model_id, tmp_path) -> None:
    """PEFT's trainable parameters on the loaded model equal the estimator's lora_params, for dense models and
    for mixture-of-experts ones (attention only: transformers fuses the experts, which target_modules do not
    match)."""
    from rigplan.estimator.memory import lora_params
    from rigplan.trainer.engine import load

    spec = toy(resolve_model(model_id))
    build_replica(spec, tmp_path / "m", dtype="float32")
    plan = Plan(model=spec.id, model_path=str(tmp_path / "m"), gpu="cpu", method="lora", rank=8, micro_batch=1,
                grad_accum=1, seq_len=64, target_modules=spec.target_modules, optimizer="adamw_torch",
                engine="transformers")
    model, _ = load(plan)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trained == lora_params(spec, 8) > 0


def test_the_schedule_comes_from_the_plan(model_dir, tmp_path) -> None:
    """Learning-rate schedule, warm-up and weight decay are the plan's, not the trainer's choices."""
    plan = plan_for(model_dir, lr_scheduler="cosine", warmup_steps=2, weight_decay=0.1)
    args = runlib.sft_config_from_plan(plan, tmp_path, RunOptions(data=tmp_path / "d", out_dir=tmp_path), False,
                                       False, False)
    assert (getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type), args.warmup_steps, args.weight_decay) == (
        "cosine", 2, 0.1)
    assert Plan.from_json(plan.to_json()) == plan


def test_the_trainer_orders_micro_batches_with_the_block_sampler(tmp_path) -> None:
    """The Trainer's sampler is rigplan's: blocks as wide as the world (one process here: a seeded shuffle of the
    micro-batches), with the data seed, so that several GPUs get micro-batches of similar length together."""
    from types import SimpleNamespace

    from rigplan.trainer.batching import BlockSampler

    cls = runlib._trainer_class(runlib._Guard(tmp_path), "transformers")
    fake = SimpleNamespace(train_dataset=list(range(40)), args=SimpleNamespace(data_seed=7, seed=3))
    sampler = cls._get_train_sampler(fake)
    assert isinstance(sampler, BlockSampler) and (sampler.rows, sampler.block, sampler.seed) == (40, 1, 7)
    assert sampler.order() == BlockSampler(40, 1, 7).order() != list(range(40))


def test_compiled_rate_leaves_out_steps_that_meet_a_new_shape(tmp_path, monkeypatch) -> None:
    """tokens_per_s_compiled: after the warm-up, each step from the first micro-batch of a shape not run before to
    the step's end (Unsloth compiles it) is left out, time and tokens; the rest is the rate a fixed-shape loop's
    steady rate compares with. A fake clock: steps of 1 s, and 9 s more in the step that meets a new shape."""
    from types import SimpleNamespace

    from rigplan.trainer import loop

    clock = [0.0]
    monkeypatch.setattr(loop.time, "perf_counter", lambda: clock[0])
    guard = runlib._Guard(tmp_path)
    cb = guard.callback()
    guard.warmup = 1
    shapes = [(4, 64), (4, 64), (4, 64), (8, 32), (4, 64), (4, 64), (8, 32)]  # 256 tokens each

    class Ids:  # what meet() and count() read of a padded micro-batch: its ids' shape, its mask's sum
        def __init__(self, shape: tuple[int, int]) -> None:
            self.shape = shape

        def sum(self) -> int:
            return self.shape[0] * self.shape[1]

    for step, shape in enumerate(shapes, 1):
        batch = {"input_ids": Ids(shape), "attention_mask": Ids(shape)}
        new = shape not in guard.shapes
        guard.meet(batch)
        clock[0] += 10.0 if new else 1.0
        guard.count(batch)
        cb.on_step_end(None, SimpleNamespace(global_step=step), type("Control", (), {})())
    # after the warm-up step 0: step 3 met (8, 32) first and is left out; steps 2, 4, 5, 6 took 1 s each
    assert [i for i, _, _ in guard.compiling] == [0, 3]
    assert guard.compiled_tokens_per_s() == pytest.approx(256 / 1.0)
    assert guard.steady_tokens_per_s() == pytest.approx(5 * 256 / 14.0, abs=0.1)  # the compiling step counted
    guard.meet({"input_ids": Ids((1, 999))})  # padding-free: a new length each time, not tracked
    assert guard.new_shape_from is None and (1, 999) not in guard.shapes


def test_the_process_count_must_match_the_plans_gpus(model_dir, data_file, tmp_path, monkeypatch) -> None:
    """A plan for two GPUs trained in one process, or a one-GPU plan under a launcher that started two, is refused
    before anything loads (both processes would otherwise train, each thinking it is alone or in DDP)."""
    with pytest.raises(ConfigError, match="trains on 2 GPUs"):
        train(plan_for(model_dir, num_gpus=2, parallelism="ddp"), RunOptions(data=data_file, out_dir=tmp_path / "a"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="2 processes were started for a plan that trains on 1 GPU.*parallelism"):
        runlib.check_plan(plan_for(model_dir))
    assert not (tmp_path / "a").exists()


def test_resuming_a_finished_run_is_refused_before_training(model_dir, data_file, tmp_path) -> None:
    """--resume on a run whose last checkpoint is already at --max-steps trains nothing more and says so
    (transformers' Trainer took a 21st step past --max-steps 20 on two H200s: bench/results/h200x2-fsdp/
    resume-prequantized-unstopped/); a larger --max-steps trains on from that checkpoint."""
    _one_architecture(model_dir)
    plan = plan_for(model_dir, epochs=1.0)
    first = train(plan, RunOptions(data=data_file, out_dir=tmp_path / "o", save_steps=2, max_steps=4))
    assert first["global_step"] == 4
    with pytest.raises(ConfigError, match=r"checkpoint-4 is already at step 4, --max-steps 4: nothing to train; "
                                          r"its adapter is .*Pass a larger --max-steps"):
        train(plan, RunOptions(data=data_file, out_dir=tmp_path / "o", save_steps=2, max_steps=4, resume=True))
    more = train(plan, RunOptions(data=data_file, out_dir=tmp_path / "o", save_steps=2, max_steps=5, resume=True))
    assert more["global_step"] == 5 and more["status"] == "done"


def test_a_resume_under_another_plan_is_refused_and_the_saved_plan_resumes(model_dir, data_file, tmp_path) -> None:
    """A checkpoint continues only under the plan it was saved with: another rank (adapter shapes) or another
    number of processes is refused with one line naming --out's plan.json, which resumes it as MODEL; a shorter
    --seq (what an out-of-memory error advises) is allowed."""
    _one_architecture(model_dir)
    plan = plan_for(model_dir, epochs=1.0)
    train(plan, RunOptions(data=data_file, out_dir=tmp_path / "o", save_steps=2, max_steps=2))
    saved = tmp_path / "o" / "plan.json"
    with pytest.raises(ConfigError, match=rf"{saved} trained rank {plan.rank}; this plan has rank {2 * plan.rank}: "
                                          r"a checkpoint continues only under its own plan\. Resume it with "
                                          rf"`rigplan run {saved} --data \.\.\. --resume`"):
        train(dataclasses.replace(plan, rank=2 * plan.rank),
              RunOptions(data=data_file, out_dir=tmp_path / "o", max_steps=3, resume=True))
    assert runlib.resume_problems(dataclasses.replace(plan, num_gpus=2, parallelism="fsdp"),
                                  tmp_path / "o")[0].startswith(f"{saved} trained num_gpus 1, parallelism single;")
    other = "adamw_torch" if plan.optimizer == "adamw_8bit" else "adamw_8bit"  # DDP LoRA plans changed optimizer
    assert runlib.resume_problems(dataclasses.replace(plan, optimizer=other),
                                  tmp_path / "o")[0].startswith(f"{saved} trained optimizer {plan.optimizer};")
    shorter = dataclasses.replace(plan, seq_len=plan.seq_len // 2)
    assert runlib.resume_problems(shorter, tmp_path / "o") == []
    refused = CliRunner().invoke(main, ["run", str(saved), "--data", str(data_file), "--out", str(tmp_path / "o"),
                                        "--rank", str(2 * plan.rank), "--resume"])
    assert refused.exit_code == 2 and "continues only under its own plan" in refused.output
    r = CliRunner().invoke(main, ["run", str(saved), "--data", str(data_file), "--out", str(tmp_path / "o"),
                                  "--max-steps", "3", "--resume", "--json"])
    assert r.exit_code == 0, r.output[-2000:]
    assert json.loads((tmp_path / "o" / "run_summary.json").read_text())["global_step"] == 3


def test_resident_memory_is_read_by_kind() -> None:
    """/proc/self/status's RssAnon, RssFile and RssShmem in GiB; nothing where the lines are missing."""
    from rigplan.trainer.loop import resident_gib

    text = "Name:\tpython\nVmRSS:\t 3670016 kB\nRssAnon:\t 2097152 kB\nRssFile:\t 1048576 kB\nRssShmem:\t 524288 kB\n"
    assert resident_gib(text) == {"cpu_peak_anon_gib": 2.0, "cpu_peak_file_gib": 1.0, "cpu_peak_shmem_gib": 0.5}
    assert resident_gib("Name:\tpython\n") == {}
    here = resident_gib()
    assert here["cpu_peak_anon_gib"] > 0.05 and here["cpu_peak_file_gib"] > 0
