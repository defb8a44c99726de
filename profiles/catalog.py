"""Load and validate the model and GPU rows (models.json, gpus.json) into frozen specs; resolve names.

Standard library only: `rigplan check` reads these in milliseconds and never imports torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

from rigplan.errors import UnknownGpuError, UnknownModelError

PROFILES_DIR = Path(__file__).resolve().parent

# config.json keys that differ by family: (key, default when the config leaves it out).
# Defaults are those of each transformers config class (LlamaConfig, Qwen2Config, Gemma2Config, ...).
TIED_BY_DEFAULT = {"gemma", "gemma2", "gemma3", "gemma3_text"}
# Qwen2's attention always has q/k/v bias (modeling_qwen2.py hard-codes bias=True); its config has no key.
# GptOssConfig defaults attention_bias to True (configuration_gpt_oss.py, transformers 5.17); Qwen2MoeConfig names it
# qkv_bias, default True (configuration_qwen2_moe.py: q/k/v_proj bias=config.qkv_bias, o_proj none).
BIAS_BY_DEFAULT = {"qwen2", "qwen2_moe", "gpt_oss"}
# Phi-3 fuses q/k/v into qkv_proj and gate/up into gate_up_proj (modeling_phi3.py).
FUSED_PROJECTIONS = {"phi3"}
# Gemma 2/3 put a norm before and after both attention and MLP (4 per layer, modeling_gemma2.py).
FOUR_NORMS = {"gemma2", "gemma3", "gemma3_text"}
# Qwen3 and Gemma 3 normalise queries and keys per head (q_norm, k_norm of size head_dim).
QK_NORM = {"qwen3", "qwen3_moe", "gemma3", "gemma3_text"}
# gpt-oss (transformers 5.17 models/gpt_oss/modeling_gpt_oss.py) beyond the Mixtral-like terms:
# - GptOssAttention: q/k/v/o_proj nn.Linear(..., bias=config.attention_bias), o_proj's bias included, and
#   `self.sinks = nn.Parameter(torch.empty(config.num_attention_heads))`, one learned sink per head per layer;
# - GptOssTopKRouter: weight [num_local_experts, hidden] and bias [num_local_experts];
# - GptOssExperts: fused 3-D parameters gate_up_proj [E, hidden, 2 x intermediate] + gate_up_proj_bias
#   [E, 2 x intermediate], down_proj [E, intermediate, hidden] + down_proj_bias [E, hidden];
# - layers alternate sliding_attention (window config.sliding_window) and full_attention (config.layer_types).
# The checkpoint stores the experts in MXFP4 (quantization_config quant_method "mxfp4"); training holds them as
# follows, and the estimate counts them in bf16 for LoRA, and in NF4 for Unsloth's QLoRA (estimator/memory.py
# base_weights_bytes, as measured for Mixtral's and Qwen3-MoE's fused experts):
# - transformers 5.17 quantizers/quantizer_mxfp4.py, Mxfp4HfQuantizer.is_trainable: "MXFP4 quantization don't
#   support training, please consider dequantizing the model first by passing
#   quantization_config=Mxfp4Config(dequantize=True)", and validate_environment sets dequantize = True (bf16)
#   on CPU or without the triton kernels: 16-bit LoRA holds bf16 experts, as counted.
# - Unsloth 2026.10.9: unsloth_zoo temporary_patches/gpt_oss.py patch_gpt_oss sets is_trainable to True and
#   keeps MXFP4 experts where triton_kernels imports (bf16 otherwise: "MXFP4 GPT OSS weights will be
#   dequantized to bf16"); for 4-bit loads unsloth/models/mapper.py maps openai/gpt-oss-20b to
#   unsloth/gpt-oss-20b-unsloth-bnb-4bit, whose experts are per-expert nn.Linear (GptOssExpertsBnb4bit,
#   "ModuleLists of nn.Linear ... so BitsAndBytes can quantize them"): Unsloth's QLoRA holds the experts in
#   NF4, as counted; measured at 4 layers on the H200 (bench/results/h200-gpt-oss/, tests/test_issue17_runs.py).
GPT_OSS = {"gpt_oss"}
GPT_OSS_SLIDING_WINDOW = 128  # GptOssConfig's default sliding_window
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class ModelSpec:
    """One model's architecture, as its config.json gives it; params_total is derived once."""

    id: str
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    attention_bias: bool = False
    architectures: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    rope_theta: float | None = None
    sliding_window: int | None = None
    num_local_experts: int = 0
    """Experts per MoE layer, as Mixtral's config.json names them."""
    num_experts: int = 0
    """Experts per MoE layer, as Qwen3-MoE's config.json names them."""
    num_experts_per_tok: int = 0
    """Experts each token is routed to."""
    moe_intermediate_size: int = 0
    """Each expert's MLP width where the config gives it apart from intermediate_size (Qwen3-MoE)."""
    shared_expert_intermediate_size: int = 0
    """The width of the shared expert every token also goes through, gated by a sigmoid (Qwen2-MoE: transformers
    5.17 Qwen2MoeSparseMoeBlock's shared_expert, a Qwen2MoeMLP of nn.Linear gate/up/down_proj, and its
    shared_expert_gate, nn.Linear(hidden, 1)); 0: none."""
    dense_layer_ids: tuple[int, ...] = ()
    """Mixture-of-experts: the decoder layers (0-based) that hold one dense MLP of intermediate_size instead of
    experts: Qwen-MoE's mlp_only_layers and the layers its decoder_sparse_step skips (transformers 5.17
    Qwen2MoeDecoderLayer, Qwen3MoeDecoderLayer: sparse where `layer_idx not in mlp_only_layers and (layer_idx + 1)
    % decoder_sparse_step == 0`). The per-layer shapes and counts below are a sparse layer's; the decoder_*
    totals add these."""
    params_active_published: int | None = None
    """Parameters one token computes with, as the model's publisher counts them."""
    prequantized: bool = False
    """Named by a pre-quantized 4-bit checkpoint (Unsloth's `...-bnb-4bit` copies): only QLoRA trains it."""
    params_published: int | None = None
    params_note: str = ""
    published_counts_lm_head: bool = False
    """The published total counts an lm_head the checkpoint stores although the config ties it."""
    published_active_excludes_embedding: bool = False
    """The published active count leaves the input embedding out (gpt-oss's model card, Table 1: "Unembedding
    parameters are counted towards active, but not embeddings")."""
    layer_types: tuple[str, ...] = ()
    """Each decoder layer's attention, as config.json's layer_types gives it (full_attention or
    sliding_attention, the latter over the last sliding_window tokens); empty: every layer full."""
    source: str = ""

    @property
    def hub_id(self) -> str:
        """The id to download weights from: the first alias that looks like a hub id, else the id."""
        return next((a for a in self.aliases if "/" in a), self.id)

    @cached_property
    def experts(self) -> int:
        """Experts per MoE layer; 0 for a dense model."""
        return self.num_local_experts or self.num_experts

    @property
    def expert_intermediate(self) -> int:
        return self.moe_intermediate_size or self.intermediate_size

    @property
    def active_intermediate(self) -> int:
        """MLP units a token computes with per layer: its routed experts' together (and the shared expert's), or
        the dense MLP's."""
        if not self.experts:
            return self.intermediate_size
        return self.num_experts_per_tok * self.expert_intermediate + self.shared_expert_intermediate_size

    @cached_property
    def dense_layers(self) -> int:
        """Layers of a mixture-of-experts model with a dense MLP (a reduced-depth copy keeps its first layers')."""
        return sum(1 for i in self.dense_layer_ids if i < self.num_hidden_layers) if self.experts else 0

    @cached_property
    def main_layers(self) -> int:
        """Layers shaped as the per-layer methods describe: every layer of a dense model, the sparse ones of a
        mixture-of-experts model."""
        return self.num_hidden_layers - self.dense_layers

    def dense_layer_shapes(self) -> list[tuple[str, int, int]]:
        """A dense layer's projections among a mixture-of-experts model's (attention and an MLP of
        intermediate_size, all nn.Linear)."""
        return self._attention_shapes() + self._mlp_shapes(self.intermediate_size)

    def _sum(self, shapes: list[tuple[str, int, int]], dense: list[tuple[str, int, int]], per: Any) -> int:
        return (self.main_layers * sum(per(n_in, n_out) for _, n_in, n_out in shapes)
                + self.dense_layers * sum(per(n_in, n_out) for _, n_in, n_out in dense))

    @cached_property
    def decoder_linear_params(self) -> int:
        """Every layer's nn.Linear weights (what bitsandbytes quantizes under QLoRA): the projections LoRA targets
        in a main layer, all of a dense layer's."""
        return self._sum(self.linear_shapes(), self.dense_layer_shapes(), lambda i, o: i * o)

    @cached_property
    def decoder_active_params(self) -> int:
        """Every layer's projection weights one token computes through (routed experts only in sparse layers)."""
        return self._sum(self.active_shapes(), self.dense_layer_shapes(), lambda i, o: i * o)

    @cached_property
    def decoder_lora_dims(self) -> int:
        """in + out features summed over every projection LoRA adapts, in every layer (a dense layer's MLP where
        its names are among the targets: none of a mixture-of-experts model's, whose shared expert's targets are
        named shared_expert.gate_proj ...)."""
        dense = [s for s in self.dense_layer_shapes() if s[0] in self.target_modules]
        return self._sum(self.linear_shapes(), dense, lambda i, o: i + o)

    @cached_property
    def mean_active_intermediate(self) -> float:
        """active_intermediate averaged over the layers (dense ones: intermediate_size), for terms summed over
        layers."""
        return ((self.main_layers * self.active_intermediate + self.dense_layers * self.intermediate_size)
                / self.num_hidden_layers)

    @property
    def widest_active_intermediate(self) -> int:
        """The widest layer's active MLP units, for one layer's transient."""
        return max(self.active_intermediate, self.intermediate_size if self.dense_layers else 0)

    def _attention_shapes(self) -> list[tuple[str, int, int]]:
        h, hd = self.hidden_size, self.head_dim
        q_out, kv_out = self.num_attention_heads * hd, self.num_key_value_heads * hd
        if self.model_type in FUSED_PROJECTIONS:
            return [("qkv_proj", h, q_out + 2 * kv_out), ("o_proj", q_out, h)]
        return [("q_proj", h, q_out), ("k_proj", h, kv_out), ("v_proj", h, kv_out), ("o_proj", q_out, h)]

    def _mlp_shapes(self, width: int) -> list[tuple[str, int, int]]:
        h = self.hidden_size
        if self.model_type in FUSED_PROJECTIONS or self.model_type in GPT_OSS:
            return [("gate_up_proj", h, 2 * width), ("down_proj", width, h)]
        return [("gate_proj", h, width), ("up_proj", h, width), ("down_proj", width, h)]

    def _shared_shapes(self) -> list[tuple[str, int, int]]:
        """The shared expert's projections (nn.Linear modules mlp.shared_expert.gate_proj ...: transformers 5.17
        Qwen2MoeSparseMoeBlock); none without one. Named with their module's parent, which PEFT matches as a
        suffix: Unsloth 2026.10.9 reads a bare gate_proj/up_proj/down_proj in a mixture-of-experts model's
        target_modules as "every routed expert too" (unsloth/models/_utils.py get_moe_target_parameters, dotted
        names left alone), which trained 60 experts' adapters the plan did not count on Qwen1.5-MoE (34.5M
        trainable against 2.5M planned at 4 layers: bench/results/h200-issue17-qwen2moe/)."""
        width = self.shared_expert_intermediate_size
        if not (self.experts and width):
            return []
        return [(f"shared_expert.{name}", n_in, n_out) for name, n_in, n_out in self._mlp_shapes(width)]

    def weight_shapes(self) -> list[tuple[str, int, int]]:
        """Every per-layer projection the layer stores, as (name, in_features, out_features): attention, and
        the MLP, once per expert in a mixture-of-experts layer, and its shared expert's."""
        return (self._attention_shapes() + self._mlp_shapes(self.expert_intermediate) * max(1, self.experts)
                + self._shared_shapes())

    def active_shapes(self) -> list[tuple[str, int, int]]:
        """The projections one token computes through per layer: attention, its routed experts' MLPs and the
        shared expert."""
        routed = self.num_experts_per_tok if self.experts else 1
        return self._attention_shapes() + self._mlp_shapes(self.expert_intermediate) * routed + self._shared_shapes()

    def linear_shapes(self) -> list[tuple[str, int, int]]:
        """The per-layer projections LoRA targets. Dense models: all of them (Unsloth's seven, or Phi-3's fused
        four). Mixture-of-experts: attention (and a shared expert's nn.Linear gate/up/down_proj), rigplan's stated
        default: transformers 5.17 stores each layer's routed experts as
        fused 3-D parameters (MixtralExperts, Qwen3MoeExperts, Qwen2MoeExperts: gate_up_proj, down_proj), which
        LoRA's target_modules do not match; PEFT's target_parameters would give every expert its own adapter."""
        return self._attention_shapes() + self._shared_shapes() if self.experts else self.weight_shapes()

    @property
    def target_modules(self) -> tuple[str, ...]:
        """LoRA target names: Unsloth's seven projections, or Phi-3's fused four."""
        return tuple(dict.fromkeys(name for name, _, _ in self.linear_shapes()))

    def layer_params(self, active: bool = False, dense: bool = False) -> int:
        """Parameters of one decoder layer: projections (active: only those a token is routed through), their
        biases, norms, MoE router; gpt-oss's attention sinks, router bias and expert biases. dense: a dense layer of
        a mixture-of-experts model (dense_layer_ids), its MLP's and attention's."""
        shapes = self.dense_layer_shapes() if dense else self.active_shapes() if active else self.weight_shapes()
        linear = sum(n_in * n_out for _, n_in, n_out in shapes)
        hd = self.head_dim
        bias = (self.num_attention_heads + 2 * self.num_key_value_heads) * hd if self.attention_bias else 0
        norms = (4 if self.model_type in FOUR_NORMS else 2) * self.hidden_size
        norms += 2 * hd if self.model_type in QK_NORM else 0
        if dense:
            return linear + bias + norms
        router = self.hidden_size * self.experts
        router += self.hidden_size if self._shared_shapes() else 0  # shared_expert_gate, nn.Linear(hidden, 1)
        sinks = 0
        if self.model_type in GPT_OSS:
            bias += self.hidden_size if self.attention_bias else 0  # o_proj's bias
            routed = self.num_experts_per_tok if active else self.experts
            bias += routed * (2 * self.expert_intermediate + self.hidden_size)  # gate_up_proj_bias, down_proj_bias
            router += self.experts  # the router's bias
            sinks = self.num_attention_heads  # one logit per head, added to the attention softmax's denominator
        return linear + bias + norms + router + sinks

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        """The output projection's own weights: none when it shares the embedding matrix."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def params_as_published(self) -> int:
        """params_total counted the way params_published was (a stored tied lm_head counted twice)."""
        extra = self.vocab_size * self.hidden_size if self.published_counts_lm_head and self.tie_word_embeddings else 0
        return self.params_total + extra

    @property
    def params_active_as_published(self) -> int:
        """params_active counted the way params_active_published was (the input embedding left out where the
        publisher leaves it out)."""
        return self.params_active - (self.embedding_params if self.published_active_excludes_embedding else 0)

    @cached_property
    def params_active(self) -> int:
        """Parameters one token computes with: as params_total, the experts it is not routed to left out."""
        return (self.embedding_params + self.main_layers * self.layer_params(active=True)
                + self.dense_layers * self.layer_params(dense=True) + self.hidden_size + self.lm_head_params)

    @cached_property
    def params_total(self) -> int:
        # Embeddings + layers + final norm + untied lm_head: how Hugging Face counts a model's size.
        return (self.embedding_params + self.main_layers * self.layer_params()
                + self.dense_layers * self.layer_params(dense=True) + self.hidden_size + self.lm_head_params)


@dataclass(frozen=True)
class GpuSpec:
    """One GPU as its vendor's spec sheet gives it; memory in GiB, bandwidth in GB/s (1e9)."""

    id: str
    name: str
    nvml_name: str
    memory_gib: float
    bandwidth_gb_s: float
    bf16_dense_tflops: float
    compute_capability: str
    bf16: bool
    source: str
    fp16_dense_tflops: float | None = None
    architecture: str = ""
    aliases: tuple[str, ...] = ()
    price_usd: float | None = None
    source_2: str | None = None
    note: str = ""
    """How a figure the spec sheet does not print was derived from ones it does (its sources named)."""
    pcie_gen: int = 4
    """PCI Express generation of the card's host link (its spec sheet): the path between cards without NVLink,
    and to CPU memory."""
    pcie_lanes: int = 16
    nvlink_gb_s: float | None = None
    """NVLink bandwidth between two such GPUs, GB/s both directions together as vendors quote it, where every
    such card has it (SXM boards, NVL pairs); None: cards talk over PCIe (an optional bridge is not assumed)."""

    @property
    def pcie_gb_s(self) -> float:
        """One direction of the host link, GB/s: 0.985 GB/s per lane at gen 3 (PCI-SIG, 8 GT/s with 128b/130b
        encoding), doubling each generation."""
        return 0.985 * 2 ** (self.pcie_gen - 3) * self.pcie_lanes

    @property
    def link_gb_s(self) -> float:
        """One direction of the fastest path between two of these GPUs, GB/s."""
        return self.nvlink_gb_s / 2 if self.nvlink_gb_s else self.pcie_gb_s

    @property
    def tensor_tflops(self) -> float:
        """The dense 16-bit tensor rate training runs at: bf16 where supported, fp16 otherwise (T4)."""
        return self.bf16_dense_tflops if self.bf16 else (self.fp16_dense_tflops or self.bf16_dense_tflops)


