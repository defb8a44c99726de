"""The planning service (rigplan/planning.py): the engine chosen in one place from profiles/known_issues.json, the
Plan's round trip with its new fields, and the planning path's imports (never the trainer, calibration or torch)."""

from __future__ import annotations

import json
import subprocess

import pytest
import sys

from rigplan import planning
from rigplan.errors import ConfigError
from rigplan.estimator.plan import Plan
from rigplan.profiles.catalog import resolve_model


def test_engine_follows_known_issues() -> None:
    """Unsloth fails on Gemma 2 (profiles/known_issues.json): its plans are transformers + PEFT plans."""
    assert planning.choose_engine(resolve_model("gemma-2-9b")) == "transformers"
    assert planning.choose_engine(resolve_model("llama-3.1-8b")) == "unsloth"
    assert planning.choose_engine(resolve_model("phi-3.5-mini")) == "unsloth"  # slow there, not failing
    d = planning.check("gemma-2-9b", "h100-sxm")
    assert d["recommended"]["engine"] == "transformers" and "transformers + PEFT" in d["reason"]
    assert planning.make_plan("gemma-2-9b", "h100-sxm").engine == "transformers"


def test_families_unsloth_trains_in_float32_warn_on_gpus_without_bf16() -> None:
    """Unsloth 2026.10.9 trains Gemma 3, gpt-oss and Qwen3-MoE in float32 where the GPU has no bf16 (its
    FORCE_FLOAT32 list; profiles/known_issues.json): `check` on a T4 or V100 says the plan counts bf16, for those
    families only, and nowhere else; the families' measured status is unchanged."""
    from rigplan.profiles.catalog import measured_status

    def noted(model: str, gpu: str) -> bool:
        return any("float32" in w for w in planning.check(model, gpu)["warnings_short"])

    assert all(noted(m, g) for m in ("gemma-3-12b", "gpt-oss-20b", "qwen3-30b-a3b") for g in ("t4", "v100-32gb"))
    assert not any(noted(m, g) for m, g in (("gemma-3-12b", "rtx-4090"), ("llama-3.1-8b", "t4"),
                                            ("mixtral-8x7b", "t4"), ("qwen3-30b-a3b", "h100-sxm")))
    assert planning.max_seq("gpt-oss-20b", "t4")["warnings"][-1].startswith("uncalibrated: Unsloth 2026.10.9")
    assert measured_status(resolve_model("gemma-3-12b")) == "measured"


def test_transformers_engine_is_estimated_apart(coeffs) -> None:
    """The same setup costs more step memory and more time on transformers + PEFT than on Unsloth, by the
    factors measured on the recorded pairs (bench/engine_factors.py); weights are the same."""
    import sys
    from pathlib import Path

    from rigplan.estimator import memory, planner, speed
    from rigplan.estimator.plan import Setup
    from rigplan.profiles.catalog import resolve_gpu

    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    import engine_factors

    f = engine_factors.factors(engine_factors.pairs())
    assert f["runs"] >= 6 and memory.TRANSFORMERS_STEP_MEMORY == pytest.approx(f["step_memory"], abs=0.01)
    assert speed.TRANSFORMERS_SPEED == pytest.approx(f["speed"], abs=0.01)
    model, gpu, setup = resolve_model("llama-3.1-8b"), resolve_gpu("h100-sxm"), Setup("lora", 16, 2, 2048)
    un, tf = (planner.estimate(model, setup, gpu, coeffs, engine=e) for e in ("unsloth", "transformers"))
    assert tf.components_bytes["base_weights"] == un.components_bytes["base_weights"]
    assert tf.peak_reserved_gib > un.peak_reserved_gib and tf.tokens_per_s < un.tokens_per_s


