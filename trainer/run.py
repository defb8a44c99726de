"""Train a Plan with TRL's SFTTrainer: data checked before the model loads, safe stop on Ctrl-C/SIGTERM,
resume, NaN stop, eval with early stopping, and measured memory/speed saved beside the plan's prediction.

TRL and transformers own the loop, gradient accumulation and checkpoints; this module adds what they lack.
The trainer never re-plans: it runs the Plan it is given.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import resource
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rigplan import data as datalib
from rigplan.errors import ConfigError, DataError, RigplanError, require
from rigplan.estimator.plan import Plan
from rigplan.trainer.batching import PackedCollator, PaddedCollator, grouped_rows, packed_rows, padded_length
from rigplan.trainer.distributed import hold, leave, world
from rigplan.trainer.loop import (  # noqa: F401  (re-exported: tests and bench import them from here)
    WARMUP_STEPS, MemorySampler, _all_ranks, _Guard, _trainer_class, cuda_uuid, examples_in, progress_callback,
    split_micro_batch)
from rigplan.trainer.options import (  # noqa: F401  (RunOptions and the checks are re-exported: callers import them here)
    CHECKPOINT_COMPLETE, DEFAULT_EVAL_FRACTION, DEFAULT_PATIENCE, DEFAULT_SAVE_STEPS, EVAL_MIN_EXAMPLES, RunOptions,
    check_options, check_out_dir, checkpoint_step, option_problems, out_dir_problems, resume_point, resume_problems,
    trim_metrics)

# On CUDA, log about this often rather than every step: a log is a host-device sync (the loss read with .item(),
# transformers/trainer.py:2175) and the logging callbacks, milliseconds, under 1% of 5 s.
LOG_EVERY_S = 5.0
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + signal number, the shell's convention


@dataclass(frozen=True)
class PreparedData:
    train: list[dict[str, list[int]]]
    eval: list[dict[str, list[int]]]
    report: dict[str, Any]


def prepare_data(plan: Plan, tokenizer: Any, opts: RunOptions) -> PreparedData:
    """Validate every record (stop with line numbers unless skip_bad), tokenize, handle overlong examples,
    split off the eval set, report lengths, and lay out the micro-batches as the plan says (trainer/batching.py):
    padded groups of micro_batch examples of similar length, or packed rows within the token budget."""
    fmt, good, issues = datalib.validate(opts.data)
    if issues and not opts.skip_bad:
        raise DataError(datalib.issues_message(opts.data, issues))
    template = datalib.use_template(tokenizer, fmt)
    rows, lengths, overlong, answerless = [], [], 0, []
    for line, record in good:
        ids, labels = datalib.tokenize(record, fmt, tokenizer)
        lengths.append(len(ids))
        if len(ids) > plan.seq_len:
            overlong += 1
            if opts.overlong == "drop":
                continue
            ids, labels = ids[: plan.seq_len], labels[: plan.seq_len]
        if any(x != -100 for x in labels):
            rows.append({"input_ids": ids, "labels": labels})
        else:  # the prompt filled the sequence: nothing of the answer is left to train on
            answerless.append(line)
    if answerless:
        warnings.warn(f"rigplan: {len(answerless)} example(s) lost their whole answer to truncation at seq "
                      f"{plan.seq_len} and are left out (line(s) {', '.join(map(str, answerless[:5]))}"
                      f"{', ...' if len(answerless) > 5 else ''}); pass a longer --seq to train on them",
                      stacklevel=2)
    if not rows:
        raise DataError(f"{opts.data}: no example left to train on after validation and --overlong {opts.overlong}")
    fraction = opts.eval_fraction
    if fraction is None:
        fraction = DEFAULT_EVAL_FRACTION if len(rows) >= EVAL_MIN_EXAMPLES else 0.0
    order = list(range(len(rows)))
    random.Random(plan.seed).shuffle(order)
    n_eval = int(len(rows) * fraction)
    eval_rows = [rows[i] for i in order[:n_eval]]
    train_rows = [rows[i] for i in order[n_eval:]]
    report = {
        "file": str(opts.data), "format": fmt, "chat_template": template, "records": len(good) + len(issues),
        "bad_records": len(issues), "bad_shown": [dataclasses.asdict(i) for i in issues[: datalib.MAX_SHOWN]],
        "skipped_bad": len(issues) if opts.skip_bad else 0, "examples": len(rows), "train_examples": len(train_rows),
        "eval_examples": len(eval_rows), "tokens": sum(lengths),
        "trained_tokens": sum(sum(x != -100 for x in r["labels"]) for r in rows),
        "length_p50": datalib.percentile(lengths, 50), "length_p95": datalib.percentile(lengths, 95),
        "length_max": max(lengths), "seq_len": plan.seq_len, "overlong": overlong,
        "overlong_share": round(overlong / len(lengths), 4), "overlong_action": opts.overlong,
        "answer_truncated_away": len(answerless),
    }
    real = sum(len(r["input_ids"]) for r in train_rows)
    random_fill = non_padding_share([len(r["input_ids"]) for r in train_rows], plan.micro_batch, plan.seed)
    if plan.batching == "packed":
        train_rows, eval_rows = packed_rows(train_rows, plan.budget), packed_rows(eval_rows, plan.budget)
    else:
        train_rows = grouped_rows(train_rows, plan.micro_batch)
        eval_rows = grouped_rows(eval_rows, plan.micro_batch)
    sizes = [batch_tokens(r, plan) for r in train_rows]
    # Packed rows are at most the budget, and fill counts each whole (as the estimate's packing_fill does).
    computed = len(train_rows) * plan.budget if plan.batching == "packed" else sum(sizes)
    report.update(batching=plan.batching, token_budget=plan.budget, micro_batches=len(train_rows),
                  micro_batch_tokens_max=max(sizes), fill=round(real / computed, 4),
                  examples_per_micro_batch=round(report["train_examples"] / len(train_rows), 2),
                  random_padded_fill=random_fill)  # had micro_batch examples been padded in random order
    return PreparedData(train_rows, eval_rows, report)


def dry_run_report(plan: Plan, opts: RunOptions) -> dict[str, Any]:
    """What a run would train on (the data report, tokenized with the model's tokenizer), without training."""
    from rigplan.trainer.engine import import_engine, model_source, require_weights

    require_weights(plan.model_path)
    cuda = _cuda()
    if plan.gpu != "cpu" and not cuda:
        warnings.warn(f"rigplan: {no_cuda_message(plan)}", stacklevel=2)
    if plan.engine == "unsloth" and cuda:
        import_engine(plan.engine)
    from transformers import AutoTokenizer

    path, local = model_source(plan.model_path)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
    return {"plan": json.loads(plan.to_json()), "data_report": prepare_data(plan, tokenizer, opts).report}


def no_cuda_message(plan: Plan) -> str:
    return (f"this plan is for {plan.gpu}, but this machine has no CUDA GPU: its memory and speed would not "
            f"hold; train it on a {plan.gpu}, or plan for this machine with rigplan run {plan.model} --gpu auto")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def batch_tokens(row: dict[str, Any], plan: Plan) -> int:
    """Tokens a micro-batch computes, padding included: at most the plan's token budget."""
    if plan.batching == "packed":
        return len(row["input_ids"])
    return len(row["input_ids"]) * padded_length(max(map(len, row["input_ids"])), plan.seq_len, plan.pad_multiple)


def non_padding_share(lengths: list[int], micro_batch: int, seed: int) -> float:
    """Expected share of real tokens when random micro-batches are padded to their longest example."""
    order = list(lengths)
    random.Random(seed).shuffle(order)
    batches = [order[i:i + micro_batch] for i in range(0, len(order), micro_batch)]
    padded = sum(max(b) * len(b) for b in batches)
    return round(sum(lengths) / padded, 4) if padded else 1.0


def logging_steps(step_s: float, save_steps: int) -> int:
    """Optimizer steps between logs: about LOG_EVERY_S of predicted step time, and a divisor of save_steps,
    so that a log (and its NaN check) comes right before every checkpoint is written."""
    target = math.ceil(LOG_EVERY_S / step_s) if step_s > 0 else 1
    return max(n for n in range(1, max(1, min(target, save_steps)) + 1) if save_steps % n == 0 or n == 1)


def keep_off_gpu_until_sharded(args: Any, plan: Plan) -> None:
    """A sharded plan's model stays where it loaded until FSDP shards it. Unsloth's SFTTrainer turns on 16-bit full
    evaluation (unsloth/models/rl.py, 2026.10.9: `args.bf16_full_eval = args.bf16`), and with it transformers'
    train() moves the whole model onto the GPU before accelerate shards it (transformers 5.17 trainer.py train():
    "Move the model now for training"): each process of the 80-layer 70B QLoRA held all of its 4-bit weights,
    38.6 GiB, against a plan of 19.2 (bench/results/h200x2-fsdp/full-depth/, the memory snapshot's stacks).
    Sharded evaluation runs in FSDP's mixed precision instead."""
    if plan.parallelism == "fsdp":
        args.bf16_full_eval = args.fp16_full_eval = False


def sft_config_from_plan(plan: Plan, out_dir: Path, opts: RunOptions, has_eval: bool, cuda: bool,
                         bf16: bool) -> Any:
    """The one place a TRL SFTConfig is built. Fields set here differ from TRL's defaults or matter to
    rigplan; the rest are TRL's (https://huggingface.co/docs/trl/sft_trainer#trl.SFTConfig)."""
    import importlib.util

    from trl import SFTConfig

    return SFTConfig(
        # Each dataset row is already one micro-batch within the token budget, collated by trainer/batching.py
        # (packed: position_ids restart at each example, so Unsloth attends within examples and transformers
        # builds a block-diagonal mask from them when no cache is passed, transformers/masking_utils.py).
        # TRL's own padding-free collator and packing stay off: explicit, because Unsloth turns an unset
        # padding_free on by itself (unsloth/trainer.py); a custom collator makes it leave both off.
        padding_free=False,
        # prepare_data has already cut or dropped every example longer than the plan's seq_len.
        max_length=None,
        output_dir=str(out_dir / "checkpoints"),
        per_device_train_batch_size=1,  # each dataset row is one micro-batch (trainer/batching.py)
        per_device_eval_batch_size=1,
        gradient_accumulation_steps=plan.grad_accum,
        num_train_epochs=plan.epochs,
        max_steps=opts.max_steps,
        learning_rate=plan.learning_rate,
        lr_scheduler_type=plan.lr_scheduler,
        warmup_steps=plan.warmup_steps,
        weight_decay=plan.weight_decay,
        optim="adamw_8bit" if cuda and plan.optimizer == "adamw_8bit" else "adamw_torch",
        bf16=cuda and bf16,
        fp16=cuda and not bf16,
        gradient_checkpointing=False,  # the engine set it up (Unsloth's or PEFT's)
        logging_steps=logging_steps(plan.step_s, opts.save_steps) if cuda else 1,
        # transformers' default (True) replaces a NaN or infinite loss by the running mean, which hid NaNs from
        # the guard, and reads each micro-batch's loss on the host, a sync (transformers/trainer.py:1843-1849).
        logging_nan_inf_filter=False,
        save_strategy="steps",
        save_steps=opts.save_steps,
        save_total_limit=2,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=opts.save_steps if has_eval else None,
        load_best_model_at_end=has_eval,
        metric_for_best_model="eval_loss" if has_eval else None,
        greater_is_better=False if has_eval else None,
        seed=plan.seed,
        data_seed=plan.seed,
        report_to=["tensorboard"] if importlib.util.find_spec("tensorboard") else "none",
        dataloader_pin_memory=cuda,
        # Micro-batches copied to the GPU from pinned memory without the host waiting for the copy (accelerate's
        # default waits, and with it for every kernel queued before it: each step's host work then ran with the
        # GPU idle).
        accelerator_config={"non_blocking": cuda},
        use_cpu=not cuda,
        # Several processes (trainer/distributed.py): NCCL on GPUs, gloo on CPUs (process_backend); every adapter
        # gets a gradient, so DDP need not search for unused parameters each step. No buffer broadcast before
        # forward passes: the buffers (rotary frequencies) are the same in every process, and a micro-batch redone
        # after an out-of-memory error would broadcast in one process alone (loop.py training_step).
        ddp_backend=process_backend(plan, cuda, world().world_size),
        ddp_find_unused_parameters=False,
        ddp_broadcast_buffers=False,
        **fsdp_arguments(plan, cuda),
    )


def process_backend(plan: Plan, cuda: bool, world_size: int) -> str | None:
    """torch.distributed's backend for several processes (None: accelerate's default, NCCL on GPUs). On GPUs a
    sharded plan that offloads to the CPU keeps its gradients in CPU memory, and clipping them all-reduces CPU
    tensors, which NCCL cannot carry: gloo carries the CPU collectives beside NCCL ("cuda:nccl,cpu:gloo", the
    backend accelerate itself picks for FSDP_OFFLOAD_PARAMS). Without it two H200s failed at the first step's
    clip_grad_norm_, "No backend type associated with device type cpu"
    (bench/results/h200x2-fsdp/offload-prequantized/fsdp-offload-failed.log)."""
    if world_size == 1:
        return None
    if not cuda:
        return "gloo"
    return "cuda:nccl,cpu:gloo" if plan.parallelism == "fsdp" and plan.cpu_offload else None


def fsdp_arguments(plan: Plan, cuda: bool) -> dict[str, Any]:
    """A sharded plan's FSDP2 settings for transformers' Trainer (through accelerate; TrainingArguments
    `fsdp_config`, https://huggingface.co/docs/transformers/main/en/fsdp): each decoder layer its own shard unit
    (the model's _no_split_modules), resharded after its forward pass (estimator/memory.py FSDP_GATHERED_LAYERS),
    the plan's checkpointing as FSDP's activation checkpointing (transformers: "prefer activation_checkpointing
    ... over gradient_checkpointing"), parameters offloaded to CPU where the plan offloads, the weights read
    from disk by rank 0 alone and broadcast to the others on GPUs (cpu_ram_efficient_loading; the others still
    hold full-size zeros in CPU memory to receive them: estimator/memory.py cpu_memory_bytes), and checkpoints
    sharded, one file per process, so no process gathers the whole model to save. Empty for one GPU or DDP."""
    if plan.parallelism != "fsdp":
        return {}
    return {"fsdp": True, "fsdp_config": {
        "version": 2, "reshard_after_forward": True, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "activation_checkpointing": plan.checkpointing != "off", "cpu_offload": plan.cpu_offload,
        "cpu_ram_efficient_loading": cuda, "state_dict_type": "SHARDED_STATE_DICT"}}


def _last_checkpoint(out_dir: Path) -> str | None:
    """The newest checkpoint transformers finished writing (marked by the guard's on_save)."""
    return resume_point(out_dir)[0]


def _measured(cuda: bool, trained_tokens: float, runtime_s: float, steady: float | None,
              nvml_peak: float | None = None, compiled: float | None = None,
              compile_steps: int | None = None, cpu_peaks: dict[str, float] | None = None) -> dict[str, Any]:
    import torch

    # The process's largest resident set so far (Linux counts KiB): what the plan's cpu_memory_gib is for (loading,
    # CPU offload), summed over a run's processes (loop.py _all_ranks).
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out: dict[str, Any] = {"tokens": round(trained_tokens), "tokens_per_s": steady, "tokens_per_s_with_warmup":
                           round(trained_tokens / runtime_s, 1) if runtime_s else None,
                           "tokens_per_s_compiled": compiled, "compile_steps": compile_steps,
                           "cpu_peak_rss_gib": round(rss_gib, 3),
                           # by kind while training (loop.py resident_gib): the process's own, a mapped checkpoint's,
                           # shared memory
                           **{k: round(v, 3) for k, v in (cpu_peaks or {}).items()}}
    if cuda:
        from rigplan.profiles import nvml

        gib = 2**30
        out.update(peak_allocated_gib=round(torch.cuda.max_memory_allocated() / gib, 3),
                   peak_reserved_gib=round(torch.cuda.max_memory_reserved() / gib, 3),
                   nvml_peak_used_gib=round(nvml_peak, 3) if nvml_peak is not None else None,
                   nvml_used_after_gib=nvml.used_gib(uuid=cuda_uuid()))
    return out


def ranks_agree(model: Any) -> bool:
    """Whether every process holds the same trainable weights (DDP): the sum and the sum of squares of each
    process's adapter, compared across processes. DDP keeps replicas equal only if every gradient is all-reduced;
    a run where they drift has trained something no process holds whole."""
    import torch
    import torch.distributed as dist

    params = [p.detach().double() for p in model.parameters() if p.requires_grad]
    local = torch.stack([sum(p.sum() for p in params), sum((p * p).sum() for p in params)])
    both = torch.cat([local, -local]).to("cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(both, op=dist.ReduceOp.MAX)  # the largest of each, and of its negation: the smallest
    return bool(torch.allclose(both[:2], -both[2:], rtol=1e-9, atol=1e-12))


def _ranks_agree_or_none(model: Any) -> bool | None:
    """ranks_agree, or None (with a warning) where the comparison itself fails: a check must not cost the
    trained adapter, which is written after it."""
    try:
        return ranks_agree(model)
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"rigplan: could not compare the processes' adapters ({e})", stacklevel=1)
        return None


def check_plan(plan: Plan) -> None:
    """What this trainer cannot train, refused before anything loads: a sharded plan on Unsloth, which has no
    FSDP (the planner's FSDP plans are transformers + PEFT)."""
    if plan.parallelism == "fsdp" and plan.engine == "unsloth":
        raise ConfigError(f"this plan shards the model over {plan.num_gpus} GPUs (FSDP) on Unsloth, which does not "
                          "shard models; pass --engine transformers, or --parallelism ddp")
    if plan.parallelism == "fsdp" and plan.gpu == "cpu":  # accelerate/state.py: FSDP for GPU processes only
        raise ConfigError("FSDP shards a model over GPUs (accelerate turns it on for GPU processes only); on CPU "
                          "processes pass --parallelism ddp")
    processes = world().world_size
    if processes > 1 and processes != plan.num_gpus:  # started under a launcher with another count
        fix = ("pass --parallelism ddp or fsdp to spread it over them, or start one process" if plan.num_gpus == 1
               else f"start {plan.num_gpus}, or make the plan for {processes} (rigplan plan --gpus {processes})")
        raise ConfigError(f"{processes} processes were started for a plan that trains on {plan.num_gpus} GPU(s); "
                          + fix)


def train(plan: Plan, opts: RunOptions) -> dict[str, Any]:
    """Run the plan with the engine it names. Returns what happened (`status`: done, interrupted, nan,
    early_stopped), where the adapter is, what was measured beside what the plan predicted, and the provenance;
    raises RigplanError for what the user must fix, before anything loads where possible."""
    from rigplan.trainer.engine import (float16_refusal, import_engine, load, model_source, provenance,
                                        require_float_storage, require_weights)

    check_options(opts)
    check_plan(plan)
    if opts.resume:
        require(resume_problems(plan, opts.out_dir))
    # One process for a plan of several GPUs (several processes of another count: check_plan); rigplan run starts
    # one process per GPU (cli.py _relaunch).
    if world().world_size == 1 < plan.num_gpus:
        raise ConfigError(f"this plan trains on {plan.num_gpus} GPUs: start it with rigplan run (one process per "
                          "GPU under torchrun), or pass --gpus 1")
    import torch

    cuda = torch.cuda.is_available()
    if plan.gpu != "cpu" and not cuda:
        raise ConfigError(no_cuda_message(plan))
    if plan.method == "qlora" and not cuda:  # said here, not once the tokenizer and data are done
        raise ConfigError("QLoRA needs a CUDA GPU (bitsandbytes 4-bit); pass --method lora on this machine")
    require_weights(plan.model_path)  # in a second when offline, not after a minute of retries
    # What Unsloth would refuse once the tokenizer and data are done, said now
    refusal = (float16_refusal(*model_source(plan.model_path), plan.method, torch.cuda.is_bf16_supported())
               if plan.engine == "unsloth" and cuda else None)
    if refusal:
        raise ConfigError(refusal)
    import_engine(plan.engine)  # Unsloth before transformers, peft and trl: it patches them on import
    from transformers import AutoConfig, AutoTokenizer, EarlyStoppingCallback

    out = Path(opts.out_dir)
    checkpoint = _last_checkpoint(out) if opts.resume else None
    path, local = model_source(plan.model_path)
    if plan.load_on_cpu:  # a 4-bit checkpoint FSDP cannot shard is refused before the tokenizer and data
        require_float_storage(AutoConfig.from_pretrained(path, local_files_only=local), path)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
    prepared = prepare_data(plan, tokenizer, opts)  # every data problem surfaces before the model loads

    from datasets import Dataset
    from transformers import set_seed

    # PEFT draws the adapters' initial weights from the global RNG at load time, before the Trainer seeds:
    # seed first, or two runs of one plan start from different adapters.
    set_seed(plan.seed)
    has_eval, bf16 = bool(prepared.eval), cuda and torch.cuda.is_bf16_supported()
    args = None
    if plan.parallelism == "fsdp":  # before loading: the Trainer's arguments tell transformers to load through rank 0
        args = sft_config_from_plan(plan, out, opts, has_eval, cuda, bf16)
    model, tokenizer = load(plan)
    # Written once the model has loaded: a run stopped before (Ctrl-C, a failed download) leaves --out as it was.
    main = world().main  # several processes: rank 0 alone writes
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "plan.json").write_text(plan.to_json() + "\n")
        (out / "data_report.json").write_text(json.dumps(prepared.report, indent=2) + "\n")
        if checkpoint:
            trim_metrics(out, checkpoint_step(Path(checkpoint)))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if args is None:
        args = sft_config_from_plan(plan, out, opts, has_eval, cuda, bf16)
    guard = _Guard(out, torch.cuda.synchronize if cuda else None, plan.micro_batch)
    callbacks = [guard.callback()] + ([EarlyStoppingCallback(early_stopping_patience=opts.patience)] if has_eval else [])
    collator = (PackedCollator(tokenizer.pad_token_id) if plan.batching == "packed"
                else PaddedCollator(tokenizer.pad_token_id, plan.seq_len, plan.pad_multiple))
    trainer = _trainer_class(guard, plan.engine)(
        model=model, args=args, train_dataset=Dataset.from_list(prepared.train),
        eval_dataset=Dataset.from_list(prepared.eval) if has_eval else None, processing_class=tokenizer,
        callbacks=callbacks, data_collator=collator)
    keep_off_gpu_until_sharded(trainer.args, plan)
    if world().world_size > 1:  # the process group lives as long as the process (distributed.exit_now)
        hold(trainer)
    handler = trainer.callback_handler  # our callback first, so the progress printer shows its tokens/s
    handler.callbacks.insert(0, handler.callbacks.pop(handler.callbacks.index(callbacks[0])))
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for printer in (ProgressCallback, PrinterCallback):  # each log as one readable line instead of a dict
        trainer.remove_callback(printer)
    trainer.add_callback(progress_callback())
    previous = {s: signal.signal(s, guard.handle) for s in EXIT_SIGNAL}
    sampler = MemorySampler(gpu=cuda)
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        sampler.start()
        t0 = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=checkpoint)
        runtime = time.perf_counter() - t0
    except torch.OutOfMemoryError as e:  # even one example per micro-batch does not fit
        asked = re.search(r"Tried to allocate [\d.]+ [KMG]iB", str(e))
        held = (f"{asked.group(0).lower() if asked else 'ran out'} with {torch.cuda.max_memory_reserved() / 2**30:.1f}"
                f" GiB reserved, the plan {plan.peak_reserved_gib:.1f}") if cuda else "ran out"
        where = ("with one example per micro-batch" if plan.parallelism != "fsdp" else
                 f"on process {world().rank} (sharded runs do not split micro-batches)")
        if world().world_size > 1 and plan.parallelism != "fsdp":
            where += f" on process {world().rank}"
        qlora = " or --method qlora" if plan.method == "lora" else ""
        raise RigplanError(f"CUDA out of memory at step {trainer.state.global_step} {where} ({held}); resume with "
                           f"--resume --seq {plan.seq_len // 2}{qlora} "
                           f"(last checkpoint: {_last_checkpoint(out)})") from e
    finally:
        guard.gc.stop()  # the automatic collector back on, whatever ended training
        nvml_peak = sampler.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)

    from rigplan.trainer.export import full_adapter_state, write_outputs

    status = ("interrupted" if guard.signal is not None else "nan" if guard.nan_step is not None
              else "early_stopped" if has_eval and trainer.state.global_step < trainer.state.max_steps else "done")
    measured = _measured(cuda, float(guard.tokens), runtime, guard.steady_tokens_per_s(), nvml_peak,
                         guard.compiled_tokens_per_s(), len(guard.compiling), sampler.cpu_peaks)
    # Each optimizer step's seconds (this process's clock; only the warm-up's end, the last and those that met a new
    # shape are synchronised with the GPU): where compiling a new shape or a slow GPU stalled the run.
    measured["step_seconds"] = guard.step_seconds()
    measured["gc"] = guard.gc.summary()  # Python's collections while training (trainer/loop.py GcWatch)
    # What ran, not what was asked: the Trainer's FSDP wrapping, if any (accelerate's plugin)
    parallelism = ("fsdp" if getattr(trainer, "is_fsdp_enabled", False)
                   else "ddp" if world().world_size > 1 else "single")
    agree = _ranks_agree_or_none(trainer.model) if parallelism == "ddp" else None
    if world().world_size > 1:  # after the comparison: the last collective, so that none is in flight at exit
        measured = _all_ranks(measured, cuda)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    summary = {"status": status, "engine": plan.engine, "gpu": plan.gpu, "method": plan.method,
               "global_step": trainer.state.global_step,
               "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
               "best_eval_loss": min(evals) if evals else None, "train_runtime_s": round(runtime, 2),
               "train_loss": getattr(result, "training_loss", None), "measured": measured,
               "predicted": {"peak_allocated_gib": plan.peak_allocated_gib, "peak_reserved_gib": plan.peak_reserved_gib,
                             "total_gib": plan.total_gib, "tokens_per_s": plan.tokens_per_s,
                             "tokens_per_s_band": [plan.tokens_per_s_low, plan.tokens_per_s_high]},
               "data": {k: prepared.report.get(k) for k in ("examples", "tokens", "length_p50", "length_p95",
                                                            "length_max", "batching", "token_budget", "fill",
                                                            "micro_batches", "micro_batch_tokens_max")},
               "oom_backoffs": guard.backoffs, "signal": guard.signal,
               "exit_code": EXIT_SIGNAL.get(guard.signal, 0) if guard.signal else 0, "provenance": provenance()}
    summary["world_size"] = world().world_size
    summary["parallelism"] = parallelism
    if parallelism == "ddp":  # every process must end with the same adapter, or the run is wrong
        summary["ranks_agree"] = agree
        if agree is False and main:
            warnings.warn("rigplan: the processes ended with different adapters (DDP should keep them equal); the "
                          "adapter written is process 0's: train on one GPU to compare", stacklevel=1)
    # Sharded: every process takes part in gathering the adapter (the last collective); rank 0 writes it.
    adapter_state = (full_adapter_state(trainer.model) if plan.parallelism == "fsdp" and status != "nan" else None)
    # Every process leaves the group before rank 0 writes: writing needs no collective, and a merge of a large model
    # can outlast the group's timeout (ddp_timeout, 30 min), which a process waiting at a barrier would hit.
    leave()
    if status == "nan":
        summary["message"] = (f"loss became NaN or infinite by step {guard.nan_step}; last good checkpoint: "
                              f"{_last_checkpoint(out)}; lower the learning rate and --resume")
        if main:
            (out / "run_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary
    if main:
        summary.update(write_outputs(trainer.model, tokenizer, plan, out, prepared.report, summary, opts.merge,
                                     adapter_state))
        (out / "run_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
