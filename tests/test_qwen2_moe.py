"""Qwen2-MoE (issue 17's shared-expert widths): the Qwen1.5-MoE-A2.7B row against its config.json and the published
counts, every parameter transformers 5.17's Qwen2MoeForCausalLM holds, what LoRA targets (attention and the shared
expert), the config checks, and a toy replica trained on CPU by rigplan's trainer. Memory and speed on a GPU are
not measured (profiles/known_issues.json says so under every plan)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from rigplan import planning
from rigplan.errors import UnknownModelError
from rigplan.estimator.memory import lora_params
from rigplan.profiles import catalog

# Qwen/Qwen1.5-MoE-A2.7B's config.json (https://huggingface.co/Qwen/Qwen1.5-MoE-A2.7B/blob/main/config.json) as a
# verbatim copy quotes it (https://huggingface.co/MaziyarPanahi/Qwen1.5-MoE-A2.7B-Wikihow/blob/main/config.json,
# "_name_or_path": "Qwen/Qwen1.5-MoE-A2.7B"; its use_cache aside).
CONFIG = {
    "architectures": ["Qwen2MoeForCausalLM"], "attention_dropout": 0.0, "decoder_sparse_step": 1,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 5632, "max_position_embeddings": 8192, "max_window_layers": 21, "model_type": "qwen2_moe",
    "moe_intermediate_size": 1408, "norm_topk_prob": False, "num_attention_heads": 16, "num_experts": 60,
    "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_key_value_heads": 16, "output_router_logits": False,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
    "shared_expert_intermediate_size": 5632, "sliding_window": 32768, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.40.0.dev0", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936,
}
SPEC = catalog.resolve_model("qwen1.5-moe-a2.7b")


def test_counts_match_the_published_total_and_active() -> None:
    """14.3B total, 2.7B activated: the 60 routed experts toward the total, 4 of them and the shared expert (and
    its gate) toward the active count."""
    assert SPEC.params_total == pytest.approx(14.3e9, rel=0.01)
    assert SPEC.params_active == pytest.approx(2.7e9, rel=0.01)
    h, layers = SPEC.hidden_size, SPEC.num_hidden_layers
    shared = 3 * h * 5632 + h  # gate/up/down_proj and shared_expert_gate
    routed_all, routed_4 = 60 * 3 * h * 1408, 4 * 3 * h * 1408
    assert SPEC.params_total - SPEC.params_active == layers * (routed_all - routed_4)
    without = dataclasses.replace(SPEC, shared_expert_intermediate_size=0)
    assert SPEC.layer_params(active=True) - without.layer_params(active=True) == shared
    assert SPEC.layer_params() - without.layer_params() == shared


def test_the_row_is_its_config_json() -> None:
    from_config = catalog.model_from_config(CONFIG, "qwen1.5-moe-a2.7b", SPEC.source)
    fields = [f.name for f in dataclasses.fields(catalog.ModelSpec)
              if f.name not in ("id", "aliases", "params_published", "params_active_published", "params_note")]
    assert {f: getattr(SPEC, f) for f in fields} == {f: getattr(from_config, f) for f in fields}
    assert (SPEC.experts, SPEC.num_experts_per_tok, SPEC.shared_expert_intermediate_size) == (60, 4, 5632)
    assert SPEC.attention_bias and SPEC.active_intermediate == 4 * 1408 + 5632
    # LoRA: attention and the shared expert's projections, named with their parent: a bare gate_proj is read by
    # Unsloth as every routed expert too (catalog.ModelSpec._shared_shapes)
    assert SPEC.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj", "shared_expert.gate_proj",
                                   "shared_expert.up_proj", "shared_expert.down_proj")
    assert lora_params(SPEC, 16) == 24 * 16 * (4 * (2048 + 2048) + 2 * (2048 + 5632) + (5632 + 2048))


def test_the_count_is_every_parameter_transformers_holds() -> None:
    """Qwen2MoeForCausalLM at full size on the meta device: its parameters are params_total exactly, and every
    LoRA target name is an nn.Linear of the attention or the shared expert, never of the routed experts."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from rigplan.calibration.replica import hf_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(SPEC))
    assert sum(p.numel() for p in model.parameters()) == SPEC.params_total
    # PEFT's match: the module's name, or its tail after a dot
    targeted = [n for n, m in model.named_modules() if any(n.endswith("." + t) for t in SPEC.target_modules)]
    assert targeted and all(isinstance(model.get_submodule(n), torch.nn.Linear) for n in targeted)
    assert all(".self_attn." in n or ".shared_expert." in n for n in targeted)
    layer = model.model.layers[0].mlp
    assert tuple(layer.experts.gate_up_proj.shape) == (60, 2 * 1408, 2048)  # fused: no module for LoRA to match