def test_plan_round_trips_with_engine_budget_and_band(tmp_path) -> None:
    p = planning.make_plan("llama-3.1-8b", "rtx-4090", data_file=None)
    assert p.engine == "unsloth" and p.batching == "padded" and p.token_budget == p.micro_batch * p.seq_len
    assert 0 < p.tokens_per_s_low < p.tokens_per_s < p.tokens_per_s_high
    assert Plan.from_json(p.to_json()) == p
    data = json.loads(p.to_json())
    data["surprise"] = 1
    try:
        Plan.from_json(json.dumps(data))
    except ValueError as e:
        assert "surprise" in str(e)
    else:
        raise AssertionError("an unknown field was accepted")


def test_planning_loads_neither_trainer_calibration_nor_torch(tmp_path) -> None:
    """check, estimate, plan and the plan a run trains, all through the planning service: none of them
    imports rigplan.trainer, rigplan.calibration or torch."""
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": "w1 " * n, "output": "w2 " * (3 * n)})
                              for n in range(10, 60)) + "\n")
    code = f"""
import sys
from rigplan import planning
planning.check("llama-3.1-8b", "rtx-4090", data_file={str(data)!r})
planning.check("llama-3.1-8b", None)
planning.estimate("llama-3.1-8b", "qlora", 1, 2048, 16, "h100-sxm")
p = planning.make_plan("llama-3.1-8b", "h100-sxm", data_file={str(data)!r})
planning.plan_for_run("llama-3.1-8b", "h100-sxm", {str(data)!r}, {{"micro_batch": 1}})
bad = [m for m in sys.modules if m == "torch" or m.startswith(("rigplan.trainer", "rigplan.calibration",
                                                              "torch.", "transformers"))]
print(bad)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_prequantized_unsloth_ids_plan_qlora_from_that_id() -> None:
    """`unsloth/...-bnb-4bit` is the profile's architecture, loaded from that id, 4-bit: QLoRA only, said."""
    from rigplan.errors import ConfigError

    spec = resolve_model("unsloth/Llama-3.1-8B-Instruct-bnb-4bit")
    assert spec.id == "llama-3.1-8b" and spec.prequantized and spec.hub_id == "unsloth/Llama-3.1-8B-Instruct-bnb-4bit"
    assert not resolve_model("llama-3.1-8b").prequantized
    p = planning.make_plan("unsloth/Llama-3.1-8B-Instruct-bnb-4bit", "rtx-4090")
    assert p.method == "qlora" and p.model_path == "unsloth/Llama-3.1-8B-Instruct-bnb-4bit"
    d = planning.check("unsloth/Qwen2.5-7B-Instruct-unsloth-bnb-4bit", "h100-sxm")
    assert d["recommended"]["method"] == "qlora" and any("dynamic 4-bit" in w for w in d["warnings"])
    plain = planning.check("unsloth/Llama-3.1-8B-Instruct-bnb-4bit", "h100-sxm")  # measured: no warning
    assert not any("4-bit" in w for w in plain["warnings"])
    with pytest.raises(ConfigError, match="only QLoRA"):
        planning.check("unsloth/Llama-3.1-8B-bnb-4bit", "rtx-4090", method="lora")