MODEL_REQUIRED = ("id", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
                  "tie_word_embeddings", "max_position_embeddings", "params_published", "source")
GPU_REQUIRED = ("id", "name", "nvml_name", "memory_gib", "bandwidth_gb_s", "bf16_dense_tflops",
                "compute_capability", "bf16", "source")


def _build(cls: type, row: dict[str, Any], required: tuple[str, ...], where: str) -> Any:
    """A spec from one row; every missing or unknown key is reported at once."""
    fields = {f.name for f in dataclasses.fields(cls)}
    problems = [f"missing {k!r}" for k in required if row.get(k) is None]
    problems += [f"unknown key {k!r}" for k in row if k not in fields]
    if problems:
        raise ValueError(f"{where} row {row.get('id', '?')!r}: " + "; ".join(problems))
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in row.items()}
    return cls(**values)


@lru_cache(maxsize=None)
def models() -> tuple[ModelSpec, ...]:
    """Every model row of profiles/models.json, validated."""
    rows = json.loads((PROFILES_DIR / "models.json").read_text())
    return tuple(_build(ModelSpec, r, MODEL_REQUIRED, "models.json") for r in rows)


@lru_cache(maxsize=None)
def gpus() -> tuple[GpuSpec, ...]:
    """Every GPU row of profiles/gpus.json, validated."""
    rows = json.loads((PROFILES_DIR / "gpus.json").read_text())
    return tuple(_build(GpuSpec, r, GPU_REQUIRED, "gpus.json") for r in rows)


