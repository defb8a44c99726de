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
# bitsandbytes NF4 without double quantization: 4-bit weights and one fp32 absmax per 64.
NF4_FLAT_BYTES_PER_PARAM = 0.5 + FP32_BYTES / 64
# Unsloth quantizes a mixture-of-experts layer's fused expert stacks itself (unsloth_zoo 2026.10.9
# temporary_patches/moe_utils_bnb4bit.py: "transformers' bnb integration only quantizes nn.Linear"), with the
# model's double quantization, except a stack of _BNB_MAX_QUANTIZE_NUMEL = 2**31 elements or more, which bitsandbytes
# cannot count in 32 bits: that one is quantized in expert slices with flat absmax (compress_statistics=False).
BNB_MAX_QUANTIZE_NUMEL = 2**31
# bitsandbytes AdamW8bit: two 8-bit moments per parameter plus one fp32 absmax per 256-value block
# (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization", sec. 2; bnb blocksize 256).
ADAM8BIT_BYTES_PER_PARAM = 2 * (1 + FP32_BYTES / 256)
# torch AdamW: exp_avg and exp_avg_sq in the parameter's dtype, fp32 for PEFT's adapters.
ADAM32_BYTES_PER_PARAM = 2 * FP32_BYTES


def lora_params(model: ModelSpec, rank: int) -> int:
    # LoRA adds A (r x in) and B (out x r) to every targeted projection (Hu et al. 2021, sec. 4.1).
    return rank * model.decoder_lora_dims


def projection_params(model: ModelSpec) -> int:
    """The weights of every layer's nn.Linear projections (ModelSpec.decoder_linear_params: those LoRA targets, and a
    dense layer's MLP among experts): what bitsandbytes stores in NF4 under QLoRA and dequantizes for each matmul."""
    return model.decoder_linear_params


def split_layer_projections(model: ModelSpec) -> tuple[int, int]:
    """One main layer's projection parameters, split: those LoRA targets (nn.Linear, quantized by bitsandbytes),
    and the rest, a mixture-of-experts layer's routed experts (fused 3-D parameters; none in a dense layer)."""
    targeted = sum(n_in * n_out for _, n_in, n_out in model.linear_shapes())
    return targeted, sum(n_in * n_out for _, n_in, n_out in model.weight_shapes()) - targeted


def expert_params(model: ModelSpec) -> int:
    """The experts' MLP weights of every layer (0 for a dense model): what a layer stores beyond the projections
    LoRA targets, which for a mixture-of-experts model are the attention ones (ModelSpec.linear_shapes)."""
    if not model.experts:
        return 0
    # the sparse layers (ModelSpec.dense_layer_ids hold none)
    return model.main_layers * split_layer_projections(model)[1]


def base_weights_bytes(model: ModelSpec, method: str, engine: str = "unsloth") -> int:
    """Frozen weights: all 16-bit for LoRA; for QLoRA the decoder projections in NF4, the rest 16-bit."""
    if method == "lora":
        return model.params_total * BF16_BYTES
    # bitsandbytes quantizes nn.Linear layers inside the decoder; embeddings, lm_head (kept out by
    # transformers' llm_int8_skip_modules default), norms and biases stay bf16. A mixture-of-experts layer's
    # experts (fused 3-D parameters in transformers 5.17) are NF4 under Unsloth (expert_nf4_bytes) and stay bf16
    # under transformers + bitsandbytes, whose integration skips them (not measured).
    linear = projection_params(model)
    experts = expert_params(model) if engine == "unsloth" else 0
    return (int(linear * NF4_BYTES_PER_PARAM) + (expert_nf4_bytes(model) if experts else 0)
            + (model.params_total - linear - experts) * BF16_BYTES)


def expert_stack_params(model: ModelSpec) -> tuple[int, int]:
    """A sparse layer's two fused expert stacks, in weights: gate_up (experts x 2 x expert width x hidden) and down
    (experts x expert width x hidden)."""
    down = model.experts * model.expert_intermediate * model.hidden_size
    return 2 * down, down


def expert_nf4_bytes(model: ModelSpec) -> int:
    """The routed experts of every sparse layer in NF4 as Unsloth stores them (BNB_MAX_QUANTIZE_NUMEL), stack by
    stack (expert_stack_params). On the H200 a layer's memory after
    loading grew by this within 0.3% from 4 to 16 layers (Qwen3-30B-A3B, gpt-oss-20b; Mixtral-8x7B at 8 layers:
    bench/results/h200-issue17-depth/), where flat absmax throughout counted 9% more."""
    per_layer = sum(n * (NF4_BYTES_PER_PARAM if n < BNB_MAX_QUANTIZE_NUMEL else NF4_FLAT_BYTES_PER_PARAM)
                    for n in expert_stack_params(model))
    return int(model.main_layers * per_layer)


def quant_state_bytes(model: ModelSpec, setup: Setup) -> int:
    """Sharded QLoRA: bitsandbytes' absmax statistics of the decoder projections (NF4_BYTES_PER_PARAM beyond the
    4 bits), which FSDP2 leaves whole on every GPU: they live in each weight's QuantState, a Python attribute
    (bitsandbytes 0.50 Params4bit.quant_state, moved by .to()), not in the parameter fully_shard splits into
    DTensor shards (torch distributed/fsdp/_fully_shard/_fsdp_param.py). Read from the sources; about 1 GiB for
    Llama-3.1-70B, 0.1 at the 8 layers measured (within those runs' noise). Counted on the GPU under CPU offload
    too (where FSDP2's offload leaves them is not known). 0 when not sharded (base_weights holds them whole)."""
    if setup.parallelism != "fsdp" or setup.method != "qlora":
        return 0
    return int(projection_params(model) * (NF4_BYTES_PER_PARAM - 0.5))


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