def test_a_local_4_bit_checkpoint_plans_qlora_and_other_quantized_ones_are_refused(tmp_path) -> None:
    """A local copy of a `-bnb-4bit` checkpoint (its config.json's quantization_config, as transformers writes it)
    is pre-quantized whatever its folder's name: QLoRA only. Weights stored in another quantized format (GPTQ,
    8-bit) are neither what LoRA nor what QLoRA counts: refused, in one line, before anything loads."""
    from rigplan.errors import ConfigError
    from rigplan.profiles.catalog import UnknownModelError

    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
              "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
              "vocab_size": 128256, "max_position_embeddings": 131072}  # Llama-3.2-1B's sizes
    bnb = {"quant_method": "bitsandbytes", "load_in_4bit": True, "_load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    for name, quant in (("my-model", bnb), ("gptq", {"quant_method": "gptq", "bits": 4}),
                        ("int8", {"quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({**config, "quantization_config": quant}))
    spec = resolve_model(str(tmp_path / "my-model"))
    assert spec.prequantized
    assert planning.make_plan(str(tmp_path / "my-model"), "rtx-4090").method == "qlora"
    with pytest.raises(ConfigError, match="only QLoRA"):
        planning.check(str(tmp_path / "my-model"), "rtx-4090", method="lora")
    for name in ("gptq", "int8"):
        with pytest.raises(UnknownModelError, match="stored quantized.*pass the 16-bit model") as refused:
            resolve_model(str(tmp_path / name))
        assert "fix config.json" not in str(refused.value)  # nothing to fix there: another model to pass
    assert not resolve_model("llama-3.2-1b").prequantized


def test_an_override_of_a_multi_gpu_plan_keeps_its_gpus(tmp_path) -> None:
    """`rigplan run --gpus 2 --micro-batch 8` on the two-H200 machine once trained on one GPU while printing two
    GPUs' speed: the re-estimated override had dropped the plan's GPUs and parallelism. An override keeps them, and
    its speed is the DDP estimate of the same per-GPU setup."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": "word " * (50 + 7 * i)}) + "\n" for i in range(200)))
    fresh = planning.plan_for_run("llama-3.1-8b", "h200", data, {"method": "lora"}, num_gpus=2)
    assert (fresh.num_gpus, fresh.parallelism) == (2, "ddp")
    changed = planning.plan_for_run("llama-3.1-8b", "h200", data,
                                    {"method": "lora", "micro_batch": fresh.micro_batch // 2,
                                     "grad_accum": fresh.grad_accum * 2}, num_gpus=2)
    assert (changed.num_gpus, changed.parallelism, changed.micro_batch) == (2, "ddp", fresh.micro_batch // 2)
    one = planning.plan_for_run("llama-3.1-8b", "h200", data,
                                {"method": "lora", "micro_batch": fresh.micro_batch // 2,
                                 "grad_accum": fresh.grad_accum * 2}, num_gpus=1)
    assert one.num_gpus == 1
    assert 1.6 < changed.tokens_per_s / one.tokens_per_s < 2  # each step waiting for the slower process


def test_checkpointing_override_is_re_estimated(tmp_path) -> None:
    """`rigplan run --checkpointing`: the plan keeps the user's choice with its own memory, or refuses it with the
    estimate when it cannot fit."""
    from rigplan.errors import ConfigError

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": "word " * (400 + 9 * i)}) + "\n" for i in range(200)))
    fresh = planning.plan_for_run("llama-3.1-8b", "h200", data, {"method": "lora"})
    assert fresh.checkpointing == "off"
    on = planning.plan_for_run("llama-3.1-8b", "h200", data, {"method": "lora", "checkpointing": "unsloth"})
    assert on.checkpointing == "unsloth" and on.peak_reserved_gib < fresh.peak_reserved_gib
    assert (on.micro_batch, on.seq_len) == (fresh.micro_batch, fresh.seq_len)
    small = planning.plan_for_run("llama-3.1-8b", "rtx-4090", data, {"method": "lora"})
    assert small.checkpointing == "unsloth"
    with pytest.raises(ConfigError, match="checkpointing=off needs"):
        planning.plan_for_run("llama-3.1-8b", "rtx-4090", data, {"method": "lora", "checkpointing": "off"})


def test_a_plan_is_sharded_when_asked(tmp_path) -> None:
    """Two 48 GB cards: the plan is 70B QLoRA under DDP, each card holding the 4-bit model with Unsloth's
    checkpointing; `rigplan run --gpus 2 --parallelism fsdp` shards it instead, re-estimated."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": "word " * (300 + 7 * i)}) + "\n" for i in range(200)))
    base = planning.plan_for_run("llama-3.1-70b", "rtx-a6000", data, {}, num_gpus=2)
    assert (base.num_gpus, base.parallelism, base.checkpointing) == (2, "ddp", "unsloth")
    spread = planning.plan_for_run("llama-3.1-70b", "rtx-a6000", data, {"parallelism": "fsdp", "method": "lora"},
                                   num_gpus=2)
    assert (spread.num_gpus, spread.parallelism, spread.optimizer) == (2, "fsdp", "adamw_torch")


