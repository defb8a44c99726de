"""The planner: estimate one configuration, or search method x rank x micro-batch x accumulation x
sequence length x checkpointing for the fastest that fits with a safety margin. Never prints.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from rigplan.errors import ConfigError
from rigplan.estimator import memory, speed
from rigplan.estimator.plan import (Batching, Checkpointing, Coefficients, Engine, ExampleLengths, Method,
                                    Optimizer, Parallelism, Plan, Setup)
from rigplan.profiles.catalog import GpuSpec, ModelSpec

GIB = 2**30
DEFAULT_SEQ_LEN = 2048
DEFAULT_EFFECTIVE_BATCH = 16
DEFAULT_RANK = 16  # Unsloth's get_peft_model default and its notebooks' choice
RANKS = (8, 16, 32, 64)
MICRO_BATCHES = (1, 2, 4, 8, 16, 32)
MIN_SEQ_LEN = 256
# A plan must leave this share of the GPU free: the estimator's worst error on the recorded H100 runs
# (bench/accuracy.py) was under 10% of peak reserved memory, and other processes hold some memory too.
SAFETY_MARGIN = 0.10
# Share of a card's nominal memory that CUDA can use: NVML reports 81,559 MiB total on the "80 GB" H100
# of our runs (profiles/calibrations/h100-runs/), 99.6% of 80 GiB.
USABLE_FRACTION = 81_559 / (80 * 1024)
# Speeds within this share count as a tie; then the smaller-memory, nearer-to-default choice wins.
SPEED_TIE = 0.03


@dataclass(frozen=True)
class Estimate:
    """One configuration's predicted memory and speed on one GPU."""

    setup: Setup
    components_bytes: dict[str, int]
    peak_allocated_gib: float
    peak_reserved_gib: float
    total_gib: float
    tokens_per_s: float
    step_s: float
    gpu_memory_gib: float
    fits: bool
    host_bound: bool = False
    example_tokens: float | None = None
    """Mean tokens per example the speed is for (None: full micro_batch x seq_len micro-batches)."""
    batching: Batching = "padded"
    """How the trainer lays out micro-batches: 'padded' (micro_batch length-sorted examples, padded) or
    'packed' (examples back to back within the token budget)."""
    fill: float | None = None
    """Expected share of the token budget real tokens fill (None: no data, full micro-batches)."""
    engine: Engine = "unsloth"
    tokens_per_s_band: tuple[float, float] = (0.0, 0.0)
    """The speed band the estimate stands behind: host-bound speeds vary between machines."""

    @property
    def headroom_gib(self) -> float:
        """GPU memory left at the peak (negative: short by that much)."""
        return self.gpu_memory_gib - self.total_gib


@dataclass(frozen=True)
class PlanResult:
    """The planner's answer: the recommended plan (None if nothing fits), runners-up, and why."""

    fits: bool
    best: Plan | None
    alternatives: list[Plan]
    reason: str
    gpu_memory_gib: float


def usable_gib(gpu: GpuSpec, local_total_gib: float | None = None) -> float:
    """Memory a plan may use: NVML's total on the local card, else the catalogue's nominal figure."""
    return local_total_gib if local_total_gib is not None else gpu.memory_gib * USABLE_FRACTION


def validate(model: ModelSpec, setup: Setup) -> None:
    """Every problem with a setup, in one error."""
    problems = []
    if setup.micro_batch <= 0:
        problems.append(f"micro-batch {setup.micro_batch} must be >= 1; pass --micro-batch 1 or more")
    if setup.rank <= 0:
        problems.append(f"rank {setup.rank} must be >= 1; pass --rank 8, 16, 32 or 64")
    if setup.grad_accum <= 0:
        problems.append(f"gradient accumulation {setup.grad_accum} must be >= 1")
    if setup.seq_len <= 0:
        problems.append(f"--seq {setup.seq_len} must be >= 1")
    elif setup.seq_len > model.max_position_embeddings:
        problems.append(f"--seq {setup.seq_len} exceeds {model.id}'s context "
                        f"({model.max_position_embeddings}); lower --seq")
    if problems:
        raise ConfigError("; ".join(problems))


