"""Training speed: FLOPs per token from the architecture, over the GPU's dense 16-bit rate times a fitted
model-FLOPs utilisation, plus fitted per-step overheads. Pure: no I/O, no torch.
"""

from __future__ import annotations

import dataclasses

from rigplan.estimator.memory import lora_params
from rigplan.estimator.plan import Coefficients, ExampleLengths, Setup
from rigplan.profiles.catalog import GpuSpec, ModelSpec

# A matmul of a token through a weight matrix costs 2 FLOPs per weight (multiply + add).
FLOPS_PER_MAC = 2
# A causal mask halves the attention score and value work (FlashAttention computes only the lower triangle).
CAUSAL_FRACTION = 0.5


def matmul_flops_per_token(model: ModelSpec, setup: Setup) -> float:
    """Training FLOPs per token in the weight matmuls, LoRA on a frozen base (Kaplan et al. 2020, sec. 2.1,
    adapted): full fine-tuning costs 6N per token (forward 2N, backward 4N for input and weight gradients).
    With the base frozen its weight gradients are skipped, so backward is 2N; checkpointing recomputes each
    layer's forward (another 2N over the decoder, not the lm_head). Adapters cost 6 x their parameters."""
    decoder = model.num_hidden_layers * sum(n_in * n_out for _, n_in, n_out in model.linear_shapes())
    head = model.vocab_size * model.hidden_size
    return FLOPS_PER_MAC * (passes(setup) * decoder + 2 * head) + 3 * FLOPS_PER_MAC * lora_params(model, setup.rank)


def attention_flops_per_token(model: ModelSpec, setup: Setup) -> float:
    """Attention's sequence-dependent FLOPs per token: QK^T and AV, 2 x 2 x seq x heads x head_dim per layer
    in forward, causal-halved; backward twice that, and once more when recomputed."""
    fwd = 2 * FLOPS_PER_MAC * setup.seq_len * model.num_attention_heads * model.head_dim * model.num_hidden_layers
    return fwd * CAUSAL_FRACTION * (1 + 2 + (passes(setup) - 2))


def flops_per_token(model: ModelSpec, setup: Setup) -> float:
    """All training FLOPs per token: the matmuls and attention."""
    return matmul_flops_per_token(model, setup) + attention_flops_per_token(model, setup)


# Below this head size attention's softmax, not its matmuls, sets its pace: an H100 SXM does 989 TFLOP/s of
# 16-bit matmul but 3.9 TFLOP/s of exponentials (Shah et al. 2024, FlashAttention-3, sec. 3.1), and a score
# costs 2 x head_dim matmul FLOPs but one exp whatever the head size. Fitted on our H100 runs: Llama-3.2-1B
# (head_dim 64) ran its attention at half the FLOP rate of the head_dim-128 models (a factor of 2 took the
# worst error of the GPU line fitted on the runs of >= 8192 tokens from 17.7% to 12.9%; 1.5 or 2.5 did worse).
SOFTMAX_BOUND_HEAD_DIM = 128


def timed_flops_per_token(model: ModelSpec, setup: Setup) -> float:
    """FLOPs per token as the GPU's time sees them: attention's count scaled up where its softmax is the
    bottleneck (heads smaller than SOFTMAX_BOUND_HEAD_DIM)."""
    softmax = max(1.0, SOFTMAX_BOUND_HEAD_DIM / model.head_dim)
    return matmul_flops_per_token(model, setup) + softmax * attention_flops_per_token(model, setup)


def passes(setup: Setup) -> int:
    """Passes over the decoder per micro-batch: forward, backward, and the recompute when checkpointing."""
    return 3 if setup.checkpointing == "unsloth" else 2


def elementwise_units(model: ModelSpec, setup: Setup) -> float:
    """Token-layer-units touched by memory-bound ops in all passes: bytes scale with hidden + MLP width."""
    return passes(setup) * setup.tokens * model.num_hidden_layers * (model.hidden_size + model.intermediate_size)