# What a mixture-of-experts layer keeps without checkpointing beyond the dense terms, per token, in units of its
# routed copy (k x hidden bf16, routed_copy_bytes): the 8- less the 4-layer allocated peaks, the layers' weights taken
# out, gave the same bytes per token and layer within 1% from 2,048 to 32,768 tokens (bench/results/
# h200-issue17-nockpt*/). Mixtral-8x7B kept 168 kB, the dense terms and one copy 171 kB: the default, its 12-layer
# runs checking it. Qwen3-30B-A3B kept 73.7 kB (dense terms 55.4, a copy 32.8) and Qwen1.5-MoE-A2.7B 98.1 kB (dense
# 68.9, a copy 16.4; its shared expert is counted in the dense terms): the multiple of the copy that gives each
# family's 4- and 8-layer 1 x 8192 rows their difference (bench/family_terms.py nockpt_routed_share); their other rows
# check it. docs/moe-saved-tensors.md counts the tensors the source saves, which gives the same figures.
NOCKPT_ROUTED_SHARE_BY_TYPE = {"qwen3_moe": 0.56, "qwen2_moe": 1.781, "gpt_oss": 1.734}
# gpt-oss-20b: the multiple of the copy that gives the bytes docs/moe-saved-tensors.md counted from the source before
# any run (125.4 kB per token and layer; the dense terms 85.5, a copy 23.0). Its QLoRA's 4- and 8-layer runs without
# checkpointing check it (bench/results/h200-issue17-gptoss-nockpt/; tests/test_issue17_runs.py), and so does its 16-bit
# LoRA under bf16 autocast, as `rigplan run` trains (8 layers, 1 x 8192: h200-issue17-autocast-next/), where by the
# same reading its adapters' inputs are kept in bf16 as under QLoRA. Probed without autocast, its 16-bit LoRA kept fp32
# copies besides (151 kB: h200-issue17-lora-nockpt/), which a run does not.
# The same for one method, where the methods keep different tensors under autocast. Qwen1.5-MoE-A2.7B's 16-bit LoRA:
# the multiple that gives its 8-layer 1 x 8192 row under autocast its allocated peak (bench/results/
# h200-issue17-autocast/probe-qwen2moe.jsonl; bench/family_terms.py qwen2_moe_lora_share); `rigplan run` on the same
# replica at 16 x 1280 checks it (h200-issue17-run/). That is about 108 kB per token and layer, where its QLoRA run
# keeps 94 (probed without autocast 98, NO_AUTOCAST_COPIES_BY_TYPE below) and its 16-bit LoRA probed without autocast
# 138 (docs/moe-saved-tensors.md, section 5): which tensors the 14 kB beyond a QLoRA run are was not found. The
# multiple counts the copy that the estimate takes out of every method (without_autocast_bytes).
NOCKPT_ROUTED_SHARE_BY_TYPE_AND_METHOD = {("qwen2_moe", "lora"): 2.659}
# Probed without autocast, as every row NOCKPT_ROUTED_SHARE_BY_TYPE is fitted on was, a mixture-of-experts layer keeps
# bf16 copies of its hidden states that a run under bf16 autocast (TRL bf16=True, as `rigplan run` trains) does not:
# only without autocast PEFT casts a LoRA layer's input to its fp32 adapter's dtype (peft 0.21 tuners/lora/bnb.py
# Linear4bit.forward) and Unsloth's rewritten lora_forward casts it back to bf16 (unsloth_zoo 2026.10.9 compiler.py),
# so projections that share one input under autocast each save a copy. Measured on Qwen3-MoE first, 8,192 bytes a
# token (2 x hidden x 2), on the backward peaks of three 4-layer QLoRA pairs with checkpointing, which hold one
# layer's recompute: without autocast (h200-issue17-expandable/, -fit6/, -heldout8/) and under it
# (h200-qwen3moe-slack-snapshot/), 8192.0, 8192.0 and 8190.5 bytes a token at 8,192, 16,384 and 18,432 tokens. Then
# for each family on QLoRA pairs without checkpointing, the same shape in processes of their own, without autocast
# (h200-issue17-nockpt/, -nockpt-check/, -nockpt-deep/, -gptoss-nockpt/) and under it (h200-issue17-nockpt-autocast/,
# run against predictions that left out Qwen3-MoE's copies only): their allocated peaks differ by the copies below
# to within 0.1% of the copies (tests/test_issue17_runs.py). With checkpointing such a probe holds the recomputed
# layer's copies: the family terms fitted on probes without autocast count them, and the estimate takes them out of
# the recompute transient. Checked on the rows under autocast whose backward sets the peak, 4-8 layers, each family
# (Qwen3-MoE 1 x 4096 to 1 x 14336, gpt-oss 1 x 8192, Mixtral 1 x 16384, Qwen1.5-MoE 2 x 8192: h200-issue17-
# own-process-refit/, -autocast-slack/, -fresh-process/, -autocast/): they had allocated one layer's copies under the
# estimate (0.94-1.01 of them), and allocate it within 0.003 GiB without them. Copies a layer keeps in such a probe
# beyond a run, by family:
NO_AUTOCAST_COPIES_BY_TYPE = {"qwen3_moe": 2, "gpt_oss": 2, "mixtral": 1, "qwen2_moe": 1}


def without_autocast_bytes(model: ModelSpec, setup: Setup) -> int:
    """What a probe without autocast keeps beyond a run of the same shape (NO_AUTOCAST_COPIES_BY_TYPE): every layer's
    copies without checkpointing, the recomputed layer's with it. The estimate, which plans runs, leaves them out of
    the kept activations and of the recompute transient."""
    layers = model.num_hidden_layers if setup.checkpointing == "off" else 1
    return setup.tokens * layers * NO_AUTOCAST_COPIES_BY_TYPE.get(family(model), 0) * model.hidden_size * BF16_BYTES


def checkpoint_bytes(model: ModelSpec, setup: Setup, coeffs: Coefficients, autocast: bool = True) -> int:
    """Activations kept for backward: each layer's input with checkpointing, all of them without (and, without
    autocast, the mixture-of-experts layers' input copies: without_autocast_bytes)."""
    layers, h, i = model.num_hidden_layers, model.hidden_size, model.mean_active_intermediate
    if setup.checkpointing == "off":
        # Without checkpointing every layer keeps its attention and MLP activations (Korthikanti et al.
        # 2022, sec. 4.1: a multiple of hidden and MLP width per token per layer), and a mixture-of-experts
        # layer its routed copy of the hidden states besides (routed_copy_bytes, NOCKPT_ROUTED_SHARE_BY_TYPE).
        t = family(model)
        share = NOCKPT_ROUTED_SHARE_BY_TYPE_AND_METHOD.get((t, setup.method), NOCKPT_ROUTED_SHARE_BY_TYPE.get(t, 1.0))
        routed = share * routed_copy_bytes(model, setup)
        return int(setup.tokens * layers * (coeffs.nockpt_per_hidden * h + coeffs.nockpt_per_intermediate * i)
                   + layers * routed - (without_autocast_bytes(model, setup) if autocast else 0))
    # Checkpointing keeps one hidden-state tensor per layer (Chen et al. 2016, sec. 3).
    return int(setup.tokens * layers * coeffs.ckpt_per_hidden * h)


def recompute_transient_bytes(model: ModelSpec, setup: Setup, coeffs: Coefficients) -> int:
    """One layer's activations while it is recomputed and backpropagated (checkpointing on only)."""
    if setup.checkpointing == "off":
        return 0
    h, i = model.hidden_size, model.widest_active_intermediate
    own = TRANSIENT_PER_KV_BY_TYPE.get(family(model), 0.0) * kv_width(model)
    return int(setup.tokens * (coeffs.transient_per_hidden * h + own + coeffs.transient_per_intermediate * i)
               + routed_copy_bytes(model, setup) + fp32_swiglu_bytes(model, setup))