def estimate(model: ModelSpec, setup: Setup, gpu: GpuSpec, coeffs: Coefficients,
             gpu_memory_gib: float | None = None, lengths: ExampleLengths | None = None,
             batching: Batching = "padded", engine: Engine = "unsloth") -> Estimate:
    """Memory and speed of one configuration (what `rigplan estimate` prints), per GPU. Memory is for a full
    token budget (micro_batch x seq_len), which the trainer's micro-batches reach and never pass; speed, given
    the data's example lengths, for the micro-batches that data makes laid out as `batching` says
    (speed.data_micro_batch), else for full ones. On the transformers engine both are scaled by the factors
    measured against Unsloth (memory.TRANSFORMERS_STEP_MEMORY, speed.transformers_speed)."""
    validate(model, setup)
    parts = memory.components_bytes(model, setup, coeffs, engine, batching, autocast=gpu.bf16)
    total = memory.total_bytes(parts) / GIB
    limit = gpu_memory_gib if gpu_memory_gib is not None else usable_gib(gpu)
    times: list[tuple[float, int]] = []  # padded micro-batches of the data: each shape's seconds and count
    if lengths is None:
        timed, real_tokens, fill = setup, float(setup.tokens), None
        micro_s = speed.micro_batch_s(model, setup, gpu, coeffs)
    else:
        timed, real_tokens, fill = speed.data_micro_batch(setup, lengths, batching)
        if batching == "padded":  # the shapes' times also give the spread of several processes' steps
            times = speed.padded_group_times(model, setup, lengths, gpu, coeffs)
            micro_s = speed.mean_group_s(times)
        else:
            micro_s = speed.data_micro_batch_s(model, setup, lengths, batching, gpu, coeffs)
    if engine == "transformers":
        micro_s /= speed.transformers_speed(model)
    step = setup.grad_accum * micro_s + speed.gradient_sync_s(model, setup, gpu)
    if setup.num_gpus > 1:  # each step waits for the slowest process (speed.parallel_step_s)
        step = speed.parallel_step_s(step, setup, speed.lengths_spread(times, setup.num_gpus))
    tps = real_tokens * setup.grad_accum / step  # per GPU
    bound = speed.host_bound(model, timed, gpu, coeffs)
    low, high = speed.speed_band(bound, engine, model.model_type)
    return Estimate(
        setup=setup, components_bytes=parts,
        peak_allocated_gib=memory.peak_allocated_bytes(parts) / GIB,
        peak_reserved_gib=memory.peak_reserved_bytes(parts) / GIB,
        total_gib=total,
        tokens_per_s=tps,
        step_s=step,
        host_bound=bound,
        example_tokens=lengths.mean(setup.seq_len) if lengths is not None else None,
        batching=batching, fill=fill, engine=engine, tokens_per_s_band=(tps * low, tps * high),
        gpu_memory_gib=limit,
        fits=total <= limit * (1 - SAFETY_MARGIN),
    )


