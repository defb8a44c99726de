"""gpt-oss (issue 17): the gpt-oss-20b and gpt-oss-120b rows against their config.json and OpenAI's published
parameter counts, every parameter transformers 5.17's GptOssForCausalLM holds, the config checks, a toy-width
replica trained on CPU by rigplan's trainer (transformers + PEFT), and `rigplan check` on a 24 GB card."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from rigplan import planning
from rigplan.cli import main
from rigplan.errors import UnknownModelError
from rigplan.estimator.memory import lora_params
from rigplan.profiles import catalog

IDS = ["gpt-oss-20b", "gpt-oss-120b"]

# openai/gpt-oss-20b's config.json (https://huggingface.co/openai/gpt-oss-20b/blob/main/config.json) as the
# verbatim copies quote it: github jihengzhang/jihz-gpt-oss-20b gpt-oss-20b/config.json (7ec8980, without the
# quantization_config) and EchoCog/gpt-oss-20b config.json (52971a1, whose quant_method reads "gptq"); the mxfp4
# quantization_config as tinygrad's test of the model quotes the Hub file.
CONFIG_20B = {
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0, "eos_token_id": 200002,
    "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880, "initial_context_length": 4096,
    "initializer_range": 0.02, "intermediate_size": 2880, "layer_types": ["sliding_attention", "full_attention"] * 12,
    "max_position_embeddings": 131072, "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4,
    "num_hidden_layers": 24, "num_key_value_heads": 8, "num_local_experts": 32, "output_router_logits": False,
    "pad_token_id": 199999,
    "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                       "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                     "rope_type": "yarn", "truncate": False},
    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
    "tie_word_embeddings": False, "transformers_version": "4.55.0.dev0", "use_cache": True, "vocab_size": 201088,
}
# openai/gpt-oss-120b's differs in depth and experts only (github foxl-ai/kiln tests/test_gpt_oss.py, a04d1fa,
# quoting https://huggingface.co/openai/gpt-oss-120b/raw/main/config.json).
CONFIG_120B = {**CONFIG_20B, "num_hidden_layers": 36, "num_local_experts": 128,
               "layer_types": ["sliding_attention", "full_attention"] * 18}
CONFIGS = {"gpt-oss-20b": CONFIG_20B, "gpt-oss-120b": CONFIG_120B}

# OpenAI's model card (arXiv 2508.10925), Table 1, per component: attention, MLP (experts and router), embedding +
# unembedding; totals and active counts are the rows' params_published and params_active_published.
CARD_COMPONENTS = {"gpt-oss-20b": (0.64e9, 19.12e9, 1.16e9), "gpt-oss-120b": (0.96e9, 114.71e9, 1.16e9)}


@pytest.mark.parametrize("model_id", IDS)
def test_counts_match_the_published_total_and_active(model_id) -> None:
    """Every expert toward the total, the 4 routed ones toward the active count, which leaves the input embedding
    out as the model card does ("Unembedding parameters are counted towards active, but not embeddings")."""
    m = catalog.resolve_model(model_id)
    assert m.params_as_published == pytest.approx(m.params_published, rel=0.01)
    assert m.params_active_as_published == pytest.approx(m.params_active_published, rel=0.01)
    assert m.params_active - m.params_active_as_published == m.vocab_size * m.hidden_size
    assert m.params_active < m.params_total / 3
    attention, mlp, embeddings = CARD_COMPONENTS[model_id]
    h, layers = m.hidden_size, m.num_hidden_layers
    attn = layers * (sum(i * o for _, i, o in m._attention_shapes())
                     + (m.num_attention_heads + 2 * m.num_key_value_heads) * m.head_dim + h + m.num_attention_heads)
    assert attn == pytest.approx(attention, rel=0.01)
    assert layers * m.layer_params() - attn - layers * 2 * h == pytest.approx(mlp, rel=0.001)
    assert m.embedding_params + m.lm_head_params == pytest.approx(embeddings, rel=0.01)


@pytest.mark.parametrize("model_id", IDS)
def test_the_row_is_its_config_json(model_id) -> None:
    """The profile row holds the config.json's facts, and reading that config.json gives the same spec (MXFP4
    quantization_config and all)."""
    row = catalog.resolve_model(model_id)
    from_config = catalog.model_from_config(CONFIGS[model_id], model_id, row.source)
    fields = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings", "max_position_embeddings",
              "attention_bias", "architectures", "rope_theta", "sliding_window", "layer_types", "num_local_experts",
              "num_experts_per_tok")
    assert {f: getattr(row, f) for f in fields} == {f: getattr(from_config, f) for f in fields}
    assert from_config.params_total == row.params_total
    assert (row.experts, row.num_experts_per_tok, row.sliding_window, row.tie_word_embeddings) == (
        CONFIGS[model_id]["num_local_experts"], 4, 128, False)
    assert row.layer_types == ("sliding_attention", "full_attention") * (row.num_hidden_layers // 2)
    assert row.hub_id == f"openai/{model_id}"
    assert row.source == f"https://huggingface.co/openai/{model_id}/blob/main/config.json"
    assert row.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")  # attention only, as the other MoE rows


@pytest.mark.parametrize("model_id", IDS)
def test_the_count_is_every_parameter_transformers_holds(model_id) -> None:
    """GptOssForCausalLM at full size on the meta device (no memory): its parameters, sinks, router and expert
    biases included, are params_total exactly, and the LoRA targets are nn.Linear modules of its attention."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from rigplan.calibration.replica import hf_config

    spec = catalog.resolve_model(model_id)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(spec))
    assert sum(p.numel() for p in model.parameters()) == spec.params_total
    layer0 = {n.removeprefix("model.layers.0."): tuple(p.shape) for n, p in model.named_parameters()
              if n.startswith("model.layers.0.")}
    h, i, e = spec.hidden_size, spec.intermediate_size, spec.experts
    assert layer0["self_attn.sinks"] == (spec.num_attention_heads,)
    assert layer0["self_attn.o_proj.bias"] == (h,)
    assert (layer0["mlp.router.weight"], layer0["mlp.router.bias"]) == ((e, h), (e,))
    assert (layer0["mlp.experts.gate_up_proj"], layer0["mlp.experts.gate_up_proj_bias"]) == ((e, h, 2 * i), (e, 2 * i))
    assert (layer0["mlp.experts.down_proj"], layer0["mlp.experts.down_proj_bias"]) == ((e, i, h), (e, h))
    attention = model.model.layers[0].self_attn
    for name in spec.target_modules:
        assert isinstance(getattr(attention, name), torch.nn.Linear), name
    assert [layer.self_attn.sliding_window for layer in model.model.layers[:2]] == [128, None]