def kv_width(model: ModelSpec) -> int:
    """The width of one token's keys (or values): key/value heads x head dimension."""
    return model.num_key_value_heads * model.head_dim


# Phi-3.5-mini's recompute holds more per token than the reference families' (fitted on Llama, Mistral and Qwen),
# both methods. Its QLoRA rows missed by more as their tokens grew, whatever the split (0.24 GiB at 16,384 tokens as
# 1 x 16384 and as 4 x 4096). Likely its full multi-head attention (32 key/value heads of 32, where the reference
# models keep K and V at a third of the hidden width or less): about 1.6 more bf16 copies of K and V, so bytes per
# token and unit of key/value width (kv_width; Phi-3.5's is its hidden size, Phi-4's a quarter of it). Least squares
# through zero on the QLoRA 2 x 4096 and 1 x 16384 rows on the H200 (bench/results/h200-issue17-heldout3/
# probe-phi.jsonl; bench/family_terms.py phi3_transient).
TRANSIENT_PER_KV_BY_TYPE = {"phi3": 4.78}


def routed_copy_bytes(model: ModelSpec, setup: Setup) -> int:
    """Mixture-of-experts: the layer's hidden states gathered once per routed expert, sorted by expert for the
    grouped matmul (bf16, tokens x experts per token x hidden; unsloth_zoo temporary_patches/moe_utils.py,
    forward_native_grouped_mm). Qwen3-30B-A3B (8 per token) at 8,192 tokens: 0.25 GiB, what its runs held above
    the dense terms (bench/results/h200-issue17/)."""
    return setup.tokens * model.num_experts_per_tok * model.hidden_size * BF16_BYTES if model.experts else 0


# gpt-oss's expert activation (unsloth_zoo 2026.10.9 temporary_patches/gpt_oss.py swiglu_torch_forward, on both the
# 16-bit and the grouped 4-bit path) upcasts the gate and the linear half to fp32, clamps them and keeps the sigmoid
# and products in fp32: more bytes per routed token and expert width unit than the bf16 SwiGLU the transient
# coefficients were fitted on. Bytes per unit beyond them in a layer's recompute, by method (the two paths free
# them at different moments), fitted on gpt-oss-20b at 4 layers and 8,192 tokens on the H200 (16-bit LoRA 4 x 2048
# under bf16 autocast, as `rigplan run` trains: bench/results/h200-issue17-autocast-lora/, where probed without it
# the same shape held 0.28 GiB more, h200-gpt-oss/; QLoRA 2 x 4096, from a process of its own: h200-issue17-heldout3/;
# bench/family_terms.py); its other rows check them, 16-bit LoRA at 32,768 tokens among them
# (h200-issue17-gptoss-long/). A later reading of the source (docs/moe-saved-tensors.md, gpt-oss) found that a replica
# with fused experts, as the probes load, runs the fused Triton SwiGLU instead: the bytes are measured, their cause is
# not settled. Its 16-bit LoRA row under autocast held what the recomputed layer's input copies would, which the
# estimate takes out (NO_AUTOCAST_COPIES_BY_TYPE): the LoRA value, fitted with them out, counts those bytes.
FP32_SWIGLU_BYTES = {"lora": 9.65, "qlora": 7.0}


def fp32_swiglu_bytes(model: ModelSpec, setup: Setup) -> int:
    """gpt-oss only: its fp32 expert activation, per routed token and expert width unit."""
    if model.model_type != "gpt_oss":
        return 0
    per_unit = FP32_SWIGLU_BYTES.get(setup.method, 0.0)
    return int(setup.tokens * model.num_experts_per_tok * model.expert_intermediate * per_unit)


# Families whose Unsloth 2026.10.9 path computes the whole logits tensor for the loss instead of the fused loss's
# tiles, bytes per logit alive at the backward's peak, by method. Gemma 3 (12B at 8 layers, 262k vocabulary) held
# 3.07-3.09 bytes per logit above the other terms on its three LoRA runs (1 x 2048, 4 x 2048, 1 x 8192; H200,
# 2026-11-30, bench/results/h200-issue17/); its three QLoRA runs, not used for the figure, 3.02-3.04; its LoRA under
# bf16 autocast, as `rigplan run` trains, the same (h200-issue17-autocast-next/). Phi-3.5-mini holds none under
# autocast, either method: its 16-bit LoRA held 3.42 bytes per logit only when probed without autocast (h200-issue17-
# heldout2/), and under autocast allocated within 0.3% of the estimate without them at 4 x 2048 and 1 x 8192
# (h200-issue17-autocast-next/probe-phi.jsonl, 2026-12-01). Phi-4 (family "phi3-128") the same: its 16-bit LoRA held
# 2.37 bytes per logit probed without autocast at 8 layers (h200-issue17-heldout6/probe-phi4.jsonl), and under
# autocast, at 4 x 2048, 1.74 GiB less, within 0.4% of the estimate without them (h200-issue17-phi4-autocast/).
MATERIALISED_LOGITS_BYTES = {("gemma3", "lora"): 3.08, ("gemma3", "qlora"): 3.08, ("gemma3_text", "lora"): 3.08,
                             ("gemma3_text", "qlora"): 3.08}


def logits_bytes(model: ModelSpec, setup: Setup, coeffs: Coefficients, engine: str = "unsloth") -> int:
    # lm_head output and its gradient, vocab-wide per token: large for 128k-256k vocabularies.
    per_logit = coeffs.logits_per_vocab
    if engine == "unsloth":
        per_logit += MATERIALISED_LOGITS_BYTES.get((family(model), setup.method), 0.0)
    return int(setup.tokens * model.vocab_size * per_logit)


# Phi-3 through Unsloth's generic path holds memory that grows with the square of the sequence, as an explicit
# attention mask of micro_batch x seq x seq elements would: at the same 8,192 tokens its full-depth runs held 0.157
# GiB (LoRA) and 0.129 GiB (QLoRA) more at 1 x 8192 than at 4 x 2048 on the H200 (bench/results/h200-issue17-
# heldout2/probe-phi*.jsonl, 2026-11-30), and their attention ran 3x slower than the softmax-bound rate
# (speed.ATTENTION_TIME_BY_TYPE_AND_METHOD), as it does off FlashAttention. Bytes per mask element, fitted on the
# LoRA pair (bench/family_terms.py); the QLoRA pair checks it.
SEQ_SQUARED_BYTES_BY_TYPE = {"phi3": 3.36}


# Phi-3.5-mini (heads of 96) and Phi-4 (heads of 128) share model type "phi3" but not what Unsloth 2026.10.9 does
# with them. Phi-3.5's terms (its recompute, slack, attention mask and time, GPU factors) did not hold for Phi-4 at
# 8 layers on the H200, which trained as the reference families do, but for whole logits under 16-bit LoRA, fewer
# bytes each than Phi-3.5's (bench/results/h200-issue17-heldout5/ and -heldout6/probe-phi4.jsonl; the comparison in
# bench/results/README.md, the twelfth session). The family a model's fitted terms are keyed by: its model type, or
# for these the type and head size.
FAMILY_BY_TYPE_AND_HEAD_DIM = {("phi3", 128): "phi3-128"}


