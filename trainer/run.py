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
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rigplan.errors import ConfigError, DataError, RigplanError
from rigplan.estimator.plan import Plan
from rigplan.trainer import data as datalib
from rigplan.trainer.engine import Engine

# Hold out 5% for evaluation once a dataset has this many examples (fewer: every example trains).
EVAL_MIN_EXAMPLES = 200
DEFAULT_EVAL_FRACTION = 0.05
DEFAULT_PATIENCE = 3
DEFAULT_SAVE_STEPS = 50
# Written into a checkpoint once transformers has saved all of it; only such checkpoints are resumed from.
CHECKPOINT_COMPLETE = "rigplan_complete.json"
# Optimizer steps left out of the measured tokens/s: compile warm-up (15-40 s per new shape on the H100).
WARMUP_STEPS = 3
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + signal number, the shell's convention


@dataclass(frozen=True)
class RunOptions:
    """How to run a plan: data, output, and what to do with bad or long examples."""

    data: Path
    """JSONL or JSON file of text, Alpaca, chat or ShareGPT records."""
    out_dir: Path
    """Where plan.json, reports, checkpoints, the adapter and the Modelfile go."""
    skip_bad: bool = False
    """Drop bad records (and say how many) instead of stopping."""
    overlong: Literal["truncate", "drop"] = "truncate"
    """What to do with examples longer than the plan's sequence length."""
    overwrite: bool = False
    """Allow writing into a non-empty output directory."""
    resume: bool = False
    """Continue from the last checkpoint in the output directory."""
    eval_fraction: float | None = None
    """Share of examples held out; None: 5% from 200 examples on, else none."""
    patience: int = DEFAULT_PATIENCE
    """Evaluations without improvement before early stopping."""
    save_steps: int = DEFAULT_SAVE_STEPS
    """Optimizer steps between checkpoints (and evaluations)."""
    max_steps: int = -1
    """Stop after this many optimizer steps (-1: run the plan's epochs)."""
    merge: bool = False
    """Also write merged 16-bit weights."""
    engine: Engine | None = None
    """Force an engine ('unsloth' or 'hf'); None chooses by the machine."""


@dataclass(frozen=True)
class PreparedData:
    train: list[dict[str, list[int]]]
    eval: list[dict[str, list[int]]]
    report: dict[str, Any]


def check_out_dir(opts: RunOptions) -> None:
    """Never overwrite a run: a non-empty output directory needs --overwrite or --resume."""
    out = Path(opts.out_dir)
    if opts.resume:
        if _last_checkpoint(out) is None:
            raise ConfigError(f"{out}: no checkpoint to resume from; drop --resume to start a new run")
        return
    if out.exists() and any(out.iterdir()) and not opts.overwrite:
        raise ConfigError(f"{out} is not empty; pass --resume to continue that run, --overwrite to replace it, "
                          "or --out with a new directory")


def prepare_data(plan: Plan, tokenizer: Any, opts: RunOptions) -> PreparedData:
    """Validate every record (stop with line numbers unless skip_bad), tokenize, handle overlong examples,
    split off the eval set, and report lengths."""
    fmt, good, issues = datalib.validate(opts.data)
    if issues and not opts.skip_bad:
        raise DataError(datalib.issues_message(opts.data, issues))
    if getattr(tokenizer, "chat_template", None) is None and fmt in ("chat", "alpaca", "sharegpt"):
        tokenizer.chat_template = datalib.DEFAULT_CHAT_TEMPLATE
        template = "ChatML (rigplan's default: the tokenizer has no chat template)"
    else:
        template = "the tokenizer's own" if fmt != "text" else "none (text trains on everything)"
    rows, lengths, overlong = [], [], 0
    for _, record in good:
        ids, labels = datalib.tokenize(record, fmt, tokenizer)
        lengths.append(len(ids))
        if len(ids) > plan.seq_len:
            overlong += 1
            if opts.overlong == "drop":
                continue
            ids, labels = ids[: plan.seq_len], labels[: plan.seq_len]
        if any(x != -100 for x in labels):
            rows.append({"input_ids": ids, "labels": labels})
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
        "non_padding_share": non_padding_share([len(r["input_ids"]) for r in train_rows], plan.micro_batch, plan.seed),
    }
    return PreparedData(train_rows, eval_rows, report)


