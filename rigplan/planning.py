"""The planning service behind `rigplan check`, `estimate`, `plan` and the plan `rigplan run` trains: model + GPU
+ data + stored calibration -> Plan, as plain dicts (the same ones --json prints).

Ties profiles (facts), rigplan/store (the fitted coefficients) and the estimator together. Never imports torch,
the trainer or calibration/ (tests/test_planning.py checks): token counts made with the model's tokenizer come in
from the caller.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rigplan import data, store, tokens
from rigplan.inputs import FLAGS, input_problems, plan_out_problems, run_problems, workload_problems  # noqa: F401
from rigplan.errors import ConfigError, UnknownGpuError, require
from rigplan.estimator import memory, planner
from rigplan.estimator.plan import Coefficients, Engine, ExampleLengths, Plan, Setup
from rigplan.profiles import catalog, nvml
from rigplan.profiles.catalog import GpuSpec, ModelSpec

DEFAULT_EPOCHS = 1.0
# With no data or --examples, time is shown for this many tokens: a typical small instruction set.
DEFAULT_WORKLOAD_TOKENS = 1_000_000


@dataclass(frozen=True)
class Workload:
    """How much text a run trains on."""

    tokens: float
    epochs: float
    examples: int | None
    avg_tokens: float | None
    source: str
    lengths: ExampleLengths | None = None
    """Tokens per example that speed is predicted for: the data's (padding counted) or --avg-tokens (all
    equal); None when only guessed (half of --seq), then speed is for full sequences."""
    lengths_from_data: bool = False
    """Whether those are each example's own length (a data file), so that padding is counted."""

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "epochs": self.epochs, "examples": self.examples,
                "avg_tokens": self.avg_tokens, "source": self.source, "lengths_from_data": self.lengths_from_data}


@dataclass(frozen=True)
class Target:
    """The GPU a plan is for: its catalogue facts and the memory to plan with."""

    spec: GpuSpec
    memory_gib: float
    local: bool