def family(model: ModelSpec) -> str:
    """The key of the model's fitted terms in the *_BY_TYPE tables (FAMILY_BY_TYPE_AND_HEAD_DIM)."""
    return FAMILY_BY_TYPE_AND_HEAD_DIM.get((model.model_type, model.head_dim), model.model_type)


def attention_mask_bytes(model: ModelSpec, setup: Setup) -> int:
    """The families whose attention keeps a micro_batch x seq x seq mask (SEQ_SQUARED_BYTES_BY_TYPE)."""
    per_element = SEQ_SQUARED_BYTES_BY_TYPE.get(family(model), 0.0)
    return int(setup.micro_batch * setup.seq_len * setup.seq_len * per_element)


def dequant_buffer_bytes(model: ModelSpec, setup: Setup) -> int:
    """QLoRA: the bf16 copy of a 4-bit weight that lives while its matmul runs. Unsloth's fast_dequantize
    writes each weight into a new tensor of its shape (kernels/utils.py, use_global_buffer=False in training)
    and the backward frees one before the next (kernels/fast_lora.py), so the largest projection's copy sets
    the peak: 0.44 GiB for a 70B layer's MLP, 0.11 for an 8B one. Llama-3.1-70B at 8 layers, 1 x 512 and
    1 x 1024, was 4.1% and 2.7% over the estimate before this term; the reference with it is within 1.8%."""
    if setup.method != "qlora":
        return 0
    shapes = model.linear_shapes() + (model.dense_layer_shapes() if model.dense_layers else [])
    return BF16_BYTES * max(n_in * n_out for _, n_in, n_out in shapes)


# Qwen3-MoE's QLoRA backward under Unsloth holds less of a layer's recompute per token than the terms above count (its
# 16-bit LoRA holds what they count; not so Mixtral's and Qwen1.5-MoE's: MOE_LORA_BACKWARD_BY_TYPE) and, beside it,
# the layer's whole dequantized gate_up stack (expert_dequant_phase_bytes): its allocated peak grew with the tokens at
# a lower rate, from a higher base. Shares of the recompute transient and of the stack, fitted through its QLoRA
# 1 x 16384 and 1 x 32768 rows at 4 layers on the H200 (bench/results/h200-issue17-heldout8/ and -fit6/;
# bench/family_terms.py qwen3_moe_qlora_backward); its rows at 2,048 to 8,192 tokens, at 4, 8 and 16 layers, check it.
# Mixtral's holds 0.83 of it and hardly any stack (from 12,288 to 32,768 tokens its allocated peak grew by 0.83 of the
# recompute transient), fitted the same way through its QLoRA 1 x 16384 and 1 x 32768 rows at 8 layers
# (h200-issue17-doublequant/, -mixtral-long/); its rows at 2,048 to 24,576 tokens, at 4 and 8 layers, check it.
# Qwen1.5-MoE's, as Qwen3-MoE's, holds part of the recompute and the whole stack: through its QLoRA 2 x 8192 and
# 4 x 8192 rows at 8 layers (h200-issue17-heldout9/); its rows at 2,048 to 16,384 tokens, at 4 to 24 layers, check it.
MOE_QLORA_BACKWARD_BY_TYPE = {"qwen3_moe": (0.816, 1.004), "mixtral": (0.827, 0.056), "qwen2_moe": (0.693, 0.951)}
# Yet Mixtral's reserved memory held the whole recompute transient as the reference counts it: beyond the allocated
# peak, its allocator kept 1.2-3.4 GiB at 12,288 to 32,768 tokens, growing with the tokens, against 0.2-0.5 at 8,192
# (same files). For these families the allocator's slack keeps the backward phase at the reference's transient
# (unlive_transient_bytes). So does its 16-bit LoRA's under autocast (MOE_LORA_BACKWARD_BY_TYPE): beyond its allocated
# peak 0.17 GiB at 2,048 tokens and 0.62-0.66 at 8,192 (h200-issue17-autocast-lora/), where the slack ratio gives
# 0.05 and 0.20 and the transient its backward does not hold 0.15 and 0.60.
WHOLE_TRANSIENT_RESERVED = {"mixtral"}
# Mixtral's and Qwen1.5-MoE's 16-bit LoRA backward under autocast, as runs train, holds a share of the recompute
# transient too, with no stack beside it (its experts stay bf16): as probed, the share of its 1 x 8192 row at 4
# layers (Mixtral, h200-issue17-autocast-lora/) and of its 2 x 8192 row at 8 (Qwen1.5-MoE, h200-issue17-autocast/;
# bench/family_terms.py moe_lora_backward); their other rows under autocast, 2,048 and 8,192 tokens, check it.
MOE_LORA_BACKWARD_BY_TYPE = {"mixtral": 0.841, "qwen2_moe": 0.854}


def moe_transient_bytes(model: ModelSpec, setup: Setup, transient: int, engine: str) -> int:
    """A layer's recompute transient (as recompute_transient_bytes counts it) as the family's backward holds it under
    Unsloth: QLoRA's share with the gate_up stack beside it (MOE_QLORA_BACKWARD_BY_TYPE), 16-bit LoRA's share
    (MOE_LORA_BACKWARD_BY_TYPE); unchanged elsewhere."""
    if engine != "unsloth" or not transient:
        return transient
    if setup.method == "lora" and family(model) in MOE_LORA_BACKWARD_BY_TYPE:
        return int(MOE_LORA_BACKWARD_BY_TYPE[family(model)] * transient)
    shares = MOE_QLORA_BACKWARD_BY_TYPE.get(family(model))
    if setup.method != "qlora" or not shares:
        return transient
    return int(shares[0] * transient + shares[1] * gate_up_stack_bytes(model))


def unlive_transient_bytes(model: ModelSpec, setup: Setup, parts: dict[str, int], transient: int, engine: str) -> int:
    """Reserved beyond the allocated peak where the allocator maps a layer's whole recompute transient (transient, as
    the reference counts it) though less of it is alive at once (WHOLE_TRANSIENT_RESERVED): how far the backward
    phase with the whole transient would rise above the allocated peak, which exceeds the backward phase by the
    terms of its other moments; 0 elsewhere."""
    if engine != "unsloth" or family(model) not in WHOLE_TRANSIENT_RESERVED:
        return 0
    beyond_backward = parts["loss_over_backward"] + parts["expert_dequant"] + parts["quantized_load"]
    return max(0, transient - parts["recompute_transient"] - beyond_backward)