def non_padding_share(lengths: list[int], micro_batch: int, seed: int) -> float:
    """Expected share of real tokens when random micro-batches are padded to their longest example."""
    order = list(lengths)
    random.Random(seed).shuffle(order)
    batches = [order[i:i + micro_batch] for i in range(0, len(order), micro_batch)]
    padded = sum(max(b) * len(b) for b in batches)
    return round(sum(lengths) / padded, 4) if padded else 1.0


def sft_config_from_plan(plan: Plan, out_dir: Path, opts: RunOptions, has_eval: bool, cuda: bool,
                         bf16: bool) -> Any:
    """The one place a TRL SFTConfig is built. Fields set here differ from TRL's defaults or matter to
    rigplan; the rest are TRL's (https://huggingface.co/docs/trl/sft_trainer#trl.SFTConfig)."""
    import importlib.util

    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(out_dir / "checkpoints"),
        per_device_train_batch_size=plan.micro_batch,
        per_device_eval_batch_size=plan.micro_batch,
        gradient_accumulation_steps=plan.grad_accum,
        num_train_epochs=plan.epochs,
        max_steps=opts.max_steps,
        learning_rate=plan.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=5,  # Unsloth's notebooks
        weight_decay=0.01,
        optim="adamw_8bit" if cuda and plan.optimizer == "adamw_8bit" else "adamw_torch",
        bf16=cuda and bf16,
        fp16=cuda and not bf16,
        max_length=plan.seq_len,
        gradient_checkpointing=False,  # the engine set it up (Unsloth's or PEFT's)
        logging_steps=1,
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
        use_cpu=not cuda,
    )