def test_peft_trains_exactly_the_adapters_the_estimate_counts() -> None:
    """PEFT on the plan's target_modules, one layer on the meta device: the trainable parameters are lora_params,
    and no name is one that Unsloth 2026.10.9 widens to the fused routed experts (a bare gate_proj, up_proj,
    down_proj or gate_up_proj: unsloth/models/_utils.py _MOE_BROAD_MLP_TARGETS), which trained 34.5M parameters
    where the plan counted 2.5M (bench/results/h200-issue17-qwen2moe/probe-qwen2moe-lora.log)."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from rigplan.calibration.replica import hf_config, reduced

    one = reduced(SPEC, 1)
    with torch.device("meta"):
        model = peft.get_peft_model(AutoModelForCausalLM.from_config(hf_config(one)),
                                    peft.LoraConfig(r=16, target_modules=list(one.target_modules)))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == lora_params(one, 16)
    assert not set(one.target_modules) & {"gate_proj", "up_proj", "down_proj", "gate_up_proj"}


@pytest.mark.parametrize("change,message", [
    ({"decoder_sparse_step": 0}, "decoder_sparse_step 0 must be a positive integer"),
    ({"mlp_only_layers": [24]}, "mlp_only_layers .* must list layer indices"),
    ({"num_experts": None}, "must give num_local_experts"),
])
def test_config_checks_describe_what_the_terms_cannot(change, message) -> None:
    config = {k: v for k, v in {**CONFIG, **change}.items() if v is not None}
    with pytest.raises(UnknownModelError, match=message):
        catalog.model_from_config(config, "bad", "config.json")


QWEN3 = {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 2048,
         "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32,
         "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936, "num_experts": 128, "num_experts_per_tok": 8}


@pytest.mark.parametrize("config", [
    {**CONFIG, "mlp_only_layers": [0, 5], "decoder_sparse_step": 2},
    {**QWEN3, "mlp_only_layers": [0, 1, 47]},
], ids=["qwen2_moe", "qwen3_moe"])
def test_dense_layers_among_the_experts_are_counted_as_transformers_builds_them(config) -> None:
    """Qwen-MoE's mlp_only_layers and decoder_sparse_step (issue 17's "dense layers"): the layers transformers 5.17
    builds with a dense MLP are the spec's, its parameters are params_total exactly (meta device, full size), LoRA's
    targets there are what the estimate counts (attention: the shared expert's targets are named with their parent,
    shared_expert.gate_proj ..., which a dense layer's mlp.gate_proj does not end with), and a reduced-depth replica
    keeps its first layers' kinds."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from rigplan.calibration.replica import hf_config, reduced

    spec = catalog.model_from_config(config, "with-dense", "config.json")
    step, only = config.get("decoder_sparse_step", 1), set(config["mlp_only_layers"])
    expected = [i for i in range(config["num_hidden_layers"]) if i in only or (i + 1) % step]
    assert list(spec.dense_layer_ids) == expected and spec.dense_layers == len(expected)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(spec))
    dense = [i for i, layer in enumerate(model.model.layers) if not hasattr(layer.mlp, "experts")]
    assert dense == expected
    assert sum(p.numel() for p in model.parameters()) == spec.params_total
    targeted = sum(m.in_features + m.out_features for n, m in model.named_modules()
                   if any(n.endswith("." + t) for t in spec.target_modules) and isinstance(m, torch.nn.Linear))
    assert lora_params(spec, 16) == 16 * targeted
    assert spec.params_active < spec.params_total
    shallow = reduced(spec, 6)
    assert shallow.dense_layers == sum(1 for i in expected if i < 6)
    with torch.device("meta"):
        small = AutoModelForCausalLM.from_config(hf_config(shallow))
    assert sum(p.numel() for p in small.parameters()) == shallow.params_total


def test_dense_layers_change_the_estimate_as_their_weights_do() -> None:
    """The same Qwen3-MoE with a quarter of its layers dense: fewer weights (a dense MLP is far smaller than 128
    experts), more FLOPs per token (6144 dense units against 8 x 768 routed), and memory follows the weights."""
    from rigplan import store
    from rigplan.estimator import memory, planner
    from rigplan.estimator.plan import Setup

    sparse = catalog.model_from_config(QWEN3, "all-sparse", "config.json")
    mixed = catalog.model_from_config({**QWEN3, "decoder_sparse_step": 4}, "mixed", "config.json")
    assert mixed.dense_layers == 36 and mixed.params_total < sparse.params_total
    assert memory.expert_params(mixed) == memory.expert_params(sparse) * 12 // 48
    setup = Setup("lora", 16, 1, 2048)
    gpu, coeffs = catalog.resolve_gpu("h200"), store.reference()[0]
    a, b = (planner.estimate(m, setup, gpu, coeffs) for m in (sparse, mixed))
    assert b.components_bytes["base_weights"] < a.components_bytes["base_weights"]
    assert b.components_bytes["base_weights"] == mixed.params_total * 2