def quantized_weights(model: ModelSpec, setup: Setup) -> float:
    """4-bit weights dequantized every micro-batch (QLoRA only): the decoder's projections."""
    if setup.method != "qlora":
        return 0.0
    return model.num_hidden_layers * sum(n_in * n_out for _, n_in, n_out in model.linear_shapes())


def micro_batch_s(model: ModelSpec, setup: Setup, gpu: GpuSpec, coeffs: Coefficients) -> float:
    """Seconds for one micro-batch: GPU time (matmuls at the fitted share of peak FLOP/s plus memory-bound
    work at the GPU's bandwidth, a roofline-style sum; Williams et al. 2009), but never less than the host's
    floor, which overlaps with GPU work: the H100 runs at 1 x 2048 tokens sit on that floor, larger ones
    on the GPU line."""
    return max(gpu_s(model, setup, gpu, coeffs), host_floor_s(model, setup, coeffs))


def gpu_s(model: ModelSpec, setup: Setup, gpu: GpuSpec, coeffs: Coefficients) -> float:
    compute = timed_flops_per_token(model, setup) * setup.tokens / (gpu.tensor_tflops * 1e12 * coeffs.mfu)
    moved = (coeffs.elementwise_bytes * elementwise_units(model, setup)
             + coeffs.dequant_bytes * quantized_weights(model, setup))
    return compute + moved / (gpu.bandwidth_gb_s * 1e9)


def host_floor_s(model: ModelSpec, setup: Setup, coeffs: Coefficients) -> float:
    """The host's floor on a micro-batch: a fixed cost (optimizer step, Python) plus a cost per layer, larger
    with Unsloth's checkpointing (its offload round trip: ~8-11 ms a layer on the H100 hosts we measured,
    for 1B, 3B and 8B alike) than without (~6 ms: 8B at 1 x 2001, 1B at 4 x 2048), and larger for QLoRA
    (dequantize launches: +3-5 ms a layer in `rigplan calibrate`'s 1 x 512 probes). It is the host's CPU,
    not the GPU: the same 8B 1 x 2048 step took 0.27 s on one H100 machine and 0.45 s on another."""
    per_layer = coeffs.layer_overhead_s if setup.checkpointing == "unsloth" else coeffs.nockpt_layer_overhead_s
    if setup.method == "qlora":
        per_layer += coeffs.qlora_layer_overhead_s
    return coeffs.step_overhead_s + per_layer * model.num_hidden_layers + coeffs.offload_s_per_gb * offload_gb(model, setup)


# How far a host-bound micro-batch's time strays: full-depth 7-8B 1 x 2048 steps on six H100 machines took
# 0.23-0.45 s (bench/results/calibrate-h100); the shipped reference, which never saw those runs, missed them by
# -14% to +46% (GPU-bound shapes of the same calls: within 4.3%), and each machine's own calibration by up to
# 38%. The host's CPU varies between machines and over minutes.
HOST_BOUND_ERROR = 0.50


def host_bound(model: ModelSpec, setup: Setup, gpu: GpuSpec, coeffs: Coefficients) -> bool:
    """Whether the host's floor, not the GPU, sets this micro-batch's time (its speed is then less certain)."""
    return host_floor_s(model, setup, coeffs) > gpu_s(model, setup, gpu, coeffs)


def offload_gb(model: ModelSpec, setup: Setup) -> float:
    """Checkpoints Unsloth moves to CPU memory per micro-batch: each layer's bf16 input (2 bytes per hidden
    unit per token), unsloth_zoo's offloaded gradient checkpointing; none without checkpointing."""
    if setup.checkpointing != "unsloth":
        return 0.0
    return 2 * setup.tokens * model.hidden_size * model.num_hidden_layers / 1e9


def step_s(model: ModelSpec, setup: Setup, gpu: GpuSpec, coeffs: Coefficients) -> float:
    """Seconds per optimizer step: grad_accum micro-batches."""
    return setup.grad_accum * micro_batch_s(model, setup, gpu, coeffs)


