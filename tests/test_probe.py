"""The probe runner end to end on CPU (a tiny replica through the transformers engine), the calibrate job
grid, and calibrate's refusal without a GPU."""

from __future__ import annotations

import json

import pytest

from rigplan.calibration import calibrate
from rigplan.calibration.probe import Job
from rigplan.errors import CalibrationError
from rigplan.profiles.catalog import resolve_model


def test_job_parse() -> None:
    job = Job.parse("llama-3.1-8b@4:qlora:16:1x2048,4x4096:checkpointing=off")
    assert (job.model, job.layers, job.method, job.rank, job.shapes, job.checkpointing) == (
        "llama-3.1-8b", 4, "qlora", 16, ((1, 2048), (4, 4096)), "off")
    assert job.autocast == "auto" and Job.parse("llama-3.1-8b:lora:16:1x2048:autocast=bf16").autocast == "bf16"


def test_calibrate_grid_reduces_depth_and_covers_both_regimes() -> None:
    jobs = calibrate.jobs(("llama-3.1-8b",), ("lora", "qlora"), quick=False)
    assert len(jobs) == 2 * len(calibrate.DEPTHS) and len(set(calibrate.DEPTHS)) >= 2
    shapes = [Job.parse(j).shapes for j in jobs][0]
    assert min(b * s for b, s in shapes) <= 4096 and max(b * s for b, s in shapes) >= 8192
    assert all(Job.parse(j).layers in calibrate.DEPTHS for j in jobs)


def test_calibrate_refuses_a_family_with_its_own_terms_before_any_gpu_work() -> None:
    """Probes of a family with its own fitted terms (gpt-oss, Qwen3-MoE, Gemma 2 on transformers) would move the
    reference's coefficients those terms sit on: refused with one line that says what to calibrate with instead."""
    for name in ("gpt-oss-20b", "qwen3-30b-a3b", "gemma-2-9b"):
        with pytest.raises(CalibrationError, match=rf"--model {name}: its family's terms come from its own recorded "
                                                   r"runs .* \(llama-3.1-8b, the default\)"):
            calibrate.jobs(("llama-3.1-8b", name), ("lora",), quick=True)
    assert calibrate.jobs(("qwen2.5-0.5b", "mistral-7b", "qwen3-8b"), ("lora",), quick=True)


def test_calibrate_without_gpu_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setattr("rigplan.profiles.nvml.local_gpus", lambda: ([], "no NVIDIA driver or GPU found"))
    with pytest.raises(CalibrationError, match="needs an NVIDIA GPU"):
        calibrate.calibrate(quick=True)


@pytest.fixture
def tiny_replica(tmp_path):
    """A one-layer float32 replica of Qwen2.5's architecture (toy widths) on disk: (its directory, its spec)."""
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    from rigplan.calibration.replica import build_replica, toy

    spec = toy(resolve_model("qwen2.5-0.5b"))
    build_replica(spec, tmp_path / "tiny-qwen", dtype="float32")
    return tmp_path / "tiny-qwen", spec


def test_probe_runs_end_to_end_on_cpu(tmp_path, tiny_replica) -> None:
    from rigplan.calibration import probe

    model_dir, _ = tiny_replica
    out = tmp_path / "probes.jsonl"
    probe.main(["--job", f"{model_dir}@1:lora:8:2x32,1x64", "--engine", "transformers", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["batch"], r["seq"]) for r in rows] == [(2, 32), (1, 64)]
    for r in rows:
        assert r["err"] is None and r["layers"] == 1 and r["step_s"] > 0 and r["steps_timed"] >= 5
        # step_s is stored to 0.1 ms: a few-ms CPU step carries that rounding into the ratio
        assert r["tok_per_s"] == pytest.approx(r["batch"] * r["seq"] / r["step_s"], rel=0.01 + 5e-5 / r["step_s"])
        # autocast "auto" is what the trainer does on the device: off on the CPU
        assert r["provenance"]["packages"]["torch"] and r["trainable_params"] > 0 and r["autocast"] == "off"


def test_probe_can_run_the_forward_under_autocast_as_the_trainer_does(tmp_path, tiny_replica) -> None:
    """autocast=bf16: the forward under torch.autocast(bfloat16), as accelerate wraps it for `rigplan run`'s bf16
    mixed precision, and the row says so; without it a float32 replica's layers compute in float32."""
    import torch
    from transformers import AutoModelForCausalLM

    from rigplan.calibration import probe

    model_dir, spec = tiny_replica
    out = tmp_path / "probes.jsonl"
    probe.main(["--job", f"{model_dir}@1:lora:8:1x32:autocast=bf16", "--engine", "transformers", "--out", str(out)])
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["err"] is None and row["autocast"] == "bf16" and row["steps_timed"] >= 5

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    seen: list = []
    model.lm_head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for autocast in ("off", "bf16"):
        seen.clear()
        probe.measure_shape(model, opt, spec.vocab_size, 1, 16, "cpu", min_timed_s=0.01, autocast=autocast)
        assert set(seen) == {torch.bfloat16 if autocast == "bf16" else torch.float32}