def to_plan(model: ModelSpec, est: Estimate, gpu: GpuSpec, coeffs: Coefficients, model_path: str | None = None) -> Plan:
    """The Plan that carries an estimate to the trainer: its GPUs and parallelism are the estimate's setup's, its
    tokens/s those of all its GPUs."""
    s = est.setup
    num_gpus = s.num_gpus
    return Plan(model=model.id, model_path=model_path or model.hub_id, gpu=gpu.id, method=s.method, rank=s.rank,
                micro_batch=s.micro_batch, grad_accum=s.grad_accum, seq_len=s.seq_len,
                target_modules=model.target_modules, optimizer=s.optimizer, checkpointing=s.checkpointing,
                peak_allocated_gib=round(est.peak_allocated_gib, 3), peak_reserved_gib=round(est.peak_reserved_gib, 3),
                total_gib=round(est.total_gib, 3), tokens_per_s=round(est.tokens_per_s * num_gpus, 1),
                step_s=round(est.step_s, 4), host_bound=est.host_bound,
                example_tokens=round(est.example_tokens or 0.0, 1), batching=est.batching,
                pad_multiple=speed.PAD_MULTIPLE,
                token_budget=s.tokens, fill=round(est.fill or 0.0, 4), engine=est.engine,
                tokens_per_s_low=round(est.tokens_per_s_band[0] * num_gpus, 1),
                tokens_per_s_high=round(est.tokens_per_s_band[1] * num_gpus, 1),
                components_gib={k: round(v / GIB, 3) for k, v in est.components_bytes.items()},
                calibration=coeffs.source and f"{coeffs.gpu}: {coeffs.source}", num_gpus=s.num_gpus,
                parallelism=s.parallelism, cpu_offload=s.cpu_offload,
                cpu_memory_gib=round(memory.cpu_memory_bytes(model, s) / GIB, 3),
                load_on_cpu=memory.loads_on_cpu(model, s))