def _key(name: str) -> str:
    return name.strip().lower()


def _gpu_key(name: str) -> str:
    # "NVIDIA GeForce RTX 4090", "RTX 4090", "rtx-4090" and "4090" all become "rtx4090" or "4090".
    s = re.sub(r"\b(nvidia|geforce|tesla)\b", "", name.lower())
    return re.sub(r"[^a-z0-9]", "", s)


# config.json keys of mixture-of-experts layers (DeepSeek's n_routed_experts, Qwen-MoE's num_experts, ...): the
# estimator's terms describe experts as Mixtral's, Qwen3-MoE's and gpt-oss's rows give them (routed experts of one
# width; Qwen2-MoE's shared expert; Qwen-MoE's dense layers among the sparse ones, ModelSpec.dense_layer_ids;
# gpt-oss's biases and sinks as ModelSpec.layer_params counts them).
MOE_TYPES = ("mixtral", "qwen3_moe", "qwen2_moe", "gpt_oss")
# Families whose sparse blocks add a shared expert (config.json shared_expert_intermediate_size).
SHARED_EXPERT_TYPES = ("qwen2_moe",)
MOE_KEYS = ("n_routed_experts", "n_shared_experts", "num_experts", "num_local_experts", "moe_intermediate_size",
            "num_experts_per_tok")