def test_calibrate_learns_this_machines_real_data_speed_from_its_runs() -> None:
    """rigplan run's records (the H200 runs of bench/results/h200-runs, real measurements) give the median of
    measured over planned tokens/s for plans made for this GPU and run on it; RTX 4090 plans run on the H200
    (capped) are not the 4090's speed and are left out. The learned rate scales the real-data estimate."""
    import dataclasses
    import json
    import statistics
    from pathlib import Path

    from rigplan import store
    from rigplan.estimator import planner
    from rigplan.estimator.plan import ExampleLengths, Setup
    from rigplan.profiles import catalog

    rows = [json.loads(f.read_text()) for f in (Path(__file__).parents[1] / "bench/results/h200-runs").rglob("*.json")]
    rows = [r for r in rows if "measured" in r and "plan" in r]
    learned, n = calibrate.real_data_speed(rows, catalog.resolve_gpu("h200"))
    ratios = sorted(r["measured"]["tokens_per_s"] / r["predicted"]["tokens_per_s"] for r in rows
                    if r["plan"]["gpu"] == "h200")
    assert n == len(ratios) >= 5 and learned == pytest.approx(statistics.median(ratios), abs=1e-3)
    assert calibrate.real_data_speed(rows, catalog.resolve_gpu("rtx-4090")) == (1.0, 0)
    coeffs, model, gpu = store.reference()[0], catalog.resolve_model("llama-3.1-8b"), catalog.resolve_gpu("h200")
    setup, lengths = Setup("lora", 16, 4, 2048, checkpointing="off"), ExampleLengths.of(range(200, 1500))
    base = planner.estimate(model, setup, gpu, coeffs, lengths=lengths)
    slower = planner.estimate(model, setup, gpu, dataclasses.replace(coeffs, real_data_speed=0.5), lengths=lengths)
    assert slower.tokens_per_s == pytest.approx(base.tokens_per_s * 0.5, rel=1e-6)


def test_calibrate_estimates_recorded_runs_again_with_the_estimator_it_runs() -> None:
    """A run record keeps its data's lengths (rigplan run's runs.jsonl); calibrate estimates it again rather than
    trusting the prediction it printed, which an upgraded estimator may have changed. The held-out H200 runs
    (bench/results/h200-runs/heldout/) printed plans 14% below what they measured; the estimator refitted on
    them plans within 3%, and learning the old ratios would have counted the refit twice."""
    import json
    import sys
    from pathlib import Path

    from rigplan import store
    from rigplan.profiles import catalog

    sys.path.insert(0, str(Path(__file__).parent))
    from test_h200_runs import data_lengths  # the runs' data lengths, rebuilt as the runs tokenized them

    gpu, coeffs = catalog.resolve_gpu("h200"), store.reference()[0]
    rows = []
    for name in ("heldout/h200-lora.json", "heldout/h200-qlora.json"):
        run = json.loads((Path(__file__).parents[1] / "bench/results/h200-runs" / name).read_text())
        lengths = data_lengths(run)
        row = {**run, "plan": {**run["plan"], "model": "llama-3.1-8b"},  # the replica's architecture
               "lengths": {"quantiles": list(lengths.tokens), "count": lengths.count}}
        rows.append(row)
    printed, n = calibrate.real_data_speed(rows, gpu)
    again, m = calibrate.real_data_speed(rows, gpu, coeffs)
    assert n == m == 2 and printed > 1.13  # the printed plans were 14% low
    assert abs(again - 1) < 0.03  # today's estimate of the same runs



def test_the_no_bf16_emulation_stands_for_unsloth_only(tmp_path, tiny_replica, capsys) -> None:
    """gpu=no-bf16 makes Unsloth's loader take its path for GPUs without bf16 (calibration/probe.py
    as_without_bf16); on any other engine it would measure nothing of the kind, so the probe refuses (one line, exit
    code 2) before it builds a replica, and writes no row."""
    from rigplan.calibration import probe

    model_dir, _ = tiny_replica
    out = tmp_path / "probes.jsonl"
    with pytest.raises(SystemExit) as refused:
        probe.main(["--job", f"{model_dir}@1:qlora:8:1x32:gpu=no-bf16", "--engine", "transformers", "--out", str(out)])
    assert refused.value.code == 2 and "engine unsloth" in capsys.readouterr().err
    assert not out.exists()
    assert probe.Job.parse("gemma-3-12b@8:qlora:16:1x2048:gpu=no-bf16").gpu == "no-bf16"
