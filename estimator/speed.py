"""Training speed: FLOPs per token from the architecture, over the GPU's dense 16-bit rate times a fitted
model-FLOPs utilisation, plus fitted per-step overheads. Pure: no I/O, no torch.
"""

from __future__ import annotations

import bisect
import dataclasses
from functools import lru_cache

from rigplan.estimator.memory import (BF16_BYTES, expert_nf4_bytes, expert_params, family, lora_params,
                                      projection_params)
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
    # Mixture-of-experts: a token goes through its routed experts only (ModelSpec.active_shapes).
    decoder = model.decoder_active_params
    head = model.vocab_size * model.hidden_size
    return FLOPS_PER_MAC * (passes(setup) * decoder + 2 * head) + 3 * FLOPS_PER_MAC * lora_params(model, setup.rank)


def attended_keys(model: ModelSpec, seq_len: int) -> float:
    """Keys a query attends to, summed over the layers: seq_len causal-halved in a full-attention layer; in a
    sliding-window layer (config.json layer_types, gpt-oss) at most the window, W - W^2 / 2L once the sequence
    is longer than it."""
    full = seq_len * CAUSAL_FRACTION
    window = model.sliding_window
    if not model.layer_types or not window:
        return full * model.num_hidden_layers
    sliding = full if seq_len <= window else window - window * window / (2 * seq_len)
    kinds = model.layer_types
    return sum(sliding if kinds[i % len(kinds)] == "sliding_attention" else full
               for i in range(model.num_hidden_layers))  # a reduced-depth copy: its first layers' kinds


def attention_flops_per_token(model: ModelSpec, setup: Setup) -> float:
    """Attention's sequence-dependent FLOPs per token: QK^T and AV, 2 x 2 x heads x head_dim per attended key
    per layer in forward (attended_keys); backward twice that, and once more when recomputed."""
    fwd = 2 * FLOPS_PER_MAC * model.num_attention_heads * model.head_dim * attended_keys(model, setup.seq_len)
    return fwd * (1 + 2 + (passes(setup) - 2))


def flops_per_token(model: ModelSpec, setup: Setup) -> float:
    """All training FLOPs per token: the matmuls and attention."""
    return matmul_flops_per_token(model, setup) + attention_flops_per_token(model, setup)


# Below this head size attention's softmax, not its matmuls, sets its pace: an H100 SXM does 989 TFLOP/s of
# 16-bit matmul but 3.9 TFLOP/s of exponentials (Shah et al. 2024, FlashAttention-3, sec. 3.1), and a score
# costs 2 x head_dim matmul FLOPs but one exp whatever the head size. Fitted on our H100 runs: Llama-3.2-1B
# (head_dim 64) ran its attention at half the FLOP rate of the head_dim-128 models (a factor of 2 took the
# worst error of the GPU line fitted on the runs of >= 8192 tokens from 17.7% to 12.9%; 1.5 or 2.5 did worse).
SOFTMAX_BOUND_HEAD_DIM = 128


# Families whose attention runs slower than the rest of their FLOPs, as measured. Phi-3.5-mini at full depth (head_dim
# 96) through Unsloth's generic path on the H200: going from 4 x 2048 to 1 x 8192 (the same tokens) added 0.36 s to a
# step where its attention FLOPs at the softmax-bound rate add 0.09 s. Cause not found (head_dim 96 is one
# FlashAttention supports). Per method, each fitted with the method's GPU factor (GPU_TIME_BY_TYPE_AND_METHOD) on its
# two GPU-bound rows at the same tokens, 4 x 2048 and 1 x 8192 (bench/family_terms.py phi3_speed): 16-bit LoRA under
# bf16 autocast, as `rigplan run` trains (bench/results/h200-issue17-autocast-next/probe-phi.jsonl, 2026-12-01; probed
# without autocast it ran 7-14% slower, its adapters computing in fp32, h200-issue17-heldout2/); QLoRA on
# h200-issue17-heldout2/probe-phi.jsonl and probe-phi-8192.jsonl, checked on 2 x 4096 and 1 x 16384
# (h200-issue17-heldout3/probe-phi.jsonl). Only for the head sizes measured slow (memory.family: not Phi-4's).
ATTENTION_TIME_BY_TYPE_AND_METHOD = {("phi3", "lora"): 4.04, ("phi3", "qlora"): 3.80}
# The same for every method, where a family's attention ran faster than the softmax bound. gpt-oss (head_dim 64) trains
# through flex attention with its sinks (unsloth_zoo 2026.10.9 temporary_patches/gpt_oss.py flex_attention_with_sink),
# not FlashAttention: going from 1 x 8192 to 1 x 16384 at full depth (24 layers, QLoRA without checkpointing, under
# bf16 autocast) added per token 0.48x what its attention FLOPs at the softmax-bound rate add, about the matmuls' rate
# (bench/results/h200-issue17-full-depth/probe-gptoss-full.jsonl, 2026-12-01; bench/family_terms.py gpt_oss_speed,
# which fits it together with GPU_TIME_BY_TYPE["gpt_oss"]); its other GPU-bound rows, 4 to 16 layers, check it.
ATTENTION_TIME_BY_TYPE = {"gpt_oss": 0.482}


