"""Plan (what to train and what it will cost) and Coefficients (the fitted constants of the estimator).

Plan is the only thing that crosses from the estimator to the trainer. Imports nothing heavy, reads no files.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterable, Literal

Method = Literal["lora", "qlora"]
Optimizer = Literal["adamw_8bit", "adamw_torch"]
Checkpointing = Literal["unsloth", "off"]
# The library that loads the model and attaches the adapters: Unsloth's FastLanguageModel, or plain
# transformers + PEFT (+ bitsandbytes for QLoRA), for families Unsloth fails on and for machines without CUDA.
Engine = Literal["unsloth", "transformers"]
# How the trainer lays out a micro-batch (trainer/batching.py): 'padded' stacks micro_batch examples of similar
# length padded to the longest of them; 'packed' puts whole examples back to back in one row of at most
# token_budget tokens (each example attends only to itself).
Batching = Literal["padded", "packed"]
Scheduler = Literal["linear", "cosine", "constant_with_warmup"]
ENGINES: tuple[Engine, ...] = ("unsloth", "transformers")
# How several GPUs share the work (torch.distributed): 'single' (one GPU), 'ddp' (each GPU holds the whole model
# and trains its own micro-batches; gradients all-reduced) or 'fsdp' (FSDP2: weights, adapters and optimizer
# state sharded across the GPUs, each layer gathered as it runs).
Parallelism = Literal["single", "ddp", "fsdp"]
BATCHINGS: tuple[Batching, ...] = ("padded", "packed")

# 2: engine and token_budget; batching 'packed' or 'padded'.
PLAN_SCHEMA_VERSION = 2
# Unsloth's defaults that users run (https://docs.unsloth.ai, get_peft_model): all seven projections.
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Setup:
    """The training choices the memory and speed terms depend on."""

    method: Method
    """'lora' or 'qlora'."""
    rank: int
    """LoRA rank r."""
    micro_batch: int
    """Sequences per forward/backward."""
    seq_len: int
    """Tokens per sequence."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    optimizer: Optimizer = "adamw_8bit"
    """Optimizer whose state is kept per trainable parameter."""
    checkpointing: Checkpointing = "unsloth"
    """Activation checkpointing on ('unsloth') or off."""
    parallelism: Parallelism = "single"
    """How num_gpus GPUs share the work."""
    num_gpus: int = 1
    """GPUs training together; the memory terms are per GPU."""
    cpu_offload: bool = False
    """FSDP only: the sharded frozen weights wait in CPU memory and come to the GPU layer by layer."""

    @property
    def tokens(self) -> int:
        """Tokens in one micro-batch."""
        return self.micro_batch * self.seq_len


@dataclass(frozen=True)
class ExampleLengths:
    """Tokens per example of the data a plan trains on, sorted (evenly spaced quantiles of a large set).
    Speed depends on them through padding: a padded micro-batch is as long as its longest example."""

    tokens: tuple[int, ...]
    count: int = 0
    """How many examples the lengths stand for (0: unknown); the trainer's length-sorted groups are tighter the
    more examples there are (speed.padded_groups)."""

    @classmethod
    def of(cls, lengths: Iterable[int], points: int = 256, count: int | None = None) -> "ExampleLengths":
        """The lengths, or `points` evenly spaced quantiles of them: enough for the expectations below. count:
        the number of examples when the lengths are a sample of them."""
        s = sorted(max(1, int(n)) for n in lengths)
        if not s:
            raise ValueError("no example lengths")
        n = count or len(s)
        if len(s) > points:
            s = [s[round(i * (len(s) - 1) / (points - 1))] for i in range(points)]
        return cls(tuple(s), n)

    @classmethod
    def equal(cls, tokens: float) -> "ExampleLengths":
        """Examples all of one length (only a mean is known: --avg-tokens), so nothing is padded."""
        return cls((max(1, round(tokens)),))

    def mean(self, seq_len: int) -> float:
        """Mean tokens per example once each is cut to seq_len."""
        return _mean_cut(self.tokens, seq_len)

    def longest_of(self, k: int, seq_len: int) -> float:
        """Expected longest of k examples drawn at random, each cut to seq_len: the order statistic
        E[max] = sum_i x_(i) ((i/n)^k - ((i-1)/n)^k) over the sorted lengths x_(1..n) (draws with
        replacement; the trainer's shuffled micro-batches draw without, a difference of 1/n)."""
        n = len(self.tokens)
        return sum(min(x, seq_len) * ((i / n) ** k - ((i - 1) / n) ** k) for i, x in enumerate(self.tokens, 1))


@lru_cache(maxsize=1024)
def _mean_cut(tokens: tuple[int, ...], seq_len: int) -> float:
    """ExampleLengths.mean, cached: the planner asks it of the same lengths for every candidate and GPU."""
    return sum(min(n, seq_len) for n in tokens) / len(tokens)