# config.json sizes that must be positive integers (a head count of 0 divided by zero).
SIZE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def supported_model_types() -> tuple[str, ...]:
    """The model types rigplan's memory and speed terms describe: those of the profile rows."""
    return tuple(sorted({m.model_type for m in models()}))


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def bnb_4bit(config: dict[str, Any]) -> bool:
    """A checkpoint stored in bitsandbytes 4-bit (Unsloth's `-bnb-4bit` copies saved locally): its config.json's
    quantization_config, as transformers' BitsAndBytesConfig.to_dict() writes it."""
    quant = config.get("quantization_config") or {}
    return quant.get("quant_method") == "bitsandbytes" and bool(quant.get("load_in_4bit") or quant.get("_load_in_4bit"))


def _quantization_problems(config: dict[str, Any], model_type: str) -> list[str]:
    """Checkpoints stored quantized other than bitsandbytes 4-bit (QLoRA's own) or gpt-oss's MXFP4 experts: their
    weights load as neither 16-bit LoRA nor QLoRA counts them."""
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method is None or bnb_4bit(config) or (method == "mxfp4" and model_type in GPT_OSS):
        return []
    return [f"its weights are stored quantized (quantization_config quant_method {method!r}); rigplan trains 16-bit "
            "checkpoints (LoRA, QLoRA) and bitsandbytes 4-bit ones (QLoRA): pass the 16-bit model"]