def timed_flops_per_token(model: ModelSpec, setup: Setup) -> float:
    """FLOPs per token as the GPU's time sees them: attention's count scaled up where its softmax is the
    bottleneck (heads smaller than SOFTMAX_BOUND_HEAD_DIM) and by a family's measured attention factor, the matmuls'
    where a family's ran slower (MATMUL_TIME_BY_TYPE)."""
    slow = (ATTENTION_TIME_BY_TYPE_AND_METHOD.get((family(model), setup.method), 1.0)
            * ATTENTION_TIME_BY_TYPE.get(family(model), 1.0))
    softmax = max(1.0, SOFTMAX_BOUND_HEAD_DIM / model.head_dim) * slow
    matmuls = MATMUL_TIME_BY_TYPE.get(family(model), 1.0)
    return (matmul_flops_per_token(model, setup) * matmuls
            + softmax * attention_flops_per_token(model, setup))


def passes(setup: Setup) -> int:
    """Passes over the decoder per micro-batch: forward, backward, and the recompute when checkpointing."""
    return 3 if setup.checkpointing == "unsloth" else 2


def elementwise_units(model: ModelSpec, setup: Setup) -> float:
    """Token-layer-units touched by memory-bound ops in all passes: bytes scale with hidden + MLP width."""
    return passes(setup) * setup.tokens * model.num_hidden_layers * (model.hidden_size + model.mean_active_intermediate)


def quantized_weights(model: ModelSpec, setup: Setup) -> float:
    """4-bit weights dequantized every micro-batch (QLoRA only): the decoder's projections."""
    if setup.method != "qlora":
        return 0.0
    return projection_params(model)


def expert_dequant_bytes(model: ModelSpec, setup: Setup) -> float:
    """QLoRA on a mixture-of-experts model: every pass over a layer dequantizes all its experts, routed to or not
    (memory.expert_dequant_phase_bytes), reading NF4 and writing bf16, a memory-bound cost per micro-batch. On
    the H200 QLoRA steps took 2-6 ms more than LoRA's on the same shapes (Qwen3-30B-A3B and Mixtral-8x7B at 4
    layers, bench/results/h200-issue17/), where this counts 3.9 and 9.0 ms at the H200's bandwidth."""
    if setup.method != "qlora" or not model.experts:
        return 0.0
    return passes(setup) * (expert_params(model) * BF16_BYTES + expert_nf4_bytes(model))


def micro_batch_s(model: ModelSpec, setup: Setup, gpu: GpuSpec, coeffs: Coefficients) -> float:
    """Seconds for one micro-batch: GPU time (matmuls at the fitted share of peak FLOP/s plus memory-bound
    work at the GPU's bandwidth, a roofline-style sum; Williams et al. 2009), but never less than the host's
    floor, which overlaps with GPU work: the H100 runs at 1 x 2048 tokens sit on that floor, larger ones
    on the GPU line."""
    return max(gpu_s(model, setup, gpu, coeffs), host_floor_s(model, setup, coeffs))