@dataclass(frozen=True)
class Plan:
    """One training configuration and the estimator's prediction for it."""

    model: str
    """Profile id of the architecture (or the path of its config.json)."""
    model_path: str
    """Hub id or local directory the weights load from."""
    gpu: str
    """GPU id the prediction is for."""
    method: Method
    """'lora' (16-bit frozen base) or 'qlora' (4-bit NF4 frozen base)."""
    rank: int
    """LoRA rank r."""
    micro_batch: int
    """Sequences per forward/backward."""
    grad_accum: int
    """Micro-batches per optimizer step."""
    seq_len: int
    """Tokens per sequence (the longest a batch is padded or packed to)."""
    lora_alpha: int = 0
    """LoRA scaling numerator; 0 means 'same as rank', Unsloth's default."""
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    """Linear layers that get adapters."""
    optimizer: Optimizer = "adamw_8bit"
    """bitsandbytes 8-bit AdamW (Unsloth's default) or torch's 32-bit AdamW."""
    checkpointing: Checkpointing = "unsloth"
    """Activation checkpointing: Unsloth's (recompute each layer in backward) or none."""
    learning_rate: float = 2e-4
    """Peak learning rate (Unsloth's notebooks use 2e-4 for LoRA)."""
    lr_scheduler: Scheduler = "linear"
    """How the learning rate falls after warm-up (transformers' lr_scheduler_type; Unsloth's notebooks: linear)."""
    warmup_steps: int = 5
    """Optimizer steps of linear warm-up to the peak learning rate (Unsloth's notebooks use 5)."""
    weight_decay: float = 0.01
    """AdamW's decoupled weight decay on the adapters (Unsloth's notebooks use 0.01)."""
    epochs: float = 1.0
    """Passes over the data."""
    seed: int = 3407
    """Seed for adapters, data order and dropout (Unsloth's notebooks use 3407)."""
    peak_allocated_gib: float = 0.0
    """Predicted torch peak allocated memory, GiB (2^30 bytes)."""
    peak_reserved_gib: float = 0.0
    """Predicted torch peak reserved memory (caching allocator), GiB."""
    total_gib: float = 0.0
    """Predicted GPU memory in use as nvidia-smi shows it (CUDA context included), GiB."""
    tokens_per_s: float = 0.0
    """Predicted training throughput, tokens per second."""
    step_s: float = 0.0
    """Predicted seconds per optimizer step (all micro-batches)."""
    host_bound: bool = False
    """Whether the host's CPU, not the GPU, sets the predicted speed (small micro-batches on fast GPUs):
    such speeds stray by up to estimator.speed.HOST_BOUND_ERROR."""
    example_tokens: float = 0.0
    """Mean tokens per example of the data the speed is for; 0: full micro_batch x seq_len micro-batches."""
    batching: Batching = "padded"
    """'padded': micro_batch examples of similar length (sorted by length) padded to the longest of them;
    'packed': whole examples back to back in rows of at most token_budget tokens, each attending only to itself."""
    token_budget: int = 0
    """Most tokens in one micro-batch, padding included: the shape memory is predicted for, and the bound the
    trainer's micro-batches keep (micro_batch x seq_len)."""
    fill: float = 0.0
    """Expected share of the token budget that real tokens fill (packing leaves gaps; padding pads); 0: no data
    known, speed for full micro-batches."""
    pad_multiple: int = 64
    """'padded': each micro-batch is padded to its longest example rounded up to this many tokens (the estimate's
    groups are made the same way, estimator/speed.py PAD_MULTIPLE)."""
    engine: Engine = "unsloth"
    """'unsloth' or 'transformers' (transformers + PEFT): the library the trainer loads the model with."""
    tokens_per_s_low: float = 0.0
    """Lower end of the speed band the estimate stands behind (wide when host-bound), tokens per second."""
    tokens_per_s_high: float = 0.0
    """Upper end of that band, tokens per second."""
    components_gib: dict[str, float] = field(default_factory=dict)
    """The memory terms that add up to total_gib, GiB each."""
    calibration: str = ""
    """Which coefficients made the prediction (GPU, date)."""
    num_gpus: int = 1
    """GPUs training together; tokens_per_s is for all of them, memory per GPU."""
    parallelism: Parallelism = "single"
    """'single', 'ddp' (each GPU the whole model) or 'fsdp' (FSDP2, sharded)."""
    cpu_offload: bool = False
    """FSDP: frozen weights kept in CPU memory, brought to the GPU layer by layer."""
    cpu_memory_gib: float = 0.0
    """CPU memory the plan needs beyond the usual (the offloaded weights), GiB; 0 without offload."""
    load_on_cpu: bool = False
    """Sharded QLoRA from a pre-quantized 4-bit checkpoint: each process loads it into CPU memory and FSDP2 moves
    its shards to the GPU (estimator/memory.py loads_on_cpu); otherwise the 4-bit model loads onto each GPU."""
    schema_version: int = PLAN_SCHEMA_VERSION
    """Version of this file format."""

    @property
    def effective_batch(self) -> int:
        """Sequences of seq_len per optimizer step on one GPU (packed: token budgets of that many)."""
        return self.micro_batch * self.grad_accum

    @property
    def setup(self) -> Setup:
        """The training choices this plan makes, as the estimator takes them (re-estimating an override or a
        recorded run): GPUs and parallelism included."""
        return Setup(method=self.method, rank=self.rank, micro_batch=self.micro_batch, seq_len=self.seq_len,
                     grad_accum=self.grad_accum, optimizer=self.optimizer, checkpointing=self.checkpointing,
                     parallelism=self.parallelism, num_gpus=self.num_gpus, cpu_offload=self.cpu_offload)

    @property
    def budget(self) -> int:
        """Tokens per micro-batch the trainer keeps within (token_budget, or micro_batch x seq_len)."""
        return self.token_budget or self.micro_batch * self.seq_len

    @property
    def alpha(self) -> int:
        return self.lora_alpha or self.rank

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        data: dict[str, Any] = json.loads(text)
        version = data.get("schema_version")
        if version != PLAN_SCHEMA_VERSION:
            raise ValueError(f"plan schema_version {version!r}, this rigplan reads {PLAN_SCHEMA_VERSION}")
        data["target_modules"] = tuple(data["target_modules"])
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"unknown plan field(s) {unknown}")
        return cls(**data)