def test_a_shared_expert_elsewhere_is_refused() -> None:
    """Qwen3-MoE's modeling code has no shared expert: a config that asks for one is not what its terms count."""
    qwen3 = {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 2048,
             "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
             "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936,
             "num_experts": 128, "num_experts_per_tok": 8, "shared_expert_intermediate_size": 1024}
    with pytest.raises(UnknownModelError, match="shared expert is not supported"):
        catalog.model_from_config(qwen3, "bad", "config.json")


def test_check_says_how_far_it_is_measured() -> None:
    d = planning.check("qwen1.5-moe-a2.7b", "rtx-4090")
    assert d["fits"] and any(w.startswith("measured: Qwen2-MoE") and "4- to 24-layer H200 runs" in w
                             for w in d["warnings_short"])


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("trl")
    from rigplan.calibration.replica import build_replica, toy

    spec = dataclasses.replace(toy(SPEC), num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                               shared_expert_intermediate_size=64)
    d = tmp_path_factory.mktemp("tiny-qwen1.5-moe")
    build_replica(spec, d, dtype="float32", init_std=0.2)
    return d


def test_rigplan_trains_a_qwen2_moe_replica_on_cpu(toy_dir, tmp_path) -> None:
    """transformers + PEFT, 16-bit LoRA: PEFT trains exactly the parameters the estimate counts (attention and the
    shared expert), the loss falls, and the adapter is written."""
    from rigplan.trainer.engine import load
    from rigplan.trainer.run import RunOptions, train

    from .test_gpt_oss import toy_lora_run

    spec, plan, data = toy_lora_run(toy_dir, tmp_path)
    assert (spec.model_type, spec.experts, spec.shared_expert_intermediate_size) == ("qwen2_moe", 8, 64)

    model, _ = load(plan)
    trained = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert sum(trained.values()) == lora_params(spec, 8) > 0
    assert any(".shared_expert." in n for n in trained) and not any(".experts." in n for n in trained)
    del model

    s = train(plan, RunOptions(data=data, out_dir=tmp_path / "out"))
    assert s["status"] == "done" and math.isfinite(s["first_loss"]) and s["final_loss"] < s["first_loss"]
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").exists()


def test_the_recorded_runs_trained_every_experts_adapters_as_unsloth_widened_them() -> None:
    """Qwen1.5-MoE at 4 layers on the H200 (bench/results/h200-issue17-qwen2moe/, predictions/qwen2moe-h200.json):
    the probes passed bare gate/up/down_proj, and Unsloth added adapters to the fused routed experts of every layer
    (its log says so): trainable parameters were the plan's plus 60 experts' rank-16 adapters on gate_up_proj and
    down_proj, exactly. Those rows measured a model the plan did not describe (memory 8.6-17% over the estimate,
    speed 22-52% under); the targets now name the shared expert's modules (test above)."""
    from rigplan.calibration.replica import reduced

    folder = Path(__file__).parents[1] / "bench" / "results" / "h200-issue17-qwen2moe"
    rows = [json.loads(x) for f in sorted(folder.glob("probe-*.jsonl")) for x in f.read_text().splitlines() if x]
    assert len(rows) == 6 and all(r["provenance"]["gpu"] == "NVIDIA H200" and not r["err"] for r in rows)
    four = reduced(SPEC, 4)
    experts = 4 * 60 * 16 * ((2048 + 2 * 1408) + (1408 + 2048))
    assert all(r["trainable_params"] == lora_params(four, 16) + experts for r in rows)
    log = (folder / "probe-qwen2moe-lora.log").read_text()
    assert "Enabling LoRA on MoE parameters: ['mlp.experts.gate_up_proj', 'mlp.experts.down_proj']" in log


def test_the_runs_as_planned_train_the_shared_experts_adapters_and_no_routed_ones() -> None:
    """Qwen1.5-MoE at 4 layers on the H200 with the shared expert's modules named (bench/results/
    h200-issue17-heldout5/, predictions/qwen2moe-shared-h200.json written before): every row trained exactly the
    plan's adapters, and Unsloth added none to the routed experts. Their memory and speed are checked with the other
    families' (tests/test_issue17_runs.py)."""
    from rigplan.calibration.replica import reduced

    folder = Path(__file__).parents[1] / "bench" / "results" / "h200-issue17-heldout5"
    rows = [json.loads(x) for x in (folder / "probe-qwen2moe.jsonl").read_text().splitlines() if x]
    assert len(rows) == 6 and all(r["provenance"]["gpu"] == "NVIDIA H200" and not r["err"] for r in rows)
    assert all(r["trainable_params"] == lora_params(reduced(SPEC, 4), 16) == 2_523_136 for r in rows)
    assert "Enabling LoRA on MoE parameters" not in (folder / "probe-qwen2moe.log").read_text()