# Families whose matmuls run slower than the dense rate, as measured. Qwen3-MoE routes each token to 8 of 128 narrow
# experts (768 wide), whose grouped matmuls run far below it, while its attention and memory-bound work do not:
# Qwen3-30B-A3B at 4 layers, LoRA 1 x 8192 on the H200 under bf16 autocast, as `rigplan run` trains, took 1.515x the
# estimate's matmul time (the rest of the step at the reference's rates; bench/results/h200-issue17-autocast/
# probe-qwen3moe.jsonl, 2026-12-01; that one run, refitted by bench/family_terms.py; its other rows, 4 to 48 layers,
# 2,048 to 32,768 tokens, check it). Probed without autocast the same shape took 1.645x (h200-issue17/, 2026-11-30),
# its adapters computed in fp32 (unsloth_zoo compiler.py), and the factor fitted on it left the estimate up to 18%
# slow (bench/results/README.md, the twenty-second session). Applied to the whole step's time instead
# it left the estimate slower the longer the sequence, as attention's share grew (bench/results/README.md, the
# twelfth session). Mixtral's 8 wide experts ran at the dense rate (within 3% on its GPU-bound runs, same file set).
# Qwen1.5-MoE (qwen2_moe: 60 experts 1,408 wide, 4 per token, and a shared expert) runs the same grouped kernels,
# at its own rate: fitted on its full-depth (24-layer) QLoRA 1 x 8192 row by the rule above (bench/results/
# h200-issue17-heldout8/probe-qwen2moe.jsonl, 2026-11-30; bench/family_terms.py), its QLoRA rows at 4 to 24 layers
# checking it. Its 16-bit LoRA runs at the same rate as trained: under bf16 autocast, as `rigplan run` trains (TRL
# bf16=True), its 8-layer LoRA and QLoRA 2 x 8192 rows took 1.206x and 1.215x (h200-issue17-autocast/, 2026-12-01).
# The probes without autocast ran its LoRA slower (about 1.6x): Unsloth rewrites PEFT's LoRA forward to compute a
# plain nn.Linear's adapter in fp32 when autocast is off (unsloth_zoo 2026.10.9 compiler.py; h200-issue17-lora-fp32/),
# which a run does not do.
MATMUL_TIME_BY_TYPE = {"qwen3_moe": 1.515, "qwen2_moe": 1.307}
# Families whose GPU time the FLOP count understates, as measured.
# gpt-oss-20b at 4 layers (32 experts, 4 per token, attention sinks, half the layers sliding over 128 tokens; its
# swiglu computed in fp32, unsloth_zoo temporary_patches/gpt_oss.py swiglu_torch_forward), LoRA 4 x 2048 on the H200:
# 1.516x (bench/results/h200-gpt-oss/probe-gptoss.jsonl, fitted on that row with its attention factor,
# ATTENTION_TIME_BY_TYPE; its other GPU-bound rows check it). Phi-3.5-mini: per method, below.
GPU_TIME_BY_TYPE = {"gpt_oss": 1.516}
# The same for one method. Gemma 3's 16-bit LoRA through Unsloth's generic path ran slower than its FLOP count:
# Gemma-3-12B at 8 layers, LoRA 4 x 2048 on the H200 under bf16 autocast, as `rigplan run` trains, took 1.07x the
# estimate's time (bench/results/h200-issue17-autocast-next/probe-gemma3.jsonl, 2026-12-01, fitted on that row by
# bench/family_terms.py; its LoRA 1 x 8192 there checks it, tests/test_issue17_runs.py). Probed without autocast it took
# 1.225x (h200-issue17/): Unsloth computes a plain nn.Linear's adapter in fp32 then (unsloth_zoo compiler.py).
# Its QLoRA, 1.084x: at 8 layers, 4 x 2048, from a process of its own (h200-issue17-expandable/probe-gemma3.jsonl,
# fitted on that row the same way); its GPU-bound rows from 4,096 to 16,384 tokens and at 48 layers check it.
# Phi-3.5-mini: 1.04x under 16-bit LoRA and 1.075x under QLoRA, each fitted with its attention factor
# (ATTENTION_TIME_BY_TYPE_AND_METHOD, above).
GPU_TIME_BY_TYPE_AND_METHOD = {("gemma3", "lora"): 1.07, ("gemma3_text", "lora"): 1.07, ("gemma3", "qlora"): 1.084,
                               ("gemma3_text", "qlora"): 1.084, ("phi3", "lora"): 1.04, ("phi3", "qlora"): 1.075}