def gate_up_stack_bytes(model: ModelSpec) -> int:
    """A layer's gate_up expert weights dequantized to bf16, every expert (expert_stack_params)."""
    return BF16_BYTES * expert_stack_params(model)[0]


def expert_dequant_phase_bytes(model: ModelSpec, setup: Setup, parts: dict[str, int], engine: str) -> int:
    """QLoRA on a mixture-of-experts model under Unsloth: while a layer's experts run, their NF4 stack is
    dequantized to bf16 for the grouped matmul (unsloth_zoo temporary_patches/moe_utils_bnb4bit.py
    forward_moe_backend_bnb4bit), the gate_up stack the larger at 2 x experts x expert width x hidden weights,
    beside the block's routed tensors (per token and routed expert: the gathered input and the down output,
    hidden wide, and the gate_up output and activation, 3 x expert width; bf16). The step's other tensors stay,
    one layer's recompute transient excepted. 0 where no such phase happens. Written from the source, then
    checked on the six H200 QLoRA runs of Qwen3-30B-A3B and Mixtral-8x7B (bench/results/h200-issue17/)."""
    if setup.method != "qlora" or not model.experts or engine != "unsloth":
        return 0
    h, width, k = model.hidden_size, model.expert_intermediate, model.num_experts_per_tok
    # Without checkpointing the routed tensors are the layer's kept activations (checkpoint_bytes), not beside them.
    routed = setup.tokens * k * (2 * h + 3 * width) * BF16_BYTES if setup.checkpointing != "off" else 0
    return backward_phase_bytes(parts) - parts["recompute_transient"] + gate_up_stack_bytes(model) + routed


# Unsloth's loss (unsloth_zoo 2026.10 fused_losses/fused_linear.py, the default fused linear cross-entropy)
# computes the loss and its gradient during the forward pass, a tile of fp32 logits at a time, the tile at
# most _BWD_TILE_BYTES = 256 MiB on CUDA: ~0.25 GiB for any micro-batch over ~520 tokens at a 128k vocabulary.
LOSS_TILE_BYTES = 256 * 2**20


def loss_tile_bytes(model: ModelSpec, setup: Setup) -> int:
    """The fused loss's fp32 logits tile (4 bytes per logit, capped), alive at the end of the forward pass."""
    return min(setup.tokens * model.vocab_size * FP32_BYTES, LOSS_TILE_BYTES)


def loss_phase_bytes(model: ModelSpec, setup: Setup, parts: dict[str, int], coeffs: Coefficients) -> int:
    """The step's bytes while the loss runs (end of the forward pass): the optimizer state, the adapters'
    gradients only when accumulating (set to None after each optimizer step), the kept activations, the
    logits tile, the gradient of the last hidden states (bf16, written in the forward) and the forward's
    other tensors at its end (a fitted multiple of tokens x hidden: 20-55 bytes on the H100 runs); none of
    the recompute's activations."""
    return int(parts["optimizer_state"] + parts["step_overhead"] + parts["activations_kept"]
               + (parts["lora_grads"] if setup.grad_accum > 1 else 0)
               + loss_tile_bytes(model, setup)
               + setup.tokens * model.hidden_size * (BF16_BYTES + coeffs.loss_per_hidden))


def backward_phase_bytes(parts: dict[str, int]) -> int:
    """The step's bytes during the backward pass, as the other step terms give them."""
    return sum(parts[k] for k in STEP_TERMS if k not in ("loss_over_backward", "expert_dequant"))


def loss_sets_peak(parts: dict[str, int]) -> bool:
    """Whether the loss, not the backward pass, sets the step's peak. On the H100 at 1 x 256-1024 tokens the
    forward pass did (bench/results/h100-width-memfloor, `phase_peak_alloc_gib`); at 1 x 2048 the two were
    level, and above it the backward pass set it. Without checkpointing the loss runs with every layer's
    activations kept, so it sets the peak."""
    return parts["loss_over_backward"] > 0  # components_bytes: how far the loss's moment exceeds the backward's


# The transformers + PEFT engine (trainer/engine.py, for families Unsloth fails on) keeps its checkpoints on the
# GPU where Unsloth offloads them, and its kernels are not fused: its step's bytes, measured against Unsloth's on
# the same plans and data (the 'hf' and 'rigplan' parts of bench/results/h100-tp-lora-121tok.json,
# h100-tp2-lora-2001tok.json, h100-tp3-{lora,qlora}-mb{1,2}.json: Llama-3.1-8B, LoRA and QLoRA, micro-batches
# 1-16, with and without checkpointing), are this multiple of Unsloth's: the median of those six runs' ratios
# (bench/engine_factors.py computes them; they spread from 1.3x to 2.9x, so the estimate is rougher there).
TRANSFORMERS_STEP_MEMORY = 1.93
# Gemma 2 on that engine (its decoder keeps four fp32-upcast norms and wide activations per layer): its step bytes
# were 7.1x the Unsloth estimate's on the H200 (Gemma-2-9B at 6 layers, padded 16 x 1,280, no checkpointing:
# 109.2 GiB where 1.93x predicted 29.6; bench/results/h200-runs/final/gemma2-L6-h200-lora.json; one run).
TRANSFORMERS_STEP_MEMORY_BY_TYPE = {"gemma2": 7.13}


# Packed micro-batches (examples back to back, trainer/batching.py) run Unsloth's decoder layers uncompiled
# (unsloth/models/_block_compile.py skips blocks given packed sequence lengths), which keeps more of each layer's
# tensors than the compiled path the coefficients were fitted on: a fixed part and a part per token per layer per
# hidden unit, least squares on the four packed runs of bench/results/h200-runs/ (Llama-3.1-8B, LoRA and QLoRA,
# budgets of 1,280-10,240 tokens, no checkpointing; H200, 2026-11-30).
PACKED_FIXED_BYTES = int(0.889 * 2**30)
PACKED_PER_HIDDEN = 1.81


def packed_uncompiled_bytes(model: ModelSpec, setup: Setup, batching: str) -> int:
    """What Unsloth's uncompiled layers hold beyond the compiled ones, for packed micro-batches only."""
    if batching != "packed":
        return 0
    return int(PACKED_FIXED_BYTES + PACKED_PER_HIDDEN * setup.tokens * model.num_hidden_layers * model.hidden_size)


def ddp_bucket_bytes(model: ModelSpec, setup: Setup) -> int:
    """DDP keeps its own buckets of the trainable parameters' gradients, all-reduced as they fill: together a
    second fp32 copy of every gradient (torch.nn.parallel.DistributedDataParallel, bucket_cap_mb 25)."""
    return lora_grads_bytes(model, setup.rank) if setup.parallelism == "ddp" else 0