class _Guard:
    """Signal flag, NaN watch and metrics log, as one TrainerCallback (built lazily: transformers is heavy)."""

    def __init__(self, out_dir: Path, tokens_per_step: float) -> None:
        self.out_dir = out_dir
        self.signal: int | None = None
        self.nan_step: int | None = None
        self.tokens_per_step = tokens_per_step
        self.t0 = time.perf_counter()
        self.step_times: list[float] = []
        self.backoffs: list[dict[str, int]] = []

    def note_backoff(self, step: int, micro_batch: int) -> None:
        """An out-of-memory error made the trainer split micro-batches: logged to metrics.jsonl and stderr."""
        self.backoffs.append({"step": step, "micro_batch": micro_batch})
        with (self.out_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"step": step, "event": "oom_backoff", "micro_batch": micro_batch}) + "\n")
        print(f"rigplan: CUDA out of memory at step {step}: micro-batch now {micro_batch}, accumulation doubled",
              file=sys.stderr, flush=True)

    def steady_tokens_per_s(self) -> float | None:
        """Tokens/s after the warm-up steps (Unsloth compiles each decoder block in the first ones)."""
        n = len(self.step_times)
        w = min(WARMUP_STEPS, n // 4)
        if n - w < 2:
            return None
        return round(self.tokens_per_step * (n - 1 - w) / (self.step_times[-1] - self.step_times[w]), 1)

    def handle(self, signum: int, _frame: Any) -> None:
        self.signal = signum  # acted on at the end of the current step: save, then stop

    def callback(self) -> Any:
        from transformers import TrainerCallback

        guard = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
                guard.step_times.append(time.perf_counter())
                if guard.signal is not None:
                    control.should_save = True
                    control.should_training_stop = True
                return control

            def on_save(self, args, state, control, **kwargs):  # noqa: ANN001
                # Called once transformers has written the whole checkpoint: mark it complete. Resume
                # uses only marked checkpoints, so one cut short by a crash is never resumed from.
                done = Path(args.output_dir) / f"checkpoint-{state.global_step}" / CHECKPOINT_COMPLETE
                if done.parent.is_dir():
                    done.write_text(json.dumps({"step": state.global_step}))
                return control

            def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
                logs = logs if logs is not None else {}
                loss = logs.get("loss", logs.get("eval_loss"))
                if loss is not None and not math.isfinite(loss):
                    guard.nan_step = state.global_step
                    control.should_training_stop = True
                    control.should_save = False
                elapsed = time.perf_counter() - guard.t0
                if "loss" in logs and elapsed:  # shown in the progress lines (this callback runs first)
                    logs["tokens_per_s"] = round(guard.tokens_per_step * len(guard.step_times) / elapsed, 1)
                row = {"step": state.global_step, "epoch": state.epoch, **logs}
                with (guard.out_dir / "metrics.jsonl").open("a") as f:
                    f.write(json.dumps(row) + "\n")
                return control

        return Callback()


def _trainer_class(guard: "_Guard") -> Any:
    """TRL's SFTTrainer with rigplan's out-of-memory backoff; where TRL's fused LM-head loss cannot run
    (its kernels need Triton, which CPU builds of torch lack: trl/kernels/chunked_logprob.py), computing the
    model's own causal-LM loss instead, the override TRL documents for a custom loss."""
    import torch
    from trl import SFTTrainer
    from trl.trainer import utils as trl_utils

    fused = getattr(trl_utils, "_ChunkedLogProbFunction", None) is not None

    class RigplanSFTTrainer(SFTTrainer):
        split = 1  # micro-batches are cut into this many parts after out-of-memory errors

        def training_step(self, model, inputs, num_items_in_batch=None):  # noqa: ANN001
            """On CUDA out-of-memory, halve the micro-batch (twice the accumulation) and redo this one:
            losses are normalised by the step's token count, so the parts add up to the same gradient."""
            while True:
                batch = next(v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor))
                size = -(-batch // self.split)
                saved = [(p, None if p.grad is None else p.grad.clone()) for p in model.parameters() if p.requires_grad]
                try:
                    total = None
                    for start in range(0, batch, size):
                        part = {k: v[start:start + size] if isinstance(v, torch.Tensor) and v.shape[:1] == (batch,)
                                else v for k, v in inputs.items()}
                        loss = super().training_step(model, part, num_items_in_batch)
                        total = loss if total is None else total + loss
                    return total
                except torch.OutOfMemoryError:
                    if size <= 1:
                        raise
                    for p, grad in saved:  # undo what the failed backward had accumulated
                        p.grad = grad
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    self.split *= 2
                    guard.note_backoff(self.state.global_step, -(-batch // self.split))

        if not fused:
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
                # The Trainer sums micro-batch losses over accumulation and expects each normalised by the
                # tokens of the whole step (num_items_in_batch), as the model's own loss does when given it.
                extra = {"num_items_in_batch": num_items_in_batch} if num_items_in_batch is not None else {}
                outputs = model(**inputs, **extra)
                return (outputs.loss, outputs) if return_outputs else outputs.loss

    return RigplanSFTTrainer


def _last_checkpoint(out_dir: Path) -> str | None:
    """The newest checkpoint transformers finished writing (marked by the guard's on_save)."""
    found = sorted((p for p in out_dir.glob("checkpoints/checkpoint-*") if (p / CHECKPOINT_COMPLETE).exists()),
                   key=lambda p: int(p.name.split("-")[-1]))
    return str(found[-1]) if found else None


def _measured(cuda: bool, trained_tokens: float, runtime_s: float, steady: float | None) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {"tokens_per_s": steady, "tokens_per_s_with_warmup":
                           round(trained_tokens / runtime_s, 1) if runtime_s else None}
    if cuda:
        from rigplan.profiles import nvml

        gib = 2**30
        out.update(peak_allocated_gib=round(torch.cuda.max_memory_allocated() / gib, 3),
                   peak_reserved_gib=round(torch.cuda.max_memory_reserved() / gib, 3), nvml_used_gib=nvml.used_gib())
    return out


def train(plan: Plan, opts: RunOptions) -> dict[str, Any]:
    """Run the plan. Returns what happened (`status`: done, interrupted, nan, early_stopped) and where the
    adapter is; raises RigplanError for what the user must fix, before anything loads where possible."""
    from rigplan.trainer.engine import choose_engine, import_engine, load, model_source

    check_out_dir(opts)
    engine = opts.engine or choose_engine()
    import_engine(engine)
    import torch
    from transformers import AutoTokenizer, EarlyStoppingCallback

    out = Path(opts.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path, local = model_source(plan.model_path)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
    prepared = prepare_data(plan, tokenizer, opts)  # every data problem surfaces before the model loads
    (out / "plan.json").write_text(plan.to_json() + "\n")
    (out / "data_report.json").write_text(json.dumps(prepared.report, indent=2) + "\n")

    from datasets import Dataset
    from transformers import set_seed

    cuda = torch.cuda.is_available()
    # PEFT draws the adapters' initial weights from the global RNG at load time, before the Trainer seeds:
    # seed first, or two runs of one plan start from different adapters.
    set_seed(plan.seed)
    model, tokenizer = load(plan, engine)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    has_eval = bool(prepared.eval)
    args = sft_config_from_plan(plan, out, opts, has_eval, cuda, cuda and torch.cuda.is_bf16_supported())
    avg_len = prepared.report["tokens"] / max(1, prepared.report["examples"])
    guard = _Guard(out, avg_len * plan.micro_batch * plan.grad_accum)
    callbacks = [guard.callback()] + ([EarlyStoppingCallback(early_stopping_patience=opts.patience)] if has_eval else [])
    trainer = _trainer_class(guard)(model=model, args=args, train_dataset=Dataset.from_list(prepared.train),
                               eval_dataset=Dataset.from_list(prepared.eval) if has_eval else None,
                               processing_class=tokenizer, callbacks=callbacks)
    handler = trainer.callback_handler  # our callback first, so the progress printer shows its tokens/s
    handler.callbacks.insert(0, handler.callbacks.pop(handler.callbacks.index(callbacks[0])))
    previous = {s: signal.signal(s, guard.handle) for s in EXIT_SIGNAL}
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        checkpoint = _last_checkpoint(out) if opts.resume else None
        start_step = int(checkpoint.rsplit("-", 1)[-1]) if checkpoint else 0
        t0 = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=checkpoint)
        runtime = time.perf_counter() - t0
    except torch.OutOfMemoryError as e:  # even one sequence per micro-batch does not fit
        raise RigplanError(f"CUDA out of memory at step {trainer.state.global_step} with one sequence per "
                           f"micro-batch; resume with --resume --seq {plan.seq_len // 2} or --method qlora "
                           f"(last checkpoint: {_last_checkpoint(out)})") from e
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

    from rigplan.trainer.export import write_outputs

    status = ("interrupted" if guard.signal is not None else "nan" if guard.nan_step is not None
              else "early_stopped" if has_eval and trainer.state.global_step < trainer.state.max_steps else "done")
    measured = _measured(cuda, guard.tokens_per_step * (trainer.state.global_step - start_step), runtime,
                         guard.steady_tokens_per_s())
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    summary = {"status": status, "engine": engine, "global_step": trainer.state.global_step,
               "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
               "best_eval_loss": min(evals) if evals else None, "train_runtime_s": round(runtime, 2),
               "train_loss": getattr(result, "training_loss", None), "measured": measured,
               "predicted": {"peak_allocated_gib": plan.peak_allocated_gib, "peak_reserved_gib": plan.peak_reserved_gib,
                             "total_gib": plan.total_gib, "tokens_per_s": plan.tokens_per_s},
               "oom_backoffs": guard.backoffs, "signal": guard.signal, "exit_code": EXIT_SIGNAL.get(guard.signal, 0) if guard.signal else 0}
    if status == "nan":
        summary["message"] = (f"loss became NaN or infinite at step {guard.nan_step}; last good checkpoint: "
                              f"{_last_checkpoint(out)}; lower the learning rate and --resume")
        (out / "run_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary
    summary.update(write_outputs(trainer.model, tokenizer, plan, out, prepared.report, summary, opts.merge))
    (out / "run_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