def gpu_s(model: ModelSpec, setup: Setup, gpu: GpuSpec, coeffs: Coefficients) -> float:
    """The GPU's time for a micro-batch: its work, or under FSDP the weights' transfers if they take longer
    (FSDP2 gathers the next layer while this one computes)."""
    compute = (timed_flops_per_token(model, setup) * setup.tokens / (gpu.tensor_tflops * 1e12 * coeffs.mfu)
               * GPU_TIME_BY_TYPE.get(family(model), 1.0)
               * GPU_TIME_BY_TYPE_AND_METHOD.get((family(model), setup.method), 1.0))
    moved = (coeffs.elementwise_bytes * elementwise_units(model, setup)
             + coeffs.dequant_bytes * quantized_weights(model, setup) + expert_dequant_bytes(model, setup))
    return max(compute + moved / (gpu.bandwidth_gb_s * 1e9), fsdp_transfer_s(model, setup, gpu))


# Several GPUs: every optimizer step ends at the all-reduce of the adapters' gradients (DDP; FSDP's collectives come
# at every layer of every micro-batch), where each process waits for the slowest. Three parts, each measured on two
# H200s and put together in parallel_step_s: DDP itself costs 1.02x one GPU's step at a fixed shape
# (bench/ddp_overhead.py, bench/results/README.md, the fifth session); the micro-batches dealt together differ in
# length, by little as trainer/batching.py BlockSampler deals consecutive length-sorted ones (lengths_spread); and
# each process's step strays from its length's time by STEP_JITTER_S (one standard deviation, the host's doing),
# so that the slowest of N strays by expected_max_of_normals(N) of them. STEP_JITTER_S is the residual spread of
# three one-GPU runs' steps around their length law (bench/ddp_jitter.py, pooled over h200-runs/ddp/nosync-seed2/
# and tokencount-seed2/, one-*.json); the DDP runs beside them, which it never saw, check the whole
# (tests/test_h200_runs.py).
DDP_ITSELF = 1.02
STEP_JITTER_S = 0.0333


@lru_cache(maxsize=64)
def expected_max_of_normals(n: int) -> float:
    """E[max of n independent standard normal draws]: 0 for one, 0.564 for two, 1.029 for four, 1.424 for eight
    (the integral of x n phi(x) Phi(x)^(n-1), by the trapezoid rule)."""
    if n <= 1:
        return 0.0
    import math

    step, total = 0.001, 0.0
    for i in range(-10_000, 10_001):
        x = i * step
        phi = math.exp(-x * x / 2) / math.sqrt(2 * math.pi)
        total += x * n * phi * (0.5 * (1 + math.erf(x / math.sqrt(2)))) ** (n - 1) * step
    return total


def lengths_spread(times: list[tuple[float, int]], n: int) -> float:
    """How much longer a step of n processes takes than the mean of their micro-batches' times because those differ
    in length: padded micro-batches are the trainer's length-sorted groups (times: padded_group_times, longest
    first), n consecutive ones dealt together (trainer/batching.py BlockSampler), so each step takes the longest
    of n neighbours. Packed micro-batches all fill the same budget (no times given): 1."""
    if n == 1:
        return 1.0
    order = [t for t, count in times for _ in range(count)]
    blocks = [order[i:i + n] for i in range(0, len(order) - len(order) % n, n)]
    if not blocks:
        return 1.0
    return sum(max(b) for b in blocks) / sum(sum(b) / n for b in blocks)


def parallel_step_s(step_s: float, setup: Setup, spread: float) -> float:
    """One GPU's optimizer step (step_s, its micro-batches' mean time) as N processes take it: DDP's own cost, the
    longest of the micro-batches dealt together (spread), and the slowest process's stray, over the step's
    grad_accum micro-batches taken together under DDP (they meet once, at the step's end) and at each micro-batch
    under FSDP (its gathers meet at every layer)."""
    if setup.num_gpus == 1 or setup.parallelism == "single":
        return step_s
    k = setup.grad_accum
    meetings = k if setup.parallelism == "fsdp" else 1
    strays = STEP_JITTER_S * expected_max_of_normals(setup.num_gpus) * meetings * (k / meetings) ** 0.5
    return step_s * DDP_ITSELF * spread + strays


def gradient_sync_s(model: ModelSpec, setup: Setup, gpu: GpuSpec) -> float:
    """Per optimizer step: the adapters' fp32 gradients all-reduced (DDP) or reduce-scattered (FSDP) over the
    link between GPUs, a ring: 2 (N-1) / N of the bytes each way for an all-reduce, half that for FSDP."""
    n = setup.num_gpus
    if n == 1 or setup.parallelism == "single":
        return 0.0
    grads = 4 * lora_params(model, setup.rank)
    share = (2 if setup.parallelism == "ddp" else 1) * (n - 1) / n
    return share * grads / (gpu.link_gb_s * 1e9)


