"""Short timed training steps on replicas, through the trainer's engine -> raw measurements with provenance.

    python -m rigplan.calibration.probe --job llama-3.1-8b:lora:16:1x2048,4x2048 --job llama-3.1-8b@4:qlora:16:2x2048 --out runs.jsonl

A job is MODEL[@LAYERS]:METHOD:RANK:BxS,BxS,...[:checkpointing=off][:autocast=bf16|off][:gpu=no-bf16]
[:labelled=F]. Each shape is measured after a warm-up step, with torch's peak allocated and reserved memory and
NVML's used memory; an out-of-memory shape is recorded, not fatal.
Every row is appended (and flushed) as soon as it is measured, so a killed probe keeps what it had.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rigplan.calibration.replica import build_replica, reduced
from rigplan.estimator.plan import Plan
from rigplan.profiles import nvml
from rigplan.profiles.catalog import resolve_model
from rigplan.trainer.engine import provenance  # noqa: F401  (re-exported: bench scripts import it from here)

GIB = 2**30
WARMUP = 1  # the first step compiles (Unsloth compiles each decoder block: 15-40 s on an H100)
MIN_STEPS = 6
MAX_STEPS = 40
# Time at least this long after warm-up: 5 steps of ~0.1 s gave medians 37% apart between two processes
# for the same 1B shape on the H100, while steps of >= 0.7 s agreed within 1%.
MIN_TIMED_S = 3.0


@dataclass(frozen=True)
class Job:
    model: str
    layers: int | None
    method: Literal["lora", "qlora"]
    rank: int
    shapes: tuple[tuple[int, int], ...]
    optimizer: str = "adamw_8bit"
    checkpointing: str = "unsloth"
    # "bf16": the forward under torch.autocast(bfloat16), as accelerate wraps the model's forward when TRL trains with
    # bf16 mixed precision (`rigplan run`, every family on a GPU with bf16: Unsloth 2026.10.9 forces its float32 list
    # to float32 without autocast only for fp16 loads or GPUs without bf16, unsloth/models/loader.py). "off": a plain
    # forward, as every probe recorded before 2026-12-01 ran. Unsloth's rewrite of PEFT's LoRA forward upcasts a
    # 16-bit layer's adapter input to fp32 only without autocast (unsloth_zoo compiler.py), so the two differ for the
    # generic-path families' 16-bit LoRA (more memory and less speed without it: bench/results/h200-issue17-autocast/,
    # -autocast-next/), not for the Llama fast path (the same peaks, speed within 1%: h200-llama-autocast/).
    # "auto" (the default): what `rigplan run` does on this device, "bf16" on a CUDA GPU with bf16, "off" elsewhere.
    autocast: Literal["auto", "off", "bf16"] = "auto"
    # "no-bf16": Unsloth's load and training as on a GPU without bf16 (T4, V100), for the families Unsloth trains in
    # float32 there (as_without_bf16): what `rigplan check` says it has not measured (profiles/known_issues.json).
    gpu: Literal["as-is", "no-bf16"] = "as-is"
    # The share of each row's positions that carry a label, the rest -100 at its start, as a chat or Alpaca prompt
    # is in `rigplan run` (rigplan/data.py tokenize: the assistant's turns only): Unsloth's fused loss computes the
    # logits of the labelled rows alone (unsloth_zoo fused_losses/fused_linear.py _keep_index). 1: every position.
    labelled: float = 1.0

    @classmethod
    def parse(cls, text: str) -> "Job":
        parts = text.split(":")
        model, _, layers = parts[0].partition("@")
        shapes = tuple(tuple(int(x) for x in s.split("x")) for s in parts[3].split(","))
        extra = dict(p.split("=", 1) for p in parts[4:])
        if "labelled" in extra:
            extra["labelled"] = float(extra["labelled"])  # type: ignore[assignment]
        return cls(model, int(layers) if layers else None, parts[1], int(parts[2]), shapes, **extra)  # type: ignore[arg-type]


def forward_loss(model: Any, ids: Any, device: str, autocast: str, labelled: float = 1.0) -> Any:
    """The loss of one forward on ids as their own labels (the first 1 - labelled of each row's positions -100),
    under torch.autocast(bfloat16) for autocast "bf16"."""
    import torch

    labels = ids
    if labelled < 1:
        labels = ids.clone()
        labels[:, : int(ids.shape[1] * (1 - labelled))] = -100
    with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=autocast == "bf16"):
        return model(input_ids=ids, labels=labels).loss


def measure_shape(model: Any, optimizer: Any, vocab: int, batch: int, seq: int, device: str,
                  min_timed_s: float = MIN_TIMED_S, autocast: str = "off",
                  labelled: float = 1.0) -> dict[str, Any]:
    """Warm-up, then timed forward+backward+optimizer steps on random ids; peaks since the reset. With autocast
    "bf16" the forward (loss included, as the model computes it) runs under torch.autocast, the backward outside."""
    import torch

    cuda = device.startswith("cuda")
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() / GIB if cuda else None
    times: list[float] = []
    losses, nvml_after = [], []
    for step in range(max(MAX_STEPS, int(MAX_STEPS * min_timed_s / MIN_TIMED_S))):
        if step >= MIN_STEPS and sum(times[WARMUP:]) >= min_timed_s:
            break
        ids = torch.randint(0, vocab, (batch, seq), device=device)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = forward_loss(model, ids, device, autocast, labelled)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        if cuda:
            nvml_after.append((nvml.used_gib(), torch.cuda.memory_reserved() / GIB))
            if step == 0:  # the first step's peak (it compiles) apart from the steps after it
                first = (torch.cuda.max_memory_allocated() / GIB, torch.cuda.max_memory_reserved() / GIB)
                torch.cuda.reset_peak_memory_stats()
    timed = sorted(times[WARMUP:])
    step_s = statistics.median(timed)
    row: dict[str, Any] = {"base_gib": base, "step_s": round(step_s, 4), "steps_timed": len(timed),
                           "step_s_p10_p90": [round(timed[len(timed) // 10], 4), round(timed[-1 - len(timed) // 10], 4)],
                           "tok_per_s": round(batch * seq / step_s, 1), "loss": losses[-1],
                           "step_times_s": [round(t, 4) for t in times]}
    if cuda:
        used, reserved = nvml_after[-1]
        steady = (torch.cuda.max_memory_allocated() / GIB, torch.cuda.max_memory_reserved() / GIB)
        row.update(peak_alloc_gib=round(max(first[0], steady[0]), 4),
                   peak_reserved_gib=round(max(first[1], steady[1]), 4),
                   nvml_used_gib=round(used, 4) if used is not None else None,
                   context_gib=round(used - reserved, 4) if used is not None else None,
                   first_step_peak_alloc_gib=round(first[0], 4), later_steps_peak_alloc_gib=round(steady[0], 4),
                   phase_peak_alloc_gib=phase_peaks(model, optimizer, vocab, batch, seq, device, autocast,
                                                                    labelled))
    return row


def phase_peaks(model: Any, optimizer: Any, vocab: int, batch: int, seq: int, device: str,
                autocast: str = "off", labelled: float = 1.0) -> dict[str, float]:
    """One more step, with the peak allocated memory of its forward pass (loss included), its backward pass
    and its optimizer step read apart: which phase sets a shape's peak, for the memory terms. Under the same
    autocast as the timed steps (the rows of h200-issue17-autocast/ read theirs without it)."""
    import torch

    ids = torch.randint(0, vocab, (batch, seq), device=device)
    peaks = {}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    loss = forward_loss(model, ids, device, autocast, labelled)
    peaks["forward"] = torch.cuda.max_memory_allocated() / GIB
    torch.cuda.reset_peak_memory_stats()
    loss.backward()
    peaks["backward"] = torch.cuda.max_memory_allocated() / GIB
    torch.cuda.reset_peak_memory_stats()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    peaks["optimizer"] = torch.cuda.max_memory_allocated() / GIB
    torch.cuda.synchronize()
    return {k: round(v, 4) for k, v in peaks.items()}


def scratch_dir(spec: Any) -> str | None:
    """Where a replica is written and read back: /dev/shm (memory) when it has room, which saves ~25 s of
    disk writes and reads per full-depth 8B replica on the H100 machine; else the default temp dir."""
    import shutil

    need = 2.5 * 2 * spec.params_total  # bf16 weights, with room to spare
    try:
        return "/dev/shm" if shutil.disk_usage("/dev/shm").free > need else None
    except OSError:
        return None


@contextlib.contextmanager
def as_without_bf16() -> Iterator[None]:
    """Unsloth's loader as on a GPU without bf16. There it turns the bf16 the trainer asks for into float16 ("Device
    does not support bfloat16. Will change to float16."), and for a family of its FORCE_FLOAT32 list it then loads
    the weights in bf16 and sets UNSLOTH_FORCE_FLOAT32 (unsloth/models/loader.py, FastModel.from_pretrained), under
    which its trainer patch trains with mixed precision "no" (unsloth/models/rl.py): no autocast. Here the loader is
    asked for float16 directly; the probe then runs without autocast."""
    import torch
    from unsloth import FastLanguageModel

    saved, original = FastLanguageModel.__dict__["from_pretrained"], FastLanguageModel.from_pretrained

    def float16(*args: Any, **kwargs: Any) -> Any:
        return original(*args, **{**kwargs, "dtype": torch.float16})

    FastLanguageModel.from_pretrained = staticmethod(float16)  # type: ignore[method-assign]
    try:
        yield
    finally:
        FastLanguageModel.from_pretrained = saved  # type: ignore[method-assign]


def refuse(message: str) -> None:
    """A job the probe cannot measure: one line on stderr and exit code 2, as the CLI's bad input; no row written."""
    print(f"rigplan probe: {message}", file=sys.stderr)
    raise SystemExit(2)


def run_job(job: Job, engine: str, out: Path, device: str, prov: dict[str, Any],
            min_timed_s: float = MIN_TIMED_S) -> None:
    import torch

    from rigplan.trainer.engine import load

    spec = reduced(resolve_model(job.model), job.layers)
    cuda = device.startswith("cuda")
    if job.gpu == "no-bf16" and not (engine == "unsloth" and cuda):  # before the replica is built
        refuse("gpu=no-bf16 stands for Unsloth's loader on a CUDA GPU: engine unsloth")
    # What an earlier job in this process left on the GPU (0.1-0.7 GiB on the H100: compiled kernels' buffers
    # and caches that outlive the model): recorded, so that the fit subtracts it (fit.parse_run).
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    start = {"start_alloc_gib": torch.cuda.memory_allocated() / GIB if cuda else None,
             "start_reserved_gib": torch.cuda.memory_reserved() / GIB if cuda else None}
    with tempfile.TemporaryDirectory(prefix="rigplan-replica-", dir=scratch_dir(spec)) as tmp:
        t0 = time.perf_counter()
        build_replica(spec, Path(tmp), device=device)
        build_s = time.perf_counter() - t0
        max_seq = max(s for _, s in job.shapes)
        plan = Plan(model=spec.id, model_path=tmp, gpu="", method=job.method, rank=job.rank, micro_batch=1,
                    grad_accum=1, seq_len=max_seq, optimizer=job.optimizer,  # type: ignore[arg-type]
                    checkpointing=job.checkpointing,  # type: ignore[arg-type]
                    target_modules=spec.target_modules, engine=engine)  # type: ignore[arg-type]
        t0 = time.perf_counter()
        with as_without_bf16() if job.gpu == "no-bf16" else contextlib.nullcontext():
            model, _tok = load(plan)
        load_s = time.perf_counter() - t0
        if job.gpu == "no-bf16" and not getattr(model, "_unsloth_forced_float32", False):
            # On such a GPU any other family trains in float16 under float16 autocast, which this does not stand for
            refuse(f"{job.model} is not one Unsloth trains in float32 without bf16")
        # Training mode, as TRL's trainer sets it: without it transformers skips gradient checkpointing
        # (`if self.gradient_checkpointing and self.training`), and the peak is that of no checkpointing.
        model.train()
        after_load = torch.cuda.memory_allocated() / GIB if cuda else None
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = job.optimizer if cuda else "adamw_torch"  # bitsandbytes needs CUDA
        if optimizer == "adamw_8bit":
            import bitsandbytes as bnb

            opt = bnb.optim.AdamW8bit(params, lr=1e-4)
        else:
            opt = torch.optim.AdamW(params, lr=1e-4)
        autocast = job.autocast if job.autocast != "auto" else (
            "bf16" if cuda and torch.cuda.is_bf16_supported() and job.gpu == "as-is" else "off")
        head = {"model": spec.id, "arch": job.model, "layers": spec.num_hidden_layers, "method": job.method,
                "rank": job.rank, "engine": engine, "optimizer": optimizer, "checkpointing": job.checkpointing,
                "autocast": autocast, "gpu_emulated": job.gpu,
                **({"labelled": job.labelled} if job.labelled < 1 else {}),
                "trainable_params": sum(p.numel() for p in params), "build_s": round(build_s, 1),
                "load_s": round(load_s, 1), "after_load_gib": after_load, **start,
                "alloc_conf": os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}
        for batch, seq in job.shapes:
            row = {**head, "batch": batch, "seq": seq, "err": None}
            try:
                row.update(measure_shape(model, opt, spec.vocab_size, batch, seq, device, min_timed_s, autocast,
                                         job.labelled))
            except torch.OutOfMemoryError as e:
                row["err"] = f"oom: {str(e).splitlines()[0][:200]}"
                opt.zero_grad(set_to_none=True)
            row["provenance"] = prov
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps({k: v for k, v in row.items() if k not in ("provenance", "step_times_s")}), flush=True)
        del model, opt, params
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", action="append", required=True, help="MODEL[@LAYERS]:METHOD:RANK:BxS,...")
    parser.add_argument("--engine", choices=["unsloth", "transformers"], default=None,
                        help="default: unsloth where it is installed and CUDA is present, else transformers")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--min-timed-s", type=float, default=MIN_TIMED_S,
                        help="time each shape at least this long after its warm-up step")
    args = parser.parse_args(argv)
    from rigplan.trainer.engine import configure_allocator, import_engine

    # The allocator `rigplan run` trains with (expandable segments), set before CUDA's first allocation: the slack
    # the fit learns from the probes is then the runs' own. (Earlier probes ran under torch's default allocator;
    # each row says which: alloc_conf.)
    configure_allocator()
    import torch

    import importlib.util

    device = "cuda" if torch.cuda.is_available() else "cpu"
    engine = args.engine or ("unsloth" if device == "cuda" and importlib.util.find_spec("unsloth") else "transformers")
    import_engine(engine)  # Unsloth before transformers, which the replica builder imports
    prov = provenance()
    for text in args.job:
        run_job(Job.parse(text), engine, args.out, device, prov, args.min_timed_s)


if __name__ == "__main__":
    main()