def workload(data_file: Path | None, examples: int | None, avg_tokens: float | None, epochs: float,
             seq_len: int | None, counted: tuple[list[int], int] | None = None,
             skip_bad: bool = False, context: int | None = None, family: str | None = None) -> tuple[Workload, int | None]:
    """The workload, and the sequence length the data asks for (its 95th percentile, at most the model's
    context; or None). The data's lengths are estimated from characters unless counted with the model's
    tokenizer (counted: a sample of them and the number of examples, from counted_lengths), by script at the
    rates measured for the model's tokenizer family (family: rigplan/data.py token_family). skip_bad: bad
    records are left out, not fatal."""
    require(input_problems({"epochs": epochs, "examples": examples, "avg_tokens": avg_tokens, "seq_len": seq_len})
            + workload_problems(data_file, examples, avg_tokens))
    if data_file is not None:
        lengths = counted[0] if counted else data.estimated_lengths(Path(data_file), skip_bad, family=family)
        examples_ = counted[1] if counted else len(lengths)
        how = ("tokenized with the model's tokenizer" if counted
               else f"lengths estimated from characters by script, {family or 'default'} tokenizer rates")
        p95 = data.percentile(lengths, 95)
        # Round the 95th percentile up to a multiple of 256: longer examples are truncated (5% at most).
        seq = seq_len or max(256, -(-p95 // 256) * 256)
        if seq_len is None and context and seq > context:  # the data's choice, never beyond the model's context
            seq = context
            longer = sum(n > context for n in lengths) / len(lengths)
            warnings.warn(f"rigplan: {longer:.0%} of {data_file}'s examples are longer than the model's context "
                          f"({context:,} tokens); they train cut to it (rigplan run --overlong drop leaves them out)",
                          stacklevel=2)
        longest = -(-max(lengths) // 256) * 256
        if seq_len and longest * 2 <= seq_len:
            # The plan's memory is for micro_batch x seq_len tokens (planner.estimate), which padded micro-batches of
            # this data never reach: it would plan fewer examples a micro-batch than fit, or checkpointing it need not.
            warnings.warn(f"rigplan: --seq {seq_len:,} is more than twice {data_file}'s longest example "
                          f"({max(lengths):,} tokens{', of those counted' if examples_ > len(lengths) else ''}); the "
                          f"plan is for {seq_len:,}-token sequences: leave --seq out to plan for the data",
                          stacklevel=2)
        tokens = sum(min(n, seq) for n in lengths)
        tokens = tokens / len(lengths) * examples_  # counted lengths may be a sample of the file
        return Workload(tokens, epochs, examples_, tokens / examples_, f"{data_file} ({how})",
                        ExampleLengths.of(lengths, count=examples_), lengths_from_data=True), seq
    if examples is not None and avg_tokens is not None:
        return Workload(examples * avg_tokens, epochs, examples, avg_tokens, "--examples --avg-tokens",
                        ExampleLengths.equal(avg_tokens)), None
    return Workload(DEFAULT_WORKLOAD_TOKENS, epochs, None, None, "per 1M tokens (pass --examples or --data)"), None


def token_family(model: ModelSpec | str) -> str:
    """The tokenizer family whose measured characters per token estimate this model's data without its tokenizer
    (profiles/token_rates.json): by catalogue id, else hub id."""
    if isinstance(model, str):
        return data.token_family(model)
    family = data.token_family(model.id)
    return family if family != "default" or not model.hub_id else data.token_family(model.hub_id)


def own_token_counts(model_name: str, model: ModelSpec, data_file: Path | None,
                     skip_bad: bool = False) -> tuple[list[int], int] | None:
    """The data's token counts with the model's own tokenizer where its files are on this machine (a local
    directory, or the hub cache for a profile's hub id), without torch (rigplan/tokens.py); else None."""
    if data_file is None:
        return None
    local = Path(model_name).expanduser()
    return tokens.counted_lengths(str(local) if local.is_dir() else model.hub_id, Path(data_file), skip_bad)


def resolve_target(gpu: str | None) -> tuple[Target | None, str]:
    """A named GPU from the catalogue, or the local one ('auto' or None); (None, why) when there is none."""
    if gpu and gpu != "auto":
        spec = catalog.resolve_gpu(gpu)
        return Target(spec, planner.usable_gib(spec), False), ""
    found, why = nvml.local_gpus()
    if not found:
        return None, f"no local GPU: {why}; showing the catalogue"
    # Several local GPUs of different kinds: plan on the smallest, which every rank must fit.
    local = min(found, key=lambda g: g.total_gib)
    spec = catalog.gpu_by_nvml_name(local.name, local.total_gib)
    if spec is None:
        raise UnknownGpuError(f"local GPU {local.name!r} is not in the catalogue; pass --gpu with the "
                              "closest card (rigplan gpus lists all)")
    return Target(spec, local.total_gib, True), ""


def calibration_info(coeffs: Coefficients, doc: dict[str, Any], measured_here: bool, gpu: GpuSpec) -> dict[str, Any]:
    res = doc.get("residuals", {})
    mem, tps = res.get("max_abs_peak_reserved_err"), res.get("max_abs_tok_per_s_err")
    date = doc.get("provenance", {}).get("date", "")
    if measured_here:
        label = f"calibrated on {coeffs.gpu} {date}".strip()
        note = f"max error on its runs: memory {mem:.0%}, speed {tps:.0%}" if mem is not None else ""
    else:
        label = f"reference calibration ({coeffs.gpu} {date}) scaled to {gpu.id} by its spec sheet".replace("  ", " ")
        note = (f"memory terms carry over (max error {mem:.0%} on the reference runs); speed scales with "
                "FLOP/s and bandwidth and is less certain (run rigplan calibrate on this GPU)") if mem is not None else ""
    return {"label": label, "measured_on_this_gpu": measured_here, "note": note}


def plan_row(p: Plan, load: Workload) -> dict[str, Any]:
    """A plan as the flat dict --json shows and the table prints."""
    return {"model_path": p.model_path, "engine": p.engine, "method": p.method, "rank": p.rank,
            "micro_batch": p.micro_batch, "grad_accum": p.grad_accum, "token_budget": p.budget,
            "effective_batch": p.effective_batch * p.num_gpus,
            "seq": p.seq_len, "checkpointing": p.checkpointing, "batching": p.batching,
            "optimizer": p.optimizer, "peak_allocated_gib": p.peak_allocated_gib,
            "peak_reserved_gib": p.peak_reserved_gib, "total_gib": p.total_gib, "tokens_per_s": p.tokens_per_s,
            "tokens_per_s_band": [p.tokens_per_s_low, p.tokens_per_s_high],
            "step_s": p.step_s, "host_bound": p.host_bound, "example_tokens": p.example_tokens or None,
            "fill": p.fill or None, "parallelism": p.parallelism, "num_gpus": p.num_gpus,
            "cpu_offload": p.cpu_offload, "cpu_memory_gib": p.cpu_memory_gib or None,
            "cpu_memory_terms_gib": cpu_memory_terms_gib(p), "load_on_cpu": p.load_on_cpu,
            "train_hours": round(planner.train_time_s(load.tokens, load.epochs, p) / 3600, 3),
            "components_gib": p.components_gib}


def cpu_memory_terms(p: Plan) -> dict[str, int]:
    """What a sharded plan's CPU memory is made of, bytes by term (estimator/memory.py cpu_memory_terms); empty for
    a plan that needs none."""
    return memory.cpu_memory_terms(plan_model(p), p.setup) if p.cpu_memory_gib else {}


def cpu_memory_terms_gib(p: Plan) -> dict[str, float] | None:
    """cpu_memory_terms in GiB, as --json shows them, or None."""
    return {k: round(v / planner.GIB, 1) for k, v in cpu_memory_terms(p).items()} or None


# Where a container's memory limit lives: cgroup v2, then v1 ("max", or v1's near 2**63, where there is none).
CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def host_memory_gib(meminfo: str | None = None, cgroup_limit: str | None = None) -> float | None:
    """The memory this process may use: Linux's /proc/meminfo MemTotal, or the container's cgroup limit where that
    is lower (a job given 64 GiB of a 512 GiB host is killed at 64); None where neither can be read."""
    if meminfo is None:
        try:
            meminfo = Path("/proc/meminfo").read_text()
        except OSError:
            meminfo = ""
    total = next((int(line.split()[1]) / 2**20 for line in meminfo.splitlines()
                  if line.startswith("MemTotal:") and len(line.split()) >= 2), None)
    if cgroup_limit is None:
        for path in CGROUP_LIMITS:
            try:
                cgroup_limit = Path(path).read_text()
                break
            except OSError:
                continue
    limit = cgroup_limit.strip() if cgroup_limit else ""
    if limit.isdigit() and int(limit) < 2**60:
        gib = int(limit) / 2**30
        return gib if total is None else min(total, gib)
    return total


def cpu_memory_check(p: Plan, host_gib: float | None, force: bool = False) -> tuple[list[str], str | None]:
    """A sharded plan's CPU memory against this machine's, before any process starts: (problems, warning). What each
    process keeps to itself, the offloaded weights and its runtime, must fit: else refused (a kernel's out-of-memory
    kill mid-load loses the time and says nothing), or with force (`rigplan run --force`) said and tried. The
    checkpoint as each process reads it (estimator/memory.py cpu_memory_terms) comes through the page cache, which
    the processes share and the kernel can drop: more than the machine has only warns."""
    terms = cpu_memory_terms(p)
    if not terms or host_gib is None:
        return [], None
    own = (terms["offloaded_weights"] + terms["process_runtime"]) / planner.GIB
    if own > host_gib:
        fix = ("pass --no-cpu-offload where the GPUs hold the weights (rigplan check --gpus "
               f"{p.num_gpus} says which plans do), or use GPUs with more memory" if p.cpu_offload else
               "use fewer processes or a machine with more memory")
        short = (f"this plan needs {own:.0f} GiB of CPU memory for its offloaded weights and {p.num_gpus} processes, "
                 f"and this machine has {host_gib:.0f} GiB")
        if force:
            return [], f"--force: trying, though {short}"
        return [f"{short}: {fix}; or pass rigplan run --force to try anyway (some virtual machines report less memory "
                "than they give once it is used)"], None
    if p.cpu_memory_gib > host_gib:
        return [], (f"the plan's CPU memory, {p.cpu_memory_gib:.0f} GiB summed over its processes, is more than this "
                    f"machine's {host_gib:.0f} GiB; {terms['checkpoint_read'] / planner.GIB:.0f} GiB of it is the "
                    "checkpoint as each process reads it, through the page cache, which the kernel can drop: it may "
                    "train slowly while loading")
    return [], None


def warnings_for(model: ModelSpec, short: bool = False, gpu: GpuSpec | None = None) -> list[str]:
    """What is known to differ for this model (on this GPU, where given; profiles/known_issues.json): the whole note
    with its sources, or (short) its one-line summary, which the tables print; --json carries both."""
    notes = [f"{i['severity']}: {i['summary']} (profiles/known_issues.json; --json for the whole note)" if short
             else f"{i['severity']}: {i['issue']} ({i['source']})" for i in catalog.issues_for(model, gpu)]
    # A plain bitsandbytes NF4 copy trained as quantizing on load does, memory within 0.1%
    # (bench/results/prequantized-h200/); Unsloth's dynamic 4-bit copies (`-unsloth-bnb-4bit`) keep some layers in
    # 16 bits, which the estimate does not count.
    if model.prequantized and "unsloth-bnb-4bit" in model.hub_id.lower():
        planned = f"{model.id} quantized on load" if model.hub_id != model.id else "its architecture quantized on load"
        notes.append(f"uncalibrated: {model.hub_id} is Unsloth's dynamic 4-bit, planned as {planned}; the layers it "
                     "keeps in 16 bits are not counted (a plain bitsandbytes 4-bit copy measured as quantizing on "
                     "load)")
    return notes


def warning_fields(model: ModelSpec, gpu: GpuSpec | None = None) -> dict[str, list[str]]:
    """The JSON's warnings: whole, and short for the tables."""
    return {"warnings": warnings_for(model, gpu=gpu), "warnings_short": warnings_for(model, short=True, gpu=gpu)}


def choose_engine(model: ModelSpec) -> Engine:
    """The one place the engine is chosen: Unsloth, unless profiles/known_issues.json records that it fails for
    this model family; then transformers + PEFT."""
    fails = any(i.get("engine") == "unsloth" and i.get("severity") == "fails" for i in catalog.issues_for(model))
    return "transformers" if fails else "unsloth"


def batchings_for(model: ModelSpec) -> tuple[str, ...]:
    """The layouts the trainer may use for this model: padded only where profiles/known_issues.json says its
    engine cannot keep examples laid back to back apart ("batching": "padded")."""
    if any(i.get("batching") == "padded" for i in catalog.issues_for(model)):
        return ("padded",)
    return ("padded", "packed")


def require_batching(model: ModelSpec, batching: str | None) -> None:
    """A layout asked for (rigplan run --batching) that this model's engine cannot train, refused in one line."""
    if batching is not None and batching not in batchings_for(model):
        raise ConfigError(f"--batching {batching}: {model.id} trains padded micro-batches only (its engine cannot "
                          "keep examples laid back to back apart: profiles/known_issues.json); use --batching padded")


def check(model_name: str, gpu: str | None = None, num_gpus: int = 1, seq_len: int | None = None,
          data_file: Path | None = None, examples: int | None = None, avg_tokens: float | None = None,
          epochs: float = DEFAULT_EPOCHS, effective_batch: int = planner.DEFAULT_EFFECTIVE_BATCH,
          method: str | None = None, rank: int | None = None) -> dict[str, Any]:
    """Does the model fit this GPU, with which plan; or, with no GPU named or found, which GPUs can train it.
    method and rank, when given, are constraints the plan keeps (as an Unsloth user sets them)."""
    require(input_problems({"seq_len": seq_len, "effective_batch": effective_batch, "num_gpus": num_gpus,
                            "rank": rank, "epochs": epochs, "examples": examples, "avg_tokens": avg_tokens})
            + workload_problems(data_file, examples, avg_tokens))
    model = catalog.resolve_model(model_name)
    counted = own_token_counts(model_name, model, data_file)
    load, data_seq = workload(data_file, examples, avg_tokens, epochs, seq_len, counted,
                              context=model.max_position_embeddings, family=token_family(model))
    seq = seq_len or data_seq or planner.DEFAULT_SEQ_LEN
    target, why = resolve_target(gpu)
    methods = (method,) if method else ("lora", "qlora")
    ranks = (rank,) if rank is not None else None
    if target is None:
        return {**catalogue(model, seq, load, effective_batch, num_gpus, methods, ranks), "note": why}
    result, plan_, info = best_plan(model, target, seq, effective_batch, num_gpus, lengths=load.lengths,
                                    methods=methods, ranks=ranks, name=model_name)
    return {
        "model": model.id, "gpu": target.spec.id, "gpu_name": target.spec.name, "gpu_memory_gib": round(target.memory_gib, 2),
        "gpu_source": "local (NVML)" if target.local else "catalogue", "num_gpus": num_gpus,
        "fits": result.fits, "reason": result.reason, "calibration": info,
        "recommended": plan_row(plan_, load) if plan_ else None,
        "alternatives": [plan_row(p, load) for p in result.alternatives],
        "workload": load.to_dict(), **warning_fields(model, target.spec), **host_memory_fields(plan_, target),
    }


def host_memory_fields(p: Plan | None, target: Target) -> dict[str, Any]:
    """On this machine's own GPUs, a sharded plan's CPU memory against this machine's (cpu_memory_check):
    `host_memory_gib`, and `host_memory_note` where it falls short or only the page cache would make it fit."""
    if p is None or not p.cpu_memory_gib or not target.local:
        return {}
    host = host_memory_gib()
    problems, warning = cpu_memory_check(p, host)
    note = "; ".join(problems) or warning
    return {"host_memory_gib": round(host, 1) if host else None, **({"host_memory_note": note} if note else {})}


def methods_for(model: ModelSpec, methods: tuple[str, ...]) -> tuple[str, ...]:
    """The methods that can train this model: a pre-quantized 4-bit checkpoint (unsloth/...-bnb-4bit) holds no
    16-bit weights to train LoRA on, so QLoRA only."""
    if not model.prequantized:
        return methods
    if "qlora" not in methods:
        raise ConfigError(f"{model.hub_id} holds 4-bit weights: only QLoRA trains it; pass --method qlora, or the "
                          f"16-bit model ({model.id}) for LoRA")
    return ("qlora",)


def best_plan(model: ModelSpec, target: Target, seq: int, effective_batch: int, num_gpus: int = 1,
              model_path: str | None = None, lengths: ExampleLengths | None = None,
              methods: tuple[str, ...] = ("lora", "qlora"),
              ranks: tuple[int, ...] | None = None,
              name: str = "") -> tuple[planner.PlanResult, Plan | None, dict[str, Any]]:
    """The planner's answer on the target GPU with its calibration; speed for the data's example lengths
    when known. Where nothing fits on several GPUs, or only with the weights offloaded, because sharded QLoRA would
    first load the whole 4-bit model onto each GPU, the profile's pre-quantized copy (catalog.prequantized_copy;
    `name`, the name given, picks the instruct one) is planned instead: the same weights, loaded into CPU memory by
    each process."""
    coeffs, doc, here = store.for_gpu(target.spec.id)
    methods = methods_for(model, methods)

    def answer(m: ModelSpec, ms: tuple[str, ...]) -> planner.PlanResult:
        return planner.plan(m, target.spec, coeffs, seq_len=seq, effective_batch=effective_batch,
                            gpu_memory_gib=target.memory_gib, num_gpus=num_gpus, model_path=model_path,
                            lengths=lengths, methods=ms, engine=choose_engine(m),  # type: ignore[arg-type]
                            ranks=ranks or planner.RANKS, batchings=batchings_for(m))  # type: ignore[arg-type]

    result = answer(model, methods)
    copy = catalog.prequantized_copy(model, name) if model_path is None and not model.prequantized else None
    # Also where the 16-bit model fits only with its frozen weights in CPU memory: offloaded, QLoRA goes first
    # (planner._preference), and the copy's 4-bit weights need a quarter of the CPU memory.
    offloaded = result.fits and result.best is not None and result.best.cpu_offload
    if (not result.fits or offloaded) and num_gpus > 1 and "qlora" in methods and copy is not None:
        sharded = answer(copy, ("qlora",))
        if sharded.fits:
            whole = memory.quantized_load_bytes(model, sharded.best.setup) / planner.GIB  # type: ignore[union-attr]
            result = dataclasses.replace(sharded, reason=(
                f"{sharded.reason}; from {copy.hub_id}, the same weights stored in 4-bit, which each process loads "
                f"into CPU memory (from the 16-bit checkpoint every process would first load the whole 4-bit model, "
                f"{whole:.1f} GiB, onto its GPU: transformers 5.17)"))
    return result, result.best, calibration_info(coeffs, doc, here, target.spec)


def catalogue(model: ModelSpec, seq: int, load: Workload, effective_batch: int, num_gpus: int = 1,
              methods: tuple[str, ...] = ("lora", "qlora"), ranks: tuple[int, ...] | None = None) -> dict[str, Any]:
    """Every catalogue GPU's best plan for the model (num_gpus of each card: speed for all of them, price for
    all of them); the smallest card that fits and the best per dollar."""
    rows = []
    for spec in catalog.gpus():
        result, p, _ = best_plan(model, Target(spec, planner.usable_gib(spec), False), seq, effective_batch,
                                 num_gpus, lengths=load.lengths, methods=methods, ranks=ranks)
        row = {"gpu": spec.id, "name": spec.name, "memory_gib": spec.memory_gib, "price_usd": spec.price_usd,
               "fits": result.fits, "recommended": plan_row(p, load) if p and result.fits else None}
        if row["recommended"] and spec.price_usd:
            row["tokens_per_s_per_kusd"] = round(p.tokens_per_s / (spec.price_usd * num_gpus) * 1000, 1)
        rows.append(row)
    fitting = [r for r in rows if r["fits"]]
    smallest = min(fitting, key=lambda r: (r["memory_gib"], r["price_usd"] or 1e12), default=None)
    priced = [r for r in fitting if r.get("tokens_per_s_per_kusd")]
    per_dollar = max(priced, key=lambda r: r["tokens_per_s_per_kusd"], default=None)
    return {"model": model.id, "gpu": None, "num_gpus": num_gpus, "seq": seq, "gpus": rows, "workload": load.to_dict(),
            "smallest_fitting": smallest and smallest["gpu"], "best_per_dollar": per_dollar and per_dollar["gpu"],
            **warning_fields(model)}


def estimate(model_name: str, method: str, batch: int, seq_len: int, rank: int, gpu: str | None = None,
             grad_accum: int = 1, checkpointing: str = "unsloth", optimizer: str = "adamw_8bit") -> dict[str, Any]:
    """One configuration's memory (term by term) and speed on one GPU (the local one, or H100 by default)."""
    require(input_problems({"micro_batch": batch, "seq_len": seq_len, "rank": rank, "grad_accum": grad_accum}))
    model = catalog.resolve_model(model_name)
    methods_for(model, (method,))
    target, _ = resolve_target(gpu)
    if target is None:
        spec = catalog.resolve_gpu(store.reference()[0].gpu)
        target = Target(spec, planner.usable_gib(spec), False)
    coeffs, doc, here = store.for_gpu(target.spec.id)
    setup = Setup(method=method, rank=rank, micro_batch=batch, seq_len=seq_len, grad_accum=grad_accum,  # type: ignore[arg-type]
                  checkpointing=checkpointing, optimizer=optimizer)  # type: ignore[arg-type]
    engine = choose_engine(model)
    est = planner.estimate(model, setup, target.spec, coeffs, target.memory_gib, engine=engine)
    gib = planner.GIB
    return {"model": model.id, "gpu": target.spec.id, "gpu_memory_gib": round(target.memory_gib, 2),
            "engine": engine, "method": method, "rank": rank, "micro_batch": batch, "grad_accum": grad_accum,
            "token_budget": batch * seq_len, "seq": seq_len,
            "checkpointing": checkpointing, "optimizer": optimizer,
            "peak_allocated_gib": round(est.peak_allocated_gib, 3), "peak_reserved_gib": round(est.peak_reserved_gib, 3),
            "total_gib": round(est.total_gib, 3), "fits": est.fits, "tokens_per_s": round(est.tokens_per_s, 1),
            "step_s": round(est.step_s, 4), "host_bound": est.host_bound,
            "tokens_per_s_band": [round(x, 1) for x in est.tokens_per_s_band],
            "components": {k: round(v / gib, 3) for k, v in est.components_bytes.items()},
            "calibration": calibration_info(coeffs, doc, here, target.spec), **warning_fields(model, target.spec)}


# Without a GPU (CPU training through transformers + PEFT) nothing is predicted: these are the settings.
CPU_MICRO_BATCH = 4


def make_plan(model_name: str, gpu: str | None, seq_len: int | None = None, data_file: Path | None = None,
              effective_batch: int = planner.DEFAULT_EFFECTIVE_BATCH, num_gpus: int = 1, epochs: float = DEFAULT_EPOCHS,
              model_path: str | None = None, allow_cpu: bool = False,
              methods: tuple[str, ...] = ("lora", "qlora"), counted: tuple[list[int], int] | None = None,
              skip_bad: bool = False, ranks: tuple[int, ...] | None = None) -> Plan:
    """The recommended Plan, as `rigplan run` will read it; an error when nothing fits. A local model
    directory is also where the weights load from. With allow_cpu and no GPU: a CPU plan, nothing predicted.
    counted: the data's tokens per example as the model's tokenizer counts them (counted_lengths; else
    estimated from characters)."""
    require(input_problems({"seq_len": seq_len, "effective_batch": effective_batch, "num_gpus": num_gpus,
                            "epochs": epochs}) + [x for r in ranks or () for x in input_problems({"rank": r})])
    model = catalog.resolve_model(model_name)
    if model_path is None and Path(model_name).expanduser().is_dir():
        model_path = str(Path(model_name).expanduser().resolve())
    if counted is None:
        counted = own_token_counts(model_path or model_name, model, data_file, skip_bad)
    load, data_seq = workload(data_file, None, None, epochs, seq_len, counted, skip_bad,
                              context=model.max_position_embeddings, family=token_family(model))
    target, why = resolve_target(gpu)
    requested = seq_len or data_seq or planner.DEFAULT_SEQ_LEN
    if target is None and allow_cpu:
        seq = min(requested, model.max_position_embeddings)
        micro = min(CPU_MICRO_BATCH, effective_batch)
        return Plan(model=model.id, model_path=model_path or model.hub_id, gpu="cpu", method="lora",
                    rank=planner.DEFAULT_RANK, micro_batch=micro, grad_accum=max(1, effective_batch // micro),
                    seq_len=seq, target_modules=model.target_modules, optimizer="adamw_torch",
                    epochs=float(epochs), calibration="none: CPU, nothing predicted", engine="transformers",
                    token_budget=micro * seq,
                    num_gpus=num_gpus, parallelism="ddp" if num_gpus > 1 else "single")
    if target is None:
        raise ConfigError(f"{why.split(';')[0]}; pass --gpu ID to plan for a catalogue GPU")
    result, p, _ = best_plan(model, target, requested, effective_batch, num_gpus, model_path, load.lengths, methods,
                             ranks, name=model_name)
    if p is not None and not result.fits:  # the planner found a plan at a shorter sequence only: say which
        raise ConfigError(f"{model.id} on {target.spec.id}: nothing fits at seq {requested}; {p.method} fits at seq "
                          f"{p.seq_len} ({p.total_gib:.1f} GiB): pass --seq {p.seq_len}, or pick a larger GPU or more "
                          f"GPUs (--gpus)")
    if p is None or not result.fits:
        raise ConfigError(f"{model.id} on {target.spec.id}: {result.reason}; pick a larger GPU or more GPUs (--gpus)")
    return dataclasses.replace(p, epochs=float(epochs))


def optimizer_problems(changes: dict[str, Any], parallelism: str | None) -> list[str]:
    """8-bit AdamW asked for with a sharded plan (parallelism: the plan's, where --parallelism does not change it):
    bitsandbytes' 8-bit state cannot step FSDP2's DTensor shards (estimator/planner.py optimizer_for)."""
    if changes.get("optimizer") == "adamw_8bit" and (changes.get("parallelism") or parallelism) == "fsdp":
        return ["--optimizer adamw_8bit cannot step FSDP's sharded adapters (bitsandbytes' 8-bit state); use "
                "--optimizer adamw_torch, or --parallelism ddp"]
    return []


def override(p: Plan, changes: dict[str, Any], force: bool = False, lengths: ExampleLengths | None = None) -> Plan:
    """A user's changes to a plan, re-estimated on the plan's GPU (speed for the data's lengths, when given);
    one that cannot fit is refused with the estimate that says why (force: kept anyway). The trainer gets the
    result and never re-plans."""
    changes = {k: v for k, v in changes.items() if v is not None}
    if not changes:
        return p
    if changes.get("parallelism") and changes.get("num_gpus", p.num_gpus) == 1:
        raise ConfigError(f"--parallelism {changes['parallelism']} spreads a plan over several GPUs; pass --gpus N too")
    if changes.get("cpu_offload") and changes.get("parallelism", p.parallelism) != "fsdp":
        raise ConfigError("--cpu-offload keeps a sharded plan's frozen weights in CPU memory; pass --parallelism fsdp "
                          "(and --gpus N) too")
    require(optimizer_problems(changes, p.parallelism))
    if changes.get("parallelism") == "fsdp" and changes.get("engine") == "unsloth":
        raise ConfigError("--parallelism fsdp trains on transformers + PEFT (Unsloth does not shard a model); "
                          "leave out --engine unsloth, or use --parallelism ddp")
    new = dataclasses.replace(p, **changes)
    if new.parallelism == "fsdp" and new.engine == "unsloth":  # the planner's FSDP plans are transformers + PEFT
        new = dataclasses.replace(new, engine="transformers")
    # The optimizer follows a change of parallelism; a saved plan's --method change keeps it, so that a checkpoint
    # (its optimizer state) resumes under QLoRA after running out of memory (trainer/run.py's advice).
    if "parallelism" in changes and "optimizer" not in changes and new.gpu != "cpu":
        new = dataclasses.replace(new, optimizer=planner.optimizer_for(new.parallelism, new.method))
    if "micro_batch" in changes or "seq_len" in changes:
        new = dataclasses.replace(new, token_budget=new.micro_batch * new.seq_len)
    if new.gpu == "cpu":
        return new
    model = plan_model(new)
    require_batching(model, changes.get("batching"))
    spec = catalog.resolve_gpu(new.gpu)
    coeffs, doc, _ = store.for_gpu(spec.id)
    est = planner.estimate(model, new.setup, spec, coeffs, lengths=lengths, batching=new.batching, engine=new.engine)
    if not est.fits and not force:
        raise ConfigError(f"{', '.join(f'{k}={v}' for k, v in changes.items())} needs {est.total_gib:.1f} GiB on "
                          f"{spec.id} ({est.gpu_memory_gib:.1f} GiB, {planner.SAFETY_MARGIN:.0%} kept free); "
                          "change it, or pass --force to try anyway")
    best = planner.to_plan(model, est, spec, coeffs, new.model_path)
    keep = {f: getattr(new, f) for f in ("model", "learning_rate", "lr_scheduler", "warmup_steps", "weight_decay",
                                         "epochs", "seed", "lora_alpha")}
    return dataclasses.replace(best, **keep)


def save_plan(p: Plan, out: Path) -> None:
    """Write a plan where `rigplan run` will read it."""
    try:
        Path(out).write_text(p.to_json() + "\n")
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write ({e.strerror}); pass another path") from e


def read_plan(path: Path) -> Plan | None:
    """A saved plan.json, or None when path is not one."""
    path = Path(path)
    if not (path.is_file() and path.suffix == ".json"):
        return None
    text = path.read_text()
    if '"schema_version"' not in text:
        return None
    try:
        plan = Plan.from_json(text)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"{path}: not a plan this rigplan reads ({e}); make one with rigplan plan --out") from e
    bad = [f"{k} {getattr(plan, k)}" for k in ("micro_batch", "grad_accum", "rank", "seq_len", "epochs",
                                                "learning_rate") if input_problems({k: getattr(plan, k)})]
    if bad:
        raise ConfigError(f"{path}: {', '.join(bad)} out of range; fix the file or make a new plan with "
                          "rigplan plan --out")
    return plan


def plan_for_run(model_or_plan: str, gpu: str | None, data_file: Path, changes: dict[str, Any],
                 force: bool = False, skip_bad: bool = False,
                 counted: tuple[list[int], int] | None = None, num_gpus: int = 1) -> Plan:
    """The plan `rigplan run` trains: a saved plan.json, or a fresh plan (CPU plan without a GPU), with the
    user's overrides re-estimated. counted: the data's tokens per example as the model's tokenizer counts them
    (the caller counts them: the trainer's count_tokens), else estimated from characters. skip_bad (`rigplan
    run --skip-bad`): bad records are left out of the plan too, not fatal."""
    require(run_problems(changes))
    if counted is None:  # the same counts for the fresh plan and any override re-estimated below
        counted = tokens.counted_lengths(local_model_dir(model_or_plan) or hub_id(model_or_plan), Path(data_file),
                                         skip_bad)
    base = read_plan(Path(model_or_plan))
    if base is None:
        # A method asked for is planned for (its own best budget and checkpointing), not patched into the other
        # method's plan. A CPU plan keeps it as a change: QLoRA is then refused when training starts
        # (bitsandbytes 4-bit needs CUDA), with a one-line error.
        method = changes.get("method")
        base = make_plan(model_or_plan, gpu, changes.get("seq_len"), data_file, allow_cpu=True,
                         methods=(method,) if method else ("lora", "qlora"), counted=counted, skip_bad=skip_bad,
                         num_gpus=num_gpus)
        if base.gpu != "cpu":
            changes = {k: v for k, v in changes.items() if k not in ("method", "seq_len")}
    if not {k: v for k, v in changes.items() if v is not None}:
        return base
    if changes.get("parallelism") and num_gpus > 1 and base.num_gpus == 1:  # a one-of-N plan, spread as asked
        changes = {**changes, "num_gpus": num_gpus}
    lengths = (ExampleLengths.of(counted[0], count=counted[1]) if counted
               else ExampleLengths.of(data.estimated_lengths(Path(data_file), skip_bad,
                                                             family=token_family(base.model))))
    return override(base, changes, force, lengths)


def local_model_dir(model_or_plan: str) -> str | None:
    """The weights' directory when the model is one on this machine (for counting tokens with its tokenizer)."""
    p = read_plan(Path(model_or_plan)) if Path(model_or_plan).suffix == ".json" else None
    where = p.model_path if p else model_or_plan
    local = Path(where).expanduser()
    return str(local.resolve()) if local.is_dir() else None


def plan_model(p: Plan) -> ModelSpec:
    """The architecture a plan trains: its local weights' config.json where they are on this machine, else its
    profile."""
    local = Path(p.model_path).expanduser().is_dir()
    copy = p.model_path.lower().endswith(catalog.PREQUANTIZED_SUFFIXES)  # a profile's 4-bit copy: loads as one
    return catalog.resolve_model(p.model_path if local or copy else p.model)


def model_of(model_or_plan: str) -> ModelSpec:
    """The architecture a model name, local directory or saved plan.json trains."""
    p = read_plan(Path(model_or_plan)) if Path(model_or_plan).suffix == ".json" else None
    return catalog.resolve_model(model_or_plan) if p is None else plan_model(p)


def hub_id(model_name: str) -> str:
    """Where a model's weights and tokenizer come from when it is not a local directory: its profile's hub id
    (a plan.json names its own)."""
    p = read_plan(Path(model_name)) if Path(model_name).suffix == ".json" else None
    return p.model_path if p else catalog.resolve_model(model_name).hub_id


def max_seq(model_name: str, gpu: str | None, rank: int = planner.DEFAULT_RANK) -> dict[str, Any]:
    """`rigplan check --max-seq`: the longest sequence each method trains at micro-batch 1 on the GPU (rank as
    given), with the plan at that length; null where not even the shortest fits."""
    require(input_problems({"rank": rank}))
    model = catalog.resolve_model(model_name)
    target, why = resolve_target(gpu)
    if target is None:
        raise ConfigError(f"{why.split(';')[0]}; pass --gpu ID to ask about a catalogue GPU")
    coeffs, doc, here = store.for_gpu(target.spec.id)
    engine = choose_engine(model)
    found = {m: planner.max_seq(model, target.spec, coeffs, m, rank, target.memory_gib, engine)  # type: ignore[arg-type]
             for m in ("lora", "qlora")}
    load = Workload(DEFAULT_WORKLOAD_TOKENS, DEFAULT_EPOCHS, None, None, "per 1M tokens")
    plans = {m: plan_row(planner.to_plan(model, e, target.spec, coeffs), load) if e else None
             for m, e in found.items()}
    limit = planner.usable_gib(target.spec, target.memory_gib)
    # Where a method fits nothing: how far its shortest sequence (checkpointing on, the least memory) is from fitting.
    why_not = {m: f"not even {planner.MIN_SEQ_LEN} tokens fit: " + planner.short_of(planner.estimate(
        model, planner.single_sequence(m, rank, planner.MIN_SEQ_LEN, "unsloth"),  # type: ignore[arg-type]
        target.spec, coeffs, limit, engine=engine), limit) for m, e in found.items() if e is None}
    for m in why_not:  # `check` lowers the rank to fit; say where a lower one would
        for r in sorted((r for r in planner.RANKS if r < rank), reverse=True):
            e = planner.max_seq(model, target.spec, coeffs, m, r, target.memory_gib, engine)  # type: ignore[arg-type]
            if e is not None:
                why_not[m] += f"; at rank {r}, {e.setup.seq_len:,} tokens fit (pass --rank {r})"
                break
    return {"model": model.id, "gpu": target.spec.id, "gpu_name": target.spec.name,
            "gpu_memory_gib": round(target.memory_gib, 2), "rank": rank,
            "max_seq": {m: e.setup.seq_len if e else None for m, e in found.items()}, "plans": plans,
            "why_not": why_not,
            "calibration": calibration_info(coeffs, doc, here, target.spec), **warning_fields(model, target.spec)}