def grad_accum_for(effective_batch: int, micro_batch: int, seq_len: int, lengths: ExampleLengths | None,
                   batching: Batching) -> int:
    """Micro-batches per optimizer step so that a step holds about effective_batch examples: a packed
    micro-batch holds budget x fill / mean-length examples, a padded one micro_batch."""
    if lengths is None or batching == "padded":
        return max(1, effective_batch // micro_batch)
    per_micro = micro_batch * seq_len * speed.packing_fill(lengths, micro_batch * seq_len, seq_len) \
        / lengths.mean(seq_len)
    return max(1, round(effective_batch / per_micro))


# Ways to use several GPUs, each with the engine that runs it. DDP runs the model as on one GPU: without
# checkpointing, or with Unsloth's (two H200s each capped at 24 GiB, 8B LoRA r16 at 2 x 1,280 per GPU: 17.17 GiB
# reserved against 16.25 planned, bench/results/h200-runs/ddp/checkpointing-4090x2/; the trainer runs every
# micro-batch under DDP's no_sync and all-reduces once per step, so the recomputing backward meets no DDP hook).
# FSDP2 with QLoRA needs bitsandbytes' quant_storage and PEFT on plain transformers (Unsloth 2026.10 does not
# shard): the transformers engine, checkpointing on or off, weights on the GPUs or offloaded to CPU memory.
SHARDINGS: dict[Parallelism, tuple[tuple[bool, Checkpointing | None, Engine | None], ...]] = {
    "single": ((False, None, None),),
    "ddp": ((False, "off", None), (False, "unsloth", "unsloth")),
    "fsdp": ((False, None, "transformers"), (True, None, "transformers")),
}


def optimizer_for(parallelism: Parallelism, method: Method) -> Optimizer:
    """AdamW with 8-bit state (bitsandbytes) wherever it costs no speed: on one GPU, and for QLoRA under DDP.
    FSDP's DTensor shards bitsandbytes' 8-bit optimizers cannot step, and Unsloth 2026.10.9 itself switches to
    torch's AdamW when handed the 8-bit one under FSDP2 (unsloth/models/fsdp2_native.py; it did on both sharded
    H200 runs, bench/results/h200x2-fsdp/). Under DDP the 8-bit one launches an update per LoRA tensor (448 for an
    8B model), host-bound work that the slower process does after each step's all-reduce while the other waits
    (h200-runs/ddp/profile/); torch's AdamW launches a few multi-tensor kernels. On two H200s, LoRA's plan trained
    9% faster with it (h200-runs/ddp/torch-adamw/ against omp-threads/, the same data and call), one GPU alone at
    the same speed; QLoRA's at the speed of its 8-bit run (tokencount-seed2/), so QLoRA keeps the 8-bit state,
    which saves 6 bytes per trainable parameter."""
    if parallelism == "fsdp" or (parallelism == "ddp" and method == "lora"):
        return "adamw_torch"
    return "adamw_8bit"


def _candidates(model: ModelSpec, gpu: GpuSpec, coeffs: Coefficients, seq_len: int, effective_batch: int,
                methods: tuple[Method, ...], ranks: tuple[int, ...], checkpointing: tuple[Checkpointing, ...],
                limit: float, lengths: ExampleLengths | None = None,
                batchings: tuple[Batching, ...] = ("padded", "packed"),
                engine: Engine = "unsloth", num_gpus: int = 1) -> list[Estimate]:
    """Every parallelism x method x rank x checkpointing x layout x token budget (micro_batch sequences of
    seq_len) up to the one that holds the effective batch's examples (all GPUs together) in one micro-batch.
    Without the data's lengths only padded (full sequences) is timed. One GPU: 'single'; several: one of them
    alone, DDP and FSDP (SHARDINGS)."""
    if lengths is None:
        batchings = ("padded",)
    kinds = ("single",) if num_gpus == 1 else ("single", "ddp", "fsdp")
    shardings = [(par, *how) for par in kinds for how in SHARDINGS[par]]
    out = []
    for (parallelism, offload, only_ckpt, only_engine), method, rank, ckpt, layout in itertools.product(
            shardings, methods, ranks, checkpointing, batchings):
        if only_ckpt and ckpt != only_ckpt:
            continue
        gpus = 1 if parallelism == "single" else num_gpus
        for micro in MICRO_BATCHES:
            accum = grad_accum_for(max(1, effective_batch // gpus), micro, seq_len, lengths, layout)
            setup = Setup(method=method, rank=rank, micro_batch=micro, seq_len=seq_len, grad_accum=accum,
                          optimizer=optimizer_for(parallelism, method), checkpointing=ckpt, parallelism=parallelism,
                          num_gpus=gpus, cpu_offload=offload)
            out.append(estimate(model, setup, gpu, coeffs, limit, lengths, layout, only_engine or engine))
            if accum == 1:  # a larger budget would hold more than a step's examples
                break
    return out


def _preference(est: Estimate, fastest: float, num_gpus: int = 1) -> tuple[bool, bool, bool, bool, int, bool, float,
                                                                         float]:
    """Order among fitting estimates: no CPU offload (it needs the host's memory and its PCIe link) where
    anything else fits, then all the GPUs asked for over one of them, then DDP over FSDP where DDP fits (DDP's
    speed is measured on full-depth runs; FSDP's only on reduced-depth QLoRA), then 16-bit LoRA (no quantization
    error), then speed (ties within SPEED_TIE), then GPU-bound over host-bound (whose speed varies with the host's
    CPU), then the rank nearest the default, then the smaller memory."""
    s = est.setup
    speed_bucket = math.floor((1 - est.tokens_per_s / fastest) / SPEED_TIE) if fastest else 0
    # Offloaded, QLoRA's 4-bit weights need a quarter of 16-bit LoRA's CPU memory: QLoRA first there.
    return (s.cpu_offload, s.num_gpus < num_gpus, s.parallelism == "fsdp",
            s.method != ("qlora" if s.cpu_offload else "lora"), speed_bucket, est.host_bound,
            abs(math.log2(s.rank / DEFAULT_RANK)), est.total_gib)


def short_of(est: Estimate, limit: float) -> str:
    """How far a setup that does not fit is from fitting, and its two largest terms: what to shrink."""
    s = est.setup
    gpus = f" per GPU ({s.parallelism} over {s.num_gpus})" if s.num_gpus > 1 else ""
    largest = sorted(est.components_bytes.items(), key=lambda kv: -kv[1])[:2]
    usable = limit * (1 - SAFETY_MARGIN)
    digits = 1 if f"{est.total_gib:.1f}" != f"{usable:.1f}" else 2  # "needs 7.2 GiB, over the 7.2" says nothing
    return (f"needs {est.total_gib:.{digits}f} GiB{gpus}, over the {usable:.{digits}f} GiB usable "
            f"({SAFETY_MARGIN:.0%} of {limit:.1f} GiB kept free); the largest terms: "
            + ", ".join(f"{k} {v / GIB:.1f} GiB" for k, v in largest))


def plan(model: ModelSpec, gpu: GpuSpec, coeffs: Coefficients, seq_len: int = DEFAULT_SEQ_LEN,
         effective_batch: int = DEFAULT_EFFECTIVE_BATCH, methods: tuple[Method, ...] = ("lora", "qlora"),
         ranks: tuple[int, ...] = RANKS, checkpointing: tuple[Checkpointing, ...] = ("unsloth", "off"),
         gpu_memory_gib: float | None = None, model_path: str | None = None, num_gpus: int = 1,
         alternatives: int = 4, lengths: ExampleLengths | None = None,
         batchings: tuple[Batching, ...] = ("padded", "packed"), engine: Engine = "unsloth") -> PlanResult:
    """The fastest configuration that fits with SAFETY_MARGIN, preferring 16-bit LoRA when it fits; if
    nothing fits at seq_len, the longest shorter sequence that does, said in the reason. Memory must fit the
    token budget (micro_batch x seq_len), which packed micro-batches reach; speed is ranked on the data's
    examples when their lengths are known, so short examples get the larger budgets that keep the GPU busy."""
    if effective_batch <= 0:
        raise ConfigError(f"effective batch {effective_batch} must be >= 1")
    if num_gpus <= 0:
        raise ConfigError(f"--gpus {num_gpus} must be >= 1")
    validate(model, Setup(method=methods[0], rank=min(ranks), micro_batch=1, seq_len=seq_len))
    limit = usable_gib(gpu, gpu_memory_gib)
    seq = seq_len
    while True:
        cands = _candidates(model, gpu, coeffs, seq, effective_batch, methods, ranks, checkpointing, limit,
                            lengths, batchings, engine, num_gpus)
        fitting = [c for c in cands if c.fits]
        if fitting or seq // 2 < MIN_SEQ_LEN:
            break
        seq //= 2
    if not fitting:
        smallest = min(cands, key=lambda c: c.total_gib)
        s = smallest.setup
        offload = ", frozen weights offloaded to CPU memory" if s.cpu_offload else ""
        why = (f"does not fit: the smallest setup ({s.method}, rank {s.rank}, micro-batch 1, seq {s.seq_len}{offload}) "
               + short_of(smallest, limit))
        held = _held_by_quantized_load(cands)
        if held:
            whole = memory.quantized_load_bytes(model, held[0].setup)
            why += (f"; sharded QLoRA: every process first loads the whole 4-bit model ({whole / GIB:.1f} GiB) onto "
                    "its GPU (transformers 5.17), where a pre-quantized 4-bit checkpoint (...-bnb-4bit) would load "
                    "into CPU memory")
        return PlanResult(False, None, [], why, limit)
    fastest = max(c.tokens_per_s for c in fitting)
    fitting.sort(key=lambda c: _preference(c, fastest, num_gpus))
    best = fitting[0]
    plans = [to_plan(model, e, gpu, coeffs, model_path) for e in _runners_up(fitting, alternatives)]
    why = _reason(best, cands, seq, seq_len, limit, num_gpus)
    if model.experts and best.setup.parallelism == "fsdp":  # the sharded runs so far: the dense 70B architecture
        why += "; a mixture-of-experts model has not been trained sharded yet: its FSDP figures are the dense terms'"
    return PlanResult(seq == seq_len, plans[0], plans[1:], why, limit)


def _runners_up(fitting: list[Estimate], n: int) -> list[Estimate]:
    """The best, then the best of each other method x checkpointing x rank, so alternatives differ."""
    out, seen = [fitting[0]], set()
    s0 = fitting[0].setup
    seen.add((s0.method, s0.checkpointing, s0.rank))
    for e in fitting[1:]:
        key = (e.setup.method, e.setup.checkpointing, e.setup.rank)
        if key not in seen and len(out) <= n:
            seen.add(key)
            out.append(e)
    return out


def _reason(best: Estimate, cands: list[Estimate], seq: int, requested: int, limit: float, num_gpus: int) -> str:
    """One line: which method and why, with the memory rule said (SAFETY_MARGIN of the card kept free)."""
    s = best.setup
    room = limit * (1 - SAFETY_MARGIN)
    lora = [c for c in cands if c.setup.method == "lora"]
    qlora_fits = [c for c in cands if c.fits and c.setup.method == "qlora"]
    if s.method == "lora":
        why = f"16-bit LoRA fits: {best.total_gib:.1f} GiB of the {room:.1f} GiB usable ({SAFETY_MARGIN:.0%} kept free)"
        if qlora_fits and max(c.tokens_per_s for c in qlora_fits) > best.tokens_per_s * (1 + SPEED_TIE):
            why += ("; QLoRA would be faster here, but 16-bit LoRA is preferred (no quantization error; "
                    "pass --method qlora for it)")
    elif lora and not any(c.fits for c in lora):
        lora_min = min((c.total_gib for c in lora), default=float("nan"))
        why = (f"QLoRA ({best.total_gib:.1f} GiB): 16-bit LoRA needs at least {lora_min:.1f} GiB, over the "
               f"{room:.1f} GiB usable ({SAFETY_MARGIN:.0%} of {limit:.1f} GiB kept free)")
    else:
        why = f"QLoRA ({best.total_gib:.1f} GiB of {room:.1f} GiB usable)"
    budget = f"token budget {s.tokens:,} ({s.micro_batch} x {s.seq_len})"
    why += f"; {budget} x {s.grad_accum} accumulation is the fastest that fits"
    if best.engine == "transformers" and s.parallelism != "fsdp":
        why += ", on transformers + PEFT (Unsloth fails on this model family)"
    if s.checkpointing == "off":
        why += ", without checkpointing (room for all activations)"
    if seq != requested:
        why = f"at seq {requested} nothing fits; at seq {seq}: " + why
    if num_gpus > 1:
        why += "; " + _parallel_reason(best, cands, num_gpus)
    return why


def _held_by_quantized_load(cands: list[Estimate]) -> list[Estimate]:
    """Sharded QLoRA setups that do not fit because every process loads the whole 4-bit model first
    (memory.quantized_load_bytes above the step's own peak)."""
    return [c for c in cands if c.setup.parallelism == "fsdp" and c.setup.method == "qlora" and not c.fits
            and c.components_bytes.get("quantized_load")]


def _parallel_reason(best: Estimate, cands: list[Estimate], num_gpus: int) -> str:
    """Which of DDP and FSDP fit on these GPUs, which is chosen, and what is not measured."""
    s = best.setup
    ddp_fits = any(c.fits and c.setup.parallelism == "ddp" for c in cands)
    if s.num_gpus == 1:  # preferred only where the ways of using them all do not fit, or offload to CPU memory
        sharded = [c for c in cands if c.fits and c.setup.num_gpus > 1]
        return (f"one GPU of the {num_gpus}: " + ("neither DDP (each GPU holds the whole model) nor FSDP fits"
                if not sharded else "using them all fits only with FSDP and the frozen weights offloaded to CPU "
                "memory, slower and needing the host's memory (rigplan run --parallelism fsdp trains that)"))
    if s.parallelism == "ddp":
        why = f"DDP over {num_gpus} GPUs: each holds the whole model"
        if s.optimizer == "adamw_torch":
            why += ", with torch's AdamW (8-bit AdamW's update per tensor held DDP back)"
    else:
        why = (f"FSDP over {num_gpus} GPUs (transformers + PEFT: Unsloth does not shard): weights, adapters and "
               "optimizer sharded"
               + (", frozen weights offloaded to CPU memory" if s.cpu_offload else "")
               + ("" if ddp_fits else "; DDP does not fit (each GPU would hold the whole model)"))
        if s.method == "lora" and _held_by_quantized_load(cands):  # why not QLoRA, which would need less once sharded
            why += ("; sharded QLoRA does not fit: every process loads the whole 4-bit model onto its GPU before "
                    "FSDP shards it (transformers 5.17), where a pre-quantized 4-bit checkpoint (...-bnb-4bit) would "
                    "load into CPU memory")
        if s.parallelism == "fsdp" and s.method == "lora":
            why += "; process 0 reads the 16-bit weights into CPU memory to send each GPU its shard"
    measured = ("DDP speed: one GPU's, each step waiting for the slowest process (measured on two H200s"
                + ("" if num_gpus == 2 else f"; {num_gpus} GPUs extrapolated") + ")"
                if s.parallelism == "ddp"
                else "FSDP speed estimated (with CPU offload measured once on the 70B at full depth, two H200s)"
                if s.cpu_offload else "FSDP speed estimated (QLoRA measured at reduced depth only)")
    return f"{why}; {measured}"


def train_time_s(tokens: float, epochs: float, plan_: Plan) -> float:
    """Wall time of a run: all tokens, every epoch, at the plan's throughput (for the data's mean example
    length when the plan was made from data, else for full sequences)."""
    return tokens * epochs / plan_.tokens_per_s if plan_.tokens_per_s else float("inf")



# --max-seq answers in steps of this many tokens (Unsloth's published context table gives exact token counts;
# a 256-token step is under 1% of the 24 GB answer).
MAX_SEQ_STEP = 256


def single_sequence(method: Method, rank: int, seq: int, checkpointing: Checkpointing,
                    effective_batch: int = DEFAULT_EFFECTIVE_BATCH) -> Setup:
    """--max-seq's setup: one example at a time (micro-batch 1), accumulating to the effective batch, as `plan` at
    that --seq would: the adapters' gradients then live through the loss too (memory.loss_phase_bytes), which sets
    the peak of the shortest sequences."""
    return Setup(method=method, rank=rank, micro_batch=1, seq_len=seq, grad_accum=effective_batch,
                 checkpointing=checkpointing)


def max_seq(model: ModelSpec, gpu: GpuSpec, coeffs: Coefficients, method: Method, rank: int = DEFAULT_RANK,
            gpu_memory_gib: float | None = None, engine: Engine = "unsloth",
            effective_batch: int = DEFAULT_EFFECTIVE_BATCH) -> Estimate | None:
    """The longest sequence one example at a time (micro-batch 1) trains with this method and rank, with
    SAFETY_MARGIN kept free, checkpointing on or off, whichever reaches further (on: only one layer's
    activations at a time); None when not even MIN_SEQ_LEN fits (setups: single_sequence). Memory grows with the
    sequence, so a binary search over multiples of MAX_SEQ_STEP up to the model's context finds it."""
    limit = usable_gib(gpu, gpu_memory_gib)

    def fitting(seq: int) -> Estimate | None:
        best = None
        for ckpt in ("unsloth", "off"):
            est = estimate(model, single_sequence(method, rank, seq, ckpt, effective_batch), gpu, coeffs, limit,
                           engine=engine)
            if est.fits and (best is None or est.tokens_per_s > best.tokens_per_s):
                best = est
        return best

    lo, hi = MIN_SEQ_LEN // MAX_SEQ_STEP, model.max_position_embeddings // MAX_SEQ_STEP
    if fitting(lo * MAX_SEQ_STEP) is None:
        return None
    while lo < hi:  # invariant: lo fits
        mid = (lo + hi + 1) // 2
        if fitting(mid * MAX_SEQ_STEP) is not None:
            lo = mid
        else:
            hi = mid - 1
    return fitting(lo * MAX_SEQ_STEP)