def fsdp_transfer_s(model: ModelSpec, setup: Setup, gpu: GpuSpec) -> float:
    """FSDP per micro-batch: every layer's weights gathered from the other GPUs in each pass (forward, the
    recompute, backward), (N-1)/N of them over the link; with CPU offload this GPU's shard also comes over its
    own PCIe link in each pass."""
    if setup.parallelism != "fsdp":
        return 0.0
    from rigplan.estimator.memory import base_weights_bytes

    weights = base_weights_bytes(model, setup.method)
    n = setup.num_gpus
    seconds = passes(setup) * weights * (n - 1) / n / (gpu.link_gb_s * 1e9)
    if setup.cpu_offload:
        seconds += passes(setup) * weights / n / (gpu.pcie_gb_s * 1e9)
    return seconds


def host_floor_s(model: ModelSpec, setup: Setup, coeffs: Coefficients) -> float:
    """The host's floor on a micro-batch: a fixed cost (optimizer step, Python) plus a cost per layer, larger
    with Unsloth's checkpointing (its offload round trip: ~8-11 ms a layer on the H100 hosts we measured,
    for 1B, 3B and 8B alike) than without (~6 ms: 8B at 1 x 2001, 1B at 4 x 2048), and larger for QLoRA
    (dequantize launches: +3-5 ms a layer in `rigplan calibrate`'s 1 x 512 probes). It is the host's CPU,
    not the GPU: the same 8B 1 x 2048 step took 0.27 s on one H100 machine and 0.45 s on another."""
    per_layer = coeffs.layer_overhead_s if setup.checkpointing == "unsloth" else coeffs.nockpt_layer_overhead_s
    if setup.method == "qlora":
        per_layer += coeffs.qlora_layer_overhead_s
    modules = len(model.target_modules) / REFERENCE_LORA_MODULES if not model.experts else 1.0
    per_layer *= HOST_LAYER_TIME_BY_TYPE.get(family(model), 1.0) * modules
    return coeffs.step_overhead_s + per_layer * model.num_hidden_layers + coeffs.offload_s_per_gb * offload_gb(model, setup)


# The reference's per-layer host cost was fitted on dense models whose LoRA adapts seven linear modules a layer (q, k,
# v, o, gate, up, down: Llama, Mistral, Qwen). Each adapted module launches kernels of its own (the adapter's matmuls
# forward and backward, its scaling and addition), so a dense layer costs the host in proportion to the modules it
# adapts: Phi-3's fused qkv_proj and gate_up_proj make four. No constant was fitted for it. Checked on Phi-3.5-mini's
# host-bound runs (estimate / measured - 1, before -> after): at 8 layers on the H100, -33% and -40% -> +4% and -9%
# (profiles/calibrations/h100-runs/h100-heldout.jsonl); at full depth on the H200, 16-bit LoRA -39% -> -2%, QLoRA
# -51% -> -19% (bench/results/h200-issue17-phi-autocast/, -heldout2/). A mixture-of-experts layer keeps the
# reference's cost: its LoRA adapts attention only (four modules) but its routing and expert dispatch launch kernels
# of their own, and counted by its modules Mixtral's and Qwen3-MoE's 4-layer rows with checkpointing ran 17-37% slower
# than the estimate (h200-issue17/). Qwen3-MoE's 4-layer rows without checkpointing ran as counted (-nockpt-check/),
# but at 8 and 16 layers, predicted both ways before the runs, 25-31% slower than counted by its modules and 13-15%
# faster than the reference's cost (h200-issue17-full-depth/probe-qwen3moe-host.jsonl): the reference's count stays.
REFERENCE_LORA_MODULES = 7