def _config_problems(cfg: dict[str, Any], config: dict[str, Any], model_type: str) -> list[str]:
    """Every reason a config.json is not one rigplan can estimate, gathered."""
    types = supported_model_types()
    supported = (f"pass a model of a type rigplan estimates: {', '.join(types)} (decoder-only, dense but for "
                 "Mixtral, Qwen2-MoE, Qwen3-MoE and gpt-oss; rigplan models lists them; other mixture-of-experts "
                 "models are not supported yet)")
    archs = [a for a in config.get("architectures") or () if isinstance(a, str)]
    if archs and not any(a.endswith(("ForCausalLM", "ForConditionalGeneration")) for a in archs):
        return [f"{archs[0]} is not a causal language model; {supported}"]
    if model_type not in types:
        return [f"model_type {model_type!r} is not one rigplan can estimate; {supported}"]
    moe = [k for k in MOE_KEYS if cfg.get(k)]
    if moe and model_type not in MOE_TYPES:
        return [f"mixture-of-experts layers ({', '.join(moe)}) are not supported yet for {model_type}; {supported}"]
    # Dense layers among the experts: Qwen-MoE's decoder_sparse_step and mlp_only_layers (dense_layer_ids); other
    # families' keys for them (DeepSeek's first_k_dense_replace) come with attention rigplan does not model.
    if (cfg.get("decoder_sparse_step", 1) != 1 or cfg.get("mlp_only_layers")) and model_type not in DENSE_AMONG_TYPES:
        return [f"{model_type} with dense layers among the experts is not supported yet; {supported}"]
    problems_dense = _dense_layer_problems(cfg)
    if problems_dense:
        return problems_dense
    if cfg.get("shared_expert_intermediate_size") and model_type not in SHARED_EXPERT_TYPES:
        return [f"{model_type} with a shared expert is not supported yet; {supported}"]
    problems = [f"{k} {cfg.get(k)!r} must be a positive integer" for k in SIZE_KEYS if _positive_int(cfg.get(k)) is None]
    for k in ("num_key_value_heads", "head_dim", "max_position_embeddings"):
        if cfg.get(k) is not None and _positive_int(cfg[k]) is None:
            problems.append(f"{k} {cfg[k]!r} must be a positive integer")
    heads, kv = _positive_int(cfg.get("num_attention_heads")), _positive_int(cfg.get("num_key_value_heads"))
    if heads and kv and heads % kv:
        problems.append(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    hidden = _positive_int(cfg.get("hidden_size"))
    if heads and hidden and cfg.get("head_dim") is None and hidden % heads:
        problems.append(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads} (and no head_dim)")
    if model_type in MOE_TYPES:
        problems += _expert_problems(cfg, model_type)
    return problems + _layer_type_problems(cfg) + _quantization_problems(config, model_type)


# Families whose decoder layers read decoder_sparse_step and mlp_only_layers (transformers 5.17).
DENSE_AMONG_TYPES = ("qwen2_moe", "qwen3_moe")


def _dense_layer_problems(cfg: dict[str, Any]) -> list[str]:
    """decoder_sparse_step a positive integer; mlp_only_layers layer indices within the model."""
    step, only, layers = cfg.get("decoder_sparse_step", 1), cfg.get("mlp_only_layers") or [], cfg.get("num_hidden_layers")
    problems = [] if _positive_int(step) else [f"decoder_sparse_step {step!r} must be a positive integer"]
    top = layers if isinstance(layers, int) else float("inf")
    if not isinstance(only, list) or not all(type(i) is int and 0 <= i < top for i in only):
        problems.append(f"mlp_only_layers {only!r} must list layer indices from 0 to num_hidden_layers - 1")
    return problems


def dense_layer_ids(cfg: dict[str, Any], model_type: str) -> tuple[int, ...]:
    """The layers a Qwen-MoE config leaves dense (ModelSpec.dense_layer_ids), as its decoder layers decide."""
    if model_type not in DENSE_AMONG_TYPES or not (cfg.get("num_experts") or cfg.get("num_local_experts")):
        return ()
    step, only = cfg.get("decoder_sparse_step", 1), set(cfg.get("mlp_only_layers") or ())
    return tuple(i for i in range(cfg["num_hidden_layers"]) if i in only or (i + 1) % step)


def _expert_problems(cfg: dict[str, Any], model_type: str) -> list[str]:
    """A mixture-of-experts config must say how many experts there are and how many a token uses (the model
    classes' defaults, GptOssConfig's 128 and 4 for instance, are not the checkpoint's)."""
    experts = cfg.get("num_local_experts") or cfg.get("num_experts")
    per_token = cfg.get("num_experts_per_tok")
    if _positive_int(experts) is None or _positive_int(per_token) is None:
        return [f"{model_type} config.json must give num_local_experts (or num_experts) and num_experts_per_tok as "
                f"positive integers, not {experts!r} and {per_token!r}"]
    return [f"num_experts_per_tok {per_token} exceeds the {experts} experts"] if per_token > experts else []


def _layer_type_problems(cfg: dict[str, Any]) -> list[str]:
    """layer_types (gpt-oss alternates sliding_attention and full_attention): one known type per layer, and a
    window for the sliding ones."""
    kinds = cfg.get("layer_types")
    if kinds is None:
        return []
    layers = _positive_int(cfg.get("num_hidden_layers"))
    if not isinstance(kinds, list) or any(k not in LAYER_TYPES for k in kinds):
        return [f"layer_types {kinds!r} must list {' or '.join(LAYER_TYPES)} per layer (other attention types are "
                "not supported yet)"]
    problems = []
    if layers and len(kinds) != layers:
        problems.append(f"layer_types gives {len(kinds)} layers, num_hidden_layers {layers}")
    if "sliding_attention" in kinds and _positive_int(cfg.get("sliding_window")) is None:
        problems.append(f"sliding_attention layers need a positive sliding_window, not {cfg.get('sliding_window')!r}")
    return problems


def default_layer_types(model_type: str, layers: int) -> tuple[str, ...]:
    """layer_types where config.json leaves them out: GptOssConfig.__post_init__ alternates sliding_attention
    (even layers) and full_attention (odd); other families attend to the full sequence in every layer."""
    if model_type in GPT_OSS:
        return tuple("sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers))
    return ()


def model_from_config(config: dict[str, Any], model_id: str, source: str) -> ModelSpec:
    """A ModelSpec from a config.json dict (multimodal configs: their text_config); every problem with it is
    gathered into one UnknownModelError that says what rigplan supports."""
    cfg = dict(config.get("text_config") or config)
    model_type = cfg.get("model_type") or config.get("model_type", "")
    problems = _config_problems(cfg, config, model_type)
    if problems:
        # A problem that already says what to pass instead (another model) needs no "fix config.json".
        raise UnknownModelError(f"{source}: {'; '.join(problems)}" + ("" if "pass " in problems[0]
                                                                        else "; fix config.json"))
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    return ModelSpec(
        id=model_id,
        model_type=model_type,
        hidden_size=hidden,
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or hidden // heads,
        vocab_size=cfg["vocab_size"],
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings",
                                         config.get("tie_word_embeddings", model_type in TIED_BY_DEFAULT))),
        max_position_embeddings=cfg.get("max_position_embeddings") or 4096,
        attention_bias=bool(cfg.get("attention_bias", cfg.get("qkv_bias", model_type in BIAS_BY_DEFAULT))),
        architectures=tuple(config.get("architectures") or ()),
        rope_theta=cfg.get("rope_theta"),
        sliding_window=cfg.get("sliding_window", GPT_OSS_SLIDING_WINDOW if model_type in GPT_OSS else None),
        layer_types=tuple(cfg.get("layer_types") or default_layer_types(model_type, cfg["num_hidden_layers"])),
        num_local_experts=int(cfg.get("num_local_experts") or 0),
        num_experts=int(cfg.get("num_experts") or 0),
        num_experts_per_tok=int(cfg.get("num_experts_per_tok") or 0),
        moe_intermediate_size=int(cfg.get("moe_intermediate_size") or 0),
        shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size") or 0)
        if model_type in SHARED_EXPERT_TYPES else 0,
        dense_layer_ids=dense_layer_ids(cfg, model_type),
        source=source,
        prequantized=bnb_4bit(config),
    )