def layer_weight_bytes(model: ModelSpec, method: str) -> int:
    """One decoder layer's frozen projections as stored: NF4 for QLoRA's nn.Linear ones, bf16 otherwise (a sparse
    layer of a mixture-of-experts model, the largest)."""
    linear, rest = split_layer_projections(model)
    return int(linear * (NF4_BYTES_PER_PARAM if method == "qlora" else BF16_BYTES) + rest * BF16_BYTES)


# FSDP2 gathers a layer's full weights before it runs and prefetches the next one's (torch.distributed.fsdp
# fully_shard, forward and backward prefetch of one module): two layers unsharded at a time.
FSDP_GATHERED_LAYERS = 2


def fsdp_gather_bytes(model: ModelSpec, setup: Setup) -> int:
    """The gathered layers' weights on each GPU (FSDP only)."""
    return FSDP_GATHERED_LAYERS * layer_weight_bytes(model, setup.method) if setup.parallelism == "fsdp" else 0


# What FSDP2 holds reserved beyond the estimate's allocated terms, in one layer's stored weights (its all-gather and
# copy-in buffers come from their own CUDA streams, whose cached blocks the compute stream cannot reuse), by method.
# QLoRA: the Llama-3.1-70B architecture at full width over two H200s capped at 24 GiB each, 8 layers: 8.1 layers'
# weights above the estimate without this term (fitted there); checked at 16 layers and at 80. 16-bit LoRA: the same
# at 8 layers capped at 48 GiB, 0.52 layers' (fitted there: bench/results/h200x2-fsdp/after-fix/a6000/).
FSDP_POOL_LAYERS_BY_METHOD = {"qlora": 8.0, "lora": 0.5}


def fsdp_pool_bytes(model: ModelSpec, setup: Setup) -> int:
    """FSDP2's stream-cached buffers, reserved on each GPU beyond the allocated peak (FSDP only)."""
    if setup.parallelism != "fsdp":
        return 0
    return int(FSDP_POOL_LAYERS_BY_METHOD[setup.method] * layer_weight_bytes(model, setup.method))