@dataclass(frozen=True)
class Coefficients:
    """Fitted constants of the memory and speed terms, with where they were measured.

    Memory coefficients multiply the shapes in estimator/memory.py; speed ones those in estimator/speed.py.
    calibration/fit.py fits them by least squares over those same term functions.
    """

    fixed_bytes: float
    """Allocated on top of weights and adapters once loaded (rotary tables, Unsloth buffers), bytes."""
    step_fixed_bytes: float
    """Allocated during a step whatever its size (workspaces, optimizer scratch), bytes."""
    ckpt_per_hidden: float
    """Checkpointing on: bytes kept per token, per layer, per hidden unit (2.0 = one bf16 copy)."""
    transient_per_hidden: float
    """Checkpointing on: bytes per token per hidden unit while one layer is recomputed."""
    transient_per_intermediate: float
    """Checkpointing on: bytes per token per MLP unit while one layer is recomputed."""
    logits_per_vocab: float
    """Bytes per token per vocabulary entry for the logits and the loss (2.0 = one bf16 copy)."""
    nockpt_per_hidden: float
    """Checkpointing off: bytes kept per token, per layer, per hidden unit."""
    nockpt_per_intermediate: float
    """Checkpointing off: bytes kept per token, per layer, per MLP unit."""
    slack_ratio: float
    """The caching allocator's slack (peak reserved - peak allocated) per byte allocated during a step,
    checkpointing on. The step's tensors, not the weights loaded once in one piece, fragment the cache."""
    qlora_slack_ratio: float
    """QLoRA's extra slack per step byte (its dequantized weights come and go in every layer)."""
    nockpt_slack_ratio: float
    """Slack per step byte with checkpointing off (activations kept in many small blocks)."""
    context_bytes: float
    """CUDA context and library workspaces outside torch's allocator (NVML used - reserved), bytes."""
    mfu: float
    """Model-FLOPs utilisation (matmuls and attention) against the GPU's dense 16-bit rate. One value:
    fitting attention's apart gave 98% for the matmuls, above what a bare matmul reaches on an H100 (81%)."""
    elementwise_bytes: float
    """Bytes moved per token, per layer, per hidden + MLP unit, per pass by memory-bound ops (norms, rope,
    activations, LoRA adapters), at the GPU's memory bandwidth."""
    dequant_bytes: float
    """QLoRA: bytes moved per 4-bit weight per micro-batch to dequantize it (each pass reads NF4,
    writes bf16), at the GPU's memory bandwidth."""
    step_overhead_s: float
    """Host floor on a micro-batch whatever the model (optimizer step, Python), seconds."""
    layer_overhead_s: float
    """Host floor on a micro-batch per decoder layer with Unsloth's checkpointing, seconds."""
    nockpt_layer_overhead_s: float
    """Host floor on a micro-batch per decoder layer without checkpointing, seconds."""
    qlora_layer_overhead_s: float = 0.0
    """QLoRA's extra host floor per decoder layer (its dequantize kernels' launches), seconds."""
    loss_per_hidden: float = 0.0
    """Bytes per token per hidden unit alive while the loss runs besides its logits tile (the forward's own
    tensors at its end), fitted on the runs whose peak the loss sets."""
    offload_s_per_gb: float = 0.0
    """Host floor per GB of checkpoints Unsloth offloads to CPU memory and brings back (one bf16 hidden
    state per token per layer), seconds: the floor grows with tokens, not only with layers."""
    real_data_speed: float = 1.0
    """This machine's own `rigplan run` speeds over their plans' (runs.jsonl, the median), which scales the
    real-data speed; 1.0 until rigplan calibrate has runs of this GPU to learn from."""
    gpu: str = ""
    """GPU id these were measured on."""
    source: str = ""
    """Where the fit came from: runs file(s), date, residuals."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Coefficients":
        return cls(**data)