def _model_from_path(path: Path) -> ModelSpec:
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise UnknownModelError(f"{path} has no config.json; pass a model directory or its config.json")
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UnknownModelError(f"{file}: unreadable config ({e}); pass a valid config.json") from e
    if not isinstance(config, dict):
        raise UnknownModelError(f"{file}: not a JSON object; pass a model's config.json")
    name = (path if path.is_dir() else path.parent).name or file.stem
    return model_from_config(config, name, str(file))


# Unsloth's pre-quantized copies on the Hub: `unsloth/<name>-bnb-4bit` (bitsandbytes NF4) and
# `unsloth/<name>-unsloth-bnb-4bit` (its dynamic 4-bit, which keeps some layers in 16 bits: not yet measured).
PREQUANTIZED_SUFFIXES = ("-unsloth-bnb-4bit", "-bnb-4bit")


def prequantized_copy(spec: ModelSpec, like: str = "") -> ModelSpec | None:
    """The profile's plain bitsandbytes 4-bit copy on the Hub (an alias ending `-bnb-4bit`, not Unsloth's dynamic
    `-unsloth-bnb-4bit`) of the same weights: instruction-tuned where `like` (the hub id the user gave, else the
    profile's) is, base where it is base; None if the profile names no such copy. The same weights as quantizing the
    16-bit checkpoint on load (bench/results/prequantized-h200/), but a sharded run can load them into CPU memory
    (estimator/memory.py loads_on_cpu)."""
    tuned = _tuned(like if "/" in like else spec.hub_id)
    copies = [a for a in spec.aliases if a.lower().endswith("-bnb-4bit") and not a.lower().endswith("-unsloth-bnb-4bit")
              and _tuned(a) == tuned]
    return dataclasses.replace(spec, aliases=(copies[0],), prequantized=True) if copies else None