# Families whose layers cost the host more than the reference's. gpt-oss's layers are not compiled as one region under
# Unsloth 2026.10.9 (its log has no "compiling each transformer block as one region"; docs/moe-saved-tensors.md), so
# each launches its kernels one by one: least squares through zero of the step less the fixed cost on the layers'
# cost, over its 4-layer 1 x 2048 rows without checkpointing, LoRA and QLoRA (bench/results/h200-issue17-gptoss-nockpt/;
# bench/family_terms.py gpt_oss_host), its 8-layer rows and its rows with checkpointing checking it.
HOST_LAYER_TIME_BY_TYPE = {"gpt_oss": 1.57}


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
# have. The trainer lays a micro-batch out in one of three ways: 'packed' (trainer/batching.py: whole examples
# back to back in one row of at most token_budget tokens, each attending only to itself) or 'padded' (micro_batch
# length-sorted examples padded to the longest); runs recorded before this trainer padded micro_batch examples
# drawn at random ('random-padded') or put them back to back however many tokens they made ('padding-free'). Each is timed as the larger of GPU time and host floor
# (micro_batch_s) with factors fitted (minimax) on rigplan's trainer and the bare Unsloth loop on Llama-3.1-8B,
# examples of 257-2001 tokens, micro-batches of 1-8, on H100 machines (bench/results/h100-tp*.json;
# bench/data_speed.py shows each run against its estimate).
#
# The host's floor on real data: micro-batches of changing shape took 1.1-1.5x the fixed-shape floor when
# host-bound (1 x ~1,100 tokens: h100-tp{3,7,8}-*.json), 1.2-1.4x when GPU and host were level (2 x ~1,400).
REAL_DATA_HOST = 1.3
# Examples back to back run uncompiled on Unsloth, which compiles each decoder block only for padded micro-
# batches (unsloth/models/_block_compile.py:923-934, `packed_seq_lengths`): their GPU work at 0.76 of the
# fixed-shape rate (QLoRA at micro-batch 8 on two machines: h100-tp9-own-qlora.json,
# h100-tp10-qlora-mb8-padding-free.json) and, without checkpointing, a host floor 2.25x the compiled one (LoRA at
# micro-batch 2 and 4, QLoRA at 4: h100-tp10-lora-mb{2,4}-padding-free.json, h100-tp{5,6}-*qlora*.json). With
# Unsloth's checkpointing the padded path is no faster on the host (h100-tp3-{lora,qlora}-mb{1,2}.json).
BACK_TO_BACK_GPU = 0.76
BACK_TO_BACK_HOST = 2.25
# The trainer's own layouts (trainer/batching.py), measured on real data against the fixed-shape estimate, which
# is right there (the bare Unsloth loop at 16 x 1,280 on the H200: 16,440 and 16,301 tok/s against 16,459).
# Padded micro-batches of length-sorted examples run at the GPU time of their padded shapes (padded_groups): the
# held-out H200 runs with expandable segments (as `rigplan run` sets them), bench/results/h200-runs/heldout/
# h200-{lora,qlora}.json, ran 1.01x and 1.01x that time's rate. (Before expandable segments the caching allocator
# cost 13% with shapes changing from one micro-batch to the next: h200-runs/grouped/.) Packed rows ran at 0.77-0.89
# of BACK_TO_BACK_GPU's rate, fitted (mean) on the packed H200 runs of bench/results/h200-runs/ (Llama-3.1-8B,
# LoRA and QLoRA, 600 long-tailed examples, 2026-11-30, before expandable segments).
GROUPED_GPU = 1.0
PACKED_GPU = BACK_TO_BACK_GPU * 0.825
DATA_BATCHINGS = ("packed", "padded", "random-padded", "padding-free")
# The transformers + PEFT engine's speed as a share of Unsloth's on the same plan and data (the runs named at
# memory.TRANSFORMERS_STEP_MEMORY; bench/engine_factors.py): their median. Gemma 2 (the family that needs this
# engine) on the H200, Gemma-2-9B at 6 layers, against its padded shapes' time: 16 x 1,280 and 8 x 1,280 x 2 ran
# at 0.21 and 0.45 of that (bench/results/h200-runs/final/gemma2-L6-h200-lora.json, .../ddp/block-order/
# gemma2-L6-h200-lora.json, 10 steps each): their geometric mean, and a band that holds both.
TRANSFORMERS_SPEED = 0.61
TRANSFORMERS_SPEED_BY_TYPE = {"gemma2": 0.31}
TRANSFORMERS_BAND_BY_TYPE = {"gemma2": (0.79, 1.25)}


def transformers_speed(model: ModelSpec) -> float:
    """The transformers engine's speed as a share of Unsloth's estimate, for this model family."""
    return TRANSFORMERS_SPEED_BY_TYPE.get(model.model_type, TRANSFORMERS_SPEED)


