"""GPU memory of LoRA/QLoRA fine-tuning, one function per term, in bytes; components_bytes() adds them up.

Pure: specs and integers in, bytes out. Shapes come from profiles (ModelSpec); fitted constants from
Coefficients (calibration/fit.py fits them on real H100 runs, see profiles/calibrations/).
"""

from __future__ import annotations

from rigplan.estimator.plan import Coefficients, Setup
from rigplan.profiles.catalog import ModelSpec

BF16_BYTES = 2
FP32_BYTES = 4
# bitsandbytes NF4 with double quantization (QLoRA, Dettmers et al. 2023, sec. 2): 4-bit weights, one
# 8-bit absmax per 64 weights, one fp32 second-level absmax per 256 of those (bnb blocksize 64 / 256).
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + FP32_BYTES / (64 * 256)
# bitsandbytes AdamW8bit: two 8-bit moments per parameter plus one fp32 absmax per 256-value block
# (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization", sec. 2; bnb blocksize 256).
ADAM8BIT_BYTES_PER_PARAM = 2 * (1 + FP32_BYTES / 256)
# torch AdamW: exp_avg and exp_avg_sq in the parameter's dtype, fp32 for PEFT's adapters.
ADAM32_BYTES_PER_PARAM = 2 * FP32_BYTES


def lora_params(model: ModelSpec, rank: int) -> int:
    # LoRA adds A (r x in) and B (out x r) to every targeted projection (Hu et al. 2021, sec. 4.1).
    return model.num_hidden_layers * sum(rank * (n_in + n_out) for _, n_in, n_out in model.linear_shapes())


def base_weights_bytes(model: ModelSpec, method: str) -> int:
    """Frozen weights: all 16-bit for LoRA; for QLoRA the decoder projections in NF4, the rest 16-bit."""
    if method == "lora":
        return model.params_total * BF16_BYTES
    # bitsandbytes quantizes nn.Linear layers inside the decoder; embeddings, lm_head (kept out by
    # transformers' llm_int8_skip_modules default), norms and biases stay bf16.
    linear = model.num_hidden_layers * sum(n_in * n_out for _, n_in, n_out in model.linear_shapes())
    return int(linear * NF4_BYTES_PER_PARAM) + (model.params_total - linear) * BF16_BYTES


def lora_weights_bytes(model: ModelSpec, rank: int) -> int:
    # PEFT keeps adapter weights in fp32 (autocast_adapter_dtype=True); the H100 runs' after-load memory
    # matches fp32 adapters to within 0.04 GiB for 8B models at ranks 16-128.
    return lora_params(model, rank) * FP32_BYTES


def lora_grads_bytes(model: ModelSpec, rank: int) -> int:
    # One fp32 gradient per trainable parameter, alive from backward to the optimizer step.
    return lora_params(model, rank) * FP32_BYTES


def optimizer_state_bytes(model: ModelSpec, rank: int, optimizer: str) -> int:
    per_param = ADAM8BIT_BYTES_PER_PARAM if optimizer == "adamw_8bit" else ADAM32_BYTES_PER_PARAM
    return int(lora_params(model, rank) * per_param)


def checkpoint_bytes(model: ModelSpec, setup: Setup, coeffs: Coefficients) -> int:
    """Activations kept for backward: each layer's input with checkpointing, all of them without."""
    layers, h, i = model.num_hidden_layers, model.hidden_size, model.intermediate_size
    if setup.checkpointing == "off":
        # Without checkpointing every layer keeps its attention and MLP activations (Korthikanti et al.
        # 2022, sec. 4.1: a multiple of hidden and MLP width per token per layer).
        return int(setup.tokens * layers * (coeffs.nockpt_per_hidden * h + coeffs.nockpt_per_intermediate * i))
    # Checkpointing keeps one hidden-state tensor per layer (Chen et al. 2016, sec. 3).
    return int(setup.tokens * layers * coeffs.ckpt_per_hidden * h)


def recompute_transient_bytes(model: ModelSpec, setup: Setup, coeffs: Coefficients) -> int:
    """One layer's activations while it is recomputed and backpropagated (checkpointing on only)."""
    if setup.checkpointing == "off":
        return 0
    h, i = model.hidden_size, model.intermediate_size
    return int(setup.tokens * (coeffs.transient_per_hidden * h + coeffs.transient_per_intermediate * i))


def logits_bytes(model: ModelSpec, setup: Setup, coeffs: Coefficients) -> int:
    # lm_head output and its gradient, vocab-wide per token: large for 128k-256k vocabularies.
    return int(setup.tokens * model.vocab_size * coeffs.logits_per_vocab)


def components_bytes(model: ModelSpec, setup: Setup, coeffs: Coefficients) -> dict[str, int]:
    """Every memory term of one configuration; the one place they are added up."""
    parts = {
        "base_weights": base_weights_bytes(model, setup.method),
        "lora_weights": lora_weights_bytes(model, setup.rank),
        "lora_grads": lora_grads_bytes(model, setup.rank),
        "optimizer_state": optimizer_state_bytes(model, setup.rank, setup.optimizer),
        "loaded_overhead": int(coeffs.fixed_bytes),
        "step_overhead": int(coeffs.step_fixed_bytes),
        "activations_kept": checkpoint_bytes(model, setup, coeffs),
        "recompute_transient": recompute_transient_bytes(model, setup, coeffs),
        "logits_loss": logits_bytes(model, setup, coeffs),
    }
    parts["allocator_slack"] = int(step_bytes(parts) * slack_ratio(setup, coeffs))
    parts["cuda_context"] = int(coeffs.context_bytes)
    return parts


# Allocated during a step and freed after it; the rest is loaded once (weights and adapters).
STEP_TERMS = ("lora_grads", "optimizer_state", "step_overhead", "activations_kept", "recompute_transient",
              "logits_loss")


def step_bytes(parts: dict[str, int]) -> int:
    return sum(parts[k] for k in STEP_TERMS)


def slack_ratio(setup: Setup, coeffs: Coefficients) -> float:
    """Slack per step byte. Fitted on the recorded H100 runs: 0.066 with checkpointing, 0.098 for QLoRA, 0.008
    without checkpointing; a share of all allocated bytes instead missed 3B-8B QLoRA at 16-32k tokens by 6-7%."""
    if setup.checkpointing == "off":
        return coeffs.nockpt_slack_ratio
    return coeffs.slack_ratio + (coeffs.qlora_slack_ratio if setup.method == "qlora" else 0.0)


ALLOCATED_TERMS = ("base_weights", "lora_weights", "lora_grads", "optimizer_state", "loaded_overhead",
                   "step_overhead", "activations_kept", "recompute_transient", "logits_loss")


def peak_allocated_bytes(parts: dict[str, int]) -> int:
    """torch.cuda.max_memory_allocated(): tensors alive at the step's peak."""
    return sum(parts[k] for k in ALLOCATED_TERMS)


def peak_reserved_bytes(parts: dict[str, int]) -> int:
    """torch.cuda.max_memory_reserved(): allocated plus the caching allocator's slack."""
    return peak_allocated_bytes(parts) + parts["allocator_slack"]


def total_bytes(parts: dict[str, int]) -> int:
    """What nvidia-smi shows: reserved plus the CUDA context and library workspaces."""
    return peak_reserved_bytes(parts) + parts["cuda_context"]