def _tuned(hub_id: str) -> bool:
    """An instruction-tuned checkpoint by its name's convention: `-Instruct`, or Gemma's `-it` (base: `-pt`)."""
    return bool(re.search(r"instruct|-it(-|$)", hub_id.lower()))


def _profile(name: str) -> ModelSpec | None:
    key = _key(name)
    for spec in models():
        if key == spec.id or key in (_key(a) for a in spec.aliases):
            return spec
    return None


def resolve_model(name: str) -> ModelSpec:
    """A profile by id or alias (any case); a pre-quantized 4-bit copy of one (`unsloth/...-bnb-4bit`, loaded
    from that id); else a local model directory or config.json."""
    for suffix in PREQUANTIZED_SUFFIXES:
        if name.lower().endswith(suffix) and not Path(name).expanduser().exists():
            base = name[: -len(suffix)]
            spec = (_profile(name) or _profile(base) or _profile(base.split("/", 1)[-1])
                    or _profile("unsloth/" + base.split("/", 1)[-1]))
            if spec is not None:  # loaded from the id given, 4-bit
                return dataclasses.replace(spec, aliases=(name,), prequantized=True)
    spec = _profile(name)
    if spec is not None:
        return spec
    path = Path(name).expanduser()
    if path.exists():
        return _model_from_path(path)
    key = _key(name)
    names = [m.id for m in models()] + [a for m in models() for a in m.aliases]
    close = difflib.get_close_matches(key, [_key(n) for n in names], n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    raise UnknownModelError(f"unknown model {name!r}; {hint}(rigplan models lists all; "
                            "or pass a local model directory or its config.json)")


def resolve_gpu(name: str) -> GpuSpec:
    """A GPU by id, alias, marketing name or NVML name, spelled loosely (`4090`, `RTX 4090`)."""
    key = _gpu_key(name)
    for spec in gpus():
        spellings = (spec.id, spec.name, spec.nvml_name, *spec.aliases)
        if key and key in (_gpu_key(s) for s in spellings):
            return spec
    close = difflib.get_close_matches(name.lower(), [g.id for g in gpus()], n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    raise UnknownGpuError(f"unknown GPU {name!r}; {hint}(rigplan gpus lists all)")


@lru_cache(maxsize=None)
def known_issues() -> tuple[dict[str, str], ...]:
    """Recorded failures and slow paths of an engine with a model family (profiles/known_issues.json)."""
    return tuple(json.loads((PROFILES_DIR / "known_issues.json").read_text()))


def issues_for(model: ModelSpec, gpu: GpuSpec | None = None) -> list[dict[str, str]]:
    """The notes for the model's family (an entry's model_type, or one of its model_types); those that hold only on
    some GPUs ("when": "gpu_without_bf16") only for such a GPU."""
    def applies(i: dict) -> bool:
        if model.model_type not in (i["model_types"] if "model_types" in i else (i["model_type"],)):
            return False
        return not i.get("when") or (i["when"] == "gpu_without_bf16" and gpu is not None and not gpu.bf16)

    return [i for i in known_issues() if applies(i)]


def measured_status(model: ModelSpec) -> str:
    """How far this family's estimate stands on GPU runs: 'fitted' (in the reference fit's H100 runs: Llama,
    Mistral, Qwen2, Qwen3), 'measured' (its own recorded runs, terms written beside them), 'unmeasured' (no run
    yet), or 'transformers' (Unsloth fails on it; planned and trained on transformers + PEFT)."""
    severities = {i["severity"] for i in issues_for(model)}
    if "fails" in severities:
        return "transformers"
    if "uncalibrated" in severities:
        return "unmeasured"
    return "measured" if severities else "fitted"


def unsloth_generic_path(model: ModelSpec) -> bool:
    """Whether Unsloth trains this family through its generic path rather than one of its own fast paths,
    which the reference's terms describe (profiles/known_issues.json, `unsloth_path`)."""
    return any(i.get("unsloth_path") == "generic" for i in issues_for(model))


def gpu_by_nvml_name(nvml_name: str, memory_gib: float | None = None) -> GpuSpec | None:
    """The catalogue row NVML's name belongs to, or None for a card we have no row for. Cards sold with two
    memory sizes under one NVML name (the RTX 4060 Ti, 8 and 16 GB) are told apart by the memory NVML reports."""
    key = _gpu_key(nvml_name)
    named = [g for g in gpus() if _gpu_key(g.nvml_name) == key]
    if len(named) > 1 and memory_gib is not None:
        return min(named, key=lambda g: abs(g.memory_gib - memory_gib))
    try:
        return resolve_gpu(nvml_name)
    except UnknownGpuError:
        return None