# The band of measured / estimated speed the estimate stands behind, containing every recorded run of its kind
# (tests/test_planner.py checks it against bench/data_speed.py's rows): GPU-bound micro-batches, and host-bound
# ones, whose pace is the host CPU's and differs between machines with the same GPU (also the full-depth 1 x 2048
# probes on six H100 machines, bench/results/calibrate-h100: measured 0.69-1.16x the estimate; RTX 4090 plans
# run on the H200's host, bench/results/h200-runs: up to 1.70x; full-depth Phi-3.5-mini QLoRA 1 x 2048 there, 2.02x,
# bench/results/h200-issue17-heldout2/probe-phi.jsonl). The transformers engine widens it by its spread
# around its median (bench/engine_factors.py).
GPU_BOUND_BAND = (0.86, 1.17)
HOST_BOUND_BAND = (0.68, 2.05)
TRANSFORMERS_BAND = (0.87, 1.41)


def speed_band(host_bound: bool, engine: str, model_type: str = "") -> tuple[float, float]:
    """The factors that bound measured speed around the estimate."""
    low, high = HOST_BOUND_BAND if host_bound else GPU_BOUND_BAND
    if engine == "transformers":
        spread = TRANSFORMERS_BAND_BY_TYPE.get(model_type, TRANSFORMERS_BAND)
        low, high = low * spread[0], high * spread[1]
    return low, high