def test_the_optimizer_is_overridden_re_estimated_and_8_bit_refused_for_fsdp(tmp_path) -> None:
    """`rigplan run --optimizer`: the plan's optimizer replaced and its memory re-estimated; 8-bit AdamW cannot step
    FSDP's shards, so asking for it with a sharded plan is refused before anything loads."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": "word " * (300 + 7 * i)}) + "\n" for i in range(200)))
    base = planning.plan_for_run("llama-3.1-8b", "h200", data, {"method": "lora"})
    assert base.optimizer == "adamw_8bit"
    torch_adamw = planning.plan_for_run("llama-3.1-8b", "h200", data, {"method": "lora", "optimizer": "adamw_torch"})
    assert torch_adamw.optimizer == "adamw_torch" and torch_adamw.total_gib > base.total_gib
    ddp = planning.plan_for_run("llama-3.1-8b", "h200", data, {"method": "lora", "optimizer": "adamw_8bit"},
                                num_gpus=2)
    assert (ddp.parallelism, ddp.optimizer) == ("ddp", "adamw_8bit")  # asked for: kept, though DDP plans torch's
    with pytest.raises(ConfigError, match="--optimizer adamw_8bit cannot step FSDP"):
        planning.plan_for_run("llama-3.1-70b", "rtx-a6000", data,
                              {"parallelism": "fsdp", "method": "lora", "optimizer": "adamw_8bit"}, num_gpus=2)


def test_a_saved_ddp_plan_keeps_its_optimizer_when_its_method_changes(tmp_path) -> None:
    """`rigplan run plan.json --method qlora --resume`, the advice after running out of memory: the checkpoint's
    optimizer state is torch's AdamW's (a DDP LoRA plan's), so the QLoRA plan keeps it (a resume under another
    optimizer is refused: trainer/options.py RESUME_KEEPS); a change of parallelism takes that parallelism's."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": "word " * (300 + 7 * i)}) + "\n" for i in range(200)))
    ddp = planning.plan_for_run("llama-3.1-8b", "h200", data, {"method": "lora"}, num_gpus=2)
    assert (ddp.parallelism, ddp.optimizer) == ("ddp", "adamw_torch")
    assert planning.override(ddp, {"method": "qlora"}).optimizer == "adamw_torch"
    qlora = planning.plan_for_run("llama-3.1-8b", "h200", data, {"method": "qlora"}, num_gpus=2)
    assert (qlora.parallelism, qlora.optimizer) == ("ddp", "adamw_8bit")
    assert planning.override(qlora, {"parallelism": "fsdp"}).optimizer == "adamw_torch"


def test_a_plan_that_fits_only_at_a_shorter_sequence_is_refused_with_the_sequence_that_fits() -> None:
    """`rigplan plan` and `rigplan run` refuse a sequence nothing fits at, with the one the planner found (check says
    FITS ONLY AT A SHORTER SEQUENCE there), and that advice plans: Gemma-3-12B on a 12 GB RTX 3060."""
    import re

    with pytest.raises(ConfigError) as refused:
        planning.make_plan("gemma-3-12b", "rtx-3060")
    said = str(refused.value)
    found = re.search(r"nothing fits at seq 2048; qlora fits at seq (\d+) \([\d.]+ GiB\): pass --seq (\d+)", said)
    assert found and found[1] == found[2] and "\n" not in said
    plan = planning.make_plan("gemma-3-12b", "rtx-3060", seq_len=int(found[1]))
    assert plan.method == "qlora" and plan.seq_len == int(found[1])