@pytest.mark.parametrize("change,message", [
    ({"num_local_experts": None}, "must give num_local_experts"),
    ({"num_experts_per_tok": 64}, "exceeds the 32 experts"),
    ({"layer_types": ["sliding_attention", "chunked_attention"] * 12}, "layer_types"),
    ({"layer_types": ["sliding_attention", "full_attention"] * 6}, "layer_types gives 12 layers"),
    ({"sliding_window": None}, "positive sliding_window"),
])
def test_config_checks_describe_what_the_terms_cannot(change, message) -> None:
    config = {k: v for k, v in {**CONFIG_20B, **change}.items() if v is not None}
    with pytest.raises(UnknownModelError, match=message):
        catalog.model_from_config(config, "bad", "config.json")


def test_a_config_without_layer_types_alternates_as_transformers_does() -> None:
    """GptOssConfig.__post_init__: sliding_attention on even layers, full_attention on odd ones; window 128."""
    config = {k: v for k, v in CONFIG_20B.items() if k not in ("layer_types", "sliding_window")}
    spec = catalog.model_from_config(config, "x", "config.json")
    assert spec.layer_types == catalog.resolve_model("gpt-oss-20b").layer_types and spec.sliding_window == 128


def test_rigplan_check_on_a_24gb_card_trains_it_with_qlora_only() -> None:
    """16-bit LoRA holds every expert in bf16: 20.9B parameters are ~39 GiB, over an RTX 4090's 21.5 usable. Unsloth's
    QLoRA holds the experts in 4-bit (as it does Mixtral's and Qwen3-MoE's, measured on the H200), so QLoRA fits;
    an H100 trains it with 16-bit LoRA."""
    r = CliRunner().invoke(main, ["check", "gpt-oss-20b", "--gpu", "rtx-4090", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["model"] == "gpt-oss-20b" and out["fits"] is True and out["recommended"]["method"] == "qlora"
    assert "16-bit LoRA needs" in out["reason"] and "GiB" in out["reason"]
    h100 = planning.check("gpt-oss-20b", "h100-sxm")
    assert h100["fits"] and h100["recommended"]["method"] == "lora"


# The CPU run: rigplan's trainer on a toy-width replica (tests/test_run.py's approach). The window is cut to 8 so
# that the 64-token sequences reach past it in the sliding layers.
TOY_INIT_STD = 0.2


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("trl")
    from rigplan.calibration.replica import build_replica, toy

    spec = dataclasses.replace(toy(catalog.resolve_model("gpt-oss-20b")), sliding_window=8)
    d = tmp_path_factory.mktemp("tiny-gpt-oss-20b")
    build_replica(spec, d, dtype="float32", init_std=TOY_INIT_STD)
    return d


def test_the_replica_is_the_toy_spec(toy_dir) -> None:
    """The replica's saved config.json reads back as gpt-oss: experts, routed experts, alternating layers, the
    window, and the parameter count."""
    from rigplan.calibration.replica import toy

    spec = catalog.resolve_model(str(toy_dir))
    want = toy(catalog.resolve_model("gpt-oss-20b"))
    assert (spec.model_type, spec.experts, spec.num_experts_per_tok, spec.layer_types, spec.sliding_window) == (
        "gpt_oss", 32, 4, ("sliding_attention", "full_attention"), 8)
    assert spec.params_total == want.params_total


def toy_lora_run(toy_dir: Path, tmp_path: Path) -> tuple[catalog.ModelSpec, Any, Path]:
    """A toy replica's spec, a 16-bit LoRA plan for it on CPU (transformers + PEFT, rank 8, 8 x 64, two epochs)
    and 64 examples of counting words to learn: what the mixture-of-experts families' CPU runs train."""
    from rigplan.estimator.plan import Plan

    spec = catalog.resolve_model(str(toy_dir))
    rng = random.Random(0)
    data = tmp_path / "train.jsonl"
    rows = []
    for _ in range(64):
        a = rng.randrange(40)
        rows.append({"instruction": f"w{a} w{a + 1}", "output": " ".join(f"w{a + k}" for k in range(2, 10))})
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    plan = Plan(model=toy_dir.name, model_path=str(toy_dir), gpu="cpu", method="lora", rank=8, micro_batch=8,
                grad_accum=1, seq_len=64, target_modules=spec.target_modules, optimizer="adamw_torch",
                learning_rate=1e-2, epochs=2.0, engine="transformers", batching="padded")
    return spec, plan, data


def test_rigplan_trains_a_gpt_oss_replica_on_cpu(toy_dir, tmp_path) -> None:
    """transformers + PEFT, 16-bit LoRA on q/k/v/o: the loss is finite and falls, the adapter is written, and PEFT
    trains exactly the parameters the estimate counts (lora_params)."""
    from rigplan.trainer.engine import load
    from rigplan.trainer.run import RunOptions, train

    spec, plan, data = toy_lora_run(toy_dir, tmp_path)

    model, _ = load(plan)
    trained = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert sum(trained.values()) == lora_params(spec, 8) > 0
    assert all(".self_attn." in n and "lora_" in n for n in trained)  # no expert, router or sink trains
    del model

    s = train(plan, RunOptions(data=data, out_dir=tmp_path / "out"))
    assert s["status"] == "done" and s["global_step"] == 16
    assert math.isfinite(s["first_loss"]) and math.isfinite(s["final_loss"])
    assert s["final_loss"] < s["first_loss"], (s["first_loss"], s["final_loss"])
    adapter = tmp_path / "out" / "adapter"
    assert (adapter / "adapter_model.safetensors").exists()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 8 and set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_gpt_oss_plans_padded_micro_batches_only(tmp_path) -> None:
    """Unsloth refuses examples back to back for gpt-oss (unsloth/trainer.py PADDING_FREE_BLOCKLIST): its plans
    are padded, even for data whose lengths would make packing faster, and asking for packed is refused."""
    import json

    from rigplan import planning
    from rigplan.errors import ConfigError

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": "word " * (5 if i % 10 else 900)}) + "\n" for i in range(300)))
    gpt = planning.make_plan("gpt-oss-20b", "h200", data_file=data)
    assert planning.batchings_for(catalog.resolve_model("gpt-oss-20b")) == ("padded",)
    assert gpt.batching == "padded"
    assert planning.batchings_for(catalog.resolve_model("llama-3.1-8b")) == ("padded", "packed")
    assert planning.make_plan("llama-3.1-8b", "h200", data_file=data).batching == "packed"  # what this data favours
    with pytest.raises(ConfigError, match="padded micro-batches only"):
        planning.plan_for_run("gpt-oss-20b", "h200", data, {"batching": "packed"})


def test_sliding_window_layers_attend_over_their_window_only() -> None:
    """gpt-oss alternates full layers and 128-token windows (layer_types): at 8,192 tokens its attention costs
    about half of what every layer attending causally would; models without layer_types are unchanged."""
    from rigplan.estimator import speed

    gpt = catalog.resolve_model("gpt-oss-20b")
    full = 8192 * speed.CAUSAL_FRACTION
    assert speed.attended_keys(gpt, 8192) == pytest.approx(12 * full + 12 * (128 - 128 * 128 / (2 * 8192)))
    assert speed.attended_keys(gpt, 64) == pytest.approx(24 * 64 * speed.CAUSAL_FRACTION)  # inside the window
    llama = catalog.resolve_model("llama-3.1-8b")
    assert speed.attended_keys(llama, 8192) == 32 * full


def test_a_reduced_depth_copy_keeps_its_first_layers_attention_kinds() -> None:
    """The 4-layer replica the probes build is two sliding and two full layers, and its attention is counted
    for those four, not for the full model's 24."""
    from rigplan.calibration.replica import reduced
    from rigplan.estimator import speed

    four = reduced(catalog.resolve_model("gpt-oss-20b"), 4)
    assert four.layer_types == ("sliding_attention", "full_attention") * 2
    assert speed.attended_keys(four, 8192) == pytest.approx(
        speed.attended_keys(catalog.resolve_model("gpt-oss-20b"), 8192) * 4 / 24)


def test_gpt_oss_qlora_from_fused_experts_is_refused_before_loading_on_gpus_without_bf16(tmp_path) -> None:
    """Unsloth 2026.10.9 refused a probe's QLoRA of a local gpt-oss replica (experts fused, no quantization_config)
    loaded in float16, as on a T4 or V100 (bench/results/h200-no-bf16/failed-gptoss.txt). `rigplan run` says so in
    one line before the tokenizer, data and weights load, and only there: not with bf16, not for 16-bit LoRA, not
    for a bitsandbytes 4-bit or MXFP4 copy, not for a hub id (Unsloth maps openai/gpt-oss-20b to its 4-bit copy
    itself)."""
    from rigplan.trainer.engine import float16_refusal

    recorded = (Path(__file__).parents[1] / "bench/results/h200-no-bf16/failed-gptoss.txt").read_text()
    assert "refuse_gpt_oss_fused_4bit_float16" in recorded and "gpt-oss-20b@4:qlora" in recorded

    def refused(config: dict, method: str = "qlora", bf16: bool = False, local: bool = True) -> str | None:
        (tmp_path / "config.json").write_text(json.dumps(config))
        return float16_refusal(str(tmp_path), local, method, bf16)

    fused = {"model_type": "gpt_oss"}
    said = refused(fused)
    assert said and "unsloth/gpt-oss-20b-unsloth-bnb-4bit" in said and "\n" not in said
    assert refused(fused, bf16=True) is None and refused(fused, method="lora") is None
    assert refused(fused, local=False) is None
    for quant in ({"quant_method": "bitsandbytes", "load_in_4bit": True}, {"quant_method": "mxfp4"}):
        assert refused({**fused, "quantization_config": quant}) is None
    assert refused({"model_type": "llama"}) is None