@lru_cache(maxsize=256)
def packing_fill(lengths: ExampleLengths, budget: int, seq_len: int) -> float:
    """Expected share of a token budget that packed examples fill: best-fit decreasing (the trainer's rule,
    trainer/batching.py) over enough copies of the length sample to make 16 micro-batches; examples longer
    than seq_len are cut to it. Cached: the planner asks for the same few budgets on every GPU."""
    sample = [min(n, seq_len) for n in lengths.tokens]
    copies = max(1, -(-16 * budget // max(1, sum(sample))))
    rooms: list[int] = []  # room left in each open micro-batch, sorted: the best fit is the first with room >= n
    for n in sorted(sample * copies, reverse=True):
        at = bisect.bisect_left(rooms, n)
        if at == len(rooms):
            bisect.insort(rooms, budget - n)
        else:
            bisect.insort(rooms, rooms.pop(at) - n)
    return sum(sample) * copies / (len(rooms) * budget)


def attention_length(lengths: ExampleLengths, seq_len: int) -> float:
    """The sequence length attention's cost per token is that of: a token of an n-token example attends over n
    (causal-halved in attention_flops_per_token), so per token the mean is sum(n^2) / sum(n)."""
    cut = [min(n, seq_len) for n in lengths.tokens]
    return sum(n * n for n in cut) / sum(cut)


# A padded micro-batch is padded to its longest example rounded up to this many tokens, never past seq_len: the
# planner writes it into every plan (Plan.pad_multiple), which the trainer pads to (trainer/batching.py).
PAD_MULTIPLE = 64
# The most examples padded_groups rebuilds from the stored quantiles: with more, the trainer's groups are tighter
# still, and the estimate's padding a little high.
MAX_GROUPED_EXAMPLES = 20_000


@lru_cache(maxsize=256)
def padded_groups(lengths: ExampleLengths, seq_len: int, micro_batch: int) -> dict[tuple[int, int], tuple[int, int]]:
    """The trainer's padded micro-batches (trainer/batching.py group): the examples longest first, micro_batch at a
    time, each group padded to its longest rounded up to PAD_MULTIPLE, at most seq_len. The examples are rebuilt
    from the stored quantiles (lengths.count of them, linear between quantiles). As {(padded length, examples):
    (micro-batches, real tokens in them)}."""
    q, n = lengths.tokens, min(lengths.count or len(lengths.tokens), MAX_GROUPED_EXAMPLES)
    if n == len(q) or len(q) == 1:
        xs = list(q) if n == len(q) else [q[0]] * n
    else:
        xs = []
        for j in range(n):
            at = j * (len(q) - 1) / max(1, n - 1)
            i = min(int(at), len(q) - 2)
            xs.append(round(q[i] + (q[i + 1] - q[i]) * (at - i)))
    xs = sorted((min(x, seq_len) for x in xs), reverse=True)
    out: dict[tuple[int, int], tuple[int, int]] = {}
    for i in range(0, len(xs), micro_batch):
        group = xs[i:i + micro_batch]
        key = (min(seq_len, -(-group[0] // PAD_MULTIPLE) * PAD_MULTIPLE), len(group))
        count, real = out.get(key, (0, 0))
        out[key] = (count + 1, real + sum(group))
    return out


def data_micro_batch(setup: Setup, lengths: ExampleLengths, batching: str) -> tuple[Setup, float, float]:
    """The micro-batch the data makes: the shape whose time it takes (tokens computed, and the sequence length
    attention sees), the real tokens in it, and the share of its tokens that are real. packed: the budget
    (micro_batch x seq_len) filled to packing_fill; padded: the trainer's groups of micro_batch length-sorted
    examples, each padded to its longest (padded_groups; timed per group shape in data_micro_batch_s); random-padded (runs recorded
    before grouping) and padding-free: micro_batch examples drawn at random, padded to the longest or back to
    back."""
    mean, budget = lengths.mean(setup.seq_len), setup.tokens
    if batching == "packed":
        real = budget * packing_fill(lengths, budget, setup.seq_len)
        attn = attention_length(lengths, setup.seq_len)
        # Timed as real / attn sequences of attn tokens: the real tokens, attention over each example's own.
        timed = dataclasses.replace(setup, micro_batch=1, seq_len=max(1, round(attn)))
        return _with_tokens(timed, real), real, real / budget
    if batching == "padded":
        groups = padded_groups(lengths, setup.seq_len, setup.micro_batch)
        count = sum(c for c, _ in groups.values())
        real = sum(r for _, r in groups.values())
        computed = sum(c * length * k for (length, k), (c, _) in groups.items())
        timed = dataclasses.replace(setup, seq_len=max(1, round(computed / (count * setup.micro_batch))))
        return timed, real / count, real / computed
    longest = lengths.longest_of(setup.micro_batch, setup.seq_len)
    timed = dataclasses.replace(setup, seq_len=max(1, round(longest if batching == "random-padded" else mean)))
    return timed, setup.micro_batch * mean, mean / longest


def _with_tokens(setup: Setup, tokens: float) -> Setup:
    """setup with micro_batch scaled so that it holds `tokens` (fractional: an expectation)."""
    return dataclasses.replace(setup, micro_batch=tokens / setup.seq_len)  # type: ignore[arg-type]


def data_micro_batch_s(model: ModelSpec, setup: Setup, lengths: ExampleLengths, batching: str, gpu: GpuSpec,
                       coeffs: Coefficients) -> float:
    """Mean seconds for one micro-batch of real data, laid out as `batching` says (the factors above); padded
    micro-batches timed at each length they are padded to."""
    if batching == "padded":
        return mean_group_s(padded_group_times(model, setup, lengths, gpu, coeffs))
    timed, _, _ = data_micro_batch(setup, lengths, batching)
    return _timed_s(model, timed, batching, gpu, coeffs)


def mean_group_s(times: list[tuple[float, int]]) -> float:
    """The mean seconds of the micro-batches padded_group_times describes."""
    return sum(t * count for t, count in times) / sum(count for _, count in times)


def padded_group_times(model: ModelSpec, setup: Setup, lengths: ExampleLengths, gpu: GpuSpec,
                       coeffs: Coefficients) -> list[tuple[float, int]]:
    """Each padded micro-batch shape's seconds and how many of the data's micro-batches have it, longest first
    (padded_groups)."""
    groups = padded_groups(lengths, setup.seq_len, setup.micro_batch)
    return [(_timed_s(model, dataclasses.replace(setup, micro_batch=k, seq_len=length), "padded", gpu, coeffs),
             groups[(length, k)][0]) for length, k in sorted(groups, reverse=True)]


def _timed_s(model: ModelSpec, timed: Setup, batching: str, gpu: GpuSpec, coeffs: Coefficients) -> float:
    """A real-data micro-batch's seconds; scaled by this machine's own runs where calibrate learned them."""
    return _layout_s(model, timed, batching, gpu, coeffs) / coeffs.real_data_speed


def _layout_s(model: ModelSpec, timed: Setup, batching: str, gpu: GpuSpec, coeffs: Coefficients) -> float:
    gpu_time, floor = gpu_s(model, timed, gpu, coeffs), host_floor_s(model, timed, coeffs) * REAL_DATA_HOST
    gpu_time /= {"padded": GROUPED_GPU, "packed": PACKED_GPU, "padding-free": BACK_TO_BACK_GPU}.get(batching, 1.0)
    if batching in ("packed", "padding-free"):
        if timed.checkpointing != "unsloth":
            floor *= BACK_TO_BACK_HOST / REAL_DATA_HOST
    return max(gpu_time, floor)