def tokens_per_s(model: ModelSpec, setup: Setup, gpu: GpuSpec, coeffs: Coefficients) -> float:
    return setup.tokens / micro_batch_s(model, setup, gpu, coeffs)


# Real data: examples of varied length, which the fixed-shape probes the coefficients are fitted on do not
# have. The trainer pads each micro-batch to its longest example, or puts the examples back to back
# (padding-free). Padding costs GPU time on tokens that do not train, and padded micro-batches of changing
# shape ran slower than fixed shapes even so. rigplan's trainer on Llama-3.1-8B, no checkpointing, examples of
# 257-2001 tokens, ran 0.73-0.97 of the fixed-shape estimate for its padded micro-batches: LoRA at
# micro-batch 2 0.81 and 0.73 (two machines), QLoRA 0.83, QLoRA at micro-batch 4 0.97
# (bench/results/h100-tp{4,5}-own-*.json, h100-tp6-qlora-mb4-padded.json). The middle of that range, in ratio,
# leaves each within 14%; bench/data_speed.py shows every recorded run.
PADDED_SPEED = 0.83
# Padding-free micro-batches run uncompiled on Unsloth, which compiles each decoder block only for padded
# ones (unsloth/models/_block_compile.py:923-934, `packed_seq_lengths`): 0.59-0.64 of the fixed-shape
# estimate for micro-batches of the mean length (LoRA at micro-batch 2, QLoRA at 4 on two machines:
# h100-tp3-own-lora.json, h100-tp5-own-qlora.json, h100-tp6-qlora-mb4-padding-free.json). Checkpointed plans
# at micro-batch 2, host-bound, lost less (h100-tp3-*-mb2.json).
PADDING_FREE_SPEED = 0.61
# When padding-free pays off, from padded and padding-free runs of one plan on one machine: padded won where
# its micro-batches were 79% real tokens (LoRA, micro-batch 2: padding-free 0.76x as fast; h100-tp3-own-lora
# {,-padded}.json, bare loop) and where they were 67% (QLoRA, micro-batch 4: 0.92x; h100-tp6-qlora-mb4-*.json),
# so only below 0.67 x 0.92 = 62% real tokens would padding-free win. The trainer's automatic choice
# (trainer/run.py) and the estimate's both rest on it.
PADDING_FREE_BELOW = 0.62


def data_micro_batch(setup: Setup, lengths: ExampleLengths,
                     batching: str | None = None) -> tuple[Setup, float, str, float]:
    """The micro-batch the data makes: the shape the GPU computes (padded: micro_batch x the expected longest
    example; padding-free: micro_batch x the mean), the real tokens in it, the batching (the trainer's
    automatic choice unless given), and its share of real tokens had it been padded (what the choice rests on)."""
    mean, longest = lengths.mean(setup.seq_len), lengths.longest_of(setup.micro_batch, setup.seq_len)
    share = mean / longest
    batching = batching or ("padded" if share >= PADDING_FREE_BELOW else "padding-free")
    timed = dataclasses.replace(setup, seq_len=max(1, round(longest if batching == "padded" else mean)))
    return timed, setup.micro_batch * mean, batching, share


def data_micro_batch_s(model: ModelSpec, timed: Setup, batching: str, gpu: GpuSpec, coeffs: Coefficients) -> float:
    """Seconds for one micro-batch of real data (timed from data_micro_batch), at the measured share of the
    fixed-shape rate that its batching reaches (host-bound or not: the trainer's own per-micro-batch work
    weighs on host-bound steps much as changing shapes weigh on GPU-bound ones, 0.78-0.86 of the estimate
    at micro-batch 1 in h100-tp3-{lora,qlora}-mb1.json)."""
    return micro_batch_s(model, timed, gpu, coeffs) / (PADDED_SPEED if batching == "padded" else PADDING_FREE_SPEED)