def sharded(nbytes: int, setup: Setup) -> int:
    """A term split N ways under FSDP (weights, adapters, gradients, optimizer state); whole otherwise."""
    return -(-nbytes // setup.num_gpus) if setup.parallelism == "fsdp" else nbytes


def loads_on_cpu(model: ModelSpec, setup: Setup) -> bool:
    """Sharded QLoRA from a pre-quantized 4-bit checkpoint: each process loads it into CPU memory (device_map cpu;
    nothing to quantize) and FSDP2 moves that process's shards to its GPU a layer at a time, bitsandbytes' quant
    states with them (two H200s, 70B architecture at 8 layers: 0.03 GiB on the GPU after loading, 1.3 GiB resident
    CPU memory per process, the checkpoint mapped from disk: bench/results/h200x2-fsdp/prequantized-cpuload/).
    Quantizing a 16-bit checkpoint on the CPU instead is no way: 5 of 75 weights in 20 s (torchrun gives each
    process one thread; bench/results/README.md, the fifth session)."""
    return setup.parallelism == "fsdp" and setup.method == "qlora" and model.prequantized


def quantized_load_bytes(model: ModelSpec, setup: Setup) -> int:
    """FSDP with QLoRA from a 16-bit checkpoint: transformers 5.17 loads a quantized model whole onto every
    process's GPU (bitsandbytes quantizes on the GPU, and its rank-0-only loading skips quantized models:
    modeling_utils.py, `is_fsdp_enabled() and not is_local_dist_rank_0() and not is_quantized`) before FSDP shards
    it: the run's peak is at least the whole 4-bit model, whatever the sharding saves later. 0 for other plans and
    for a pre-quantized checkpoint, which loads into CPU memory (loads_on_cpu)."""
    if setup.parallelism != "fsdp" or setup.method != "qlora" or loads_on_cpu(model, setup):
        return 0
    return base_weights_bytes(model, "qlora", "transformers")


def cpu_memory_bytes(model: ModelSpec, setup: Setup) -> int:
    """CPU memory a sharded plan needs, all processes of the host together (their peak resident memory, summed):
    - a pre-quantized 4-bit checkpoint (loads_on_cpu) is mapped from disk by every process, and FSDP2 moves each
      layer onto the GPU to shard it, so the whole file becomes resident in every process (pages the processes may
      share through the page cache are counted in each);
    - 16-bit weights are read by rank 0 alone, which broadcasts them (cpu_ram_efficient_loading; the full-size zero
      tensors transformers 5.17 gives the other processes are never written, so they take no memory: 24.0 GiB
      summed at 8 layers, 16.7 of them weights, bench/results/h200x2-fsdp/after-fix/);
    - QLoRA from a 16-bit checkpoint loads onto each GPU (quantized_load_bytes);
    - the offloaded shards, where the plan offloads, and each process's own runtime (PROCESS_CPU_BYTES)."""
    return sum(cpu_memory_terms(model, setup).values())


def cpu_memory_terms(model: ModelSpec, setup: Setup) -> dict[str, int]:
    """cpu_memory_bytes term by term (empty where nothing is sharded): the checkpoint as read (mapped whole by
    every process, or process 0's 16-bit read), the offloaded weights, the processes' runtime."""
    if setup.parallelism != "fsdp":
        return {}
    if loads_on_cpu(model, setup):
        checkpoint = setup.num_gpus * base_weights_bytes(model, "qlora", "transformers")
    else:
        checkpoint = base_weights_bytes(model, "lora") if setup.method == "lora" else 0
    return {"checkpoint_read": checkpoint, "offloaded_weights": cpu_offload_bytes(model, setup),
            "process_runtime": setup.num_gpus * PROCESS_CPU_BYTES}


# Each sharded process's resident CPU memory beside the weights (Python, torch, CUDA's host side, Unsloth): fitted
# on the 80-layer 70B QLoRA run on two H200s, its weights' share subtracted (bench/results/h200x2-fsdp/full-depth/).
PROCESS_CPU_BYTES = int(4.97 * 2**30)


def cpu_offload_bytes(model: ModelSpec, setup: Setup) -> int:
    """CPU memory the offloaded shards take, all GPUs together: the frozen weights (FSDP with cpu_offload)."""
    # FSDP trains on transformers + PEFT (Unsloth has no FSDP), so mixture-of-experts experts stay bf16 there.
    offloaded = setup.parallelism == "fsdp" and setup.cpu_offload
    return base_weights_bytes(model, setup.method, "transformers") if offloaded else 0


def components_bytes(model: ModelSpec, setup: Setup, coeffs: Coefficients, engine: str = "unsloth",
                     batching: str = "padded", autocast: bool = True) -> dict[str, int]:
    """Every memory term of one configuration, per GPU; the one place they are added up. autocast: whether the step
    runs under bf16 autocast, as `rigplan run` trains on a GPU with bf16 (TRL bf16=True); on one without, Unsloth
    trains without autocast and a mixture-of-experts layer keeps copies of its input (without_autocast_bytes)."""
    offloaded = setup.parallelism == "fsdp" and setup.cpu_offload
    whole = quant_state_bytes(model, setup)  # on every GPU, sharded or offloaded
    transient = recompute_transient_bytes(model, setup, coeffs)
    # the recomputed layer's input copies that the terms fitted on probes without autocast hold and a run does not
    copies = without_autocast_bytes(model, setup) if transient and autocast else 0
    parts = {
        "base_weights": whole + (0 if offloaded else sharded(
            base_weights_bytes(model, setup.method, engine) - whole, setup)),
        "lora_weights": sharded(lora_weights_bytes(model, setup.rank), setup),
        "lora_grads": sharded(lora_grads_bytes(model, setup.rank), setup),
        "optimizer_state": sharded(optimizer_state_bytes(model, setup.rank, setup.optimizer), setup),
        "loaded_overhead": int(coeffs.fixed_bytes),
        "step_overhead": int(coeffs.step_fixed_bytes),
        "activations_kept": checkpoint_bytes(model, setup, coeffs, autocast),
        "recompute_transient": moe_transient_bytes(model, setup, transient, engine) - copies,
        "logits_loss": logits_bytes(model, setup, coeffs, engine),
        "dequant_buffer": dequant_buffer_bytes(model, setup),
        "attention_mask": attention_mask_bytes(model, setup),
        "packed_uncompiled": packed_uncompiled_bytes(model, setup, batching) if engine == "unsloth" else 0,
        "ddp_buckets": ddp_bucket_bytes(model, setup),
        "fsdp_gather": fsdp_gather_bytes(model, setup),
    }
    # The peak is the larger of the two phases; this term is how far the loss's exceeds the backward's.
    parts["loss_over_backward"] = max(0, loss_phase_bytes(model, setup, parts, coeffs) - backward_phase_bytes(parts))
    dequant = expert_dequant_phase_bytes(model, setup, parts, engine)
    parts["expert_dequant"] = max(0, dequant - backward_phase_bytes(parts) - parts["loss_over_backward"])
    parts["quantized_load"] = 0  # the step's peak without it first
    parts["quantized_load"] = max(0, quantized_load_bytes(model, setup) - peak_allocated_bytes(parts))
    ratio = 0.0 if engine == "unsloth" and (family(model), setup.method) in FAMILY_SLACK_ONLY else slack_ratio(setup,
                                                                                                            coeffs)
    parts["allocator_slack"] = (int(step_bytes(parts) * ratio) + family_slack_bytes(model, setup, engine)
                                + unlive_transient_bytes(model, setup, parts, transient - copies, engine))
    if engine == "transformers":
        factor = TRANSFORMERS_STEP_MEMORY_BY_TYPE.get(model.model_type, TRANSFORMERS_STEP_MEMORY)
        for k in STEP_TERMS + ("allocator_slack",):
            parts[k] = int(parts[k] * factor)
    parts["fsdp_pool"] = fsdp_pool_bytes(model, setup)
    parts["cuda_context"] = int(coeffs.context_bytes)
    return parts


# Allocated during a step and freed after it; the rest is loaded once (weights and adapters).
STEP_TERMS = ("lora_grads", "optimizer_state", "step_overhead", "activations_kept", "recompute_transient",
              "logits_loss", "dequant_buffer", "attention_mask", "packed_uncompiled", "ddp_buckets", "fsdp_gather",
              "loss_over_backward", "expert_dequant")


def step_bytes(parts: dict[str, int]) -> int:
    return sum(parts[k] for k in STEP_TERMS)


# Unsloth's QLoRA on the generic-path and mixture-of-experts families keeps reserved memory beyond its allocated peak
# that the reference's slack ratio (fitted on Llama, Mistral and Qwen's fast path) does not give, and that does not
# grow with the step's bytes (the estimate held their allocated peaks within 5%). GiB per family: the mean excess
# of measured over estimated reserved memory on its first recorded QLoRA rows on the H200 from a process of their own
# (Qwen3-30B-A3B at 1 x 2048, 4 x 2048, 1 x 8192: bench/results/h200-issue17-expandable/; Gemma-3-12B at the same:
# -expandable/, -fresh-process/; gpt-oss-20b: -heldout3/; bench/family_terms.py refits them), its later rows checking it
# (tests/test_issue17_runs.py). Mixtral's rows held less than the estimate: none. The allocator's own scatter stays in the error (Gemma 3 at 4 x 2048 held 1.0 and
# 1.7 GiB beyond its allocated peak under two allocator settings).
# Phi-3.5-mini's grows with the tokens of a micro-batch (0.30 GiB at 2,048 tokens, 0.67-0.81 at 16,384): a constant
# plus bytes per token and unit of key/value width, as its recompute (QLORA_SLACK_PER_KV_BY_TYPE), least squares
# over its QLoRA 1 x 2048, 4 x 2048 (h200-issue17-fresh-process/) and 2 x 4096, 1 x 16384 rows (-heldout3/;
# bench/family_terms.py phi3_qlora_slack), its 1 x 8192 and 4 x 4096 rows checking it. Qwen1.5-MoE's: its QLoRA
# 1 x 2048 row, the first that trained the adapters planned (h200-issue17-heldout5/), its 4 x 2048 and 1 x 8192 rows
# checking it.
QLORA_SLACK_GIB_BY_TYPE = {"qwen3_moe": 0.572, "gemma3_text": 0.272, "gemma3": 0.272, "phi3": 0.125, "gpt_oss": 0.267,
                           "qwen2_moe": 0.447}
QLORA_SLACK_PER_KV_BY_TYPE = {"phi3": 3.37}
# Qwen3-MoE's QLoRA held 0.45-0.77 GiB beyond its allocated peak at 2,048 to 8,192 tokens and at 32,768, but
# 0.13-0.25 at most single sequences from 12,288 to 24,576 (0.60 at 18,432), at 4, 8 and 16 layers alike
# (bench/results/h200-issue17*/probe-qwen3moe*.jsonl): the constant holds the larger, the side that does not run out
# of memory. Memory snapshots (h200-qwen3moe-slack-snapshot/) show why there is no trend: the large pool last grows
# for one of the step's largest transients (a layer's dequantized gate_up stack, the routed tokens' buffer), which
# the largest free hole misses by under 5%, and their sizes move with the tokens. Qwen1.5-MoE's held 0.41-0.59 GiB
# from 2,048 to 32,768 tokens (0.14 once, at 2 x 8192; h200-issue17-heldout5/, -doublequant/, -heldout8/, -heldout9/,
# -mixtral-long/). The reference's slack grows with the step's bytes: for the families and methods here, the family's
# constant alone.
FAMILY_SLACK_ONLY = {("qwen3_moe", "qlora"), ("qwen2_moe", "qlora")}
# Their 16-bit LoRA too, for Qwen3-MoE and Gemma 3: reserved memory beyond the allocated peak that grows with the
# tokens of a micro-batch (Qwen3-30B-A3B 0.14 GiB at 2,048 tokens, 0.49 at 16,384), bytes per token and hidden unit,
# least squares through zero on each family's first LoRA rows (bench/results/h200-issue17/, 1 x 2048, 4 x 2048,
# 1 x 8192; bench/family_terms.py lora_slack), their 2 x 4096 and 1 x 16384 rows (h200-issue17-heldout2/) checking
# it.
LORA_SLACK_PER_HIDDEN_BY_TYPE = {"qwen3_moe": 16.2, "gemma3_text": 14.9, "gemma3": 14.9}
# Qwen1.5-MoE's 16-bit LoRA holds a constant 0.2-0.3 GiB beyond its allocated peak at 2,048 and 8,192 tokens, as
# its QLoRA does (a constant, not per token): GiB, its LoRA 1 x 2048 row (h200-issue17-heldout5/; bench/
# family_terms.py constant_slack), its 4 x 2048 and 1 x 8192 rows checking it.
LORA_SLACK_GIB_BY_TYPE = {"qwen2_moe": 0.295}


# Mixtral's QLoRA without checkpointing held 1.5-3.8 GiB beyond its allocated peak from 2,048 to 32,768 tokens, at 4
# and at 8 layers alike (bench/results/h200-issue17-nockpt*/probe-mixtral.jsonl), where the reference's slack
# without checkpointing is a hundredth of the step's bytes: about the bf16 gate_up stack its experts dequantize
# (gate_up_stack_bytes, 1.75 GiB) at 2,048 tokens, growing with the tokens. GiB, and bytes per token and hidden unit:
# least squares over the 4-layer 1 x 2048, 1 x 16384 and 1 x 32768 rows (h200-issue17-nockpt-fit/; bench/
# family_terms.py nockpt_qlora_slack); its 4-layer rows at 8,192 and 24,576 tokens and its 8- and 12-layer rows check
# it. Qwen1.5-MoE's held 0.08-0.23 GiB, where its QLoRA with checkpointing held 0.41-0.59: the mean excess on its 4- and
# 8-layer 1 x 8192 rows (nockpt_constant_slack), the 1 x 2048 rows checking it. Qwen3-MoE's keeps its family constant.
# gpt-oss-20b's grows with the tokens, and held more without autocast (0.21-1.43 GiB, h200-issue17-gptoss-nockpt/)
# than under it as runs train (0.36 against 0.50 at 4 layers and 1 x 8192): the line through its 4-layer QLoRA
# 1 x 2048 and 1 x 16384 rows under autocast (h200-issue17-autocast-slack/; bench/family_terms.py
# gpt_oss_nockpt_slack). Its other rows under autocast check it: 1 x 8192 at 4, 8 and 16 layers (-nockpt-autocast/,
# -gptoss-depth-autocast/: 0.36, 0.52 and 0.95 GiB, the estimate's slack 0.56-0.65), `rigplan run` at 4 layers and
# 16 x 1280 (h200-issue17-moe-runs/: 0.89, the estimate's 1.24). For both methods, as its kept bytes
# (NOCKPT_ROUTED_SHARE_BY_TYPE): its 16-bit LoRA at 8 layers and 1 x 8192 held 0.65 (h200-issue17-autocast-next/).
NOCKPT_SLACK_BY_TYPE_AND_METHOD = {("mixtral", "qlora"): (1.434, 14.8), ("qwen2_moe", "qlora"): (0.225, 0.0)}
NOCKPT_SLACK_BY_TYPE = {"gpt_oss": (0.113, 18.9)}


def family_slack_bytes(model: ModelSpec, setup: Setup, engine: str) -> int:
    """The family's slack under Unsloth (without checkpointing NOCKPT_SLACK_BY_TYPE_AND_METHOD or NOCKPT_SLACK_BY_TYPE
    where it has an entry; QLoRA: QLORA_SLACK_GIB_BY_TYPE, QLORA_SLACK_PER_KV_BY_TYPE; LoRA: LORA_SLACK_GIB_BY_TYPE,
    LORA_SLACK_PER_HIDDEN_BY_TYPE); 0 otherwise."""
    if engine != "unsloth":
        return 0
    t = family(model)
    nockpt = NOCKPT_SLACK_BY_TYPE_AND_METHOD.get((t, setup.method), NOCKPT_SLACK_BY_TYPE.get(t))
    if setup.checkpointing == "off" and nockpt:
        gib, per_hidden = nockpt
        return int(gib * 2**30 + per_hidden * setup.tokens * model.hidden_size)
    if setup.method == "lora":
        return int(LORA_SLACK_GIB_BY_TYPE.get(t, 0.0) * 2**30
                   + LORA_SLACK_PER_HIDDEN_BY_TYPE.get(t, 0.0) * setup.tokens * model.hidden_size)
    return int(QLORA_SLACK_GIB_BY_TYPE.get(t, 0.0) * 2**30
               + QLORA_SLACK_PER_KV_BY_TYPE.get(t, 0.0) * setup.tokens * kv_width(model))


def slack_ratio(setup: Setup, coeffs: Coefficients) -> float:
    """Slack per step byte. Fitted on the recorded H100 runs: 0.068 with checkpointing, 0.097 for QLoRA, 0.008
    without checkpointing; a share of all allocated bytes instead missed 3B-8B QLoRA at 16-32k tokens by 6-7%."""
    if setup.checkpointing == "off":
        return coeffs.nockpt_slack_ratio
    return coeffs.slack_ratio + (coeffs.qlora_slack_ratio if setup.method == "qlora" else 0.0)


ALLOCATED_TERMS = ("base_weights", "lora_weights", "lora_grads", "optimizer_state", "loaded_overhead",
                   "step_overhead", "activations_kept", "recompute_transient", "logits_loss", "dequant_buffer",
                   "attention_mask", "packed_uncompiled", "ddp_buckets", "fsdp_gather", "loss_over_backward",
                   "expert_dequant", "quantized_load")


def peak_allocated_bytes(parts: dict[str, int]) -> int:
    """torch.cuda.max_memory_allocated(): tensors alive at the step's peak."""
    return sum(parts[k] for k in ALLOCATED_TERMS)


def peak_reserved_bytes(parts: dict[str, int]) -> int:
    """torch.cuda.max_memory_reserved(): allocated plus the caching allocator's slack (and FSDP2's stream pools)."""
    return peak_allocated_bytes(parts) + parts["allocator_slack"] + parts["fsdp_pool"]


def total_bytes(parts: dict[str, int]) -> int:
    """What nvidia-smi shows: reserved plus the CUDA context and library workspaces."""
    return peak_reserved_bytes(parts) + parts["cuda_context"]
